"""A decoder layer's decode step as three calls: before attention, attention, after attention.

The unfused path (each block's ``__call__``: RMSNorm, FusedProjections, reshapes, RoPE,
attention, W_o, residual, RMSNorm, MLP, residual) spends about 60 µs of Python per layer and
token between its kernels — a fifth of a SmolLM2 decode step at depth 0. Here the work on either
side of attention is one compiled call each (:mod:`mqa_gen.kernels.decode_layer`), into buffers
kept from step to step. Attention itself — the cache write and the split-K decode kernel — stays
the attention block's (:meth:`~mqa_gen.attention.Attention.attend_decode`), so every cache type
works unchanged.

The fused step runs the same kernels in the same order on the same values as the unfused one, so
the logits are identical bit for bit (tests/test_decode_layer.py); it applies when every matrix of
the layer is quantised (:class:`~mqa_gen.linear.QuantizedLinear`) and the MLP's activation is
SwiGLU or GeGLU-tanh. ``MQA_GEN_UNFUSED_DECODE=1`` turns it off (for before/after measurements).
"""

from __future__ import annotations

import os
import threading

import numpy as np

from .kernels import geglu_tanh, swiglu
from .kernels.decode_layer import after_attention, before_attention
from .linear import QuantizedLinear

#: False when ``MQA_GEN_UNFUSED_DECODE=1``: every decode step takes the unfused path.
ENABLED = os.environ.get("MQA_GEN_UNFUSED_DECODE", "") != "1"

#: The gated activations the compiled step knows, with its ``gelu`` flag.
_ACTIVATIONS = {swiglu: False, geglu_tanh: True}


def _weights(linear: QuantizedLinear) -> tuple:
    """(codes, scales, mins, quads) — mins None for the int8 layout, quads None unless int8 dot
    products are on — as the kernels take a matrix."""
    return linear.codes, linear.scales, linear.mins, linear.quads


class _Buffers:
    """The step's float32 work arrays for n rows: q [n, H, D], k and v [n, KV, D], o [n, H, D],
    the d_model-wide scratch rows and the MLP's gate and up [n, d_ff]."""

    def __init__(self, n: int, d_model: int, d_ff: int, n_heads: int, n_kv_heads: int, head_dim: int):
        def rows(*shape):
            return np.empty((n, *shape), np.float32)

        self.q, self.o = rows(n_heads, head_dim), rows(n_heads, head_dim)
        self.k, self.v = rows(n_kv_heads, head_dim), rows(n_kv_heads, head_dim)
        self.x_normed, self.attn_out, self.mlp_out = rows(d_model), rows(d_model), rows(d_model)
        self.gate, self.up = rows(d_ff), rows(d_ff)


#: Work arrays per thread, shared by every layer of that shape: layers run one after another, and
#: one set of buffers stays in the CPU's caches where a set per layer (30 of them) would not —
#: with 8 sequences, separate sets made the fused step slower than the unfused one.
_per_thread = threading.local()


def _buffers(n: int, d_model: int, d_ff: int, n_heads: int, n_kv_heads: int, head_dim: int) -> _Buffers:
    kept = getattr(_per_thread, "buffers", None)
    if kept is None:
        kept = _per_thread.buffers = {}
    key = (n, d_model, d_ff, n_heads, n_kv_heads, head_dim)
    buffers = kept.get(key)
    if buffers is None:
        if len(kept) >= 16:  # batch sizes come and go; keep the dictionary small
            kept.clear()
        buffers = kept[key] = _Buffers(*key)
    return buffers


