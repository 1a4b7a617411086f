"""Gemma 3 decoder (Gemma Team 2025, "Gemma 3 Technical Report"), text part, as Gemma 3 270M uses it.

What differs from llama (:mod:`mqa_gen.models.llama`, whose tensor names and loaders this reuses):

    h⁰ = E[tokens] · √d_model                                          scaled embedding (N, d_model)
    for each layer ℓ:
        a = hˡ + RMSNorm_post(Attention(RMSNorm_pre(hˡ)))                norms before and after
        hˡ⁺¹ = a + RMSNorm_post'(W_down(gelu_tanh(W_gate x) ⊙ W_up x)),  x = RMSNorm_pre'(a)
    logits = RMSNorm(hᴸ) Eᵀ                                             tied embeddings

Attention is MQA for the 270M model (4 query heads, 1 KV head, head_dim 256 independent of
d_model), with RMSNorm over head_dim on q and k before RoPE, NeoX RoPE order, score scale
1/√head_dim (llama.cpp's rule; transformers' query_pre_attn_scalar = 256 = head_dim here). Five
of every six layers attend within a sliding window (512 tokens) with RoPE base 10,000, every
sixth globally with the file's base (10⁶) — see :func:`config_extras`.

RMSNorm weights: Gemma's RMSNorm computes x̂ · (1 + w); llama.cpp's GGUF converter stores 1 + w,
so the stored gains are used as they are, exactly like llama's (transformers' GGUF loader
subtracts the 1 again before its own 1 + w).
"""

from __future__ import annotations

import math

import numpy as np

from ..attention import Attention
from ..config import ModelConfig
from ..decode_layer import fused_decode_layer
from ..errors import ConfigError
from ..gguf_file import GGUFFile
from ..kernels import geglu_tanh
from ..mlp import GatedMLP
from ..weights import tensor_f32
from . import llama
from .base import Decoder, rms_norm

ARCHITECTURE = "gemma3"

#: Every 6th layer is global, the others slide (Gemma 3 Technical Report §2; llama.cpp and
#: transformers use the same default), with RoPE base 10,000 locally.
SLIDING_PATTERN = 6
LOCAL_ROPE_THETA = 10_000.0

#: Per-layer norm gains besides llama's attn_norm and ffn_norm.
_LAYER_NORMS = ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm")


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """llama's tensors plus, per layer, ``attn_q_norm``/``attn_k_norm`` [head_dim] and
    ``post_attention_norm``/``post_ffw_norm`` [d_model]."""
    c = config
    shapes = llama.tensor_shapes(c)
    for i in range(c.n_layers):
        per_layer = {"attn_q_norm": (c.head_dim,), "attn_k_norm": (c.head_dim,),
                     "post_attention_norm": (c.d_model,), "post_ffw_norm": (c.d_model,)}
        shapes.update({llama.tensor_name(i, role): shape for role, shape in per_layer.items()})
    return shapes


def config_extras(gguf: GGUFFile, n_layers: int, key) -> dict:
    """The gemma3 fields GGUF metadata implies: NeoX RoPE order (the converter does not permute
    Q/K rows for gemma), the window of each layer, and the local RoPE base.

    Raises:
        ConfigError: a malformed ``sliding_window_pattern``.
    """
    window = key("attention.sliding_window", int)
    pattern = gguf.get("gemma3.attention.sliding_window_pattern", SLIDING_PATTERN)
    if isinstance(pattern, list):  # per-layer flags: true = sliding
        if len(pattern) != n_layers:
            raise ConfigError(f"gemma3.attention.sliding_window_pattern has {len(pattern)} entries for "
                              f"{n_layers} layers in {gguf.path}")
        windows = tuple(window if flag else 0 for flag in pattern)
    elif isinstance(pattern, int) and pattern > 0:
        windows = tuple(window if (i + 1) % pattern else 0 for i in range(n_layers))
    else:
        raise ConfigError(f"invalid gemma3.attention.sliding_window_pattern {pattern!r} in {gguf.path}")
    return {"rope_interleaved": False, "layer_windows": windows, "rope_local_theta": LOCAL_ROPE_THETA}


class Gemma3Block:
    """One Gemma 3 layer: attention and MLP, each between a pre- and a post-RMSNorm, then a residual."""

    def __init__(self, norms: dict[str, np.ndarray], attention: Attention, mlp: GatedMLP, eps: float):
        self.attn_norm, self.post_attn_norm = norms["attn_norm"], norms["post_attention_norm"]
        self.mlp_norm, self.post_mlp_norm = norms["ffn_norm"], norms["post_ffw_norm"]
        self.attention, self.mlp, self.eps = attention, mlp, eps

    def __call__(self, x: np.ndarray, batch, last_only: bool = False) -> np.ndarray:
        """x: float32 [N, d_model] → float32 [N, d_model] (a decode step may overwrite x); with
        ``last_only``, float32 [B, d_model], each sequence's last row (as llama's block)."""
        fused = fused_decode_layer(self) if batch.decode else None
        if fused is not None:
            return fused(x, batch)  # the same arithmetic in three calls (mqa_gen.decode_layer)
        a = self.attention(rms_norm(x, self.attn_norm, self.eps), batch, last_only)
        h = (x[batch.last_rows] if last_only else x) + rms_norm(a, self.post_attn_norm, self.eps)
        m = self.mlp(rms_norm(h, self.mlp_norm, self.eps))
        return h + rms_norm(m, self.post_mlp_norm, self.eps)


def from_gguf(gguf: GGUFFile, config: ModelConfig) -> Decoder:
    """Load a gemma3 GGUF. Quantised matrices stay quantised; norms are float32.

    Raises:
        UnsupportedModelError: a missing tensor, unsupported type or unexpected shape.
    """
    c = config
    d, hd = c.d_model, c.head_dim
    blocks = []
    for i in range(c.n_layers):
        attention = Attention(
            *llama.attention_projections(gguf, c, i), c.n_heads, c.n_kv_heads, hd, layer=i,
            rope_theta=c.layer_rope_theta(i), rope_interleaved=c.rope_interleaved,
            q_norm=tensor_f32(gguf, llama.tensor_name(i, "attn_q_norm"), (hd,)),
            k_norm=tensor_f32(gguf, llama.tensor_name(i, "attn_k_norm"), (hd,)),
            norm_eps=c.norm_eps, window=c.layer_windows[i],
        )
        mlp = GatedMLP(*llama.mlp_projections(gguf, c, i), geglu_tanh)  # GeGLU
        norms = {role: tensor_f32(gguf, llama.tensor_name(i, role), (d,)) for role in _LAYER_NORMS}
        blocks.append(Gemma3Block(norms, attention, mlp, c.norm_eps))
    embeddings, final_norm, output = llama.embeddings_and_head(gguf, c)
    # √d_model rounded to float32 first, as the reference scales in the weights' dtype.
    return Decoder(config, embeddings, blocks, final_norm, output, embed_scale=float(np.float32(math.sqrt(d))))
