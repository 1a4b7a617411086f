"""Integer dot products for the opt-in fast path: activations rounded to 8 bits, weights' codes
multiplied as integers.

The default kernels (:mod:`~mqa_gen.kernels.quant`) convert every weight code to float32 and
multiply it by the float32 activation: exact up to float32 summation order, so the logits match
transformers'. llama.cpp instead rounds each activation row to 8 bits per block of 32 (its
``block_q8_0`` / ``block_q8_1``, ggml-common.h) and multiplies integer codes by integer codes, which
one instruction does for 64 byte pairs at a time. This module does the same, as an opt-in:

    x̃ = d_x · q_x,  d_x = max|x_block| / 127,  q_x = round(x / d_x) ∈ [−127, 127]   per 32 values
    4-bit affine (Q4_1, Q4_K):  Σ_block (d_w · d_x · Σ_i q_w,i q_x,i  +  m_w · d_x · Σ_i q_x,i)
    int8 (Q8_0, Q5_0, Q6_K):    Σ_block  d_w · d_x · Σ_i q_w,i q_x,i

The integer sums are exact, so the only change from the float32 kernels is x → x̃ (the
rounding of the activations) plus float32 summation order: a product here equals
``dequantize(W) @ x̃`` to float32 rounding (tests/test_int8_dot.py), and the perplexity command
measures what x → x̃ costs (BENCHMARKS.md).

Layout. The integer instructions sum four byte products into each 32-bit lane, so one lane must
see four consecutive codes of one row: the *row-quad* layout holds codes [n_tiles, n_blocks,
groups, TILE, 4] — per block, groups of four code bytes, each group TILE rows × 4 bytes (for the
4-bit layout, byte j holds weight j in its low nibble and weight j + 16 in its high nibble, as in
:mod:`~mqa_gen.kernels.quant`). :func:`row_quads` makes it from the row-tile layout; scales and
minimums are the row-tile ones, unchanged.

Instructions (Intel's intrinsics guide; ggml-cpu's quants.c uses the same ones):
* AVX-512 VNNI: ``vpdpbusd`` — unsigned byte × signed byte, four products summed into each int32
  lane, 64 byte pairs per instruction. Signed int8 codes are made unsigned by adding 128
  (``q + 128``), and 128 · Σ q_x is subtracted after.
* AVX2: ``vpmaddubsw`` (unsigned × signed bytes, pairs summed to int16) then ``vpmaddwd`` with ones
  (int16 pairs summed to int32): 32 byte pairs per two instructions. Signed codes use
  ``|q_w| × sign(q_w)·q_x`` (``vpsignb``), since ``q + 128`` would overflow int16.
  4-bit codes (≤ 15) against |q_x| ≤ 127 keep every int16 sum of a block below 2¹⁵.
Kernel. :func:`products` gives each tile of TILE weight rows to one parallel task, which runs a
micro-kernel (LLVM IR through Numba intrinsics) on eight rows of x̃ at a time (then four, then
one): each group of code bytes is loaded once for all eight rows and multiplied with each row's
four activation codes, the int32 sums of a block and the float32 sums of all blocks staying in
registers — the register blocking of a BLAS kernel (Goto & van de Geijn 2008), with integers.
Every row count runs it, a decode step's one row as a prefill's 512, so both apply the same
arithmetic; on 512 rows it takes about half the time of dequantising + BLAS here
(``benchmarks/bench_int8_dot.py``).

:data:`ISA` is the set the kernels use: ``"avx512vnni"`` where the CPU has it, else ``"avx2"``,
else None (no fast path; :func:`require_fast_path` says so). ``MQA_GEN_INT8_DOT_ISA=avx2`` picks
the AVX2 code on a VNNI CPU (the tests run both).
"""

from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .flags import FASTMATH
from .halfprec import as_float32
from .quant import BLOCK, TILE

#: Values per activation block: one float32 scale per 32 int8 values (ggml's QK8_0).
X_BLOCK = 32

