"""The attention block of a decoder layer: Multi-Query / Grouped-Query self-attention with RoPE.

For one layer and T new tokens x [T, d_model] (Shazeer 2019; Ainslie et al. 2023; Su et al. 2021):

    q = x W_qᵀ → [T, n_heads,    head_dim]      RoPE(q) at absolute positions
    k = x W_kᵀ → [T, n_kv_heads, head_dim]      RoPE(k), then k and v are written into the cache
    v = x W_vᵀ → [T, n_kv_heads, head_dim]
    o_h = softmax(q_h Kᵀ_{h//G} / √head_dim) V_{h//G}   causal, G = n_heads / n_kv_heads
    out = concat_h(o_h) W_oᵀ → [T, d_model]

Gemma 3 adds an RMSNorm over head_dim on every q and k head before RoPE ("QK-norm", Dehghani et
al. 2023) and, in its local layers, a sliding window: position i attends to i − window + 1 .. i
only, and the cache of such a layer is a ring of ``window`` rows (:class:`~mqa_gen.cache.KVCache`).
"""

from __future__ import annotations

import copy

import numpy as np

from .cache import KVCache
from .kernels import attention_decode, attention_prefill, rmsnorm, rope
from .kernels.attention import DECODE_BLOCK
from .linear import DenseLinear, FusedMatvec


