"""KV-cache rows in every storage type: how kernels read one, and how q8_0 / q4_0 rows are written.

A cache array is [..., n_kv_heads, capacity, row_width]; what a row holds depends on the array's
dtype, which is how a kernel tells the storage types apart (Numba compiles one specialisation per
dtype, so the f32 and f16 paths carry no test for the others):

* float32 — head_dim values as they are;
* uint16 — head_dim float16 bit patterns (:mod:`~mqa_gen.kernels.halfprec`);
* int8 — llama.cpp's **q8_0** blocks, head_dim / 32 of them, 34 bytes each: the float16 scale d
  (2 bytes, little-endian) then 32 int8 codes q; x = d·q;
* uint8 — llama.cpp's **q4_0** blocks, head_dim / 32 of them, 18 bytes each: the float16 scale d
  then 16 bytes of 4-bit codes q — byte j holds element j in its low nibble and element j + 16
  in its high nibble; x = d·(q − 8).

(ggml-common.h ``block_q8_0`` / ``block_q4_0``; the int8 / uint8 dtypes follow the codes' own
signedness.) :func:`cache_row` decodes one row into float32 as a kernel reads it, so the attention
kernels read the blocks themselves — there is no dequantised copy of a cache.

:func:`quantize_q8_0` and :func:`quantize_q4_0` write rows the way ggml's reference quantisers
``quantize_row_q8_0_ref`` / ``quantize_row_q4_0_ref`` (ggml-quants.c) do, with the same float32
arithmetic and rounding, so a block here equals llama.cpp's for the same input byte for byte. They
are compiled without fast-math for that reason.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .flags import FASTMATH
from .halfprec import f32_to_half_bits, half_row_to_f32, half_to_f32

#: Elements per block (ggml's QK8_0 = QK4_0 = 32).
QK = 32
#: Bytes per block: a float16 scale plus 32 int8 codes, or plus 16 bytes of nibbles.
Q8_0_BLOCK_BYTES = 2 + QK
Q4_0_BLOCK_BYTES = 2 + QK // 2


@njit(cache=True)
def quantize_q8_0(x, out):
    """float32 rows x [N, head_dim] (head_dim a multiple of 32) → q8_0 blocks in out (uint8 [N,
    head_dim / 32 · 34], the bytes of the int8 cache rows). Per block: amax = max |x|, d = amax / 127,
    q = roundf(x · (1/d)) (0 when d = 0), d stored as float16 — ``quantize_row_q8_0_ref``."""
    N, D = x.shape
    for n in range(N):
        for b in range(D // QK):
            base = b * QK
            amax = np.float32(0.0)
            for j in range(QK):
                amax = max(amax, abs(x[n, base + j]))
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
            h = f32_to_half_bits(d)
            o = b * Q8_0_BLOCK_BYTES
            out[n, o] = np.uint8(h & 0xFF)
            out[n, o + 1] = np.uint8(h >> 8)
            for j in range(QK):
                v = x[n, base + j] * inv  # float32 product, as in C
                # C's roundf: half away from zero. |v| + 0.5 in float64 is exact, so floor gives
                # the right integer even for 0.49999997 (which float32 addition would round up).
                r = np.int64(np.floor(np.float64(abs(v)) + 0.5))
                q = -r if v < 0 else r
                out[n, o + 2 + j] = np.uint8(q & 0xFF)  # two's complement byte of the int8 code


@njit(cache=True)
def quantize_q4_0(x, out):
    """float32 rows x [N, head_dim] (head_dim a multiple of 32) → q4_0 blocks in out (uint8 [N,
    head_dim / 32 · 18]). Per block: m = the element of largest magnitude (the first of equals),
    d = m / −8, q = min(15, trunc(x · (1/d) + 8.5)), element j in byte j's low nibble and element
    j + 16 in its high nibble, d stored as float16 — ``quantize_row_q4_0_ref``."""
    N, D = x.shape
    half = QK // 2
    for n in range(N):
        for b in range(D // QK):
            base = b * QK
            amax = np.float32(0.0)
            m = np.float32(0.0)
            for j in range(QK):
                v = x[n, base + j]
                if amax < abs(v):
                    amax = abs(v)
                    m = v
            d = m / np.float32(-8.0)
            inv = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
            h = f32_to_half_bits(d)
            o = b * Q4_0_BLOCK_BYTES
            out[n, o] = np.uint8(h & 0xFF)
            out[n, o + 1] = np.uint8(h >> 8)
            for j in range(half):
                # (int8_t)(x·id + 8.5f): a float32 sum truncated toward zero, capped at 15.
                lo = min(15, np.int64(x[n, base + j] * inv + np.float32(8.5)))
                hi = min(15, np.int64(x[n, base + half + j] * inv + np.float32(8.5)))
                out[n, o + 2 + j] = np.uint8(lo | (hi << 4))


# Decoding one block's 32 codes is a fixed-size vector operation, written here as one: LLVM's loop
# vectoriser, given a loop of 32, picks 64-lane iterations and runs the block in its scalar or
# narrow remainder (about 10× slower than a float16 row), and the fully unrolled form does not
# vectorise because the stores might alias the codes. These intrinsics load the codes as one
# vector, convert, scale and store them as one vector: a few instructions per block on any x86-64
# or Arm CPU (LLVM splits the vectors to the registers the CPU has).


def _vector_ptr(context, builder, array_type, array, index, vector):
    """Pointer to element ``index`` of a 1-D array, as a pointer to ``vector`` (an LLVM type)."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(cgutils.gep(builder, data, index), vector.as_pointer())


