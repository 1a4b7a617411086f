"""Llama-architecture decoder (Touvron et al. 2023), as SmolLM2 uses it.

    h⁰ = E[tokens]                                         embedding   (N, d_model)
    for each layer ℓ:
        a = hˡ + Attention(RMSNorm(hˡ))                     MQA/GQA + RoPE, KV cache
        hˡ⁺¹ = a + W_down(silu(W_gate x) ⊙ W_up x), x = RMSNorm(a)   SwiGLU MLP
    logits = RMSNorm(hᴸ) W_outᵀ                             W_out = E when embeddings are tied

This module is the architecture's whole description: its GGUF tensor names and shapes
(:func:`tensor_shapes`), the config it adds to the generic metadata (:func:`config_extras`: none),
its block (:class:`LlamaBlock`) and how a file becomes a :class:`~mqa_gen.models.base.Decoder`
(:func:`from_gguf`). GGUF names follow llama.cpp's ``LLM_ARCH_LLAMA`` table.
"""

from __future__ import annotations

import numpy as np

from ..attention import Attention
from ..config import ModelConfig
from ..decode_layer import fused_decode_layer
from ..gguf_file import GGUFFile
from ..linear import linear_from_gguf
from ..mlp import GatedMLP
from ..weights import tensor_f32
from .base import Decoder, rms_norm

ARCHITECTURE = "llama"


def tensor_name(layer: int, role: str) -> str:
    """GGUF name of one layer's tensor: ``role`` is llama.cpp's name for it (``attn_q``, ``attn_k``,
    ``attn_v``, ``attn_output``, ``attn_norm``, ``ffn_gate`` …). The one place that spells the
    per-layer pattern; calibration and ``convert`` read and write K/V projections through it."""
    return f"blk.{layer}.{role}.weight"


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a llama GGUF must hold, name → shape in PyTorch order (rows first); ``output``
    only when the output head is not tied to the embeddings."""
    c = config
    d, hd = c.d_model, c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (c.vocab_size, d)}
    for i in range(c.n_layers):
        per_layer = {"attn_norm": (d,), "attn_q": (c.n_heads * hd, d), "attn_k": (c.n_kv_heads * hd, d),
                     "attn_v": (c.n_kv_heads * hd, d), "attn_output": (d, c.n_heads * hd), "ffn_norm": (d,),
                     "ffn_gate": (c.d_ff, d), "ffn_up": (c.d_ff, d), "ffn_down": (d, c.d_ff)}
        shapes.update({tensor_name(i, role): shape for role, shape in per_layer.items()})
    shapes["output_norm.weight"] = (d,)
    if not c.tie_embeddings:
        shapes["output.weight"] = (c.vocab_size, d)
    return shapes


def config_extras(gguf: GGUFFile, n_layers: int, key) -> dict:
    """Config fields beyond the generic metadata: none (GGUF llama files store Q/K rows permuted
    for interleaved RoPE, :class:`~mqa_gen.config.ModelConfig`'s default)."""
    return {}


def attention_projections(gguf: GGUFFile, c: ModelConfig, layer: int) -> tuple:
    """W_q [n_heads·head_dim, d_model], W_k, W_v [n_kv_heads·head_dim, d_model] and W_o
    [d_model, n_heads·head_dim] of one layer, as :mod:`mqa_gen.linear` objects.

    Raises:
        UnsupportedModelError: a missing tensor or an unexpected shape.
    """
    d, hd = c.d_model, c.head_dim
    return (linear_from_gguf(gguf, tensor_name(layer, "attn_q"), (c.n_heads * hd, d)),
            linear_from_gguf(gguf, tensor_name(layer, "attn_k"), (c.n_kv_heads * hd, d)),
            linear_from_gguf(gguf, tensor_name(layer, "attn_v"), (c.n_kv_heads * hd, d)),
            linear_from_gguf(gguf, tensor_name(layer, "attn_output"), (d, c.n_heads * hd)))


def mlp_projections(gguf: GGUFFile, c: ModelConfig, layer: int) -> tuple:
    """W_gate, W_up [d_ff, d_model] and W_down [d_model, d_ff] of one layer."""
    return (linear_from_gguf(gguf, tensor_name(layer, "ffn_gate"), (c.d_ff, c.d_model)),
            linear_from_gguf(gguf, tensor_name(layer, "ffn_up"), (c.d_ff, c.d_model)),
            linear_from_gguf(gguf, tensor_name(layer, "ffn_down"), (c.d_model, c.d_ff)))


def embeddings_and_head(gguf: GGUFFile, c: ModelConfig) -> tuple:
    """(token embeddings, final norm gain, output head) — the head is the embeddings when tied."""
    embeddings = linear_from_gguf(gguf, "token_embd.weight", (c.vocab_size, c.d_model))
    final_norm = tensor_f32(gguf, "output_norm.weight", (c.d_model,))
    output = embeddings if c.tie_embeddings else linear_from_gguf(gguf, "output.weight", (c.vocab_size, c.d_model))
    return embeddings, final_norm, output


class LlamaBlock:
    """One pre-norm decoder layer: attention and MLP, each wrapped in RMSNorm and a residual."""

    def __init__(self, attn_norm: np.ndarray, attention: Attention, mlp_norm: np.ndarray, mlp: GatedMLP, eps: float):
        self.attn_norm, self.attention = attn_norm, attention
        self.mlp_norm, self.mlp = mlp_norm, mlp
        self.eps = eps

    def __call__(self, x: np.ndarray, batch, last_only: bool = False) -> np.ndarray:
        """x: float32 [N, d_model] → float32 [N, d_model] (a decode step may overwrite x); with
        ``last_only``, float32 [B, d_model], each sequence's last row (see
        :meth:`~mqa_gen.attention.Attention.__call__`)."""
        fused = fused_decode_layer(self) if batch.decode else None
        if fused is not None:
            return fused(x, batch)  # the same arithmetic in three calls (mqa_gen.decode_layer)
        a = self.attention(rms_norm(x, self.attn_norm, self.eps), batch, last_only)
        h = (x[batch.last_rows] if last_only else x) + a
        return h + self.mlp(rms_norm(h, self.mlp_norm, self.eps))


def from_gguf(gguf: GGUFFile, config: ModelConfig) -> Decoder:
    """Load a llama GGUF; Q4_1/Q4_K/Q8_0/Q5_0/Q6_K matrices stay quantised, norms are float32.

    Raises:
        UnsupportedModelError: a missing tensor, unsupported type or unexpected shape.
    """
    c = config
    blocks = []
    for i in range(c.n_layers):
        attention = Attention(*attention_projections(gguf, c, i), c.n_heads, c.n_kv_heads, c.head_dim, layer=i,
                              rope_theta=c.layer_rope_theta(i), rope_interleaved=c.rope_interleaved)
        mlp = GatedMLP(*mlp_projections(gguf, c, i))  # SwiGLU
        blocks.append(LlamaBlock(tensor_f32(gguf, tensor_name(i, "attn_norm"), (c.d_model,)), attention,
                                 tensor_f32(gguf, tensor_name(i, "ffn_norm"), (c.d_model,)), mlp, c.norm_eps))
    embeddings, final_norm, output = embeddings_and_head(gguf, c)
    return Decoder(config, embeddings, blocks, final_norm, output)
