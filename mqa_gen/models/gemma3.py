"""Gemma 3 decoder (Gemma Team 2025, "Gemma 3 Technical Report"), text part, as Gemma 3 270M uses it.

What differs from llama (:mod:`mqa_gen.models.llama`, whose forward pass this reuses):

    h⁰ = E[tokens] · √d_model                                          scaled embedding (T, d_model)
    for each layer ℓ:
        a = hˡ + RMSNorm_post(Attention(RMSNorm_pre(hˡ)))                norms before and after
        hˡ⁺¹ = a + RMSNorm_post'(W_down(gelu_tanh(W_gate x) ⊙ W_up x)),  x = RMSNorm_pre'(a)
    logits = RMSNorm(hᴸ) Eᵀ                                             tied embeddings

Attention is MQA for the 270M model (4 query heads, 1 KV head, head_dim 256 independent of
d_model), with RMSNorm over head_dim on q and k before RoPE, NeoX RoPE order, score scale
1/√head_dim (llama.cpp's rule; transformers' query_pre_attn_scalar = 256 = head_dim here). Five
of every six layers attend within a sliding window (512 tokens) with RoPE base 10,000, every
sixth globally with the file's base (10⁶) — see :func:`mqa_gen.config.config_from_gguf`.

RMSNorm weights: Gemma's RMSNorm computes x̂ · (1 + w); llama.cpp's GGUF converter stores 1 + w,
so the stored gains are used as they are, exactly like llama's (transformers' GGUF loader
subtracts the 1 again before its own 1 + w).
"""

from __future__ import annotations

import math

import numpy as np

from ..attention import Attention
from ..config import ModelConfig
from ..gguf_file import GGUFFile
from ..kernels import geglu_tanh
from ..linear import linear_from_gguf
from ..weights import tensor_f32
from .llama import GatedMLP, LlamaModel, attention_projections, mlp_projections, rms_norm


class Gemma3Block:
    """One Gemma 3 layer: attention and MLP, each between a pre- and a post-RMSNorm, then a residual."""

    def __init__(self, norms: dict[str, np.ndarray], attention: Attention, mlp: GatedMLP, eps: float):
        self.attn_norm, self.post_attn_norm = norms["attn_norm"], norms["post_attention_norm"]
        self.mlp_norm, self.post_mlp_norm = norms["ffn_norm"], norms["post_ffw_norm"]
        self.attention, self.mlp, self.eps = attention, mlp, eps

    def __call__(self, x, cache, layer, cos, sin, scratch):
        a = self.attention(rms_norm(x, self.attn_norm, self.eps), cache, layer, cos, sin, scratch)
        h = x + rms_norm(a, self.post_attn_norm, self.eps)
        m = self.mlp(rms_norm(h, self.mlp_norm, self.eps))
        return h + rms_norm(m, self.post_mlp_norm, self.eps)


class Gemma3Model(LlamaModel):
    """A Gemma 3 text decoder; ``forward``, ``new_cache`` as :class:`LlamaModel` (sliding-window
    layers get ring-buffer caches)."""

    def __init__(self, config: ModelConfig, embeddings, blocks: list[Gemma3Block], final_norm, output):
        super().__init__(config, embeddings, blocks, final_norm, output)
        # √d_model rounded to float32 first, as the reference scales in the weights' dtype.
        self.embed_scale = float(np.float32(math.sqrt(config.d_model)))

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, config: ModelConfig) -> "Gemma3Model":
        """Load a gemma3 GGUF (``blk.N.attn_q_norm``, ``post_attention_norm``, ``post_ffw_norm`` …
        besides llama's names). Q4_1/Q8_0 matrices stay quantised; other types are dequantised.

        Raises:
            UnsupportedModelError: a missing tensor, unsupported type or unexpected shape.
        """
        c = config
        d, hd = c.d_model, c.head_dim
        embeddings = linear_from_gguf(gguf, "token_embd.weight", (c.vocab_size, d))
        blocks = []
        for i in range(c.n_layers):
            p = f"blk.{i}."
            attention = Attention(
                *attention_projections(gguf, c, p), c.n_heads, c.n_kv_heads, hd, c.rope_interleaved,
                q_norm=tensor_f32(gguf, p + "attn_q_norm.weight", (hd,)),
                k_norm=tensor_f32(gguf, p + "attn_k_norm.weight", (hd,)),
                norm_eps=c.norm_eps, window=c.layer_windows[i],
            )
            mlp = GatedMLP(*mlp_projections(gguf, c, p), geglu_tanh)  # GeGLU
            norms = {name: tensor_f32(gguf, p + name + ".weight", (d,))
                     for name in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm")}
            blocks.append(Gemma3Block(norms, attention, mlp, c.norm_eps))
        final_norm = tensor_f32(gguf, "output_norm.weight", (d,))
        output = embeddings if c.tie_embeddings else linear_from_gguf(gguf, "output.weight", (c.vocab_size, d))
        return cls(config, embeddings, blocks, final_norm, output)
