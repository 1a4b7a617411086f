"""Weight matrices as y = x Wᵀ, kept in the file's quantised form when we have kernels for it.

* :class:`QuantizedLinear` — Q4_1, Q4_K, Q8_0, Q5_0 or Q6_K blocks, repacked once at load (see
  :mod:`mqa_gen.kernels.quant`). One row of x (a single sequence's decode step) runs the quantised
  matrix × vector kernel, reading 5 (4-bit) or 8–9 (int8) bits per weight instead of 32; a few rows
  (a batch of sequences decoding together, a short chat turn) run a kernel that unpacks each weight
  once for all of them, so a batched decode step reads every matrix once. Many rows (a prefill)
  dequantise the matrix into a temporary float32 array and multiply with BLAS through NumPy:
  prompt-sized products are compute-bound, and no float32 copy outlives the call.
  With int8 dot products switched on (:meth:`QuantizedLinear.set_int8_dot`, the CLI's
  ``--int8-dot``), every product, whatever its row count, rounds its input rows to 8 bits and
  multiplies integer codes (:mod:`mqa_gen.kernels.int8_dot`): a prefill runs the same kernel as a
  decode step, about twice as fast as dequantising + BLAS with AVX-512 VNNI (BENCHMARKS.md).
* :class:`DenseLinear` — a float32 matrix (F32/F16 tensors, other quantisation types, and the
  K/V projections that ``--kv-heads`` rewrites).
"""

from __future__ import annotations

import numpy as np

from .gguf_file import GGUFFile
from .kernels import int8_dot
from .kernels.quant import (
    tile_rows,
    untile_rows,
    q4_1_dequantize_rows,
    q4_1_dequantize_transposed,
    q4_1_matmul,
    q4_1_matvec,
    q4_1_matvec3,
    int8_dequantize_rows,
    int8_dequantize_transposed,
    int8_matmul,
    int8_matvec,
    int8_matvec3,
    repack_q4_1,
    repack_q4_k,
    repack_q5_0,
    repack_q6_k,
    repack_q8_0,
)
from .weights import check_finite, require_tensor, tensor_f32

#: Tensor types kept quantised in memory (others are dequantised to float32 at load), with the
#: repacking into the kernels' layout (see :mod:`mqa_gen.kernels.quant`) and the row length unit.
REPACKERS = {"Q4_1": (repack_q4_1, 32), "Q4_K": (repack_q4_k, 256),
             "Q8_0": (repack_q8_0, 32), "Q5_0": (repack_q5_0, 32), "Q6_K": (repack_q6_k, 256)}
QUANTIZED_KERNEL_TYPES = tuple(REPACKERS)

#: Up to this many rows of x (a decode step of up to 64 sequences, a short prompt), quantised
#: products unpack each weight once for all rows; above it (prefill chunks), dequantising the matrix
#: and calling BLAS is faster (it amortises over the rows). Measured here on SmolLM2's 1536×576
#: Q4_1 and 49152×576 Q8_0 matrices: the kernel took 1/4 to 2/3 of dequantise + BLAS at 16, 32 and
#: 64 rows. Within this limit every row's result is independent of the other rows, bit for bit
#: (tests/test_scheduler.py), so a sequence decodes the same text in any batch.
SMALL_BATCH = 64


