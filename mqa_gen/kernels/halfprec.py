"""float16 KV-cache support for Numba, which has no float16 type on the CPU.

A float16 cache is stored as its raw uint16 bit patterns. Kernels read a single element through
:func:`as_f32`, which is the identity for float32 arrays and a 65,536-entry lookup table
(256 KiB, stays in L2) for uint16 ones; the table is exact: it is NumPy's own float16→float32
cast. Kernels that stream whole rows (decode attention) use :func:`cache_row` instead, which
converts a row with integer bit operations that vectorise, also exactly (see :func:`half_row_to_f32`).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from .flags import FASTMATH

#: 2^112 = 2^(127 − 15): moves a float16 exponent, placed in a float32's exponent field, to its value.
_REBIAS = np.float32(2.0 ** 112)

#: float32 value of every float16 bit pattern, indexed by the uint16 pattern.
HALF_TO_FLOAT: np.ndarray = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def as_f32(value, lut):  # pragma: no cover - replaced by the overload inside jitted code
    """Element of a KV cache as float32: ``value`` is float32, or uint16 bits decoded via ``lut``."""
    raise NotImplementedError("as_f32 is only callable from Numba-jitted code")


@overload(as_f32, inline="always")
def _as_f32_overload(value, lut):
    if isinstance(value, types.Float):
        return lambda value, lut: np.float32(value)
    if isinstance(value, types.Integer):
        return lambda value, lut: lut[value]
    return None


@njit(cache=True, fastmath=FASTMATH, inline="always")
def half_row_to_f32(src, bits, out):
    """Decode float16 bit patterns src (uint16 [n]) into out (float32 [n], a view of bits, uint32 [n]).

    Sign to bit 31; exponent and mantissa shifted by 13 into the float32 fields, then × 2^112 to
    re-bias the exponent from 15 to 127 — exact for normal and subnormal halves (a power-of-two
    scale); infinities and NaNs get the float32 all-ones exponent. Integer operations and one
    multiply per element, which LLVM vectorises (a table lookup is a gather and does not).
    """
    for i in range(src.shape[0]):
        h = np.uint32(src[i])
        special = np.uint32((h & np.uint32(0x7C00)) == np.uint32(0x7C00))  # inf / NaN: 0 or 1, no branch
        bits[i] = (((h & np.uint32(0x8000)) << np.uint32(16)) | ((h & np.uint32(0x7FFF)) << np.uint32(13))
                   | (special * np.uint32(0x7F800000)))
    for i in range(src.shape[0]):
        out[i] *= _REBIAS  # inf × 2^112 = inf, NaN stays NaN


def cache_row(cache, g, s, bits, out):  # pragma: no cover - replaced by the overload inside jitted code
    """Row ``cache[g, s]`` as float32 [head_dim]: a view for a float32 cache; for a uint16 (float16)
    cache, decoded into ``out`` (float32 [head_dim], a view of ``bits``, uint32) and returned."""
    raise NotImplementedError("cache_row is only callable from Numba-jitted code")


@overload(cache_row, inline="always")
def _cache_row_overload(cache, g, s, bits, out):
    if isinstance(cache.dtype, types.Float):
        return lambda cache, g, s, bits, out: cache[g, s]
    if isinstance(cache.dtype, types.Integer):
        def decode(cache, g, s, bits, out):
            half_row_to_f32(cache[g, s], bits, out)
            return out
        return decode
    return None
