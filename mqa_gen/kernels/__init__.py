"""Numba kernels: attention (prefill and decode), RMSNorm, RoPE, SwiGLU, GeGLU, softmax, and the
quantised matrix products (:mod:`~mqa_gen.kernels.quant`).

Kernels take NumPy arrays and integers only, so each can be tested alone against plain NumPy.
Compiled code is cached on disk (``cache=True``); :mod:`~mqa_gen.kernels.numba_cache` chooses the
folder, and must do so before the first kernel is decorated, so it runs before any submodule here
is imported.
"""

from __future__ import annotations

from .numba_cache import configure_numba_cache

configure_numba_cache()

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