class DenseLinear:
    """y = x Wᵀ with a dense W [out_features, in_features], float32 (float64 when asked: the
    trainable :class:`~mqa_gen.layer.MultiQueryAttention` may hold float64 weights).

    Args:
        weight: [out_features, in_features], any real dtype.
        dtype: the dtype to hold (float32 by default).
    """

    def __init__(self, weight: np.ndarray, dtype=np.float32):
        self.weight = np.ascontiguousarray(weight, dtype=dtype)
        self.out_features, self.in_features = self.weight.shape

    @property
    def nbytes(self) -> int:
        """Bytes of weight data held."""
        return self.weight.nbytes

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: float32 [T, in_features] → float32 [T, out_features].

        Up to :data:`SMALL_BATCH` rows (a decode step) go row by row through BLAS's matrix × vector,
        so each row's result is what it would be alone: a matrix product may sum in another order
        depending on the other rows, and a sequence's text must not depend on its batch."""
        if x.shape[0] > SMALL_BATCH:
            return x @ self.weight.T
        out = np.empty((x.shape[0], self.out_features), np.result_type(x, self.weight))
        for i in range(x.shape[0]):
            np.matmul(self.weight, x[i], out=out[i])
        return out

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` of W as float32 [len(ids), in_features] (an embedding lookup)."""
        return self.weight[ids]

    def dequantize(self) -> np.ndarray:
        """W as float32 [out_features, in_features]."""
        return self.weight


class QuantizedLinear:
    """y = x Wᵀ with W stored as repacked quantised blocks: the 4-bit affine layout (Q4_1, Q4_K;
    ``mins`` set) or the int8 layout (Q8_0, Q5_0, Q6_K; ``mins`` None).

    Args:
        raw: the tensor's GGUF bytes, uint8 [out_features, in_features / block · block_bytes].
        type_name: one of :data:`QUANTIZED_KERNEL_TYPES`.
        out_features, in_features: W's shape; in_features a multiple of the type's block (32, or
            256 for the K-quants).

    Raises:
        ValueError: another type, or in_features not a multiple of the block.
    """

    def __init__(self, raw: np.ndarray | None, type_name: str, out_features: int, in_features: int,
                 packed: tuple[np.ndarray, ...] | None = None):
        if type_name not in REPACKERS:
            raise ValueError(f"no quantised kernel for {type_name}")
        repack, unit = REPACKERS[type_name]
        if in_features % unit:
            raise ValueError(f"in_features must be a multiple of {unit} for {type_name}, got {in_features}")
        self.type_name = type_name
        self.out_features, self.in_features = out_features, in_features
        if packed is None:  # ``packed``: the arrays repacked earlier (mqa_gen.repack_cache)
            packed = repack(raw, out_features, in_features)
        self.codes, self.scales = packed[0], packed[1]
        self.mins = packed[2] if len(packed) == 3 else None
        self.quads = None  # the codes in the row-quad layout while int8 dot products are on

    def set_int8_dot(self, on: bool) -> None:
        """Switch int8 dot products on (products round their input to 8 bits and multiply integer
        codes, :mod:`mqa_gen.kernels.int8_dot`) or off (exact float32 products, the default). On
        keeps a second copy of the codes in the row-quad layout (as many bytes as the codes).

        Raises:
            FastPathUnavailable: on, on a CPU without AVX2.
        """
        if not on:
            self.quads = None
        elif self.quads is None:
            int8_dot.require_fast_path()
            self.quads = int8_dot.row_quads(self.codes)

    def _int8_product(self, x: np.ndarray, y: np.ndarray) -> None:
        """y = x̃ Wᵀ with integer codes: x float32 [n, in_features] C-contiguous, y float32 [n, out]."""
        int8_dot.product(self.quads, self.scales, self.mins, *int8_dot.quantized(x), y)

    @property
    def packed(self) -> tuple[np.ndarray, ...]:
        """(codes, scales) or (codes, scales, mins): what ``packed=`` takes to rebuild this matrix."""
        return (self.codes, self.scales) if self.mins is None else (self.codes, self.scales, self.mins)

    @property
    def nbytes(self) -> int:
        """Bytes of weight data held (codes and scales)."""
        return sum(a.nbytes for a in (self.codes, self.scales, self.mins) if a is not None)

    def repeat_row_groups(self, group_rows: int, repeats: int) -> "QuantizedLinear":
        """A new matrix whose consecutive groups of ``group_rows`` rows (e.g. the rows of one KV
        head) each appear ``repeats`` times in a row: exact, and still quantised."""
        clone = object.__new__(QuantizedLinear)
        clone.type_name, clone.in_features = self.type_name, self.in_features
        clone.out_features = self.out_features * repeats
        groups = self.out_features // group_rows

        def repeat(tiled: np.ndarray) -> np.ndarray:
            rows = untile_rows(tiled, self.out_features)
            rows = rows.reshape((groups, group_rows) + rows.shape[1:])
            rows = np.repeat(rows, repeats, axis=0).reshape((clone.out_features,) + rows.shape[2:])
            return tile_rows(rows, clone.out_features)

        clone.codes, clone.scales = repeat(self.codes), repeat(self.scales)
        clone.mins = None if self.mins is None else repeat(self.mins)
        clone.quads = None
        clone.set_int8_dot(self.quads is not None)
        return clone

    def matvec(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """W x for one float32 vector x [in_features] → float32 [out_features] (``out`` if given)."""
        y = np.empty(self.out_features, np.float32) if out is None else out
        if self.quads is not None:
            self._int8_product(x[None], y[None])
        elif self.mins is not None:
            q4_1_matvec(self.codes, self.scales, self.mins, x, y)
        else:
            int8_matvec(self.codes, self.scales, x, y)
        return y

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: float32 [N, in_features] → float32 [N, out_features]. The kernel is chosen by N
        (see the module docstring): matrix × vector, few rows, or dequantise + BLAS."""
        n = x.shape[0]
        if n == 1:
            return self.matvec(np.ascontiguousarray(x[0]))[None]
        if n <= SMALL_BATCH or self.quads is not None:
            y = np.empty((n, self.out_features), np.float32)
            x = np.ascontiguousarray(x, dtype=np.float32)
            if self.quads is not None:
                self._int8_product(x, y)
            elif self.mins is not None:
                q4_1_matmul(self.codes, self.scales, self.mins, x, y)
            else:
                int8_matmul(self.codes, self.scales, x, y)
            return y
        return x @ self.dequantize_transposed()[:, : self.out_features]  # a temporary float32 Wᵀ, BLAS

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` of W, dequantised to float32 [len(ids), in_features] (an embedding lookup)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        out = np.empty((ids.shape[0], self.in_features), np.float32)
        if self.mins is not None:
            q4_1_dequantize_rows(self.codes, self.scales, self.mins, ids, out)
        else:
            int8_dequantize_rows(self.codes, self.scales, ids, out)
        return out

    def dequantize(self) -> np.ndarray:
        """W as a new float32 [out_features, in_features] array."""
        return self.rows(np.arange(self.out_features))

    def dequantize_transposed(self) -> np.ndarray:
        """Wᵀ as a new float32 [in_features, out_features rounded up to whole tiles] array
        (the fast way to get float32 weights: the tiled layout streams in this order)."""
        out = np.empty((self.in_features, self.codes.shape[0] * self.codes.shape[3]), np.float32)
        if self.mins is not None:
            q4_1_dequantize_transposed(self.codes, self.scales, self.mins, out)
        else:
            int8_dequantize_transposed(self.codes, self.scales, out)
        return out


