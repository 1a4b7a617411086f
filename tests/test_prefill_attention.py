"""Prefill attention as products (mqa_gen.prefill_attention) against a plain NumPy reference,
per query head and row, with the causal and sliding-window rules written out — and against the
Numba kernel it replaces for long chunks."""

from __future__ import annotations

import numpy as np
import pytest

from mqa_gen.kernels import attention_prefill
from mqa_gen.prefill_attention import MIN_ROWS, ROW_BLOCK, prefill_attention


def reference(q, k, v, start, scale, window):
    """softmax(q kᵀ · scale) v for every head and row, float64, over the indices the row may read."""
    T, H, D = q.shape
    G = H // k.shape[0]
    out = np.zeros((T, H, D))
    for t in range(T):
        end = start + t + 1
        first = max(0, end - window) if window else 0
        for h in range(H):
            s = k[h // G, first:end].astype(np.float64) @ q[t, h].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v[h // G, first:end]
    return out


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 1), (9, 3), (4, 4)])
@pytest.mark.parametrize("T,start,window", [(40, 0, 0), (300, 0, 0), (300, 37, 0), (ROW_BLOCK + 5, 200, 64),
                                            (MIN_ROWS - 1, 10, 0)])
@pytest.mark.parametrize("cache", ["float32", "float16"])
def test_products_match_the_reference_and_the_kernel(n_heads, n_kv_heads, T, start, window, cache):
    rng = np.random.default_rng(T + start + n_heads)
    D, S = 32, start + T + 3
    q = rng.standard_normal((T, n_heads, D)).astype(np.float32)
    k = rng.standard_normal((n_kv_heads, S, D)).astype(np.float32)
    v = rng.standard_normal((n_kv_heads, S, D)).astype(np.float32)
    if cache == "float16":
        k, v = k.astype(np.float16), v.astype(np.float16)
        stored_k, stored_v = k.view(np.uint16), v.view(np.uint16)
    else:
        stored_k, stored_v = k, v
    scale = 1 / np.sqrt(D)
    out = np.empty_like(q)
    prefill_attention(q, stored_k, stored_v, start, scale, window, out)
    np.testing.assert_allclose(out, reference(q, k.astype(np.float32), v.astype(np.float32), start, scale, window),
                               atol=2e-5, rtol=1e-4)
    kernel = np.empty_like(q)
    attention_prefill(q, stored_k, stored_v, start, np.float32(scale), window, kernel)
    np.testing.assert_allclose(out, kernel, atol=2e-5, rtol=1e-4)
