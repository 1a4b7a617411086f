"""float16 support for Numba, which has no float16 type on the CPU: KV-cache rows and
quantisation scales are stored as their raw uint16 bit patterns and converted as they are read
(:func:`half_to_f32`; :func:`as_float32` accepts float32 or such bits).

A float16 cache is stored as its raw uint16 bit patterns. Kernels read a cache row through
:func:`cache_row`: a view for a float32 cache; for a uint16 one, the row decoded into float32 by
:func:`half_row_to_f32` — with the CPU's conversion instruction where it has one (F16C), else with
integer bit operations; both vectorise and equal NumPy's float16→float32 cast exactly.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from .bits import HAS_F16C, float32_from_bits, float32_from_half_bits
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


def cache_row(cache, g, s, out):  # pragma: no cover - replaced by the overload inside jitted code
    """Row ``cache[g, s]`` as float32 [head_dim]: a view for a float32 cache; for a uint16 (float16)
    cache, decoded into ``out`` (float32 [head_dim]) and returned."""
    raise NotImplementedError("cache_row is only callable from Numba-jitted code")


@overload(cache_row, inline="always")
def _cache_row_overload(cache, g, s, out):
    if isinstance(cache.dtype, types.Float):
        return lambda cache, g, s, out: cache[g, s]
    if isinstance(cache.dtype, types.Integer):
        def decode(cache, g, s, out):
            half_row_to_f32(cache[g, s], out)
            return out
        return decode
    return None
