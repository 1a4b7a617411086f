"""Llama-architecture decoder (Touvron et al. 2023), as SmolLM2 uses it.

    h⁰ = E[tokens]                                         embedding   (T, d_model)
    for each layer ℓ:
        a = hˡ + Attention(RMSNorm(hˡ))                     MQA/GQA + RoPE, KV cache
        hˡ⁺¹ = a + W_down(silu(W_gate x) ⊙ W_up x), x = RMSNorm(a)   SwiGLU MLP
    logits = RMSNorm(hᴸ) W_outᵀ                             W_out = E when embeddings are tied
"""

from __future__ import annotations

import numpy as np

from ..attention import Attention, DecodeScratch, rope_tables
from ..cache import KVCache
from ..config import ModelConfig
from ..gguf_file import GGUFFile
from ..kernels import rmsnorm, swiglu
from ..linear import FusedMatvec, linear_from_gguf
from ..weights import tensor_f32


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm of float32 [T, d] rows with gain ``weight`` [d]; returns a new float32 [T, d]."""
    out = np.empty_like(x)
    rmsnorm(x, weight, eps, out)
    return out


def attention_projections(gguf: GGUFFile, c: ModelConfig, prefix: str) -> tuple:
    """W_q [n_heads·head_dim, d_model], W_k, W_v [n_kv_heads·head_dim, d_model] and W_o
    [d_model, n_heads·head_dim] of one layer (GGUF ``{prefix}attn_q`` …), as :mod:`mqa_gen.linear`
    objects. Raises UnsupportedModelError for a missing tensor or unexpected shape."""
    d, hd = c.d_model, c.head_dim
    return (linear_from_gguf(gguf, prefix + "attn_q.weight", (c.n_heads * hd, d)),
            linear_from_gguf(gguf, prefix + "attn_k.weight", (c.n_kv_heads * hd, d)),
            linear_from_gguf(gguf, prefix + "attn_v.weight", (c.n_kv_heads * hd, d)),
            linear_from_gguf(gguf, prefix + "attn_output.weight", (d, c.n_heads * hd)))


def mlp_projections(gguf: GGUFFile, c: ModelConfig, prefix: str) -> tuple:
    """W_gate, W_up [d_ff, d_model] and W_down [d_model, d_ff] of one layer (``{prefix}ffn_gate`` …)."""
    return (linear_from_gguf(gguf, prefix + "ffn_gate.weight", (c.d_ff, c.d_model)),
            linear_from_gguf(gguf, prefix + "ffn_up.weight", (c.d_ff, c.d_model)),
            linear_from_gguf(gguf, prefix + "ffn_down.weight", (c.d_model, c.d_ff)))


class GatedMLP:
    """Gated MLP W_down(act(W_gate x) ⊙ W_up x) (Shazeer 2020, "GLU Variants Improve Transformer").
    ``gated_activation(gate, up, out)`` is the kernel computing act(gate) ⊙ up: :func:`swiglu`
    (SiLU, llama) by default, :func:`~mqa_gen.kernels.geglu_tanh` (GELU-tanh, Gemma).
    w_gate, w_up: [d_ff, d_model]; w_down: [d_model, d_ff] — :mod:`mqa_gen.linear` objects (y = x Wᵀ)."""

    def __init__(self, w_gate, w_up, w_down, gated_activation=swiglu):
        self.w_gate, self.w_up, self.w_down = w_gate, w_up, w_down
        self.gated_activation = gated_activation
        self.gate_up_matvec = FusedMatvec((w_gate, w_up))  # decode: one kernel launch

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: float32 [T, d_model] → float32 [T, d_model]."""
        if x.shape[0] == 1:
            gate, up = (y[None] for y in self.gate_up_matvec(x[0]))  # buffers reused next step
        else:
            gate, up = self.w_gate(x), self.w_up(x)  # (T, d_ff)
        self.gated_activation(gate, up, gate)
        return self.w_down(gate)  # (T, d_model)


class Block:
    """One pre-norm decoder layer: attention and MLP, each wrapped in RMSNorm and a residual."""

    def __init__(self, attn_norm: np.ndarray, attention: Attention, mlp_norm: np.ndarray, mlp: GatedMLP, eps: float):
        self.attn_norm, self.attention = attn_norm, attention
        self.mlp_norm, self.mlp = mlp_norm, mlp
        self.eps = eps

    def __call__(self, x, cache, layer, cos, sin, scratch):
        h = x + self.attention(rms_norm(x, self.attn_norm, self.eps), cache, layer, cos, sin, scratch)
        return h + self.mlp(rms_norm(h, self.mlp_norm, self.eps))


