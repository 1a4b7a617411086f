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
    """(d, 1/d) of row k's 32 values from ``base``: d = max|x| / 127; (0, 0) for a zero block."""
    amax = np.float32(0.0)
    for j in range(X_BLOCK):
        amax = max(amax, abs(x[k, base + j]))
    d = amax / np.float32(127.0)
    return d, (np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0))


@njit(cache=True, inline="always")
def _code(v):
    """C's roundf(v) for |v| ≤ 127 (half away from zero), capped at 127. |v| + 0.5 in float64 is
    exact, so floor gives the right integer even for 0.49999997 (float32 would round it up)."""
    q = min(127, np.int32(np.floor(np.float64(abs(v)) + 0.5)))
    return -q if v < 0 else q


@njit(cache=True)
def quantize_rows(x, qx, dx, qsum):
    """Round float32 rows x [n, cols] to 8 bits per block of 32 (cols a multiple of 32):
    qx int8 [n, cols] = round(x / d) (half away from zero, as C's roundf), dx float32
    [n, cols/32] = max|x_block| / 127 (0 for a zero block, whose codes are 0), qsum int32
    [n, cols/16] = Σ q_x over each half block (the 4-bit layout's minimum term, the int8 layout's
    +128 correction, and the K-quants' blocks of 16). Outputs overwritten. ggml's
    ``quantize_row_q8_0_ref``, with the scale kept as float32 rather than float16."""
    n, cols = x.shape
    for k in range(n):
        for b in range(cols // X_BLOCK):
            d, inv = _block_scale(x, k, b * X_BLOCK)
            dx[k, b] = d
            for half in range(2):
                s = 0
                for j in range(b * X_BLOCK + half * 16, b * X_BLOCK + half * 16 + 16):
                    q = _code(x[k, j] * inv)
                    qx[k, j] = q
                    s += q
                qsum[k, 2 * b + half] = s


@njit(cache=True, parallel=True)
def rounded_rows(x, out):
    """out = x̃ = d · round(x / d) per block of 32, as :func:`quantize_rows` rounds (float32
    [n, cols] each; out may be x): the values the integer kernels multiply, for products of many
    rows that run in float32 (a prefill's BLAS product) with the same rounding."""
    n, cols = x.shape
    for k in prange(n):
        for b in range(cols // X_BLOCK):
            d, inv = _block_scale(x, k, b * X_BLOCK)
            for j in range(b * X_BLOCK, b * X_BLOCK + X_BLOCK):
                out[k, j] = np.float32(_code(x[k, j] * inv)) * d


# --- the integer instructions, as LLVM IR --------------------------------------------------------


def _data(context, builder, array_type, array):
    return context.make_array(array_type)(context, builder, array).data


def _load_vector(builder, base, index, vector):
    """``vector`` loaded from byte pointer ``base`` + ``index`` (unaligned)."""
    return builder.load(builder.bitcast(builder.gep(base, [index]), vector.as_pointer()), align=1)


def _splat_i32(builder, value, lanes):
    """An int32 ``value`` in every one of ``lanes`` lanes."""
    vec = ir.VectorType(ir.IntType(32), lanes)
    one = builder.insert_element(ir.Constant(vec, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(vec, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))


def _call(builder, name, ret, *args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _byte_quad(builder, qx_data, index):
    """Four int8 activation codes from ``qx_data + index`` as one int32 (little-endian)."""
    return builder.load(builder.bitcast(builder.gep(qx_data, [index]), ir.IntType(32).as_pointer()), align=1)


def _emit_block_dots(builder, codes, start, groups, qx, x_start, x_sum, out, four_bit):
    """out[0:TILE] (int32) = Σ over one block of each row's code × activation products.

    codes: i8* of row-quad codes, the block's first byte at ``start``; ``groups`` groups of
    TILE × 4 bytes follow. qx: i8* of activation codes, the block's first at ``x_start``; x_sum:
    their sum over the block (int32), which undoes VNNI's +128 on int8 codes.
    four_bit: the codes are nibble pairs (weight j low, j + 16 high) rather than int8.
    """
    i8, i16, i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
    lanes = 16 if ISA == "avx512vnni" else 8  # int32 lanes (rows) per vector
    rows_per_vec, vec_bytes = lanes, lanes * 4
    v_bytes = ir.VectorType(i8, vec_bytes)
    v_i32 = ir.VectorType(i32, lanes)
    v_i16 = ir.VectorType(i16, 2 * lanes)
    n_vec = TILE // rows_per_vec
    zero32 = ir.Constant(v_i32, [0] * lanes)
    accs = [cgutils.alloca_once_value(builder, zero32) for _ in range(n_vec)]
    if ISA == "avx2" and four_bit:  # int16 sums, widened once per block
        acc16 = [cgutils.alloca_once_value(builder, ir.Constant(v_i16, [0] * (2 * lanes))) for _ in range(n_vec)]
    low_mask = ir.Constant(v_bytes, [0x0F] * vec_bytes)
    four = ir.Constant(v_bytes, [4] * vec_bytes)
    flip = ir.Constant(v_bytes, [0x80] * vec_bytes)
    ones16 = ir.Constant(v_i16, [1] * (2 * lanes))
    with cgutils.for_range(builder, groups) as loop:
        g = loop.index
        group_start = builder.add(start, builder.mul(g, ir.Constant(g.type, TILE * 4)))
        x_low = builder.add(x_start, builder.mul(g, ir.Constant(g.type, 4)))
        xl = builder.bitcast(_splat_i32(builder, _byte_quad(builder, qx, x_low), lanes), v_bytes)
        if four_bit:
            x_high = builder.add(x_low, ir.Constant(g.type, 16))
            xh = builder.bitcast(_splat_i32(builder, _byte_quad(builder, qx, x_high), lanes), v_bytes)
        for v in range(n_vec):
            raw = _load_vector(builder, codes, builder.add(group_start, ir.Constant(g.type, v * vec_bytes)), v_bytes)
            if ISA == "avx512vnni":
                acc = builder.load(accs[v])
                if four_bit:
                    low, high = builder.and_(raw, low_mask), builder.lshr(raw, four)
                    acc = _call(builder, "llvm.x86.avx512.vpdpbusd.512", v_i32, acc, low, xl)
                    acc = _call(builder, "llvm.x86.avx512.vpdpbusd.512", v_i32, acc, high, xh)
                else:
                    acc = _call(builder, "llvm.x86.avx512.vpdpbusd.512", v_i32, acc, builder.xor(raw, flip), xl)
                builder.store(acc, accs[v])
            elif four_bit:
                low, high = builder.and_(raw, low_mask), builder.lshr(raw, four)
                pairs = builder.add(_call(builder, "llvm.x86.avx2.pmadd.ub.sw", v_i16, low, xl),
                                    _call(builder, "llvm.x86.avx2.pmadd.ub.sw", v_i16, high, xh))
                builder.store(builder.add(builder.load(acc16[v]), pairs), acc16[v])
            else:
                # |q_w| as an unsigned byte (−128 → 128) and q_x with q_w's sign: the same products.
                negative = builder.icmp_signed("<", raw, ir.Constant(v_bytes, [0] * vec_bytes))
                magnitude = builder.select(negative, builder.neg(raw), raw)
                signed_x = _call(builder, "llvm.x86.avx2.psign.b", v_bytes, xl, raw)
                pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", v_i16, magnitude, signed_x)
                quads = _call(builder, "llvm.x86.avx2.pmadd.wd", v_i32, pairs, ones16)
                builder.store(builder.add(builder.load(accs[v]), quads), accs[v])
    i32_ptr = v_i32.as_pointer()
    for v in range(n_vec):
        if ISA == "avx2" and four_bit:
            acc = _call(builder, "llvm.x86.avx2.pmadd.wd", v_i32, builder.load(acc16[v]), ones16)
        else:
            acc = builder.load(accs[v])
        if ISA == "avx512vnni" and not four_bit:  # Σ (q_w + 128) q_x − 128 Σ q_x
            acc = builder.sub(acc, _splat_i32(builder, builder.shl(x_sum, ir.Constant(i32, 7)), lanes))
        builder.store(acc, builder.bitcast(builder.gep(out, [ir.Constant(ir.IntType(64), v * rows_per_vec)]), i32_ptr),
                      align=4)


def _block_dots_typer(codes, start, groups, qx, x_start, x_sum, out):
    """The intrinsics' common signature check: None (no match) unless the arrays are 1-D
    C-contiguous codes (uint8 or int8), int8 activations and an int32 output."""
    ok = (ISA is not None
          and isinstance(codes, types.Array) and codes.ndim == 1 and codes.layout == "C"
          and codes.dtype in (types.uint8, types.int8)
          and isinstance(qx, types.Array) and qx.ndim == 1 and qx.dtype == types.int8 and qx.layout == "C"
          and isinstance(out, types.Array) and out.ndim == 1 and out.dtype == types.int32 and out.layout == "C")
    return types.void(codes, start, groups, qx, x_start, x_sum, out) if ok else None


def _block_dots_codegen(four_bit: bool):
    def codegen(context, builder, signature, args):
        codes, start, groups, qx, x_start, x_sum, out = args
        i32, i64, byte_ptr = ir.IntType(32), ir.IntType(64), ir.IntType(8).as_pointer()
        as_i64 = [context.cast(builder, v, t, types.int64) for v, t in
                  ((start, signature.args[1]), (groups, signature.args[2]), (x_start, signature.args[4]))]
        _emit_block_dots(builder, builder.bitcast(_data(context, builder, signature.args[0], codes), byte_ptr),
                         as_i64[0], as_i64[1],
                         builder.bitcast(_data(context, builder, signature.args[3], qx), byte_ptr), as_i64[2],
                         context.cast(builder, x_sum, signature.args[5], types.int32),
                         _data(context, builder, signature.args[6], out), four_bit)
        return context.get_dummy_value()

    return codegen


@intrinsic
def _nibble_block_dots(typingctx, codes, start, groups, qx, x_start, x_sum, out):
    """out[0:TILE] = each row's Σ code × q_x over one 4-bit block (x_sum unused). No bounds checks."""
    sig = _block_dots_typer(codes, start, groups, qx, x_start, x_sum, out)
    return None if sig is None else (sig, _block_dots_codegen(True))


@intrinsic
def _int8_block_dots(typingctx, codes, start, groups, qx, x_start, x_sum, out):
    """out[0:TILE] = each row's Σ q_w × q_x over one int8 block. No bounds checks."""
    sig = _block_dots_typer(codes, start, groups, qx, x_start, x_sum, out)
    return None if sig is None else (sig, _block_dots_codegen(False))


# --- products -------------------------------------------------------------------------------------


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _store_tile(acc, t, y):
    """y[:, tile t's rows] = acc [n, TILE], leaving out the padding rows past y's last."""
    T = acc.shape[1]
    for k in range(acc.shape[0]):
        for r in range(min(T, y.shape[1] - t * T)):
            y[k, t * T + r] = acc[k, r]


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _nibble_tile(codes, scales, mins, qx, dx, qsum, t, y):
    """Tile t of y = x̃ Wᵀ for every row of x̃ (4-bit layout, row-quad codes; module docstring)."""
    nb, groups, T = codes.shape[1], codes.shape[2], codes.shape[3]
    flat = codes.reshape(-1)
    n = qx.shape[0]
    isum = np.empty(T, np.int32)
    acc = np.zeros((n, T), np.float32)
    for b in range(nb):
        start = (t * nb + b) * groups * T * 4
        for k in range(n):
            _nibble_block_dots(flat, start, groups, qx[k], b * BLOCK, 0, isum)
            d = dx[k, b]
            m_term = d * np.float32(qsum[k, 2 * b] + qsum[k, 2 * b + 1])
            for r in range(T):
                acc[k, r] += as_float32(scales[t, b, r]) * (d * np.float32(isum[r])) + as_float32(mins[t, b, r]) * m_term
    _store_tile(acc, t, y)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _int8_tile(codes, scales, qx, dx, qsum, t, y):
    """Tile t of y = x̃ Wᵀ for every row of x̃ (int8 layout, blocks of 32 or 16, row-quad codes)."""
    nb, groups, T = codes.shape[1], codes.shape[2], codes.shape[3]
    bs = groups * 4
    flat = codes.reshape(-1)
    n = qx.shape[0]
    isum = np.empty(T, np.int32)
    acc = np.zeros((n, T), np.float32)
    for b in range(nb):
        start = (t * nb + b) * groups * T * 4
        x_start = b * bs
        half = x_start // 16
        for k in range(n):
            x_sum = qsum[k, half] + qsum[k, half + 1] if bs == 32 else qsum[k, half]
            _int8_block_dots(flat, start, groups, qx[k], x_start, x_sum, isum)
            d = dx[k, x_start // X_BLOCK]
            for r in range(T):
                acc[k, r] += as_float32(scales[t, b, r]) * (d * np.float32(isum[r]))
    _store_tile(acc, t, y)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def nibble_products(ca, sa, ma, ya, cb, sb, mb, yb, cc, sc, mc, yc, qx, dx, qsum):
    """ya, yb, yc = x̃ Waᵀ, x̃ Wbᵀ, x̃ Wcᵀ for up to three 4-bit-layout matrices (row-quad codes
    c*, scales s*, minimums m*) and the rows x̃ given by :func:`quantize_rows` (qx int8 [n, cols],
    dx, qsum); y* float32 [n, rows*], overwritten. One parallel region over all tiles; pass
    0-tile arrays for unused slots. Each row's result is independent of the other rows."""
    na, nb = ca.shape[0], cb.shape[0]
    for task in prange(na + nb + cc.shape[0]):
        if task < na:
            _nibble_tile(ca, sa, ma, qx, dx, qsum, task, ya)
        elif task < na + nb:
            _nibble_tile(cb, sb, mb, qx, dx, qsum, task - na, yb)
        else:
            _nibble_tile(cc, sc, mc, qx, dx, qsum, task - na - nb, yc)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def int8_products(ca, sa, ya, cb, sb, yb, cc, sc, yc, qx, dx, qsum):
    """As :func:`nibble_products` for int8-layout matrices (Q8_0, Q5_0, Q6_K)."""
    na, nb = ca.shape[0], cb.shape[0]
    for task in prange(na + nb + cc.shape[0]):
        if task < na:
            _int8_tile(ca, sa, qx, dx, qsum, task, ya)
        elif task < na + nb:
            _int8_tile(cb, sb, qx, dx, qsum, task - na, yb)
        else:
            _int8_tile(cc, sc, qx, dx, qsum, task - na - nb, yc)


@njit(cache=True)
def quantized(x):
    """:func:`quantize_rows` into new arrays: (qx int8 [n, cols], dx float32 [n, cols/32],
    qsum int32 [n, cols/16]) for float32 x [n, cols]."""
    n, cols = x.shape
    qx = np.empty((n, cols), np.int8)
    dx = np.empty((n, cols // X_BLOCK), np.float32)
    qsum = np.empty((n, cols // 16), np.int32)
    quantize_rows(x, qx, dx, qsum)
    return qx, dx, qsum


@njit(cache=True, fastmath=FASTMATH)
def no_tiles(a):
    """A 0-tile slice of ``a`` (minimums or codes: an empty slot of a three-matrix kernel), or
    None for None (the int8 layout's minimums)."""
    if a is None:
        return None
    return a[:0]


@njit(cache=True, fastmath=FASTMATH)
def products(qa, sa, ma, ya, qb, sb, mb, yb, qc, sc, mc, yc, qx, dx, qsum):
    """ya, yb, yc = x̃ Waᵀ, x̃ Wbᵀ, x̃ Wcᵀ for matrices of one layout: row-quad codes q*, scales
    s*, minimums m* (None for the int8 layout — then every m* is None). Unused slots: 0-tile
    slices. The layout is settled when Numba compiles, as ``mins is None`` is in
    :mod:`~mqa_gen.kernels.decode_layer`."""
    if ma is None:
        int8_products(qa, sa, ya, qb, sb, yb, qc, sc, yc, qx, dx, qsum)
    else:
        nibble_products(qa, sa, ma, ya, qb, sb, mb, yb, qc, sc, mc, yc, qx, dx, qsum)


@njit(cache=True, fastmath=FASTMATH)
def product(quads, scales, mins, qx, dx, qsum, y):
    """y = x̃ Wᵀ for one matrix (row-quad codes, scales, minimums or None); y float32 [n, rows]."""
    products(quads, scales, mins, y, quads[:0], scales[:0], no_tiles(mins), y[:, :0],
             quads[:0], scales[:0], no_tiles(mins), y[:, :0], qx, dx, qsum)


def rounded(x: np.ndarray) -> np.ndarray:
    """:func:`rounded_rows` of float32 x [n, cols] into a new array."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    rounded_rows(x, out)
    return out


def warm_up() -> None:
    """Compile (or load) the integer kernels: products of each layout (4-bit with float16 and
    float32 scales, int8 with blocks of 32 and 16) for one and two rows, and the rounding. Run by
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
            rounded(x)
