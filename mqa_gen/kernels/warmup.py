"""Compile every kernel once, up front, and remember that we did.

Numba compiles on first call and caches the machine code on disk (``cache=True``). The first run
of a fresh install therefore spends tens of seconds compiling; we say so on stderr before it starts
(so it never looks hung) and compile all kernels with the exact argument types the model uses, so
later runs only load the cache. A small marker file, keyed by the kernel sources, the Numba version
and the CPU, records that the cache is warm.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path

import numba
import numpy as np

from .numba_cache import user_cache_dir
from .attention import DECODE_BLOCK, attention_decode, attention_prefill
from .rowwise import geglu_tanh, rmsnorm, rope, softmax_inplace, swiglu
from .quant import (
    TILE,
    q4_1_dequantize_rows,
    q4_1_dequantize_transposed,
    q4_1_matmul,
    q4_1_matvec,
    q4_1_matvec3,
    int8_dequantize_rows,
    int8_dequantize_transposed,
    int8_matvec,
    repack_q4_1,
    repack_q4_k,
    repack_q6_k,
    repack_q8_0,
)


def _marker_path() -> Path:
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for source in sorted(here.glob("*.py")):
        digest.update(source.read_bytes())
    digest.update(f"{numba.__version__}|{sys.version}|{platform.machine()}|{here}".encode())
    cache_root = Path(os.environ.get("NUMBA_CACHE_DIR") or user_cache_dir()).parent
    return cache_root / f"kernels-compiled-{digest.hexdigest()[:16]}"


def kernels_are_compiled() -> bool:
    """True when a previous run compiled (and cached) every kernel for this install."""
    return _marker_path().exists()


def compile_kernels() -> None:
    """Call each kernel once on tiny inputs with every argument type the model uses (float32 and
    float16-as-uint16 caches), so Numba compiles and caches them; then write the marker file."""
    f32 = np.float32
    x = np.ones((2, 8), f32)
    rmsnorm(x, np.ones(8, f32), 1e-5, np.empty_like(x))
    gain = np.ones(8, f32)
    gain.flags.writeable = False  # float32 norm weights are read-only views of the GGUF mapping
    rmsnorm(x, gain, 1e-5, np.empty_like(x))
    swiglu(x, x, np.empty_like(x))
    geglu_tanh(x, x, np.empty_like(x))
    softmax_inplace(np.ones(4, f32))
    q = np.ones((2, 2, 4), f32)
    cos, sin = np.ones((2, 2), f32), np.zeros((2, 2), f32)
    rope(q, cos, sin, True)
    rope(q, cos, sin, False)
    for storage in (np.float32, np.uint16):
        k = np.zeros((1, 4, 4), storage)
        attention_prefill(q, k, k, 0, f32(0.5), 0, np.empty_like(q))
        scores = np.empty((2, 4), f32)
        partial = np.empty((-(-4 // DECODE_BLOCK), 2, 4 + 2), f32)
        attention_decode(q[0], k, k, 3, f32(0.5), scores, partial, np.empty((2, 4), f32))
    x, rows = np.ones(256, f32), np.arange(2)
    # Scales as float16 bits (Q4_1, Q8_0, Q5_0) and as float32 (the K-quants' products d·sc).
    for codes, scales, mins in (repack_q4_1(np.zeros((TILE, 8 * 20), np.uint8), TILE, 256),
                                repack_q4_k(np.zeros((TILE, 144), np.uint8), TILE, 256)):
        q4_1_matvec(codes, scales, mins, x, np.empty(TILE, f32))
        q4_1_matmul(codes, scales, mins, np.ones((2, 256), f32), np.empty((2, TILE), f32))
        y = np.empty(TILE, f32)
        q4_1_matvec3(codes, scales, mins, y, codes, scales, mins, y, codes[:0], scales[:0], mins[:0], y[:0], x)
        q4_1_dequantize_rows(codes, scales, mins, rows, np.empty((2, 256), f32))
        q4_1_dequantize_transposed(codes, scales, mins, np.empty((256, TILE), f32))
    for codes, scales in (repack_q8_0(np.zeros((TILE, 8 * 34), np.uint8), TILE, 256),
                          repack_q6_k(np.zeros((TILE, 210), np.uint8), TILE, 256)):
        int8_matvec(codes, scales, x, np.empty(TILE, f32))
        int8_dequantize_rows(codes, scales, rows, np.empty((2, 256), f32))
        int8_dequantize_transposed(codes, scales, np.empty((256, TILE), f32))
    marker = _marker_path()
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:
        pass  # a read-only home only costs the notice being shown again