class LlamaModel:
    """A llama decoder.

    Weight matrices are :mod:`mqa_gen.linear` objects: Q4_1/Q8_0 tensors stay quantised.

    Args:
        config: the model's :class:`~mqa_gen.config.ModelConfig`.
        embeddings: [vocab_size, d_model] (``rows(ids)`` looks tokens up). blocks: one
            :class:`Block` per layer. final_norm: float32 [d_model]. output: [vocab_size, d_model]
            (the embeddings when tied).
    """

    #: Factor on the embedding rows (Gemma scales them by √d_model).
    embed_scale: float = 1.0

    def __init__(self, config: ModelConfig, embeddings, blocks: list, final_norm, output):
        self.config = config
        self.embeddings, self.blocks = embeddings, blocks
        self.final_norm, self.output = final_norm, output
        self._scratch: DecodeScratch | None = None

    def new_cache(self, max_seq_len: int | None = None, dtype: str = "float32") -> KVCache:
        """An empty KV cache for this model (ring buffers for sliding-window layers);
        ``max_seq_len`` defaults to the context length."""
        c = self.config
        return KVCache(c.n_layers, c.n_kv_heads, c.head_dim, max_seq_len or c.context_length, dtype,
                       c.layer_windows)

    def forward(self, tokens, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run T tokens (int [T]) at positions cache.length .. +T-1 and store their K/V rows.

        Returns the logits, float32 [vocab_size] of the last position, or [T, vocab_size] with
        ``all_logits``. Prefill and decode are the same call (T > 1 or T = 1).

        Raises:
            ValueError: the tokens do not fit in the cache, or an id is outside the vocabulary.
        """
        c = self.config
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        T = tokens.shape[0]
        if T == 0:
            raise ValueError("forward needs at least one token")
        if cache.length + T > cache.max_seq_len:
            raise ValueError(f"{cache.length} + {T} tokens exceed the KV cache capacity {cache.max_seq_len}")
        if tokens.min() < 0 or tokens.max() >= c.vocab_size:
            raise ValueError("token id outside the vocabulary")
        if self._scratch is None or self._scratch.max_seq_len < cache.max_seq_len:
            self._scratch = DecodeScratch(c.n_heads, c.head_dim, cache.max_seq_len)

        x = self.embeddings.rows(tokens)  # (T, d_model)
        if self.embed_scale != 1.0:
            x *= np.float32(self.embed_scale)
        thetas = [c.layer_rope_theta(layer) for layer in range(c.n_layers)]
        tables = rope_tables(cache.length + np.arange(T), c.head_dim, thetas)  # θ → cos, sin (T, D/2)
        for layer, block in enumerate(self.blocks):
            cos, sin = tables[thetas[layer]]
            x = block(x, cache, layer, cos, sin, self._scratch)
        cache.advance(T)
        if not all_logits:
            x = x[-1:]
        logits = self.output(rms_norm(x, self.final_norm, c.norm_eps))  # (T or 1, vocab)
        return logits if all_logits else logits[0]

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, config: ModelConfig) -> "LlamaModel":
        """Load a llama GGUF (tensor names ``token_embd``, ``blk.N.attn_q`` …, ``output_norm``,
        ``output``); Q4_1/Q8_0 matrices stay quantised, norms are float32.

        Raises:
            UnsupportedModelError: a missing tensor, unsupported type or unexpected shape.
        """
        c = config
        d = c.d_model
        embeddings = linear_from_gguf(gguf, "token_embd.weight", (c.vocab_size, d))
        blocks = []
        for i in range(c.n_layers):
            p = f"blk.{i}."
            attention = Attention(*attention_projections(gguf, c, p), c.n_heads, c.n_kv_heads, c.head_dim,
                                  c.rope_interleaved)
            mlp = GatedMLP(*mlp_projections(gguf, c, p))  # SwiGLU
            blocks.append(Block(tensor_f32(gguf, p + "attn_norm.weight", (d,)), attention,
                                tensor_f32(gguf, p + "ffn_norm.weight", (d,)), mlp, c.norm_eps))
        final_norm = tensor_f32(gguf, "output_norm.weight", (d,))
        output = embeddings if c.tie_embeddings else linear_from_gguf(gguf, "output.weight", (c.vocab_size, d))
        return cls(config, embeddings, blocks, final_norm, output)
