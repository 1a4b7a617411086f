"""The MQA/GQA attention block, checked against invariants that need no oracle."""

from __future__ import annotations

import numpy as np
import pytest

from mqa_gen.attention import Attention, DecodeScratch
from mqa_gen.batch import Batch
from mqa_gen.cache import KVCache
from mqa_gen.kv_heads import valid_kv_heads
from mqa_gen.regroup import regroup_kv_projection

RNG = np.random.default_rng(7)


def gguf_row_order(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a Hugging Face Q or K projection in the order llama GGUF files store them: within each
    head, the two halves that HF's rotate_half pairs become adjacent rows (as llama.cpp's converter
    lays them out for its pairwise RoPE)."""
    d_out, d_in = w.shape
    return w.reshape(n_heads, 2, d_out // n_heads // 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)


def hf_attention(x, wq, wk, wv, wo, n_heads, n_kv_heads, theta):
    """Reference: Hugging Face's llama attention (rotate_half RoPE, repeat_kv, causal softmax) in NumPy."""
    T = x.shape[0]
    D = wq.shape[0] // n_heads
    q = (x @ wq.T).reshape(T, n_heads, D).astype(np.float64)
    k = (x @ wk.T).reshape(T, n_kv_heads, D).astype(np.float64)
    v = (x @ wv.T).reshape(T, n_kv_heads, D).astype(np.float64)
    inv = theta ** (-np.arange(0, D, 2) / D)
    ang = np.arange(T)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]

    def rotate_half(a):
        return np.concatenate([-a[..., D // 2:], a[..., : D // 2]], -1)

    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    G = n_heads // n_kv_heads
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(D)
    scores = np.where(np.tril(np.ones((T, T), bool))[None], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("hts,shd->thd", p, v).reshape(T, n_heads * D)
    return o @ wo.T


def run_block(attn: Attention, x: np.ndarray, split: int | None = None) -> np.ndarray:
    """Run the block over x, as one prefill or as a prefill of ``split`` tokens then decode steps."""
    T = x.shape[0]
    cache = KVCache(1, attn.n_kv_heads, attn.head_dim, T + 3)
    scratch = DecodeScratch(attn.n_heads, attn.head_dim, T + 3)
    outs = []
    pieces = [slice(0, T)] if split is None else [slice(0, split)] + [slice(i, i + 1) for i in range(split, T)]
    for piece in pieces:
        batch = Batch([cache], [piece.stop - piece.start], attn.head_dim, scratch)
        outs.append(attn(x[piece], batch))
        batch.advance()
    return np.concatenate(outs)


def random_weights(d_model, n_heads, n_kv_heads, D):
    def w(rows, cols):
        return (RNG.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    return w(n_heads * D, d_model), w(n_kv_heads * D, d_model), w(n_kv_heads * D, d_model), w(d_model, n_heads * D)


@pytest.mark.parametrize("n_heads,n_kv_heads", [(9, 3), (4, 1), (8, 8)])
def test_pairwise_rope_on_gguf_rows_equals_hf_attention(n_heads, n_kv_heads):
    """We keep GGUF's Q/K row order and rotate adjacent pairs; that must equal HF's rotate_half on
    the original rows. K's rows are grouped by n_kv_heads, not n_heads."""
    D, d_model, T, theta = 16, 40, 7, 10000.0
    wq, wk, wv, wo = random_weights(d_model, n_heads, n_kv_heads, D)
    x = RNG.standard_normal((T, d_model)).astype(np.float32)
    expected = hf_attention(x, wq, wk, wv, wo, n_heads, n_kv_heads, theta)
    ours = Attention(gguf_row_order(wq, n_heads), gguf_row_order(wk, n_kv_heads), wv, wo,
                     n_heads, n_kv_heads, D, rope_theta=theta, rope_interleaved=True)
    np.testing.assert_allclose(run_block(ours, x), expected, atol=1e-4)
    # The same layer with HF's row order and half-split RoPE (Gemma-style files) agrees too.
    hf_layout = Attention(wq, wk, wv, wo, n_heads, n_kv_heads, D, rope_theta=theta, rope_interleaved=False)
    np.testing.assert_allclose(run_block(hf_layout, x), expected, atol=1e-4)


@pytest.mark.parametrize("n_heads,n_kv_heads", [(9, 3), (4, 1), (8, 8)])
def test_cached_decode_equals_one_prefill(n_heads, n_kv_heads):
    D, d_model, T, theta = 16, 40, 9, 10000.0
    attn = Attention(*random_weights(d_model, n_heads, n_kv_heads, D), n_heads, n_kv_heads, D, rope_theta=theta)
    x = RNG.standard_normal((T, d_model)).astype(np.float32)
    np.testing.assert_allclose(run_block(attn, x, split=3), run_block(attn, x), atol=1e-5)


@pytest.mark.parametrize("target", [3, 9])
def test_expanding_kv_heads_is_exact(target):
    n_heads, native, D, d_model, theta = 9, 3, 16, 40, 10000.0
    wq, wk, wv, wo = random_weights(d_model, n_heads, native, D)
    x = RNG.standard_normal((6, d_model)).astype(np.float32)
    base = Attention(wq, wk, wv, wo, n_heads, native, D, rope_theta=theta)
    wide = Attention(wq, regroup_kv_projection(wk, native, target, D), regroup_kv_projection(wv, native, target, D),
                     wo, n_heads, target, D, rope_theta=theta)
    np.testing.assert_allclose(run_block(wide, x, split=2), run_block(base, x), atol=1e-5)


def test_mean_pooling_averages_each_group_of_heads():
    D = 2
    w = np.arange(3 * D * 4, dtype=np.float32).reshape(3 * D, 4)  # 3 heads of 2 rows
    pooled = regroup_kv_projection(w, 3, 1, D)
    np.testing.assert_array_equal(pooled, (w[0:2] + w[2:4] + w[4:6]) / 3)
    assert valid_kv_heads(9, 3) == [1, 3, 9]
    assert valid_kv_heads(8, 2) == [1, 2, 4, 8]
    with pytest.raises(ValueError):
        regroup_kv_projection(w, 3, 2, D)


def test_attention_rejects_inconsistent_heads():
    wq, wk, wv, wo = random_weights(40, 9, 3, 16)
    with pytest.raises(ValueError, match="divisible"):
        Attention(wq, wk, wv, wo, 9, 2, 16)
    with pytest.raises(ValueError, match="KV heads"):
        Attention(wq, wk, wv, wo, 9, 9, 16)