class FusedProjections:
    """[x Wᵀ for W in linears] for the same input rows x [N, in_features]: W_q, W_k, W_v of a
    layer, or W_gate, W_up.

    For one row (a single sequence's decode step), two or three matrices of one layout (4-bit or
    int8) run in one kernel launch (one parallel region instead of three), into float32
    [1, out_features] buffers owned by this object and overwritten by the next call: no allocation
    per decode step. Other row counts, and matrices of mixed layouts, run each matrix's own product
    (:class:`QuantizedLinear` reads each weight once for all rows).
    """

    def __init__(self, linears):
        self.linears = tuple(linears)
        self.outs = [np.empty(w.out_features, np.float32) for w in self.linears]
        self.rows = [y[None] for y in self.outs]  # the same buffers as [1, out_features]
        quantized = all(isinstance(w, QuantizedLinear) for w in self.linears)
        layouts = {w.mins is None for w in self.linears} if quantized else set()
        self._fused_kernel = self._fused_args = None
        if 2 <= len(self.linears) <= 3 and len(layouts) == 1:  # one layout: one kernel takes them all
            int8 = layouts == {True}
            slots = [(w.codes, w.scales) + (() if int8 else (w.mins,)) + (y,)
                     for w, y in zip(self.linears, self.outs)]
            # An unused third slot: 0-tile slices of the first matrix (the same types, so the
            # kernel the warm-up compiled is the one that runs).
            slots += [tuple(a[:0] for a in slots[0])] * (3 - len(slots))
            self._fused_args = tuple(a for slot in slots for a in slot)
            self._fused_kernel = int8_matvec3 if int8 else q4_1_matvec3

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        """x: float32 [N, in_features] → one float32 [N, out_features] array per matrix."""
        if self._fused_kernel is not None and all(w.quads is not None for w in self.linears):
            return self._int8_products(np.ascontiguousarray(x, dtype=np.float32))
        if x.shape[0] != 1:
            return [w(x) for w in self.linears]
        if self._fused_kernel is not None:
            self._fused_kernel(*self._fused_args, np.ascontiguousarray(x[0]))
            return self.rows
        for w, y in zip(self.linears, self.outs):
            if isinstance(w, QuantizedLinear):
                w.matvec(np.ascontiguousarray(x[0]), y)
            else:
                y[:] = w(x)[0]
        return self.rows


    def _int8_products(self, x: np.ndarray) -> list[np.ndarray]:
        """With int8 dot products on: x rounded once for all the matrices (each matrix alone would
        round it again, to the same values), then one integer kernel for them all."""
        n = x.shape[0]
        ys = self.rows if n == 1 else [np.empty((n, w.out_features), np.float32) for w in self.linears]
        slots = [(w.quads, w.scales, w.mins, y) for w, y in zip(self.linears, ys)]
        first, y0 = self.linears[0], ys[0]
        slots += [(first.quads[:0], first.scales[:0], None if first.mins is None else first.mins[:0], y0[:, :0])] \
            * (3 - len(slots))
        int8_dot.products(*(a for slot in slots for a in slot), *int8_dot.quantized(x))
        return ys


def linear_from_gguf(gguf: GGUFFile, name: str, shape: tuple[int, int]):
    """Tensor ``name`` as a :class:`QuantizedLinear` when its type has kernels, else a
    :class:`DenseLinear` dequantised by the ``gguf`` package. A quantised tensor is taken from
    ``gguf.repacked`` (a :class:`~mqa_gen.repack_cache.RepackCache`) when it holds it, and given
    to it once repacked.

    Raises:
        UnsupportedModelError: missing tensor, unsupported type or unexpected shape.
        ModelFileError: NaN or infinite weights (or block scales).
    """
    tensor = require_tensor(gguf, name)
    kernel = REPACKERS.get(tensor.type_name)
    if kernel is not None and shape[1] % kernel[1] == 0 and tuple(tensor.shape) == tuple(shape):
        store = gguf.repacked
        packed = None if store is None else store.get(name, tensor.type_name, shape)
        if packed is not None:
            linear = QuantizedLinear(None, tensor.type_name, *shape, packed=packed)
        else:
            linear = QuantizedLinear(np.asarray(tensor.data), tensor.type_name, *shape)
            gguf.release(tensor)  # repacked: the file's copy of these bytes can leave memory
            if store is not None:
                store.put(name, tensor.type_name, shape, linear.packed)
        check_finite(gguf, name, linear.scales, linear.mins)  # the codes are integers
        return linear
    return DenseLinear(tensor_f32(gguf, name, shape))