class DecodeScratch:
    """Reusable float32 work buffers of the decode attention kernel, sized for ``max_seq_len``:
    ``scores`` [n_heads, max_seq_len] and ``partial`` [ceil(max_seq_len / block), n_heads,
    head_dim + 2] (each block's unnormalised output, maximum score and sum of exponentials)."""

    def __init__(self, n_heads: int, head_dim: int, max_seq_len: int):
        n_blocks = -(-max_seq_len // DECODE_BLOCK)
        self.max_seq_len = max_seq_len
        self.scores = np.empty((n_heads, max_seq_len), dtype=np.float32)
        self.partial = np.empty((n_blocks, n_heads, head_dim + 2), dtype=np.float32)
        self.out = np.empty((n_heads, head_dim), dtype=np.float32)


class Attention:
    """Causal MQA/GQA/MHA self-attention with RoPE over a :class:`~mqa_gen.cache.KVCache`.

    Args:
        wq: [n_heads·head_dim, d_model]; wk, wv: [n_kv_heads·head_dim, d_model];
            wo: [d_model, n_heads·head_dim] (PyTorch ``Linear`` layout: y = x Wᵀ). Each is a
            float32 array or a :mod:`mqa_gen.linear` object (e.g. quantised).
        n_heads, n_kv_heads, head_dim: ints, n_heads divisible by n_kv_heads.
        rope_interleaved: RoPE pairing the Q/K rows expect (True for GGUF llama files).
        q_norm, k_norm: float32 [head_dim] RMSNorm gains applied to each q / k head before RoPE
            (Gemma 3), or None. norm_eps: their epsilon.
        window: sliding window in tokens (0 = full causal attention).
        scale: the score scale; None = 1/√head_dim.

    Raises:
        ValueError: inconsistent shapes or head counts.
    """

    def __init__(self, wq, wk, wv, wo, n_heads: int, n_kv_heads: int, head_dim: int, rope_interleaved: bool,
                 q_norm: np.ndarray | None = None, k_norm: np.ndarray | None = None, norm_eps: float = 1e-6,
                 window: int = 0, scale: float | None = None):
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads})")
        wq, wk, wv, wo = (w if hasattr(w, "out_features") else DenseLinear(w) for w in (wq, wk, wv, wo))
        if wq.out_features != n_heads * head_dim or wo.in_features != n_heads * head_dim:
            raise ValueError(f"W_q/W_o do not fit {n_heads} heads of {head_dim}")
        if wk.out_features != n_kv_heads * head_dim or wv.out_features != wk.out_features:
            raise ValueError(f"W_k/W_v do not fit {n_kv_heads} KV heads of {head_dim}")
        self.wq, self.wk, self.wv, self.wo = wq, wk, wv, wo
        self.qkv_matvec = FusedMatvec((wq, wk, wv))  # decode: q, k, v in one kernel launch
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.rope_interleaved = rope_interleaved
        self.q_norm, self.k_norm, self.norm_eps = q_norm, k_norm, norm_eps
        self.window = window
        self.scale = np.float32(1.0 / np.sqrt(head_dim) if scale is None else scale)

    def with_kv_projections(self, wk, wv, n_kv_heads: int) -> "Attention":
        """A copy of this block whose K/V projections (:mod:`mqa_gen.linear` objects, [n_kv_heads ·
        head_dim, d_model]) serve ``n_kv_heads`` KV heads; W_q, W_o and the rest are shared."""
        new = copy.copy(self)
        new.wk, new.wv, new.n_kv_heads = wk, wv, n_kv_heads
        new.qkv_matvec = FusedMatvec((new.wq, wk, wv))
        return new

    def __call__(self, x: np.ndarray, cache: KVCache, layer: int, cos: np.ndarray, sin: np.ndarray,
                 scratch: DecodeScratch) -> np.ndarray:
        """Attend T new tokens x (float32 [T, d_model]) at positions cache.length .. +T-1.

        cos, sin: float32 [T, head_dim/2] for those positions. Writes this layer's K/V rows into
        ``cache`` (the caller advances ``cache.length`` after the last layer). Returns float32
        [T, d_model].
        """
        T = x.shape[0]
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        if T == 1:
            q, k, v = self.qkv_matvec(x[0])  # buffers reused by the next decode step of this layer
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.q_norm is not None:  # per-head RMSNorm, in place on the (T·H, D) rows
            rmsnorm(q.reshape(T * H, D), self.q_norm, self.norm_eps, q.reshape(T * H, D))
            rmsnorm(k.reshape(T * KV, D), self.k_norm, self.norm_eps, k.reshape(T * KV, D))
        q = q.reshape(T, H, D)  # (T, H, D)
        k = k.reshape(T, KV, D)  # (T, KV, D)
        v = v.reshape(T, KV, D)  # (T, KV, D)
        rope(q, cos, sin, self.rope_interleaved)
        rope(k, cos, sin, self.rope_interleaved)
        start = cache.length
        capacity = cache.capacity(layer)
        k_cache, v_cache = cache.keys[layer], cache.values[layer]
        if T == 1:
            cache.write(layer, k, v)
            # A ring holds exactly the window, in any slot order: softmax does not care about order.
            attention_decode(q[0], k_cache, v_cache, min(start + 1, capacity), self.scale,
                             scratch.scores, scratch.partial, scratch.out)
            return self.wo(scratch.out.reshape(1, H * D))  # (1, d_model)
        o = np.empty((T, H, D), dtype=np.float32)
        if start + T <= capacity:  # the layer's rows are still in position order
            cache.write(layer, k, v)
            attention_prefill(q, k_cache, v_cache, start, self.scale, self.window, o)
        else:  # a ring that wraps: attend over [the window's older rows | the new rows], then store
            old_k, old_v = cache.window_rows(layer, self.window - 1)  # (KV, n_old, D)
            keys = np.concatenate([old_k, cache.to_storage(k).transpose(1, 0, 2)], axis=1)
            values = np.concatenate([old_v, cache.to_storage(v).transpose(1, 0, 2)], axis=1)
            attention_prefill(q, keys, values, old_k.shape[1], self.scale, self.window, o)
            cache.write(layer, k, v)
        return self.wo(o.reshape(T, H * D))  # (T, d_model)


def rope_tables(positions: np.ndarray, head_dim: int, thetas) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """:func:`rope_cos_sin` for each distinct base in ``thetas`` (one per layer): {θ: (cos, sin)}."""
    return {theta: rope_cos_sin(positions, head_dim, theta) for theta in set(thetas)}


def rope_cos_sin(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of the RoPE angles pos · θ^(-2i/head_dim), i < head_dim/2 (Su et al. 2021).

    positions: int [T] absolute token positions. Returns two float32 [T, head_dim/2] arrays;
    the angles are computed in float64 so long positions keep their precision.
    """
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (D/2,)
    angles = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]  # (T, D/2)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
