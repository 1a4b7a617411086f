"""The attention block of a decoder layer: Multi-Query / Grouped-Query self-attention with RoPE.

For the N new rows x [N, d_model] of a :class:`~mqa_gen.batch.Batch` (Shazeer 2019; Ainslie et al.
2023; Su et al. 2021):

    q = x W_qᵀ → [N, n_heads,    head_dim]      RoPE(q) at each row's absolute position
    k = x W_kᵀ → [N, n_kv_heads, head_dim]      RoPE(k), then each sequence's k, v rows go into
    v = x W_vᵀ → [N, n_kv_heads, head_dim]      its own KV cache (update_and_fetch)
    o_h = softmax(q_h Kᵀ_{h//G} / √head_dim) V_{h//G}   causal, per sequence, G = n_heads / n_kv_heads
    out = concat_h(o_h) W_oᵀ → [N, d_model]

The projections multiply the rows of all sequences at once; attention runs sequence by sequence
against that sequence's cache. Gemma 3 adds an RMSNorm over head_dim on every q and k head before
RoPE ("QK-norm", Dehghani et al. 2023) and, in its local layers, a sliding window: position i
attends to i − window + 1 .. i only, and the layer's cache is a ring
(:class:`~mqa_gen.cache.RingLayerCache`).
"""

from __future__ import annotations

import copy

import numpy as np

from .batch import Batch
from .kernels import attention_decode, rmsnorm, rope
from .kernels.attention import decode_partial_shape
from .linear import DenseLinear, FusedProjections
from .prefill_attention import prefill_attention


class DecodeScratch:
    """Reusable work buffer of the decode attention kernel for up to ``batch_size`` sequences of up
    to ``max_seq_len`` positions: ``partial`` float32 [batch_size, ceil(max_seq_len / block),
    n_heads, head_dim + 2] (each block's unnormalised output, maximum score and sum of
    exponentials; see :func:`~mqa_gen.kernels.attention.attention_decode`)."""

    def __init__(self, n_heads: int, head_dim: int, max_seq_len: int, batch_size: int = 1):
        self.n_heads, self.head_dim = n_heads, head_dim
        self.max_seq_len, self.batch_size = max_seq_len, batch_size
        self.partial = np.empty(decode_partial_shape(batch_size, max_seq_len, n_heads, head_dim), np.float32)

    def fits(self, n_heads: int, head_dim: int, max_seq_len: int, batch_size: int = 1) -> bool:
        """Whether this buffer serves a step of these dimensions."""
        return ((self.n_heads, self.head_dim) == (n_heads, head_dim) and self.max_seq_len >= max_seq_len
                and self.batch_size >= batch_size)


#: Slot 0, for one sequence's own cache passed to the decode kernel as a one-slot pool.
_SLOT_0 = np.zeros(1, np.int64)


