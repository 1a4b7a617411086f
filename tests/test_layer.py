"""The public MultiQueryAttention layer: gradients against finite differences, the cached forward
against the whole-sequence forward, the seq_len-1 closed forms, validation, init and optimisers."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import mqa_gen
from mqa_gen.cache import KVCache
from mqa_gen.kernels.attention_grad import attention_backward, attention_forward
from mqa_gen.layer import LayerError, LayerKVCache, MultiQueryAttention, MultiQueryAttentionConfig
from mqa_gen.optim import SGD, Adam, adam, sgd

EMPTY64 = np.zeros((0, 0, 0, 0))
GROUPINGS = [1, 2, 4]  # MQA, GQA (num_heads=4, num_kv_heads=2), MHA


def make_layer(kv=1, causal=True, rope=None, dtype=np.float64, dropout=0.0, seed=1, heads=4, head_dim=4):
    cfg = MultiQueryAttentionConfig(num_heads=heads, head_dim=head_dim, num_kv_heads=kv, causal=causal,
                                    rope_theta=rope, dropout_prob=dropout)
    return MultiQueryAttention(heads * head_dim, cfg, np.random.default_rng(seed), dtype=dtype)


def finite_difference_errors(layer, x, g_out, forward=None, eps=1e-5):
    """Relative error ‖analytic − numeric‖ / ‖numeric‖ of dL/dx and dL/dW for L = Σ y ⊙ g_out,
    numeric by central differences over every element."""
    forward = forward or (lambda: layer.forward(x))
    grads = layer.backward(x, g_out)
    targets = [("x", x, grads.d_input)] + [(n, layer.parameters()[n], getattr(grads, "d_" + n))
                                          for n in ("w_q", "w_k", "w_v", "w_o")]
    errors = {}
    for name, array, analytic in targets:
        numeric = np.empty_like(array)
        for i in np.ndindex(array.shape):
            old = array[i]
            array[i] = old + eps
            plus = float(np.sum(forward() * g_out))
            array[i] = old - eps
            minus = float(np.sum(forward() * g_out))
            array[i] = old
            numeric[i] = (plus - minus) / (2 * eps)
        errors[name] = np.linalg.norm(analytic - numeric) / np.linalg.norm(numeric)
    return errors


# --- gradients ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rope", [None, 10000.0], ids=["no-rope", "rope"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("kv", GROUPINGS, ids=["MQA", "GQA", "MHA"])
def test_gradients_match_central_differences_float64(kv, causal, rope):
    layer = make_layer(kv, causal, rope)
    rng = np.random.default_rng(kv * 10 + causal)
    x = rng.standard_normal((2, 5, 16))  # batch 2, seq 5
    g_out = rng.standard_normal((2, 5, 16))
    errors = finite_difference_errors(layer, x, g_out)
    assert set(errors) == {"x", "w_q", "w_k", "w_v", "w_o"}
    assert max(errors.values()) < 1e-6, errors


def test_gradients_with_dropout_use_the_forward_mask():
    layer = make_layer(kv=2, dropout=0.3)
    rng = np.random.default_rng(5)
    x, g_out = rng.standard_normal((2, 5, 16)), rng.standard_normal((2, 5, 16))
    y = layer.forward(x, training=True, rng=np.random.default_rng(7), keep=True)
    assert not np.allclose(y, layer.forward(x))  # the mask changed the output
    # Central differences through the same mask (same seed each call).
    errors = finite_difference_errors(
        layer, x, g_out, forward=lambda: layer.forward(x, training=True, rng=np.random.default_rng(7)))
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("kv", GROUPINGS, ids=["MQA", "GQA", "MHA"])
def test_seq_len_one_only_the_value_path_carries_gradient(kv):
    """One position: softmax over one key is 1, so o_h = v_{h//G}. Hence dW_q = dW_k = 0 and
    dW_v, dW_o, dx have closed forms through the head-expansion matrix E (v → o)."""
    layer = make_layer(kv, rope=10000.0)  # RoPE at position 0 is the identity
    H, D, G = 4, 4, 4 // kv
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 1, 16))
    dy = rng.standard_normal((2, 1, 16))
    dx, dwq, dwk, dwv, dwo = layer.backward(x, dy)
    X, DY = x[:, 0], dy[:, 0]  # (B, d_model)
    E = np.kron(np.repeat(np.eye(kv), G, axis=1), np.eye(D))  # (kv·D, H·D): KV head g → query heads of g
    o = X @ layer.w_v @ E  # (B, H·D)
    np.testing.assert_allclose(layer.forward(x)[:, 0], o @ layer.w_o, rtol=1e-12, atol=1e-12)
    assert not dwq.any() and not dwk.any()
    do = DY @ layer.w_o.T  # (B, H·D)
    np.testing.assert_allclose(dwo, o.T @ DY, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dwv, X.T @ (do @ E.T), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx[:, 0], do @ E.T @ layer.w_v.T, rtol=1e-12, atol=1e-12)


# --- cached forward -----------------------------------------------------------------------------

@pytest.mark.parametrize("rope", [None, 10000.0], ids=["no-rope", "rope"])
@pytest.mark.parametrize("kv", GROUPINGS, ids=["MQA", "GQA", "MHA"])
def test_forward_with_cache_in_pieces_equals_forward_over_the_whole(kv, rope):
    layer = make_layer(kv, rope=rope)
    x = np.random.default_rng(kv).standard_normal((2, 9, 16))
    whole = layer.forward(x)
    cache = layer.new_cache(batch=2, max_seq_len=12)
    pieces = []
    for a, b in [(0, 3), (3, 4), (4, 8), (8, 9)]:  # prefill, one decode step, prefill, decode
        y, cache = layer.forward_with_cache(x[:, a:b], cache)
        pieces.append(y)
        assert cache.length == b
    pieces = np.concatenate(pieces, axis=1)
    assert pieces.dtype == np.float64
    # The cache is the model's float32 KVCache and its kernels compute in float32; the float64
    # whole-sequence forward is exact, so the two agree to float32 rounding (~2e-7 here).
    np.testing.assert_allclose(pieces, whole, atol=1e-6, rtol=0)
    # Decode steps merge per-block softmax partials (online softmax), prefill normalises once:
    # the same float32 maths in another order.
    one_go, _ = layer.forward_with_cache(x)
    np.testing.assert_allclose(pieces, one_go, atol=1e-6, rtol=0)


def test_forward_with_cache_float32_and_float16_cache():
    layer = make_layer(2, rope=10000.0, dtype=np.float32)
    x = np.random.default_rng(0).standard_normal((3, 7, 16)).astype(np.float32)
    whole = layer.forward(x)
    assert whole.dtype == np.float32
    cache = layer.new_cache(3, 7)
    y1, _ = layer.forward_with_cache(x[:, :4], cache)
    y2, _ = layer.forward_with_cache(x[:, 4:], cache)
    np.testing.assert_allclose(np.concatenate([y1, y2], 1), whole, atol=1e-6, rtol=0)
    half, half_cache = layer.forward_with_cache(x, cache_dtype="float16")
    assert half_cache.dtype == "f16" and half_cache.nbytes * 2 == cache.nbytes
    np.testing.assert_allclose(half, whole, atol=5e-3, rtol=0)


def test_forward_with_cache_accepts_a_plain_kv_cache_and_writes_in_place():
    layer = make_layer(1, dtype=np.float32)
    x = np.random.default_rng(0).standard_normal((1, 5, 16)).astype(np.float32)
    kv = KVCache(1, 1, 4, 8)
    keys_before = kv.layers[0].keys
    y, same = layer.forward_with_cache(x, kv)
    assert same is kv and kv.length == 5 and kv.layers[0].keys is keys_before  # no reallocation
    np.testing.assert_allclose(kv.layer_view(0)[0][0], (x[0] @ layer.w_k), rtol=1e-6)
    np.testing.assert_allclose(y, layer.forward(x), atol=1e-6)
    wrapped = LayerKVCache.wrap([KVCache(1, 1, 4, 8), KVCache(1, 1, 4, 8)])
    assert wrapped.batch == 2 and wrapped.bytes_per_token == 2 * 4 * 4


@pytest.mark.parametrize("kv", GROUPINGS, ids=["MQA", "GQA", "MHA"])
def test_a_cache_made_for_the_caller_grows_with_single_token_calls(kv):
    """The seed use of the layer: the prompt with no cache, then tokens one at a time. The cache the
    layer makes must leave room for them, and the pieces must equal one forward over everything."""
    layer = make_layer(kv, rope=10000.0, dtype=np.float32)
    x = np.random.default_rng(5).standard_normal((2, 26, 16)).astype(np.float32)
    y, cache = layer.forward_with_cache(x[:, :6], None)
    pieces = [y]
    for t in range(6, 26):  # 20 decode steps
        y, cache = layer.forward_with_cache(x[:, t:t + 1], cache)
        pieces.append(y)
    assert cache.length == 26 and cache.max_seq_len >= 26
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), layer.forward(x), atol=1e-5, rtol=0)
    fixed = layer.new_cache(2, 6)  # a cache the caller sized stays that size
    layer.forward_with_cache(x[:, :6], fixed)
    with pytest.raises(LayerError, match="no room"):
        layer.forward_with_cache(x[:, 6:7], fixed)


def test_forward_with_cache_default_capacity_and_truncate():
    layer = make_layer(1, dtype=np.float32)
    x = np.random.default_rng(0).standard_normal((2, 4, 16)).astype(np.float32)
    _, cache = layer.forward_with_cache(x, max_seq_len=10)
    assert cache.max_seq_len == 10 and cache.length == 4
    cache.truncate(2)
    y, _ = layer.forward_with_cache(x[:, 2:], cache)
    np.testing.assert_allclose(y, layer.forward(x)[:, 2:], atol=1e-6)


# --- validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(num_heads=0, head_dim=4), "num_heads must be a positive integer"),
    (dict(num_heads=4, head_dim=0), "head_dim must be a positive integer"),
    (dict(num_heads=4, head_dim=4, num_kv_heads=0), "num_kv_heads must be a positive integer"),
    (dict(num_heads=4, head_dim=4, num_kv_heads=3), "divisible by num_kv_heads"),
    (dict(num_heads=4, head_dim=4, dropout_prob=1.0), "dropout_prob"),
    (dict(num_heads=4, head_dim=3, rope_theta=10000.0), "even for RoPE"),
    (dict(num_heads=2.5, head_dim=4), "positive integer"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        MultiQueryAttentionConfig(**kwargs)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, mqa_gen.errors.MqaGenError)


def test_layer_validation():
    cfg = MultiQueryAttentionConfig(num_heads=4, head_dim=4)
    with pytest.raises(ValueError, match=r"num_heads × head_dim \(4 × 4 = 16\) must equal d_model \(12\)"):
        MultiQueryAttention(12, cfg, np.random.default_rng(0))
    with pytest.raises(ValueError, match="d_model must be a positive integer"):
        MultiQueryAttention(0, cfg)
    with pytest.raises(ValueError, match="float32 or float64"):
        MultiQueryAttention(16, cfg, dtype=np.int32)
    with pytest.raises(ValueError, match="Generator"):
        MultiQueryAttention(16, cfg, rng=42)
    layer = MultiQueryAttention(16, cfg, np.random.default_rng(0))
    with pytest.raises(ValueError, match="3-D"):
        layer.forward(np.zeros((5, 16)))
    with pytest.raises(ValueError, match="last dimension is 8, expected d_model=16"):
        layer.forward(np.zeros((1, 5, 8)))
    with pytest.raises(ValueError, match="empty"):
        layer.forward(np.zeros((1, 0, 16)))
    with pytest.raises(ValueError, match="grad_output has shape"):
        layer.backward(np.zeros((1, 5, 16)), np.zeros((1, 4, 16)))
    with pytest.raises(ValueError, match="unknown weight"):
        layer.backward(np.zeros((1, 5, 16)), np.zeros((1, 5, 16)), weights=("w_x",))
    w = layer.parameters()
    with pytest.raises(ValueError, match="w_k has shape"):
        MultiQueryAttention.from_weights(cfg, w["w_q"], w["w_q"], w["w_v"], w["w_o"])


def test_cache_validation():
    layer = make_layer(kv=2, dtype=np.float32)  # 4 heads, 2 KV heads of 4
    x = np.zeros((2, 3, 16), np.float32)
    with pytest.raises(ValueError, match="holds 1 sequence.*batch is 2"):
        layer.forward_with_cache(x, layer.new_cache(1, 8))
    with pytest.raises(ValueError, match="cache has 1 KV heads, the layer 2"):
        layer.forward_with_cache(x, LayerKVCache(2, 1, 4, 8))
    with pytest.raises(ValueError, match="head_dim is 8, the layer's 4"):
        layer.forward_with_cache(x, LayerKVCache(2, 2, 8, 8))
    with pytest.raises(ValueError, match="no room for 3 more"):
        layer.forward_with_cache(x, layer.new_cache(2, 2))
    with pytest.raises(ValueError, match="n_layers=1"):
        layer.forward_with_cache(x[:1], KVCache(2, 2, 4, 8))
    with pytest.raises(ValueError, match="LayerKVCache or a KVCache"):
        layer.forward_with_cache(x, cache=[1, 2])
    with pytest.raises(ValueError, match="causal"):
        make_layer(causal=False).forward_with_cache(x)


# --- construction, parameters, dropout, keep ----------------------------------------------------

def test_parameter_count_and_xavier_init():
    cfg = MultiQueryAttentionConfig(num_heads=8, head_dim=16, num_kv_heads=2)
    layer = MultiQueryAttention(128, cfg, np.random.default_rng(0))
    assert layer.parameter_count() == 2 * 128 * 128 + 2 * 128 * 32
    assert layer.w_q.shape == (128, 128) and layer.w_k.shape == (128, 32) and layer.w_o.shape == (128, 128)
    assert all(w.dtype == np.float32 for w in layer.parameters().values())
    limit = np.sqrt(6 / (128 + 32))
    assert np.abs(layer.w_k).max() <= limit and np.abs(layer.w_k).max() > 0.95 * limit
    assert layer.w_k.var() == pytest.approx(limit**2 / 3, rel=0.1)  # variance of U(±a) is a²/3
    again = MultiQueryAttention(128, cfg, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(layer.parameters().values(), again.parameters().values()))
    assert "MultiQueryAttention(GQA" in repr(layer)


def test_from_weights_copies_and_infers_dtype():
    base = make_layer(kv=2)
    w = base.parameters()
    layer = MultiQueryAttention.from_weights(base.config, w["w_q"], w["w_k"], w["w_v"], w["w_o"])
    assert layer.dtype == np.float64 and layer.w_q is not w["w_q"]
    x = np.random.default_rng(0).standard_normal((1, 3, 16))
    np.testing.assert_array_equal(layer.forward(x), base.forward(x))
    as32 = MultiQueryAttention.from_weights(base.config, *(w[n] for n in ("w_q", "w_k", "w_v", "w_o")), dtype="float32")
    assert as32.forward(x).dtype == np.float32


def test_config_helpers():
    cfg = MultiQueryAttentionConfig(num_heads=4, head_dim=4)
    assert cfg.kind == "MQA" and cfg.with_kv_heads(4).kind == "MHA" and cfg.with_kv_heads(2).kind == "GQA"
    assert cfg.with_dropout(0.1).dropout_prob == 0.1 and not cfg.with_causal(False).causal
    assert cfg.with_rope(500.0).rope_theta == 500.0 and cfg.group_size == 4 and cfg.d_model == 16


def test_dropout_only_in_training_and_reproducible():
    layer = make_layer(kv=1, dropout=0.5, dtype=np.float32)
    x = np.random.default_rng(0).standard_normal((2, 6, 16)).astype(np.float32)
    plain = layer.forward(x)
    a = layer.forward(x, training=True, rng=np.random.default_rng(1))
    b = layer.forward(x, training=True, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, plain)
    np.testing.assert_allclose(layer.forward(x, training=False), plain)
    # Inverted dropout keeps the expectation: averaging many masks approaches the plain output.
    mean = np.mean([layer.forward(x, training=True, rng=np.random.default_rng(s)) for s in range(400)], axis=0)
    assert np.abs(mean - plain).max() < 0.15 * np.abs(plain).max()


def test_backward_reuses_what_forward_kept(monkeypatch):
    layer = make_layer(kv=2)
    x = np.random.default_rng(0).standard_normal((2, 5, 16))
    g = np.ones_like(x)
    layer.forward(x, keep=True)
    calls = []
    original = layer._forward_full
    monkeypatch.setattr(layer, "_forward_full", lambda *a, **k: calls.append(1) or original(*a, **k))
    kept = layer.backward(x, g)
    assert calls == []  # nothing recomputed
    layer.apply_gradients(kept, sgd(lr=1e-3))  # weights change: the kept state is stale now
    layer.backward(x, g)
    assert calls == [1]
    layer.backward(x.copy(), g)  # another array: recomputed
    assert calls == [1, 1]


def test_backward_can_skip_the_input_and_some_weights():
    layer = make_layer(kv=1, rope=10000.0)
    x = np.random.default_rng(0).standard_normal((2, 5, 16))
    g = np.random.default_rng(1).standard_normal(x.shape)
    full = layer.backward(x, g)
    part = layer.backward(x, g, input_grad=False, weights=("w_k", "w_v"))
    assert part.d_input is None and part.d_w_q is None and part.d_w_o is None
    np.testing.assert_allclose(part.d_w_k, full.d_w_k, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(part.d_w_v, full.d_w_v, rtol=1e-12, atol=1e-14)


# --- optimisers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("make_opt", [lambda: sgd(lr=0.05, momentum=0.9), lambda: adam(lr=1e-2)],
                         ids=["sgd", "adam"])
def test_optimisers_fit_a_teacher_layer(make_opt):
    teacher = make_layer(kv=2, rope=10000.0, seed=1, dtype=np.float32)
    student = make_layer(kv=2, rope=10000.0, seed=2, dtype=np.float32)
    x = np.random.default_rng(0).standard_normal((4, 8, 16)).astype(np.float32)
    target = teacher.forward(x)
    opt = make_opt()

    def loss():
        return float(np.mean((student.forward(x) - target) ** 2))

    start = loss()
    for _ in range(150):
        y = student.forward(x, keep=True)
        student.apply_gradients(student.backward(x, 2 * (y - target) / y.size), opt)
    assert loss() < 0.2 * start


def test_optimiser_validation():
    with pytest.raises(ValueError, match="lr"):
        Adam(lr=0)
    with pytest.raises(ValueError, match="momentum"):
        SGD(momentum=1.0)
    with pytest.raises(ValueError, match="unknown parameter"):
        Adam().step({"a": np.zeros(2)}, {"b": np.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        SGD().step({"a": np.zeros(2)}, {"a": np.zeros(3)})


def test_adam_first_step_moves_each_weight_by_lr():
    """With bias correction, Adam's first step is lr · g / (|g| + eps) ≈ lr · sign(g) (Kingma & Ba 2015)."""
    p = {"w": np.array([1.0, -2.0, 3.0])}
    Adam(lr=0.1).step(p, {"w": np.array([0.5, -4.0, 1e-3])})
    np.testing.assert_allclose(p["w"], [0.9, -1.9, 2.9], rtol=1e-5)


# --- kernels alone ------------------------------------------------------------------------------

def reference_attention(q, k, v, scale, causal, mask):
    B, T, H, D = q.shape
    G = H // k.shape[2]
    ke, ve = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, ke) * scale
    if causal:
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p, np.einsum("bhts,bshd->bthd", p * mask, ve)