def _splat(builder, value, vector):
    """``value`` (float) in every lane of ``vector``."""
    lanes = vector.count
    one = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))


@intrinsic
def _q8_0_codes_to_f32(typingctx, src, start, d, out, out_start):
    """out[out_start : out_start + 32] = d · src[start : start + 32] (int8 codes; float32 d and out).
    No bounds checks: callers pass rows checked by :func:`check_cache_rows`."""
    if not (isinstance(src, types.Array) and src.dtype == types.int8 and src.ndim == 1 and src.layout == "C"
            and isinstance(out, types.Array) and out.dtype == types.float32 and out.ndim == 1 and out.layout == "C"
            and d == types.float32):
        return None

    def codegen(context, builder, signature, args):
        codes_t, floats_t = ir.VectorType(ir.IntType(8), QK), ir.VectorType(ir.FloatType(), QK)
        codes = builder.load(_vector_ptr(context, builder, signature.args[0], args[0], args[1], codes_t), align=1,
                             typ=codes_t)
        x = builder.fmul(builder.sitofp(codes, floats_t), _splat(builder, args[2], floats_t))
        builder.store(x, _vector_ptr(context, builder, signature.args[3], args[3], args[4], floats_t), align=4)
        return context.get_dummy_value()

    return types.void(src, start, d, out, out_start), codegen


@intrinsic
def _q4_0_codes_to_f32(typingctx, src, start, d, out, out_start):
    """The 16 bytes src[start : start + 16] hold 32 4-bit codes q (byte j: code j low, code j + 16
    high); out[out_start + i] = d · (q_i − 8) for i < 32. No bounds checks, as above."""
    if not (isinstance(src, types.Array) and src.dtype == types.uint8 and src.ndim == 1 and src.layout == "C"
            and isinstance(out, types.Array) and out.dtype == types.float32 and out.ndim == 1 and out.layout == "C"
            and d == types.float32):
        return None

    def codegen(context, builder, signature, args):
        half = QK // 2
        bytes_t, floats_t = ir.VectorType(ir.IntType(8), half), ir.VectorType(ir.FloatType(), half)
        packed = builder.load(_vector_ptr(context, builder, signature.args[0], args[0], args[1], bytes_t), align=1,
                              typ=bytes_t)
        low = builder.and_(packed, ir.Constant(bytes_t, [15] * half))
        high = builder.lshr(packed, ir.Constant(bytes_t, [4] * half))
        d, eight = _splat(builder, args[2], floats_t), ir.Constant(floats_t, [8.0] * half)
        out_index = args[4]
        for codes, offset in ((low, 0), (high, half)):
            x = builder.fmul(builder.fsub(builder.uitofp(codes, floats_t), eight), d)
            at = builder.add(out_index, ir.Constant(out_index.type, offset))
            builder.store(x, _vector_ptr(context, builder, signature.args[3], args[3], at, floats_t), align=4)
        return context.get_dummy_value()

    return types.void(src, start, d, out, out_start), codegen


