"""float16 support for Numba, which has no float16 type on the CPU: KV-cache rows and
quantisation scales are stored as their raw uint16 bit patterns and converted as they are read
(:func:`half_to_f32`; :func:`as_float32` accepts float32 or such bits), and written with
:func:`f32_to_half_bits` (the scales of quantised KV-cache blocks).

A float16 cache row is decoded into float32 by :func:`half_row_to_f32` (kernels call it through
:func:`mqa_gen.kernels.cache_rows.cache_row`) — with the CPU's conversion instruction where it has
one (F16C), else with integer bit operations; both vectorise and equal NumPy's float16→float32
cast exactly.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from .bits import HAS_F16C, bits_from_float32, float32_from_bits, float32_from_half_bits, half_bits_from_float32
from .flags import FASTMATH

#: 2^112 = 2^(127 − 15): moves a float16 exponent, placed in a float32's exponent field, to its value.
_REBIAS = np.float32(2.0 ** 112)

@njit(cache=True, fastmath=FASTMATH, inline="always")
def half_to_f32_portable(h):
    """float16 bits h (uint16) → float32 with integer operations only, for CPUs without F16C.

    Sign to bit 31; exponent and mantissa shifted by 13 into the float32 fields, then × 2^112 to
    re-bias the exponent from 15 to 127 — exact for normal and subnormal halves (a power-of-two
    scale); infinities and NaNs get the float32 all-ones exponent (inf × 2^112 = inf, NaN stays
    NaN). No branches, so a loop of it vectorises (a table lookup would be a gather).
    """
    w = np.uint32(h)
    special = np.uint32((w & np.uint32(0x7C00)) == np.uint32(0x7C00))  # inf / NaN: 0 or 1
    bits = (((w & np.uint32(0x8000)) << np.uint32(16)) | ((w & np.uint32(0x7FFF)) << np.uint32(13))
            | (special * np.uint32(0x7F800000)))
    return float32_from_bits(bits) * _REBIAS


@njit(cache=True, fastmath=FASTMATH, inline="always")
def half_to_f32(h):
    """float16 bits h (uint16) → float32, exact: the CPU's conversion instruction with F16C
    (:data:`~mqa_gen.kernels.bits.HAS_F16C`; NaNs come back quiet, still NaN), else
    :func:`half_to_f32_portable`."""
    if HAS_F16C:  # a compile-time constant: Numba keeps only one branch
        return float32_from_half_bits(h)
    return half_to_f32_portable(h)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def half_row_to_f32(src, out):
    """Decode float16 bit patterns src (uint16 [n]) into out (float32 [n])."""
    for i in range(src.shape[0]):
        out[i] = half_to_f32(src[i])


@njit(cache=True, fastmath=FASTMATH)
def half_rows_to_f32(cache, first, stop, out):
    """out[a, j] ← cache[a, first + j] as float32, for j < stop − first: a float16 cache's rows
    [first, stop) of every KV head, decoded.

    cache: uint16 float16 bits [n_kv_heads, S, head_dim], C-contiguous; out: float32
    [n_kv_heads, ≥ stop − first, head_dim]. 0.07 ns an element here, 20× NumPy's
    ``view(np.float16).astype(np.float32)`` (which runs scalar on this CPU); the same values.
    """
    for a in range(cache.shape[0]):
        for j in range(stop - first):
            half_row_to_f32(cache[a, first + j], out[a, j])


@njit(cache=True, fastmath=FASTMATH)
def _encode_half_hardware(x, out):
    for i in range(x.shape[0]):
        out[i] = half_bits_from_float32(x[i])


#: Elements below which :func:`float32_array_to_half_bits` leaves the cast to NumPy (1 µs against 2–8).
_SMALL_ENCODE = 4096


def float32_array_to_half_bits(x: np.ndarray) -> np.ndarray:
    """float32 array → uint16 [same shape], the bits of NumPy's ``x.astype(np.float16)`` (nearest,
    ties to even; a NaN stays NaN, quieted where the CPU converts): with the CPU's conversion
    instruction where it has one (:data:`~mqa_gen.kernels.bits.HAS_F16C`), vectorised — 0.1 ns an
    element against NumPy's 1.4 here, which runs scalar — else by NumPy. Below
    :data:`_SMALL_ENCODE` elements (a decode step's row) NumPy's call is the cheaper one."""
    if not HAS_F16C or x.dtype != np.float32 or x.size < _SMALL_ENCODE:
        return x.astype(np.float16).view(np.uint16)
    flat = np.ascontiguousarray(x).reshape(-1)
    out = np.empty(flat.shape[0], np.uint16)
    _encode_half_hardware(flat, out)
    return out.reshape(x.shape)


@njit(cache=True, inline="always")
def f32_to_half_bits(f):
    """float32 f → the uint16 bits of the nearest float16, ties to even: NumPy's
    ``astype(np.float16)`` and ggml's ``GGML_FP32_TO_FP16``, bit for bit (for the float16 scales of
    quantised KV-cache blocks). Integer operations only, so it needs no F16C and no fast-math.

    Magnitudes ≥ 65520 become ±inf; NaNs stay NaN (their payload's top 10 bits kept, never 0, as
    NumPy does); below 2⁻¹⁴ the result is a subnormal half, rounded to a multiple of 2⁻²⁴.
    """
    x = np.int64(bits_from_float32(f))
    sign = (x >> 16) & 0x8000
    a = x & 0x7FFFFFFF
    if a >= 0x7F800000:  # inf or NaN
        mantissa = (a & 0x7FFFFF) >> 13
        if a > 0x7F800000 and mantissa == 0:
            mantissa = 1  # a NaN whose payload sits in the dropped bits must not become inf
        return np.uint16(sign | 0x7C00 | mantissa)
    if a >= 0x477FF000:  # rounds to 2^16 or more: beyond float16's largest finite value 65504
        return np.uint16(sign | 0x7C00)
    if a < 0x38800000:  # below float16's smallest normal 2^-14: a multiple of 2^-24 (or zero)
        if a <= 0x33000000:  # at most 2^-25, half the smallest subnormal: ties to even = 0
            return np.uint16(sign)
        m = (a & 0x7FFFFF) | 0x800000  # value = m · 2^(e − 150), e = a >> 23 in 102 .. 112
        shift = 126 - (a >> 23)  # value / 2^-24 = m >> shift, plus the rounding below
        q = m >> shift
        rest = m & ((np.int64(1) << shift) - 1)
        half = np.int64(1) << (shift - 1)
        if rest > half or (rest == half and (q & 1) == 1):
            q += 1  # may carry into 0x400: the smallest normal, encoded correctly
        return np.uint16(sign | q)
    # Normal: rebias the exponent (127 → 15, i.e. − 112 · 2^23), then round the 23-bit mantissa to
    # 10 bits, ties to even (add 0xFFF plus the lowest kept bit, then drop 13 bits).
    r = a - 0x38000000
    r += 0xFFF + ((r >> 13) & 1)
    return np.uint16(sign | (r >> 13))


def as_float32(value):  # pragma: no cover - replaced by the overload inside jitted code
    """A quantisation scale as float32: float32 as it is, uint16 as the float16 it holds."""
    raise NotImplementedError("as_float32 is only callable from Numba-jitted code")


@overload(as_float32, inline="always")
def _as_float32_overload(value):
    if isinstance(value, types.Float):
        return lambda value: value
    if value == types.uint16:
        return lambda value: half_to_f32(value)
    return None


def warm_up() -> None:
    """Compile (or load) the float16 cache's bulk conversions for the arrays prefill passes."""
    half_rows_to_f32(np.zeros((1, 2, 4), np.uint16), 0, 2, np.empty((1, 2, 4), np.float32))
    _encode_half_hardware(np.zeros(4, np.float32), np.empty(4, np.uint16))