class FusedDecodeLayer:
    """One layer's decode step in three calls (module docstring).

    Args:
        attention: the layer's :class:`~mqa_gen.attention.Attention`.
        mlp: its :class:`~mqa_gen.mlp.GatedMLP`.
        attn_norm, mlp_norm: float32 [d_model] RMSNorm gains before attention and before the MLP.
        eps: their epsilon.
        post_attn_norm, post_mlp_norm: float32 [d_model] gains of the norms after attention and
            after the MLP (Gemma 3), or None.

    Raises:
        ValueError: a matrix that is not quantised, or an activation the compiled step lacks
            (check :meth:`applies` first).
    """

    def __init__(self, attention, mlp, attn_norm: np.ndarray, mlp_norm: np.ndarray, eps: float,
                 post_attn_norm: np.ndarray | None = None, post_mlp_norm: np.ndarray | None = None):
        if not self.applies(attention, mlp):
            raise ValueError("the fused decode step needs quantised matrices and SwiGLU or GeGLU-tanh")
        self.attention, self.mlp = attention, mlp
        self.attn_norm, self.mlp_norm, self.eps = attn_norm, mlp_norm, eps
        self.post_attn_norm, self.post_mlp_norm = post_attn_norm, post_mlp_norm
        self.gelu = _ACTIVATIONS[mlp.gated_activation]
        self.wq, self.wk, self.wv, self.wo = (_weights(w) for w in (attention.wq, attention.wk, attention.wv, attention.wo))
        self.w_gate, self.w_up, self.w_down = (_weights(w) for w in (mlp.w_gate, mlp.w_up, mlp.w_down))
        self._shape = (mlp_norm.shape[0], mlp.w_gate.out_features, attention.n_heads, attention.n_kv_heads,
                       attention.head_dim)

    @staticmethod
    def applies(attention, mlp) -> bool:
        """Whether the compiled step can run this layer: all seven matrices quantised, a known
        gated activation."""
        matrices = (attention.wq, attention.wk, attention.wv, attention.wo, mlp.w_gate, mlp.w_up, mlp.w_down)
        return (all(isinstance(w, QuantizedLinear) for w in matrices)
                and mlp.gated_activation in _ACTIVATIONS)

    def __call__(self, x: np.ndarray, batch) -> np.ndarray:
        """The decode step for the batch's B rows x (float32 [B, d_model], C-contiguous), which it
        overwrites with the layer's output and returns. Writes this layer's K/V rows into each
        sequence's cache."""
        n = x.shape[0]
        buf = _buffers(n, *self._shape)
        a = self.attention
        cos, sin = batch.rope(a.rope_theta) if a.rope_theta is not None else (None, None)
        before_attention(x, self.attn_norm, self.eps, self.wq, self.wk, self.wv, a.q_norm, a.k_norm, a.norm_eps,
                         cos, sin, a.rope_interleaved, buf.x_normed, buf.q, buf.k, buf.v)
        a.attend_decode(buf.q, buf.k, buf.v, batch, buf.o)
        after_attention(x, buf.o.reshape(n, -1), self.wo, self.post_attn_norm, self.mlp_norm, self.eps,
                        self.w_gate, self.w_up, self.w_down, self.post_mlp_norm, self.gelu,
                        buf.attn_out, buf.x_normed, buf.gate, buf.up, buf.mlp_out)
        return x


def fused_decode_layer(block) -> FusedDecodeLayer | None:
    """The block's :class:`FusedDecodeLayer`, or None when it does not apply (or is turned off).

    ``block`` has ``attention``, ``mlp``, ``attn_norm``, ``mlp_norm``, ``eps`` and optionally
    ``post_attn_norm`` and ``post_mlp_norm``. The step is built on first use and kept on the
    block; it is rebuilt when the block's attention or MLP object has been replaced since (a
    ``copy.copy`` of a block with new K/V projections, as :func:`mqa_gen.regroup.regroup_model`
    makes, shares the old one until then), or int8 dot products were switched on or off."""
    if not ENABLED:
        return None
    int8_dot = getattr(block.attention.wq, "quads", None) is not None  # the weight tuples hold the quads
    kept = block.__dict__.get("_fused_decode")  # (attention, mlp, int8_dot, step or None)
    if kept is None or kept[0] is not block.attention or kept[1] is not block.mlp or kept[2] != int8_dot:
        fused = None
        if FusedDecodeLayer.applies(block.attention, block.mlp):
            fused = FusedDecodeLayer(block.attention, block.mlp, block.attn_norm, block.mlp_norm, block.eps,
                                     getattr(block, "post_attn_norm", None), getattr(block, "post_mlp_norm", None))
        kept = block._fused_decode = (block.attention, block.mlp, int8_dot, fused)
    return kept[3]
