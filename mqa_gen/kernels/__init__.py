"""Numba kernels: attention (prefill and decode), RMSNorm, RoPE, SwiGLU, softmax.

Kernels take NumPy arrays and integers only, so each can be tested alone against plain NumPy.
Compiled code is cached on disk (``cache=True``). Numba writes its cache beside the source when it
can; when the package is installed read-only we point it at a user cache folder before Numba is
imported (``NUMBA_CACHE_DIR`` set by the user always wins).
"""

from __future__ import annotations

import os


def _user_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mqa-gen", "numba")


def _configure_numba_cache() -> None:
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    here = os.path.dirname(os.path.abspath(__file__))
    pycache = os.path.join(here, "__pycache__")
    writable = os.access(pycache, os.W_OK) if os.path.isdir(pycache) else os.access(here, os.W_OK)
    if not writable:
        os.environ["NUMBA_CACHE_DIR"] = _user_cache_dir()


_configure_numba_cache()

from .attention import attention_decode, attention_prefill  # noqa: E402
from .rowwise import geglu_tanh, rmsnorm, rope, softmax_inplace, swiglu  # noqa: E402
from .warmup import compile_kernels, kernels_are_compiled  # noqa: E402

__all__ = [
    "attention_decode",
    "attention_prefill",
    "geglu_tanh",
    "rmsnorm",
    "rope",
    "softmax_inplace",
    "swiglu",
    "compile_kernels",
    "kernels_are_compiled",
]