class Attention:
    """Causal MQA/GQA/MHA self-attention with RoPE, one layer of a decoder.

    Args:
        wq: [n_heads·head_dim, d_model]; wk, wv: [n_kv_heads·head_dim, d_model];
            wo: [d_model, n_heads·head_dim] (PyTorch ``Linear`` layout: y = x Wᵀ). Each is an
            array or a :mod:`mqa_gen.linear` object (e.g. quantised).
        n_heads, n_kv_heads, head_dim: ints, n_heads divisible by n_kv_heads.
        layer: this block's layer index (which layer cache of each sequence it uses).
        rope_theta: the RoPE base, or None for no RoPE. rope_interleaved: the pairing the Q/K rows
            expect (True for GGUF llama files, see :func:`~mqa_gen.kernels.rope`).
        q_norm, k_norm: float32 [head_dim] RMSNorm gains applied to each q / k head before RoPE
            (Gemma 3), or None. norm_eps: their epsilon.
        window: sliding window in tokens (0 = full causal attention).
        scale: the score scale; None = 1/√head_dim.

    Raises:
        ValueError: inconsistent shapes or head counts.
    """

    def __init__(self, wq, wk, wv, wo, n_heads: int, n_kv_heads: int, head_dim: int, *, layer: int = 0,
                 rope_theta: float | None = 10000.0, rope_interleaved: bool = True,
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
        self.qkv = FusedProjections((wq, wk, wv))
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.layer = layer
        self.rope_theta, self.rope_interleaved = rope_theta, rope_interleaved
        self.q_norm, self.k_norm, self.norm_eps = q_norm, k_norm, norm_eps
        self.window = window
        self.scale = np.float32(1.0 / np.sqrt(head_dim) if scale is None else scale)

    def with_kv_projections(self, wk, wv, n_kv_heads: int) -> "Attention":
        """A copy of this block whose K/V projections (:mod:`mqa_gen.linear` objects, [n_kv_heads ·
        head_dim, d_model]) serve ``n_kv_heads`` KV heads; W_q, W_o and the rest are shared."""
        new = copy.copy(self)
        new.wk, new.wv, new.n_kv_heads = wk, wv, n_kv_heads
        new.qkv = FusedProjections((new.wq, wk, wv))
        return new

    def __call__(self, x: np.ndarray, batch: Batch, last_only: bool = False) -> np.ndarray:
        """Attend the batch's N new rows x (float32 [N, d_model]), each sequence over its own cache.

        Writes this layer's K/V rows into each sequence's cache (the caller advances the caches
        after the last layer). Returns float32 [N, d_model].

        ``last_only`` (a prefill's last layer, where only each sequence's last row goes on to the
        logits): every row's K/V is still computed and stored, but the queries, attention and
        W_o run for the B last rows only (:attr:`Batch.last_rows`), and the result is float32
        [B, d_model]. llama.cpp prunes its last layer's rows the same way.
        """
        N = x.shape[0]
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        attending = batch.last_rows if last_only else slice(None)  # the rows whose queries attend
        if last_only:
            q, k, v = self.wq(x[attending]), self.wk(x), self.wv(x)  # (B, H·D), (N, KV·D), (N, KV·D)
        else:
            q, k, v = self.qkv(x)  # (N, H·D), (N, KV·D), (N, KV·D)
        M = q.shape[0]  # N, or B with last_only
        if self.q_norm is not None:  # per-head RMSNorm, in place on the (M·H, D) and (N·KV, D) rows
            rmsnorm(q.reshape(M * H, D), self.q_norm, self.norm_eps, q.reshape(M * H, D))
            rmsnorm(k.reshape(N * KV, D), self.k_norm, self.norm_eps, k.reshape(N * KV, D))
        q = np.ascontiguousarray(q.reshape(M, H, D), dtype=np.float32)  # (M, H, D); the kernels are float32
        k = np.ascontiguousarray(k.reshape(N, KV, D), dtype=np.float32)  # (N, KV, D)
        v = np.ascontiguousarray(v.reshape(N, KV, D), dtype=np.float32)  # (N, KV, D)
        if self.rope_theta is not None:
            cos, sin = batch.rope(self.rope_theta)  # (N, D/2), each row at its own position
            rope(q, cos[attending], sin[attending], self.rope_interleaved)
            rope(k, cos, sin, self.rope_interleaved)
        o = np.empty((M, H, D), dtype=np.float32)  # (M, H, D)
        if batch.decode:
            self.attend_decode(q, k, v, batch, o)
        else:
            for b, cache in enumerate(batch.caches):
                rows = batch.rows(b)
                keys, values, start = cache.layers[self.layer].update_and_fetch(k[rows], v[rows], int(batch.starts[b]))
                if last_only:  # the last new row alone, at its own cache index
                    last = start + rows.stop - rows.start - 1
                    prefill_attention(q[b : b + 1], keys, values, last, self.scale, self.window, o[b : b + 1])
                else:
                    prefill_attention(q[rows], keys, values, start, self.scale, self.window, o[rows])
        return self.wo(o.reshape(M, H * D))  # (M, d_model)

    def attend_decode(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, batch: Batch, o: np.ndarray) -> None:
        """The decode step's attention, into o (float32 [B, H, D]): row b (q [B, H, D], k, v
        [B, KV, D], float32, after QK-norm and RoPE) is sequence b's one new token; its k, v rows
        are written into its cache first.
        Caches in one pool: every row written at once, then one kernel call for all B sequences.
        Otherwise sequence by sequence, each cache passed as a one-slot pool; the kernel's result
        for a sequence is the same either way."""
        partial = batch.scratch.partial
        if batch.pool is not None:
            keys, values, lengths = batch.pool.update_and_fetch_rows(self.layer, k, v, batch.slots, batch.starts)
            attention_decode(q, keys, values, batch.slots, lengths, self.scale, partial, o)
            return
        for b, cache in enumerate(batch.caches):
            keys, values, start = cache.layers[self.layer].update_and_fetch(k[b : b + 1], v[b : b + 1],
                                                                             int(batch.starts[b]))
            length = np.full(1, start + 1, np.int64)
            attention_decode(q[b : b + 1], keys[None], values[None], _SLOT_0, length, self.scale, partial, o[b : b + 1])
