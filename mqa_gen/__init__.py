"""mqa-gen: text generation with Multi-Query Attention, Numba kernels and a measured KV cache."""

import os

# OpenBLAS worker threads busy-wait for about 2^28 cycles (~0.1 s) after each call before they
# sleep. Prefill and decode alternate BLAS products with Numba kernels, so on a 2-core machine the
# spinning BLAS threads steal the cores the Numba threads need: prefill of 512 tokens ran at 132
# tok/s with the default and 270 with 2^4 cycles (BENCHMARKS.md). Takes effect only if set before
# NumPy loads OpenBLAS (the CLI imports this package first); a value the user set wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
# Numba's OpenMP workers are left to spin as libgomp decides (OMP_WAIT_POLICY unset): with
# OMP_WAIT_POLICY=passive they sleep at once, which under a busy core helps (2 threads 0.72-0.83x
# of 1 thread instead of 0.35-0.42x) but on a quiet machine makes 2 threads slower than one
# (0.51-0.65x, each of ~100 parallel regions a token pays a wake-up); GOMP_SPINCOUNT=20000 was
# worse on both (benchmarks/bench_busy_core.py, 2026-12-07). The thread governor handles the busy
# core instead (thread_governor.py).

from .process_memory import keep_freed_memory  # noqa: E402

keep_freed_memory()  # a prefill's work arrays are reused, not faulted in afresh (process_memory.py)

__version__ = "0.1.0"

__all__ = ["MultiQueryAttention", "MultiQueryAttentionConfig"]


def __getattr__(name: str):
    # Lazy: ``import mqa_gen`` stays light; the layer (and Numba) load on first use.
    if name in __all__:
        from . import layer

        return getattr(layer, name)
    raise AttributeError(f"module 'mqa_gen' has no attribute {name!r}")
