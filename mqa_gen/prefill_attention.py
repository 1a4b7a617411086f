"""Prefill attention as matrix products: MQA turns a KV group's G query heads into one product.

For T new rows of one sequence whose K/V rows are already in its cache (Shazeer 2019; Ainslie et
al. 2023), for each KV head g and its G = n_heads / n_kv_heads query heads:

    Q_g = the G heads' query rows stacked           [G·T, head_dim]
    S   = Q_g K_gᵀ · scale                          [G·T, L]       one BLAS product per group
    P   = softmax(S + causal / sliding-window mask) row by row
    O_g = P V_g                                     [G·T, head_dim] a second product

With one KV head (MQA) the whole layer is two products of G·T rows; with MHA it is n_heads pairs
of T rows. The rows go in blocks of at most :data:`ROW_BLOCK`, and a block only reads keys up to
its last row's position ("causal masking by blocks": the upper-right triangle of S is never
computed), which also bounds the score matrix to G·ROW_BLOCK × L floats.

The K/V rows a chunk reads are converted to float32 once per layer (a float16 cache stores bit
patterns). Other cache element types — q8_0 and q4_0 blocks, whose whole point is not to hold
the cache as floats — and chunks of fewer than :data:`MIN_ROWS` rows, where the products are too
small to pay for their set-up, go to the Numba kernel
(:func:`~mqa_gen.kernels.attention.attention_prefill`), which reads the cache in place. The two
agree to float32 rounding (tests/test_prefill_attention.py); the decode step does not use this.
"""

from __future__ import annotations

import numpy as np

from .kernels import attention_prefill
from .kernels.halfprec import half_rows_to_f32
from .kernels.rowwise import causal_softmax_rows

#: Query rows per block: big enough for efficient products, small enough to skip most of the
#: causal triangle and to keep G·ROW_BLOCK × L scores in the CPU's caches for short contexts.
ROW_BLOCK = 128

#: Below this many new rows the Numba kernel is faster (set-up of a dozen NumPy calls per group).
MIN_ROWS = 32

#: Cache element types the products read (after :func:`_float32_rows`): float32 and float16 bits;
#: the others (q8_0, q4_0 blocks) go to the Numba kernel, which reads them in place.
_PRODUCT_DTYPES = (np.dtype(np.float32), np.dtype(np.uint16))


def _float32_rows(cache: np.ndarray, first: int, stop: int) -> np.ndarray:
    """Rows [first, stop) of a float32 cache as they are, of a float16 one (uint16 bits) decoded."""
    if cache.dtype == np.float32:
        return cache[:, first:stop]
    out = np.empty((cache.shape[0], stop - first, cache.shape[2]), np.float32)
    half_rows_to_f32(cache, first, stop, out)
    return out


def prefill_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int, scale: float,
                      window: int, out: np.ndarray) -> None:
    """Causal (optionally sliding-window) attention of T new rows over a KV cache, into ``out``.

    q: float32 [T, n_heads, head_dim], RoPE applied; row t sits at cache index start + t and
    attends to indices 0 .. start + t, or with ``window`` > 0 to the last ``window`` of them.
    keys, values: [n_kv_heads, S, head_dim] cache arrays (S ≥ start + T) as the attention kernels
    take them. scale: the score scale (float). out: float32 [T, n_heads, head_dim], overwritten.
    The semantics are :func:`~mqa_gen.kernels.attention.attention_prefill`'s.
    """
    T, H, D = q.shape
    if keys.dtype not in _PRODUCT_DTYPES or T < MIN_ROWS:
        attention_prefill(q, keys, values, start, np.float32(scale), window, out)
        return
    KV = keys.shape[0]
    G = H // KV
    base = max(0, start + 1 - window) if window > 0 else 0  # the first index any row reads
    k_all = _float32_rows(keys, base, start + T)  # [KV, L, D] float32, index base + j
    v_all = _float32_rows(values, base, start + T)
    for t0 in range(0, T, ROW_BLOCK):
        t1 = min(T, t0 + ROW_BLOCK)
        lo = max(0, start + t0 + 1 - window) if window > 0 else 0  # keys this block may read: lo .. hi-1
        hi = start + t1
        k = k_all[:, lo - base : hi - base]  # [KV, L_b, D]
        v = v_all[:, lo - base : hi - base]
        rows = t1 - t0
        for g in range(KV):
            q_g = q[t0:t1, g * G : (g + 1) * G].transpose(1, 0, 2).reshape(G * rows, D)  # [G·rows, D]
            scores = (q_g @ k[g].T).reshape(G, rows, hi - lo)  # [G, rows, L_b]
            causal_softmax_rows(scores, float(scale), lo, start + t0, window)  # in place, one call
            o_g = scores.reshape(G * rows, hi - lo) @ v[g]  # [G·rows, D]
            out[t0:t1, g * G : (g + 1) * G] = o_g.reshape(G, rows, D).transpose(1, 0, 2)
