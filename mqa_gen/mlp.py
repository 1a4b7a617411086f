"""The gated feed-forward block of a decoder layer (Shazeer 2020, "GLU Variants Improve Transformer"):

    out = W_down(act(W_gate x) ⊙ W_up x)        x [N, d_model] → [N, d_ff] → [N, d_model]

act is SiLU for llama (SwiGLU) and GELU with the tanh approximation for Gemma (GeGLU).
"""

from __future__ import annotations

import numpy as np

from .kernels import swiglu
from .linear import FusedProjections


class GatedMLP:
    """Gated MLP. ``gated_activation(gate, up)`` is the kernel computing up ← act(gate) ⊙ up:
    :func:`~mqa_gen.kernels.swiglu` (SiLU, llama) by default, :func:`~mqa_gen.kernels.geglu_tanh`
    (GELU-tanh, Gemma).

    Args:
        w_gate, w_up: [d_ff, d_model]; w_down: [d_model, d_ff] — :mod:`mqa_gen.linear` objects (y = x Wᵀ).
    """

    def __init__(self, w_gate, w_up, w_down, gated_activation=swiglu):
        self.w_gate, self.w_up, self.w_down = w_gate, w_up, w_down
        self.gated_activation = gated_activation
        self.gate_up = FusedProjections((w_gate, w_up))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: float32 [N, d_model] → float32 [N, d_model]."""
        gate, up = self.gate_up(x)  # (N, d_ff) each
        self.gated_activation(gate, up)  # up ← act(gate) ⊙ up
        return self.w_down(up)  # (N, d_model)