@pytest.mark.parametrize("dtype, tol", [(np.float32, 3e-6), (np.float64, 1e-13)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv", [1, 3, 6])
def test_kernels_equal_numpy(kv, causal, dtype, tol):
    rng = np.random.default_rng(kv)
    B, T, H, D = 2, 7, 6, 5
    q = rng.standard_normal((B, T, H, D)).astype(dtype)
    k, v = (rng.standard_normal((B, T, kv, D)).astype(dtype) for _ in range(2))
    mask = ((rng.random((B, H, T, T)) > 0.25) / 0.75).astype(dtype)
    scale = dtype(0.4)
    p_ref, o_ref = reference_attention(q, k, v, 0.4, causal, mask)
    probs, out = np.empty((B, H, T, T), dtype), np.empty_like(q)
    attention_forward(q, k, v, scale, causal, mask, True, probs, True, out)
    np.testing.assert_allclose(probs, p_ref, atol=tol)
    np.testing.assert_allclose(out, o_ref, atol=tol)
    out2 = np.empty_like(q)  # no mask, no stored probabilities
    attention_forward(q, k, v, scale, causal, EMPTY64.astype(dtype), False, EMPTY64.astype(dtype), False, out2)
    np.testing.assert_allclose(out2, reference_attention(q, k, v, 0.4, causal, 1.0)[1], atol=tol)
    # Backward against the NumPy formulas (module docstring of kernels/attention_grad.py).
    do = rng.standard_normal(q.shape).astype(dtype)
    ds, dq, dk, dv = np.empty_like(probs), np.empty_like(q), np.empty_like(k), np.empty_like(v)
    attention_backward(q, k, v, probs, mask, True, do, scale, causal, True, ds, dq, dk, dv)
    G = H // kv
    ve, ke = np.repeat(v, G, axis=2), np.repeat(k, G, axis=2)
    dp = np.einsum("bthd,bshd->bhts", do, ve) * mask
    dsr = p_ref * (dp - (p_ref * dp).sum(-1, keepdims=True)) * 0.4
    np.testing.assert_allclose(dq, np.einsum("bhts,bshd->bthd", dsr, ke), atol=tol * 10)
    np.testing.assert_allclose(dk, np.einsum("bhts,bthd->bshd", dsr, q).reshape(B, T, kv, G, D).sum(3), atol=tol * 10)
    np.testing.assert_allclose(dv, np.einsum("bhts,bthd->bshd", p_ref * mask, do).reshape(B, T, kv, G, D).sum(3),
                               atol=tol * 10)


# --- public surface -----------------------------------------------------------------------------

def test_public_names_and_light_import():
    assert mqa_gen.MultiQueryAttention is MultiQueryAttention
    assert mqa_gen.MultiQueryAttentionConfig is MultiQueryAttentionConfig
    with pytest.raises(AttributeError):
        mqa_gen.NoSuchThing  # noqa: B018
    code = "import sys, mqa_gen; assert 'numba' not in sys.modules and 'mqa_gen.layer' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_layer_error_is_value_error_and_config_error():
    from mqa_gen.errors import ConfigError

    assert issubclass(LayerError, ValueError) and issubclass(LayerError, ConfigError)


def test_training_only_k_and_v_reuses_the_rotated_queries():
    layer = make_layer(kv=1, rope=10000.0)
    x = np.random.default_rng(0).standard_normal((2, 5, 16))
    g = np.random.default_rng(1).standard_normal(x.shape)
    layer.forward(x, keep=True)
    q_before = layer._saved.q
    opt = adam(lr=1e-2)
    layer.apply_gradients(layer.backward(x, g, input_grad=False, weights=("w_k", "w_v")), opt)
    y = layer.forward(x, keep=True)
    assert layer._saved.q is q_before  # W_q unchanged: not recomputed
    fresh = MultiQueryAttention.from_weights(layer.config, layer.w_q, layer.w_k, layer.w_v, layer.w_o)
    np.testing.assert_allclose(y, fresh.forward(x), rtol=1e-12, atol=1e-12)
    grads = layer.backward(x, g)
    expected = fresh.backward(x, g)
    for a, b in zip(grads, expected):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    layer.apply_gradients(grads, opt)  # W_q changes now
    layer.forward(x, keep=True)
    assert layer._saved.q is not q_before
