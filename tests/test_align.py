"""Per-head transforms before merging KV heads (mqa_gen.head_transforms) and the merges
(mqa_gen.head_merge).

Oracles: the real SmolLM2 model's own logits (the transforms alone must not change them), NumPy
formulas computed another way (the polar factor for Procrustes, a grid search over angles for one
RoPE pair, the rope kernel for the pair layout), and layers built so that a merge can be exact.
"""

from __future__ import annotations

import numpy as np
import pytest

from mqa_gen.calibrate import attention_weights, collect_attention_inputs
from mqa_gen.errors import ConfigError
from mqa_gen.head_merge import (
    input_moment,
    key_alignment,
    merge_heads,
    pair_rotation,
    procrustes,
    value_alignment,
)
from mqa_gen.head_transforms import (
    AttentionWeights,
    from_pairs,
    rope_pairs,
    to_pairs,
    transform_key_pairs,
    transform_values,
)
from mqa_gen.layer import MultiQueryAttention, MultiQueryAttentionConfig
from mqa_gen.regroup import with_attention_weights

THETA = 10000.0


def random_orthogonal(rng, n):
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def layer_output(w: AttentionWeights, x, theta=THETA):
    """The layer's output for x [B, T, d_model] (float64, RoPE in the weights' pairing)."""
    cfg = MultiQueryAttentionConfig(num_heads=w.n_heads, head_dim=w.head_dim, num_kv_heads=w.n_kv_heads,
                                    rope_theta=theta, rope_interleaved=w.rope_interleaved)
    return MultiQueryAttention.from_projections(cfg, w.wq, w.wk, w.wv, w.wo, dtype=np.float64).forward(x)


def random_weights(rng, n_heads=6, n_kv_heads=3, head_dim=8, interleaved=True):
    H, KV, D = n_heads, n_kv_heads, head_dim
    d = H * D  # the layer class needs d_model = n_heads·head_dim
    return AttentionWeights(rng.standard_normal((H * D, d)) / np.sqrt(d), rng.standard_normal((KV * D, d)) / np.sqrt(d),
                            rng.standard_normal((KV * D, d)) / np.sqrt(d), rng.standard_normal((d, H * D)) / np.sqrt(H * D),
                            n_heads=H, head_dim=D, rope_interleaved=interleaved)


# ─────────────────────────── exact transforms ───────────────────────────


