"""Scalar bit casts for Numba kernels, which Numba has no spelling for, and a vectorisable exp.

Each cast is one LLVM instruction inside the caller's loop, so loops that use them still
vectorise: ``float32_from_bits`` is a ``bitcast`` (no machine instruction at all), and
``float32_from_half_bits`` is ``fpext half→float`` — ``vcvtph2ps`` on CPUs with F16C
(every x86-64 since 2012; Arm has its own), which LLVM otherwise lowers to a library call that
Numba's JIT cannot link. :data:`HAS_F16C` says which we have.
"""

from __future__ import annotations

import os
import platform

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .flags import FASTMATH


def _has_hardware_half_conversion() -> bool:
    if os.environ.get("NUMBA_CPU_NAME") or os.environ.get("NUMBA_CPU_FEATURES"):
        return False  # compiling for another CPU than this one: stay portable
    try:
        features = llvm.get_host_cpu_features()
    except RuntimeError:  # features unknown on this host: take the portable path
        return False
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return bool(features.get("f16c", False))
    return machine in ("aarch64", "arm64")


#: True when this CPU converts float16 → float32 in hardware (x86 F16C or Arm).
HAS_F16C = _has_hardware_half_conversion()


@intrinsic
def float32_from_bits(typingctx, bits):
    """The float32 whose IEEE-754 bit pattern is the low 32 bits of integer ``bits``."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if bits.bitwidth > 32:
            value = builder.trunc(value, ir.IntType(32))
        elif bits.bitwidth < 32:
            value = builder.zext(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def bits_from_float32(typingctx, value):
    """The IEEE-754 bit pattern of float32 ``value`` as a uint32 (the inverse of
    :func:`float32_from_bits`)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(value), codegen


@intrinsic
def float32_from_half_bits(typingctx, bits):
    """float16 bit pattern (uint16) → float32, exact (NaNs come back quiet). Needs :data:`HAS_F16C`."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def half_bits_from_float32(typingctx, value):
    """float32 → the bit pattern (uint16) of the nearest float16, ties to even (the CPU's
    conversion instruction; NaNs come back quiet, still NaN). Needs :data:`HAS_F16C`."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(value), codegen


_LOG2E = np.float32(1.4426950408889634)
# ln 2 split so that n · _LN2_HI is exact for |n| ≤ 2^8 (Cody & Waite 1980 range reduction).
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def exp32(x):
    """e^x for float32 x, within 4e-7 relative of the exact value; 0 for x < −87 (and −inf).

    x = n ln 2 + r with |r| ≤ ln2/2, e^r by its degree-7 Taylor polynomial (Horner), 2^n placed
    straight into the exponent bits. No branches or calls, so a loop of it vectorises (about 7×
    NumPy's scalar ``expf`` here); inputs above 88 saturate at e^88.
    """
    xc = min(max(x, np.float32(-87.0)), np.float32(88.0))
    n = np.floor(xc * _LOG2E + np.float32(0.5))
    r = xc - n * _LN2_HI - n * _LN2_LO
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    e = p * float32_from_bits((np.int64(n) + 127) << 23)
    return e if x >= np.float32(-87.0) else np.float32(0.0)


def _nibble_to_float32(take_high: bool):
    @intrinsic
    def nibble(typingctx, byte):
        if byte != types.uint8:
            return None

        def codegen(context, builder, signature, args):
            four = ir.Constant(ir.IntType(8), 4)
            value = builder.lshr(args[0], four) if take_high else builder.and_(args[0], ir.Constant(ir.IntType(8), 15))
            return builder.uitofp(value, ir.FloatType())

        return types.float32(byte), codegen

    return nibble


#: float32 of the low / high 4 bits of a uint8, computed in 8-bit lanes. Numba widens ``q & 15``
#: to int64 (and its vectorised loop to 8 lanes of 64-bit integers, then ``vcvtqq2ps``); these
#: keep the byte width, so a 4-bit weight loop converts 16 or 32 codes per instruction.
low_nibble_f32 = _nibble_to_float32(False)
high_nibble_f32 = _nibble_to_float32(True)
