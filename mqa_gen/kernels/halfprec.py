"""float16 KV-cache support for Numba, which has no float16 type on the CPU.

A float16 cache is stored as its raw uint16 bit patterns; kernels read an element through
:func:`as_f32`, which is the identity for float32 arrays and a 65,536-entry lookup table
(256 KiB, stays in L2) for uint16 ones. The table is exact: it is NumPy's own float16→float32 cast.
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import overload

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