@intrinsic
def _half_bits_at(typingctx, src, start):
    """The uint16 stored little-endian at bytes start, start + 1 of a 1-D int8 / uint8 array (one
    unaligned 16-bit load; x86 and Arm are little-endian). No bounds check, as above."""
    if not (isinstance(src, types.Array) and src.dtype in (types.int8, types.uint8) and src.ndim == 1
            and src.layout == "C"):
        return None

    def codegen(context, builder, signature, args):
        half_t = ir.IntType(16)
        return builder.load(_vector_ptr(context, builder, signature.args[0], args[0], args[1], half_t), align=1,
                            typ=half_t)

    return types.uint16(src, start), codegen


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _block_scale(src, o):
    """The float16 scale stored little-endian at bytes o, o + 1 of a block row, as float32."""
    return half_to_f32(_half_bits_at(src, o))


@njit(cache=True, fastmath=FASTMATH, inline="always")
def q8_0_row_to_f32(src, out):
    """Decode one q8_0 row src (int8 [head_dim / 32 · 34], C-contiguous) into out (float32
    [head_dim], C-contiguous): x = d·q. The row widths must match (:func:`check_cache_rows`)."""
    for b in range(out.shape[0] // QK):
        o = b * Q8_0_BLOCK_BYTES
        _q8_0_codes_to_f32(src, o + 2, _block_scale(src, o), out, b * QK)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def q4_0_row_to_f32(src, out):
    """Decode one q4_0 row src (uint8 [head_dim / 32 · 18], C-contiguous) into out (float32
    [head_dim], C-contiguous): x = d·(q − 8), low nibbles first. Widths as above."""
    for b in range(out.shape[0] // QK):
        o = b * Q4_0_BLOCK_BYTES
        _q4_0_codes_to_f32(src, o + 2, _block_scale(src, o), out, b * QK)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _strided_q8_0_row_to_f32(src, out):
    """:func:`q8_0_row_to_f32` for a row that is not C-contiguous (a strided view of a cache): one
    element at a time, the same values."""
    for b in range(out.shape[0] // QK):
        o = b * Q8_0_BLOCK_BYTES
        d = half_to_f32(np.uint16(np.uint16(np.uint8(src[o])) | (np.uint16(np.uint8(src[o + 1])) << np.uint16(8))))
        for j in range(QK):
            out[b * QK + j] = d * np.float32(src[o + 2 + j])


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _strided_q4_0_row_to_f32(src, out):
    """:func:`q4_0_row_to_f32` for a row that is not C-contiguous, one element at a time."""
    half = QK // 2
    for b in range(out.shape[0] // QK):
        o = b * Q4_0_BLOCK_BYTES
        d = half_to_f32(np.uint16(np.uint16(src[o]) | (np.uint16(src[o + 1]) << np.uint16(8))))
        for j in range(half):
            byte = np.int64(src[o + 2 + j])
            out[b * QK + j] = d * np.float32((byte & 15) - 8)
            out[b * QK + half + j] = d * np.float32((byte >> 4) - 8)


def row_width(cache, head_dim):  # pragma: no cover - replaced by the overload inside jitted code
    """The last-axis length a cache array of this dtype needs for rows of ``head_dim`` elements
    (-1 where the dtype's blocks cannot hold head_dim)."""
    raise NotImplementedError("row_width is only callable from Numba-jitted code")


@overload(row_width)
def _row_width_overload(cache, head_dim):
    if cache.dtype in (types.float32, types.float64, types.uint16):
        return lambda cache, head_dim: head_dim
    block_bytes = {types.int8: Q8_0_BLOCK_BYTES, types.uint8: Q4_0_BLOCK_BYTES}.get(cache.dtype)
    if block_bytes is None:
        return None

    def blocks(cache, head_dim):
        width = -1
        if head_dim % QK == 0:
            width = head_dim // QK * block_bytes
        return width
    return blocks


@njit(cache=True)
def check_cache_rows(cache, head_dim):
    """Raise ValueError unless the last axis of ``cache`` holds rows of ``head_dim`` elements in its
    dtype's storage type (the block decoders read without bounds checks, so a kernel checks once)."""
    if cache.shape[-1] != row_width(cache, head_dim):
        raise ValueError("cache rows do not fit head_dim for the cache's storage type")


def cache_row(cache, g, s, out):  # pragma: no cover - replaced by the overload inside jitted code
    """Row ``cache[g, s]`` as float32 [head_dim]: a view for a float32 cache; for a uint16 (f16),
    int8 (q8_0) or uint8 (q4_0) cache, decoded into ``out`` (float32 [head_dim]) and returned."""
    raise NotImplementedError("cache_row is only callable from Numba-jitted code")


@overload(cache_row, inline="always")
def _cache_row_overload(cache, g, s, out):
    dtype = cache.dtype
    if isinstance(dtype, types.Float):
        return lambda cache, g, s, out: cache[g, s]
    decoders = {types.uint16: half_row_to_f32, types.int8: q8_0_row_to_f32, types.uint8: q4_0_row_to_f32}
    if cache.layout != "C":  # a strided view: the vector block readers need contiguous rows
        decoders.update({types.int8: _strided_q8_0_row_to_f32, types.uint8: _strided_q4_0_row_to_f32})
    decoder = decoders.get(dtype)
    if decoder is None:
        return None

    def read(cache, g, s, out):
        decoder(cache[g, s], out)
        return out
    return read


#: Bytes per cache line on the CPUs we target (x86-64; most Arm cores).
CACHE_LINE = 64


@intrinsic
def _prefetch_line(typingctx, cache, g, s, offset):
    """Ask the CPU to start loading the cache line at byte ``offset`` of row ``cache[g, s]`` into
    its caches (``llvm.prefetch``: read, keep in all levels). A hint only: no value, no fault for
    an address past the array, no effect on results."""
    if not (isinstance(cache, types.Array) and cache.ndim == 3):
        return None

    def codegen(context, builder, signature, args):
        i8, i32 = ir.IntType(8), ir.IntType(32)
        array = context.make_array(signature.args[0])(context, builder, args[0])
        strides = cgutils.unpack_tuple(builder, array.strides, 3)
        index = [context.cast(builder, v, t, types.int64) for v, t in zip(args[1:], signature.args[1:])]
        start = builder.add(builder.add(builder.mul(index[0], strides[0]), builder.mul(index[1], strides[1])), index[2])
        address = builder.gep(builder.bitcast(array.data, i8.as_pointer()), [start])
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8.as_pointer(), i32, i32, i32]), "llvm.prefetch.p0i8")
        builder.call(prefetch, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(cache, g, s, offset), codegen


@njit(cache=True, inline="always")
def prefetch_row(cache, g, s):
    """Start loading row ``cache[g, s]`` (all its cache lines) ahead of its use: a stream of rows
    read right after other kernels evicted them waits on memory latency rather than bandwidth
    unless the loads are requested early (see :func:`mqa_gen.kernels.attention.attention_decode`)."""
    for offset in range(0, cache.shape[2] * cache.itemsize, CACHE_LINE):
        _prefetch_line(cache, g, s, offset)


def warm_up() -> None:
    """Compile (or load) both quantisers for the float32 rows the attention block writes."""
    x = np.zeros((1, QK), np.float32)
    quantize_q8_0(x, np.empty((1, Q8_0_BLOCK_BYTES), np.uint8))
    quantize_q4_0(x, np.empty((1, Q4_0_BLOCK_BYTES), np.uint8))
