"""Two small optimisers that update named NumPy arrays in place: SGD (with optional momentum) and Adam.

Both take ``params`` and ``grads`` as dicts of name → array (for :class:`~mqa_gen.layer.
MultiQueryAttention`: ``layer.parameters()`` and ``grads.as_dict()``). A gradient that is None is
skipped, so a caller can train a subset of the parameters (the K/V calibration trains only W_k and
W_v). Arrays keep their dtype (float32 or float64).

Sources: Adam — Kingma & Ba 2015, "Adam: A Method for Stochastic Optimization", Algorithm 1.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def _check(params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray | None]) -> None:
    for name, g in grads.items():
        if g is None:
            continue
        if name not in params:
            raise ValueError(f"gradient for unknown parameter {name!r}")
        if np.shape(g) != params[name].shape:
            raise ValueError(f"gradient {name} has shape {np.shape(g)}, parameter has {params[name].shape}")


class SGD:
    """Stochastic gradient descent: v ← μ v + g; p ← p − lr · v (plain SGD when momentum μ = 0).

    Raises:
        ValueError: lr ≤ 0 or momentum outside [0, 1); on :meth:`step`, a gradient whose name or
            shape does not match a parameter.
    """

    def __init__(self, lr: float = 1e-2, momentum: float = 0.0):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.lr, self.momentum = float(lr), float(momentum)
        self.velocity: dict[str, np.ndarray] = {}

    def step(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray | None]) -> None:
        """Update every parameter that has a gradient, in place."""
        _check(params, grads)
        for name, g in grads.items():
            if g is None:
                continue
            p = params[name]
            if self.momentum:
                v = self.velocity.setdefault(name, np.zeros_like(p))
                v *= self.momentum
                v += g
                g = v
            p -= (self.lr * g).astype(p.dtype, copy=False)


class Adam:
    """Adam (Kingma & Ba 2015): per-element step lr · m̂ / (√v̂ + eps) from running moments of g, g².

    Args:
        lr: step size α (> 0). betas: (β₁, β₂) in [0, 1). eps: ε (> 0).

    Raises:
        ValueError: an argument outside its range; on :meth:`step`, a gradient whose name or shape
            does not match a parameter.
    """

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        b1, b2 = betas
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.lr, self.beta1, self.beta2, self.eps = float(lr), float(b1), float(b2), float(eps)
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.t: dict[str, int] = {}

    def step(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray | None]) -> None:
        """One Adam update of every parameter that has a gradient, in place."""
        _check(params, grads)
        for name, g in grads.items():
            if g is None:
                continue
            p = params[name]
            m = self.m.setdefault(name, np.zeros_like(p))
            v = self.v.setdefault(name, np.zeros_like(p))
            t = self.t[name] = self.t.get(name, 0) + 1
            m *= self.beta1
            m += (1.0 - self.beta1) * g
            v *= self.beta2
            v += (1.0 - self.beta2) * np.square(g)
            m_hat = m / (1.0 - self.beta1**t)  # bias-corrected moments (Algorithm 1)
            v_hat = v / (1.0 - self.beta2**t)
            p -= (self.lr * m_hat / (np.sqrt(v_hat) + self.eps)).astype(p.dtype, copy=False)


def sgd(lr: float = 1e-2, momentum: float = 0.0) -> SGD:
    """An :class:`SGD` optimiser."""
    return SGD(lr, momentum)


def adam(lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> Adam:
    """An :class:`Adam` optimiser."""
    return Adam(lr, betas, eps)
