"""Causal multi-query / grouped-query attention over a head-major KV cache.

softmax(q kᵀ / √head_dim) v per query head, where query head h reads KV head h // G with
G = n_heads / n_kv_heads (Shazeer 2019, "Fast Transformer Decoding: One Write-Head is All You
Need"; Ainslie et al. 2023 for GQA). n_kv_heads = 1 is MQA, n_kv_heads = n_heads is MHA.

Both kernels loop over KV heads on the outside and over the G query heads that share a KV head on
the inside, so every K and V row is read from memory once per group rather than once per query
head: that is where MQA's decode speed comes from.

Cache arrays are [n_kv_heads, max_seq_len, row_width]: float32 rows, or rows stored as float16
bits (uint16) or llama.cpp's q8_0 (int8) / q4_0 (uint8) blocks, each row decoded into float32 as
it is read (:func:`mqa_gen.kernels.cache_rows.cache_row`); head_dim is always q's last axis.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .bits import exp32
from .rowwise import softmax_inplace
from .flags import FASTMATH
from .cache_rows import cache_row, check_cache_rows, prefetch_row

#: Cache positions handled by one decode task; several blocks keep both cores busy even for MQA.
DECODE_BLOCK = 128

#: How many K rows ahead of the one being read the decode kernel asks for (:func:`_block_scores`).
PREFETCH_AHEAD = 8


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def attention_prefill(q, k_cache, v_cache, start, scale, window, out):
    """Causal attention for T new query rows whose K/V rows are already in the cache.

    q: float32 [T, n_heads, head_dim], RoPE applied; row t sits at cache index start + t and
    attends to cache indices 0 .. start + t, or with ``window`` > 0 only to the last ``window`` of
    them (start + t − window + 1 .. start + t: sliding-window attention, Beltagy et al. 2020, as
    Gemma 3's local layers use it). k_cache, v_cache: [n_kv_heads, S, head_dim] with S ≥ start + T.
    scale: usually 1/√head_dim. window: int, 0 = none.
    out: float32 [T, n_heads, head_dim], overwritten.
    """
    T, H, D = q.shape
    KV = k_cache.shape[0]
    G = H // KV
    check_cache_rows(k_cache, D)
    check_cache_rows(v_cache, D)
    for task in prange(KV * T):
        g = task % KV
        i = task // KV
        # Zig-zag over rows (0, T-1, 1, T-2, ...) so each thread's contiguous share of tasks mixes
        # short and long causal prefixes.
        t = i // 2 if i % 2 == 0 else T - 1 - i // 2
        end = start + t + 1
        first = max(0, end - window) if window > 0 else 0
        n = end - first
        scores = np.empty((G, n), dtype=np.float32)
        row = np.empty(D, np.float32)  # an f16 / q8_0 / q4_0 cache row, decoded
        for s in range(n):
            k = cache_row(k_cache, g, first + s, row)
            for j in range(G):
                h = g * G + j
                acc = np.float32(0.0)
                for d in range(D):
                    acc += q[t, h, d] * k[d]
                scores[j, s] = acc * scale
        for j in range(G):
            softmax_inplace(scores[j])
            for d in range(D):
                out[t, g * G + j, d] = 0.0
        for s in range(n):
            v = cache_row(v_cache, g, first + s, row)
            for j in range(G):
                p = scores[j, s]
                h = g * G + j
                for d in range(D):
                    out[t, h, d] += p * v[d]


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _four_rows(cache, g, s, rows):
    """Cache rows s .. s+3 of KV head g as four float32 [head_dim] arrays (views of a float32
    cache, or f16 / q8_0 / q4_0 rows decoded into rows[0..3], float32 [4, head_dim])."""
    return (cache_row(cache, g, s, rows[0]), cache_row(cache, g, s + 1, rows[1]),
            cache_row(cache, g, s + 2, rows[2]), cache_row(cache, g, s + 3, rows[3]))


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _block_scores(q_group, k_cache, v_cache, g, s0, s1, scores, m, rows):
    """scores[j, s − s0] = q_group[j] · k_cache[g, s] for s in [s0, s1), and m[j] = max(m[j], those).

    Four K rows at a time: each q element loaded once serves four dot products, whose four
    accumulators keep the FMA units busy. rows: float32 [4, head_dim] scratch (decoded rows).
    It also asks for the K rows PREFETCH_AHEAD positions on and for this block's V rows, which
    :func:`_block_values` reads next: the weights' products between two layers' attention evict
    the cache, and rows requested only when read arrived at memory latency (0.19 vs 0.15 ms a
    SmolLM2 layer at depth 2048 on the Intel VM of BENCHMARKS.md, cache cold).
    """
    G, D = q_group.shape
    s = s0
    while s + 4 <= s1:
        for r in range(4):
            prefetch_row(k_cache, g, s + PREFETCH_AHEAD + r)
            prefetch_row(v_cache, g, s + r)
        k0, k1, k2, k3 = _four_rows(k_cache, g, s, rows)
        i = s - s0
        for j in range(G):
            qj = q_group[j]
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for d in range(D):
                a0 += qj[d] * k0[d]
                a1 += qj[d] * k1[d]
                a2 += qj[d] * k2[d]
                a3 += qj[d] * k3[d]
            scores[j, i], scores[j, i + 1], scores[j, i + 2], scores[j, i + 3] = a0, a1, a2, a3
            m[j] = max(m[j], max(max(a0, a1), max(a2, a3)))
        s += 4
    for s in range(s, s1):
        k0 = cache_row(k_cache, g, s, rows[0])
        for j in range(G):
            qj = q_group[j]
            a0 = np.float32(0.0)
            for d in range(D):
                a0 += qj[d] * k0[d]
            scores[j, s - s0] = a0
            m[j] = max(m[j], a0)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _block_values(p, v_cache, g, s0, s1, o, rows):
    """o[j] += Σ_s p[j, s − s0] · v_cache[g, s] over s in [s0, s1), four V rows per pass over o
    (one load and store of o per four rows). o: float32 [G, head_dim]; rows as above."""
    G, D = o.shape
    s = s0
    while s + 4 <= s1:
        v0, v1, v2, v3 = _four_rows(v_cache, g, s, rows)
        i = s - s0
        for j in range(G):
            p0, p1, p2, p3 = p[j, i], p[j, i + 1], p[j, i + 2], p[j, i + 3]
            oj = o[j]
            for d in range(D):
                oj[d] += p0 * v0[d] + p1 * v1[d] + p2 * v2[d] + p3 * v3[d]
        s += 4
    for s in range(s, s1):
        v0 = cache_row(v_cache, g, s, rows[0])
        for j in range(G):
            p0 = p[j, s - s0]
            oj = o[j]
            for d in range(D):
                oj[d] += p0 * v0[d]


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def attention_decode(q, k_caches, v_caches, slots, lengths, scale, partial, out):
    """Attention of one new query row per sequence and head, for B sequences at once, each over
    its own cache and length.

    q: float32 [B, n_heads, head_dim], RoPE applied. k_caches, v_caches: [P, n_kv_heads, S,
    head_dim] caches of P sequences (a slot pool; one sequence's cache as a [1, …] view with
    slot 0); sequence b reads slot ``slots[b]`` and its first ``lengths[b]`` positions (int64
    [B] each, 1 ≤ length ≤ S), its own K/V row already stored. scale: usually 1/√head_dim.
    partial: float32 scratch [≥ B, ≥ ceil(max(lengths) / DECODE_BLOCK), n_heads, head_dim + 2].
    out: float32 [B, n_heads, head_dim], overwritten.

    One parallel region over every (sequence, KV head, block of DECODE_BLOCK positions) task, so
    both cores stay busy even for one sequence with n_kv_heads = 1 and the step pays for a single
    launch whatever B is. Each task keeps its block's running maximum m, sum of exponentials l and
    unnormalised output o = Σ e^(s−m) v (in ``partial``); a second pass merges each (sequence,
    head)'s blocks with the usual rescaling by e^(m_b − M) (split-K "flash decoding", Dao et al.
    2023; Milakov & Gimelshein 2018 for the online softmax). A sequence's tasks and merge do not
    depend on the other sequences, so its output is the same, bit for bit, in any batch.
    """
    B, H, D = q.shape
    KV = k_caches.shape[1]
    G = H // KV
    check_cache_rows(k_caches, D)
    check_cache_rows(v_caches, D)
    first_task = np.empty(B + 1, np.int64)  # sequence b owns tasks first_task[b] .. first_task[b+1] − 1
    first_task[0] = 0
    for b in range(B):
        first_task[b + 1] = first_task[b] + KV * ((lengths[b] + DECODE_BLOCK - 1) // DECODE_BLOCK)
    for task in prange(first_task[B]):
        b = np.searchsorted(first_task, task, side="right") - 1
        n_blocks = (lengths[b] + DECODE_BLOCK - 1) // DECODE_BLOCK
        local = task - first_task[b]
        g = local // n_blocks
        blk = local % n_blocks
        s0 = blk * DECODE_BLOCK
        s1 = min(s0 + DECODE_BLOCK, lengths[b])
        k_cache, v_cache = k_caches[slots[b]], v_caches[slots[b]]
        h0 = g * G  # the group's first query head
        # Small task-local arrays (the group's scaled queries, scores, running maxima, output sums,
        # decoded cache rows) keep the inner loops on unit-stride 1-D data, which LLVM vectorises.
        rows = np.empty((4, D), np.float32)
        q_group = np.empty((G, D), np.float32)
        for j in range(G):
            for d in range(D):
                q_group[j, d] = q[b, h0 + j, d] * scale
        scores = np.empty((G, DECODE_BLOCK), np.float32)
        m = np.full(G, -np.inf, np.float32)
        _block_scores(q_group, k_cache, v_cache, g, s0, s1, scores, m, rows)  # K rows read once per group
        for j in range(G):
            total = np.float32(0.0)
            for i in range(s1 - s0):
                e = exp32(scores[j, i] - m[j])
                scores[j, i] = e
                total += e
            partial[b, blk, h0 + j, D] = m[j]
            partial[b, blk, h0 + j, D + 1] = total
        o = np.zeros((G, D), np.float32)
        _block_values(scores, v_cache, g, s0, s1, o, rows)  # V rows read once per group
        for j in range(G):
            for d in range(D):
                partial[b, blk, h0 + j, d] = o[j, d]
    for bh in prange(B * H):
        b = bh // H
        h = bh % H
        n_blocks = (lengths[b] + DECODE_BLOCK - 1) // DECODE_BLOCK
        m_all = -np.inf
        for blk in range(n_blocks):
            m_all = max(m_all, partial[b, blk, h, D])
        total = np.float32(0.0)
        for d in range(D):
            out[b, h, d] = 0.0
        for blk in range(n_blocks):
            w = exp32(partial[b, blk, h, D] - m_all)
            total += w * partial[b, blk, h, D + 1]
            for d in range(D):
                out[b, h, d] += w * partial[b, blk, h, d]
        # total ≥ 1 for finite scores (the best block's best score contributes e^0); NaN scores
        # (a damaged model or prompt cache) give exp32 = 0 and a zero total: a NaN output then,
        # which the sampler reports, rather than a ZeroDivisionError inside the parallel region.
        inv = np.float32(1.0) / total if total > 0 else np.float32(np.nan)
        for d in range(D):
            out[b, h, d] *= inv


def decode_partial_shape(batch_size: int, max_length: int, n_heads: int, head_dim: int) -> tuple[int, ...]:
    """The shape of :func:`attention_decode`'s ``partial`` scratch for up to ``batch_size``
    sequences of up to ``max_length`` positions."""
    return (batch_size, -(-max_length // DECODE_BLOCK), n_heads, head_dim + 2)


def warm_up() -> None:
    """Call both kernels once on tiny inputs for every cache storage type — float32, float16
    (uint16 bits), q8_0 (int8 blocks), q4_0 (uint8 blocks) — so Numba compiles (or loads from its
    disk cache) each specialisation before the first token."""
    from .cache_rows import Q4_0_BLOCK_BYTES, Q8_0_BLOCK_BYTES, QK

    f32 = np.float32
    D = QK  # one block per row
    q = np.ones((2, 2, D), f32)
    for storage, width in ((np.float32, D), (np.uint16, D), (np.int8, Q8_0_BLOCK_BYTES), (np.uint8, Q4_0_BLOCK_BYTES)):
        k = np.zeros((1, 4, width), storage)
        attention_prefill(q, k, k, 0, f32(0.5), 0, np.empty_like(q))
        partial = np.empty(decode_partial_shape(1, 4, 2, D), f32)
        one = np.ones(1, np.int64)
        attention_decode(q[:1], k[None], k[None], one * 0, one * 3, f32(0.5), partial, np.empty((1, 2, D), f32))
