"""float16 KV-cache support for Numba, which has no float16 type on the CPU.

A float16 cache is stored as its raw uint16 bit patterns. Kernels read a cache row through
:func:`cache_row`: a view for a float32 cache; for a uint16 one, the row decoded into float32 by
:func:`half_row_to_f32` — with the CPU's conversion instruction where it has one (F16C), else with
integer bit operations; both vectorise and equal NumPy's float16→float32 cast exactly.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from .bits import HAS_F16C, float32_from_half_bits
from .flags import FASTMATH

#: 2^112 = 2^(127 − 15): moves a float16 exponent, placed in a float32's exponent field, to its value.
_REBIAS = np.float32(2.0 ** 112)

@njit(cache=True, fastmath=FASTMATH, inline="always")
def half_row_to_f32(src, bits, out):
    """Decode float16 bit patterns src (uint16 [n]) into out (float32 [n], a view of bits, uint32 [n]).

    With F16C (:data:`~mqa_gen.kernels.bits.HAS_F16C`) the hardware conversion does it, 8 or 16
    values per instruction (NaNs come back quiet, still NaN); otherwise
    :func:`half_row_to_f32_portable`.
    """
    if HAS_F16C:  # a compile-time constant: Numba keeps only one branch
        for i in range(src.shape[0]):
            out[i] = float32_from_half_bits(src[i])
    else:
        half_row_to_f32_portable(src, bits, out)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def half_row_to_f32_portable(src, bits, out):
    """:func:`half_row_to_f32` with integer operations only, for CPUs without F16C.

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