@pytest.mark.parametrize("interleaved", [True, False])
def test_pair_layout_is_the_rope_kernels(interleaved):
    """RoPE on a head = each pair (as to_pairs reads it) times e^{i·pos·ω_i}: the rope kernel against
    complex multiplication in NumPy, for both layouts."""
    from mqa_gen.batch import rope_cos_sin
    from mqa_gen.kernels import rope

    rng = np.random.default_rng(0)
    D, T = 16, 5
    x = rng.standard_normal((T, 1, D)).astype(np.float32)
    cos, sin = rope_cos_sin(np.arange(T), D, THETA)
    rotated = x.copy()
    rope(rotated, cos, sin, interleaved)
    pairs = lambda rows: to_pairs(rows[:, 0].T.astype(np.float64), D, interleaved)[0].T  # (T, D/2) complex
    z = pairs(x)
    omega = THETA ** (-np.arange(D // 2) * 2.0 / D)
    expected = z * np.exp(1j * np.arange(T)[:, None] * omega[None, :])
    np.testing.assert_allclose(pairs(rotated), expected, atol=1e-5)
    np.testing.assert_array_equal(from_pairs(to_pairs(x[:, 0].T.astype(np.float64), D, interleaved), interleaved),
                                  x[:, 0].T)
    a, b = rope_pairs(D, interleaved)
    assert sorted(np.concatenate([a, b])) == list(range(D))


@pytest.mark.parametrize("interleaved", [True, False])
def test_key_and_value_transforms_leave_the_layer_unchanged(interleaved):
    """Rotations, and any nonzero complex factor, per RoPE pair (keys and their queries), and any
    invertible value map with its inverse folded into W_o: same output, RoPE on, float64."""
    rng = np.random.default_rng(1)
    w = random_weights(rng, interleaved=interleaved)
    x = rng.standard_normal((2, 7, w.d_model))
    expected = layer_output(w, x)
    angles = rng.uniform(-np.pi, np.pi, (w.n_kv_heads, w.head_dim // 2))
    scales = rng.uniform(0.3, 3.0, angles.shape)
    for factors in (np.exp(1j * angles), scales * np.exp(1j * angles)):
        moved = transform_key_pairs(w, factors)
        assert not np.allclose(moved.wk, w.wk) and not np.allclose(moved.wq, w.wq)
        np.testing.assert_allclose(layer_output(moved, x), expected, atol=1e-12)
    maps = np.stack([random_orthogonal(rng, w.head_dim) for _ in range(w.n_kv_heads)])
    np.testing.assert_allclose(layer_output(transform_values(w, maps), x), expected, atol=1e-12)
    maps = maps + 0.5 * rng.standard_normal(maps.shape)  # not orthogonal, still invertible
    np.testing.assert_allclose(layer_output(transform_values(w, maps), x), expected, atol=1e-11)


def test_transforms_alone_leave_smollm2_logits_unchanged(smollm2):
    """The whole real model with RoPE: every layer's keys rotated per pair by the Procrustes angles
    chosen on a text, values by the Procrustes maps (and, on top, random rotations), nothing
    merged: the logits equal those of the same float32 weights untransformed, within 1e-4."""
    c = smollm2.config
    ids = smollm2.tokenizer.encode("The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.")
    inputs = collect_attention_inputs(smollm2.model, smollm2.gguf, c, np.asarray([ids]))
    rng = np.random.default_rng(2)
    native, moved = {}, {}
    for layer in range(c.n_layers):
        w = attention_weights(smollm2.gguf, c, layer)
        native[layer] = w
        moment = input_moment(inputs[layer])
        keys = key_alignment(w, moment, 1) * np.exp(1j * rng.uniform(-np.pi, np.pi, (c.n_kv_heads, c.head_dim // 2)))
        t = transform_key_pairs(w, keys)
        moved[layer] = transform_values(t, value_alignment(t, moment, 1))
        assert not np.allclose(moved[layer].wk, w.wk, atol=1e-3)
    reference = with_attention_weights(smollm2.model, native)
    transformed = with_attention_weights(smollm2.model, moved)
    expected = reference.forward(ids, reference.new_cache(len(ids)), all_logits=True)
    actual = transformed.forward(ids, transformed.new_cache(len(ids)), all_logits=True)
    assert np.abs(actual - expected).max() < 1e-4
    # and the dense float32 reference is the model itself up to its quantised kernels' rounding
    own = smollm2.model.forward(ids, smollm2.model.new_cache(len(ids)), all_logits=True)
    assert (own.argmax(axis=1) == expected.argmax(axis=1)).mean() > 0.9


# ─────────────────────────── Procrustes ───────────────────────────


def test_procrustes_is_the_polar_factor_and_recovers_a_rotation():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((50, 6))
    q0 = random_orthogonal(rng, 6)
    np.testing.assert_allclose(procrustes(a.T @ (a @ q0)), q0, atol=1e-10)  # B = A Q0 exactly
    b = a @ q0 + 0.3 * rng.standard_normal((50, 6))
    m = a.T @ b
    vals, vecs = np.linalg.eigh(m.T @ m)
    polar = m @ (vecs / np.sqrt(vals)) @ vecs.T  # M (MᵀM)^-½, the orthogonal polar factor
    q = procrustes(m)
    np.testing.assert_allclose(q, polar, atol=1e-10)
    np.testing.assert_allclose(q.T @ q, np.eye(6), atol=1e-12)
    best = np.linalg.norm(a @ q - b)
    for _ in range(200):  # no other orthogonal matrix fits better
        assert np.linalg.norm(a @ random_orthogonal(rng, 6) - b) >= best


def test_pair_rotation_against_a_grid_of_2x2_rotations():
    """The rotation of one RoPE pair that brings a head's 2-D outputs closest to a reference:
    the closed form against a fine grid of NumPy rotation matrices."""
    rng = np.random.default_rng(4)
    k = rng.standard_normal((40, 2))
    ref = k @ np.array([[np.cos(0.7), np.sin(0.7)], [-np.sin(0.7), np.cos(0.7)]]) + 0.2 * rng.standard_normal((40, 2))
    z, zr = k[:, 0] + 1j * k[:, 1], ref[:, 0] + 1j * ref[:, 1]
    phi = pair_rotation(np.mean(z * np.conj(zr)))
    grid = np.linspace(-np.pi, np.pi, 20001)
    errors = [np.sum((k @ np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]]) - ref) ** 2) for t in grid]
    assert abs(np.angle(phi) - grid[int(np.argmin(errors))]) < 1e-3
    assert np.abs(phi) == pytest.approx(1.0)
    assert pair_rotation(0j) == 1


def test_alignment_makes_rotated_copies_identical_so_the_mean_merge_is_exact():
    """KV heads that are rotated copies of one head (keys: one rotation per RoPE pair; values: any
    orthogonal map), with query heads and W_o slices rotated to match: Procrustes undoes the
    rotations, the mean of the aligned heads is every head, and MQA equals the original."""
    rng = np.random.default_rng(5)
    base = random_weights(rng, n_heads=6, n_kv_heads=1, head_dim=8)
    k_rows, v_rows = base.wk, base.wv
    w = AttentionWeights(np.tile(base.wq[:16], (3, 1)), np.tile(k_rows, (3, 1)), np.tile(v_rows, (3, 1)),
                         np.tile(base.wo[:, :16], (1, 3)), n_heads=6, head_dim=8)
    w = transform_key_pairs(w, np.exp(1j * rng.uniform(-np.pi, np.pi, (3, 4))))
    w = transform_values(w, np.stack([random_orthogonal(rng, 8) for _ in range(3)]))
    x = rng.standard_normal((2, 9, w.d_model))
    moment = input_moment(x)
    for merge in ("mean", "ls"):
        merged = merge_heads(w, 1, "aligned", moment, merge=merge, rope_theta=THETA)
        assert merged.n_kv_heads == 1
        np.testing.assert_allclose(layer_output(merged, x), layer_output(w, x), atol=1e-9)
    assert np.abs(layer_output(merge_heads(w, 1, "mean"), x) - layer_output(w, x)).max() > 1e-2


def test_lowrank_merges_are_exact_when_the_heads_share_a_rank_head_dim_space():
    """Keys whose pairs are complex multiples of one head's, values that are linear maps of one
    head's: svd and pca represent them exactly (W_q, W_o absorb the maps)."""
    rng = np.random.default_rng(6)
    base = random_weights(rng, n_heads=4, n_kv_heads=1, head_dim=8)
    keys = to_pairs(base.wk, 8, True)  # (1, 4, d)
    factors = rng.uniform(0.5, 2, (2, 4)) * np.exp(1j * rng.uniform(-np.pi, np.pi, (2, 4)))
    wk = from_pairs(keys * factors[:, :, None], True)
    wv = np.concatenate([rng.standard_normal((8, 8)) @ base.wv for _ in range(2)])
    w = AttentionWeights(base.wq, wk, wv, base.wo, n_heads=4, head_dim=8)
    x = rng.standard_normal((2, 9, w.d_model))
    moment = input_moment(x)
    for method in ("svd", "pca"):
        merged = merge_heads(w, 1, method, moment, rope_theta=THETA, rope_span=0)
        np.testing.assert_allclose(layer_output(merged, x), layer_output(w, x), atol=1e-8)


def test_merges_reduce_the_error_of_mean_pooling_on_random_heads():
    rng = np.random.default_rng(7)
    w = random_weights(rng, n_heads=8, n_kv_heads=4, head_dim=8)
    x = rng.standard_normal((2, 16, w.d_model))
    moment = input_moment(x)
    target = layer_output(w, x)

    def error(m):
        return np.sum((layer_output(m, x) - target) ** 2) / np.sum(target ** 2)

    mean = error(merge_heads(w, 2, "mean"))
    assert error(merge_heads(w, 2, "aligned", moment, rope_theta=THETA)) < mean
    assert error(merge_heads(w, 2, "pca", moment, rope_theta=THETA)) < mean
    expanded = merge_heads(w, 8, "pca", moment)  # a multiple replicates: exact whatever the method
    np.testing.assert_allclose(layer_output(expanded, x), target, atol=1e-12)


def test_merge_errors():
    w = random_weights(np.random.default_rng(8))
    with pytest.raises(ConfigError, match="unknown merge method"):
        merge_heads(w, 1, "median")
    with pytest.raises(ConfigError, match="needs the calibration"):
        merge_heads(w, 1, "pca")
    with pytest.raises(ConfigError, match="cannot regroup"):
        merge_heads(w, 2, "mean")
    with pytest.raises(ConfigError, match="key factors"):
        transform_key_pairs(w, np.ones((1, 4)))
    with pytest.raises(ConfigError, match="do not fit"):
        AttentionWeights(w.wq, w.wk[:5], w.wv, w.wo, n_heads=6, head_dim=8)