#: From this many rows on (a prefill chunk), :func:`quantized` rounds them on all Numba's threads.
PARALLEL_ROWS = 16


def _host_isa() -> str | None:
    """The instruction set the kernels compile for (module docstring)."""
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features()
    has = {name for name in ("avx2", "avx512bw", "avx512vnni") if features.get(name, False)}
    wanted = os.environ.get("MQA_GEN_INT8_DOT_ISA", "")
    if wanted == "avx2" and "avx2" in has:
        return "avx2"
    if {"avx512bw", "avx512vnni"} <= has:
        return "avx512vnni"
    return "avx2" if "avx2" in has else None


ISA = _host_isa()


class FastPathUnavailable(RuntimeError):
    """The CPU has neither AVX2 nor AVX-512 VNNI: the integer kernels cannot be compiled."""


def require_fast_path() -> None:
    """Raise :class:`FastPathUnavailable` when this CPU has no integer kernels."""
    if ISA is None:
        raise FastPathUnavailable("the integer fast path needs an x86-64 CPU with AVX2 or AVX-512 VNNI")


def row_quads(codes: np.ndarray) -> np.ndarray:
    """Row-tile codes [n_tiles, nb, bytes, TILE] → row-quad codes [n_tiles, nb, bytes/4, TILE, 4]
    (module docstring), a new C-contiguous array of the same dtype."""
    n_tiles, nb, nbytes, tile = codes.shape
    quads = codes.reshape(n_tiles, nb, nbytes // 4, 4, tile).transpose(0, 1, 2, 4, 3)
    return np.ascontiguousarray(quads)


@njit(cache=True, inline="always")
def _block_scale(x, k, base):
    """(d, 1/d) of row k's 32 values from ``base``: d = max|x| / 127; (0, 0) for a zero block.
    Eight running maxima: one is a chain of dependent compares that LLVM does not vectorise
    without the ``nnan`` flag (as in :func:`~mqa_gen.kernels.rowwise.row_max`)."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = np.float32(0.0)
    for j in range(base, base + X_BLOCK, 8):
        m0, m1 = max(m0, abs(x[k, j])), max(m1, abs(x[k, j + 1]))
        m2, m3 = max(m2, abs(x[k, j + 2])), max(m3, abs(x[k, j + 3]))
        m4, m5 = max(m4, abs(x[k, j + 4])), max(m5, abs(x[k, j + 5]))
        m6, m7 = max(m6, abs(x[k, j + 6])), max(m7, abs(x[k, j + 7]))
    d = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7))) / np.float32(127.0)
    return d, (np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0))


@njit(cache=True, inline="always")
def _code(v):
    """C's roundf(v) (half away from zero) for |v| ≤ 127.0001, capped at ±127, as float32.

    Exact in float32: t = trunc(v) and v − t are exact for |v| < 2²³, so comparing the fraction
    with ±0.5 decides as a real-number rounding would (roundf's own definition) — 0.49999997
    rounds to 0, which floor(v + 0.5) in float32 would get wrong. Branch-free, so a loop of it
    vectorises (a prefill's rounding: 0.8 ns a value on one thread here, where the float64
    floor it replaces took 2.8)."""
    t = np.trunc(v)
    frac = v - t
    q = t + np.float32(frac >= np.float32(0.5)) - np.float32(frac <= np.float32(-0.5))
    return min(max(q, np.float32(-127.0)), np.float32(127.0))


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _quantize_row(x, qx, dx, qsum, k):
    """Row k of :func:`quantize_rows`."""
    for b in range(x.shape[1] // X_BLOCK):
        d, inv = _block_scale(x, k, b * X_BLOCK)
        dx[k, b] = d
        for j in range(b * X_BLOCK, b * X_BLOCK + X_BLOCK):
            qx[k, j] = np.int8(_code(x[k, j] * inv))
        for half in range(2):
            total = np.int32(0)
            for j in range(b * X_BLOCK + half * 16, b * X_BLOCK + half * 16 + 16):
                total += np.int32(qx[k, j])
            qsum[k, 2 * b + half] = total


@njit(cache=True, fastmath=FASTMATH)
def quantize_rows(x, qx, dx, qsum):
    """Round float32 rows x [n, cols] to 8 bits per block of 32 (cols a multiple of 32):
    qx int8 [n, cols] = round(x / d) (half away from zero, as C's roundf), dx float32
    [n, cols/32] = max|x_block| / 127 (0 for a zero block, whose codes are 0), qsum int32
    [n, cols/16] = Σ q_x over each half block (the 4-bit layout's minimum term, the int8 layout's
    +128 correction, and the K-quants' blocks of 16). Outputs overwritten. ggml's
    ``quantize_row_q8_0_ref``, with the scale kept as float32 rather than float16."""
    for k in range(x.shape[0]):
        _quantize_row(x, qx, dx, qsum, k)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def _quantize_rows_in_parallel(x, qx, dx, qsum):
    """:func:`quantize_rows`, rows spread over Numba's threads (a prefill's hundreds of rows)."""
    for k in prange(x.shape[0]):
        _quantize_row(x, qx, dx, qsum, k)


# --- the integer instructions, as LLVM IR --------------------------------------------------------


def _call(builder, name, ret, *args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _splat(builder, value, vector):
    """A scalar ``value`` in every lane of ``vector`` (an ir.VectorType of its type)."""
    one = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), vector.count), [0] * vector.count))


class _ArrayView:
    """An array argument inside generated code: its data as a byte pointer and its strides in
    bytes, for addresses ``at(i, j, …)`` = data + Σ index × stride."""

    def __init__(self, context, builder, array_type, value):
        array = context.make_array(array_type)(context, builder, value)
        self.builder = builder
        self.data = builder.bitcast(array.data, ir.IntType(8).as_pointer())
        self.strides = cgutils.unpack_tuple(builder, array.strides, array_type.ndim)

    def at(self, *index, element=None):
        """The address of [index…] (int64 values), as a pointer to ``element`` (default: byte)."""
        offset = ir.Constant(ir.IntType(64), 0)
        for i, stride in zip(index, self.strides):
            offset = self.builder.add(offset, self.builder.mul(i, stride))
        address = self.builder.gep(self.data, [offset])
        return address if element is None else self.builder.bitcast(address, element.as_pointer())


def _emit_tile_rows(builder, a, rows, four_bit, half_scales):
    """The micro-kernel: rows k .. k+rows−1 of x̃ times tile t of W (TILE weight rows), over all
    its blocks, into y[k + r, t·TILE + i].

    ``a`` holds the arguments of :data:`_TILE_ROWS_ARGS` (array views and int64 values). For each
    block b: the integer sums Σ q_w q_x of every (row, weight row), in int32 lanes — one vector per
    16 (AVX-512) or 8 (AVX2) weight rows and row of x̃ —, then added into float32 sums as
    s[b] · d[r, b] · Σ (+ m[b] · d[r, b] · Σq_x for the 4-bit layout), the scales s, m read as
    float16 (``half_scales``) or float32. Each weight vector loaded serves all ``rows`` rows, and
    the float32 sums stay in registers across blocks.
    """
    i8, i16, i32, i64, f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
    lanes = 16 if ISA == "avx512vnni" else 8
    v_bytes, v_i16 = ir.VectorType(i8, 4 * lanes), ir.VectorType(i16, 2 * lanes)
    v_i32, v_f32 = ir.VectorType(i32, lanes), ir.VectorType(f32, lanes)
    n_vec = TILE // lanes

    def const(value):
        return ir.Constant(i64, value)

    def scale_vectors(view, b):  # the tile's n_vec scale (or minimum) vectors of block b, as float32
        if not half_scales:
            return [builder.load(view.at(a["t"], b, const(v * lanes), element=v_f32), align=4) for v in range(n_vec)]
        halves = ir.VectorType(ir.HalfType(), lanes)
        return [builder.fpext(builder.load(view.at(a["t"], b, const(v * lanes), element=halves), align=2), v_f32)
                for v in range(n_vec)]

    sums_f32 = [[cgutils.alloca_once_value(builder, ir.Constant(v_f32, [0.0] * lanes)) for _ in range(n_vec)]
                for _ in range(rows)]
    # AVX2 with 4-bit codes: int16 pair sums per block (below 2^15: codes ≤ 15, |q_x| ≤ 127, 16
    # products a lane), widened once per block; otherwise int32 sums.
    acc_type = v_i16 if ISA == "avx2" and four_bit else v_i32
    sums = [[cgutils.alloca_once(builder, acc_type) for _ in range(n_vec)] for _ in range(rows)]
    low_mask, four = ir.Constant(v_bytes, [0x0F] * (4 * lanes)), ir.Constant(v_bytes, [4] * (4 * lanes))
    flip, ones16 = ir.Constant(v_bytes, [0x80] * (4 * lanes)), ir.Constant(v_i16, [1] * (2 * lanes))
    x_rows = [builder.add(a["k"], const(r)) for r in range(rows)]
    halves = builder.lshr(a["bs"], const(4))  # entries of qsum (sums of 16 codes) per block: 1 or 2
    with cgutils.for_range(builder, a["nb"]) as block_loop:
        b = block_loop.index
        for r in range(rows):
            for v in range(n_vec):
                builder.store(ir.Constant(acc_type, None), sums[r][v])
        x_block = builder.mul(b, a["bs"])
        with cgutils.for_range(builder, a["groups"]) as group_loop:
            g = group_loop.index
            codes = a["codes"].at(a["t"], b, g)  # TILE × 4 code bytes
            raw = [builder.load(builder.bitcast(builder.gep(codes, [const(v * 4 * lanes)]), v_bytes.as_pointer()), align=1)
                   for v in range(n_vec)]
            if four_bit:
                low = [builder.and_(w, low_mask) for w in raw]
                high = [builder.lshr(w, four) for w in raw]
            elif ISA == "avx512vnni":
                unsigned = [builder.xor(w, flip) for w in raw]  # q + 128
            else:  # |q_w| as an unsigned byte (−128 → 128); q_x takes q_w's sign below
                magnitude = [builder.select(builder.icmp_signed("<", w, ir.Constant(v_bytes, None)), builder.neg(w), w)
                             for w in raw]
            x_at = builder.add(x_block, builder.mul(g, const(4)))
            for r in range(rows):
                quad = a["qx"].at(x_rows[r], x_at, element=i32)
                xl = builder.bitcast(_splat(builder, builder.load(quad, align=1), v_i32), v_bytes)
                if four_bit:
                    quad_high = a["qx"].at(x_rows[r], builder.add(x_at, const(16)), element=i32)
                    xh = builder.bitcast(_splat(builder, builder.load(quad_high, align=1), v_i32), v_bytes)
                for v in range(n_vec):
                    acc = builder.load(sums[r][v])
                    if ISA == "avx512vnni":
                        if four_bit:
                            acc = _call(builder, "llvm.x86.avx512.vpdpbusd.512", v_i32, acc, low[v], xl)
                            acc = _call(builder, "llvm.x86.avx512.vpdpbusd.512", v_i32, acc, high[v], xh)
                        else:
                            acc = _call(builder, "llvm.x86.avx512.vpdpbusd.512", v_i32, acc, unsigned[v], xl)
                    elif four_bit:
                        acc = builder.add(acc, builder.add(_call(builder, "llvm.x86.avx2.pmadd.ub.sw", v_i16, low[v], xl),
                                                           _call(builder, "llvm.x86.avx2.pmadd.ub.sw", v_i16, high[v], xh)))
                    else:
                        signed_x = _call(builder, "llvm.x86.avx2.psign.b", v_bytes, xl, raw[v])
                        pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", v_i16, magnitude[v], signed_x)
                        acc = builder.add(acc, _call(builder, "llvm.x86.avx2.pmadd.wd", v_i32, pairs, ones16))
                    builder.store(acc, sums[r][v])
        # The block's integer sums, scaled, into the float32 sums.
        s = scale_vectors(a["scales"], b)
        m = scale_vectors(a["mins"], b) if four_bit else None
        first_half = builder.mul(b, halves)
        last_half = builder.sub(builder.add(first_half, halves), const(1))
        for r in range(rows):
            d = builder.load(a["dx"].at(x_rows[r], builder.lshr(x_block, const(5)), element=f32))
            d_vec = _splat(builder, d, v_f32)
            if four_bit or ISA == "avx512vnni":  # Σ q_x over the block: the minimum term, or VNNI's +128
                q0 = builder.load(a["qsum"].at(x_rows[r], first_half, element=i32))
                q1 = builder.load(a["qsum"].at(x_rows[r], last_half, element=i32))
                x_sum = builder.add(q0, builder.select(builder.icmp_unsigned("==", halves, const(2)), q1,
                                                       ir.Constant(i32, 0)))
            if four_bit:
                mt = _splat(builder, builder.fmul(d, builder.sitofp(x_sum, f32)), v_f32)
            elif ISA == "avx512vnni":  # Σ (q_w + 128) q_x − 128 Σ q_x
                offset = _splat(builder, builder.shl(x_sum, ir.Constant(i32, 7)), v_i32)
            for v in range(n_vec):
                total = builder.load(sums[r][v])
                if acc_type is v_i16:
                    total = _call(builder, "llvm.x86.avx2.pmadd.wd", v_i32, total, ones16)
                elif ISA == "avx512vnni" and not four_bit:
                    total = builder.sub(total, offset)
                term = builder.fmul(s[v], builder.fmul(d_vec, builder.sitofp(total, v_f32)))
                if four_bit:
                    term = builder.fadd(term, builder.fmul(m[v], mt))
                builder.store(builder.fadd(builder.load(sums_f32[r][v]), term), sums_f32[r][v])
    # Stores masked to the y columns that exist (a last tile's padding rows have none).
    column = builder.mul(a["t"], const(TILE))
    lane_index = ir.Constant(v_i32, list(range(lanes)))
    masked_store = f"llvm.masked.store.v{lanes}f32.p0v{lanes}f32"
    for v in range(n_vec):
        left = builder.trunc(builder.sub(a["valid"], const(v * lanes)), i32)  # columns left from here
        mask = builder.icmp_signed("<", lane_index, _splat(builder, left, v_i32))
        for r in range(rows):
            target = a["y"].at(x_rows[r], builder.add(column, const(v * lanes)), element=v_f32)
            _call(builder, masked_store, ir.VoidType(), builder.load(sums_f32[r][v]), target, ir.Constant(i32, 4), mask)


#: The micro-kernel intrinsics' arguments, in order: row-quad codes [n_tiles, nb, groups, TILE, 4]
#: (int8 or uint8), the tile t, blocks nb, code groups per block, values per block bs (32 or 16),
#: x̃'s codes qx int8 [n, cols], the first row k, scales and minimums [n_tiles, nb, TILE] (float16
#: bits or float32; None for the int8 layout), dx float32 [n, cols/32], qsum int32
#: [n, cols/16], the output y float32 [n, out] (unit column stride) and ``valid``, the columns of y
#: this tile has (TILE, or fewer for the last tile of a matrix whose rows are not whole tiles).
_TILE_ROWS_ARGS = ("codes", "t", "nb", "groups", "bs", "qx", "k", "scales", "mins", "dx", "qsum", "y", "valid")
_ARRAY_TYPES = {"codes": (types.uint8, types.int8), "qx": (types.int8,), "scales": (types.uint16, types.float32),
                "mins": (types.uint16, types.float32), "dx": (types.float32,), "qsum": (types.int32,),
                "y": (types.float32,)}


def _tile_rows_intrinsic(rows: int):
    """A Numba intrinsic running :func:`_emit_tile_rows` for ``rows`` rows, on the arguments
    :data:`_TILE_ROWS_ARGS`; ``mins`` None means the int8 layout (decided when compiled). No
    bounds checks: the caller keeps every index in range."""

    def typer(typingctx, codes, t, nb, groups, bs, qx, k, scales, mins, dx, qsum, y, valid):
        args = (codes, t, nb, groups, bs, qx, k, scales, mins, dx, qsum, y, valid)
        # An empty slot's minimums reach here as an Optional array (no_tiles): unwrapped below.
        plain = [a.type if isinstance(a, types.Optional) else a for a in args]
        four_bit = not isinstance(plain[8], types.NoneType)
        if not four_bit:
            plain[8] = plain[7]  # the int8 layout has no minimums: the scales' view stands in, unread
        ok = ISA is not None and plain[7] == plain[8] and all(
            isinstance(ty, types.Array) and ty.dtype in _ARRAY_TYPES[name] if name in _ARRAY_TYPES
            else isinstance(ty, types.Integer) for name, ty in zip(_TILE_ROWS_ARGS, plain))
        if not ok:
            return None

        def codegen(context, builder, signature, values):
            unpacked = {}
            for name, ty, value, plain_ty in zip(_TILE_ROWS_ARGS, signature.args, values, plain):
                if name == "mins" and not four_bit:
                    unpacked[name] = unpacked["scales"]
                    continue
                value = context.cast(builder, value, ty, plain_ty if name in _ARRAY_TYPES else types.int64)
                unpacked[name] = _ArrayView(context, builder, plain_ty, value) if name in _ARRAY_TYPES else value
            _emit_tile_rows(builder, unpacked, rows, four_bit, plain[7].dtype == types.uint16)
            return context.get_dummy_value()

        return types.void(*args), codegen

    typer.__name__ = f"_tile_rows{rows}"
    return intrinsic(typer)


_tile_rows8, _tile_rows4, _tile_rows1 = (_tile_rows_intrinsic(n) for n in (8, 4, 1))


@njit(cache=True)
def quantized(x):
    """:func:`quantize_rows` into new arrays: (qx int8 [n, cols], dx float32 [n, cols/32],
    qsum int32 [n, cols/16]) for float32 x [n, cols]."""
    n, cols = x.shape
    qx = np.empty((n, cols), np.int8)
    dx = np.empty((n, cols // X_BLOCK), np.float32)
    qsum = np.empty((n, cols // 16), np.int32)
    if n >= PARALLEL_ROWS:
        _quantize_rows_in_parallel(x, qx, dx, qsum)
    else:  # a decode step's rows: one parallel region's start would cost more than the rounding
        quantize_rows(x, qx, dx, qsum)
    return qx, dx, qsum


@njit(cache=True, fastmath=FASTMATH)
def no_tiles(a):
    """A 0-tile slice of ``a`` (minimums or codes: an empty slot of a three-matrix kernel), or
    None for None (the int8 layout's minimums)."""
    if a is None:
        return None
    return a[:0]


# --- products -------------------------------------------------------------------------------------


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _tile(codes, scales, mins, qx, dx, qsum, t, y):
    """Tile t of y = x̃ Wᵀ (TILE columns of y, every row of x̃): the micro-kernel on eight rows at
    a time, then four, then one. Arguments as :func:`products` takes them."""
    nb, groups, T = codes.shape[1], codes.shape[2], codes.shape[3]
    bs = groups * 4 if mins is None else BLOCK  # values per block: int8 codes 32 or 16, nibble pairs 32
    valid = min(T, y.shape[1] - t * T)
    n = qx.shape[0]
    k = 0
    while k < n:
        if k + 8 <= n:
            _tile_rows8(codes, t, nb, groups, bs, qx, k, scales, mins, dx, qsum, y, valid)
            k += 8
        elif k + 4 <= n:
            _tile_rows4(codes, t, nb, groups, bs, qx, k, scales, mins, dx, qsum, y, valid)
            k += 4
        else:
            _tile_rows1(codes, t, nb, groups, bs, qx, k, scales, mins, dx, qsum, y, valid)
            k += 1


@njit(cache=True, inline="always")
def _unit_columns(y):
    """Whether y's columns are adjacent float32s (the micro-kernel stores whole vectors)."""
    return y.shape[1] <= 1 or y.strides[1] == 4


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def products(qa, sa, ma, ya, qb, sb, mb, yb, qc, sc, mc, yc, qx, dx, qsum):
    """ya, yb, yc = x̃ Waᵀ, x̃ Wbᵀ, x̃ Wcᵀ for up to three matrices of one layout — row-quad codes
    q*, scales s*, minimums m* (None for the int8 layout: then every m* is None) — and the rows x̃
    given by :func:`quantize_rows` (qx int8 [n, cols], dx, qsum); y* float32 [n, rows*] with unit
    column stride, overwritten. Unused slots: 0-tile slices. One parallel region over all tiles.
    Each row's result is the same, bit for bit, whatever the other rows are: the micro-kernel does
    the same operations on a row whether it takes 8, 4 or 1."""
    if not (_unit_columns(ya) and _unit_columns(yb) and _unit_columns(yc)):
        raise ValueError("the outputs need unit column stride")
    na, nb = qa.shape[0], qb.shape[0]
    for task in prange(na + nb + qc.shape[0]):
        if task < na:
            _tile(qa, sa, ma, qx, dx, qsum, task, ya)
        elif task < na + nb:
            _tile(qb, sb, mb, qx, dx, qsum, task - na, yb)
        else:
            _tile(qc, sc, mc, qx, dx, qsum, task - na - nb, yc)


@njit(cache=True, fastmath=FASTMATH)
def product(quads, scales, mins, qx, dx, qsum, y):
    """y = x̃ Wᵀ for one matrix (row-quad codes, scales, minimums or None); y float32 [n, rows]."""
    products(quads, scales, mins, y, quads[:0], scales[:0], no_tiles(mins), y[:, :0],
             quads[:0], scales[:0], no_tiles(mins), y[:, :0], qx, dx, qsum)


def warm_up() -> None:
    """Compile (or load) the integer kernels: products of each layout (4-bit with float16 and
    float32 scales, int8 with blocks of 32 and 16) for one and two rows. Run by
    the first ``--int8-dot`` (:func:`mqa_gen.kernels.warmup.compile_int8_kernels`, which also warms
    the fused decode step with row-quad codes), not by every first run."""
    from .quant import repack_q4_1, repack_q4_k, repack_q6_k, repack_q8_0

    f32 = np.float32
    for packed in (repack_q4_1(np.zeros((TILE, 8 * 20), np.uint8), TILE, 256),
                   repack_q4_k(np.zeros((TILE, 144), np.uint8), TILE, 256),
                   repack_q8_0(np.zeros((TILE, 8 * 34), np.uint8), TILE, 256),
                   repack_q6_k(np.zeros((TILE, 210), np.uint8), TILE, 256)):
        codes, scales, mins = packed[0], packed[1], (packed[2] if len(packed) == 3 else None)
        quads = row_quads(codes)
        for n in (1, 2):
            x = np.ones((n, 256), f32)
            y = np.empty((n, TILE), f32)
            product(quads, scales, mins, *quantized(x), y)
            products(quads, scales, mins, y, quads, scales, mins, y, quads[:0], scales[:0], no_tiles(mins),
                     y[:, :0], *quantized(x))
