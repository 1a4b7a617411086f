"""The fused decode step (mqa_gen.decode_layer) against the unfused path it replaces: the same
kernels in the same order, so the same logits bit for bit — one sequence and a pooled batch, both
models (SmolLM2: all Q4_1; Gemma 3: Q4_K, Q5_0, Q8_0, Q6_K mixed, QK-norm, post-norms, GeGLU,
sliding-window layers). Attention, ring buffers included, is the same call on both paths."""

from __future__ import annotations

import numpy as np
import pytest

from mqa_gen import decode_layer
from mqa_gen.cache import KVCachePool
from mqa_gen.regroup import regroup_model


def _decode_logits(model, prompts, steps, cache_dtype="float16"):
    """Prefill each prompt into its own slot of a pool, then ``steps`` batched greedy decode
    steps; returns every step's logits, float32 [steps, B, vocab]."""
    c = model.config
    pool = KVCachePool(len(prompts), c.n_layers, c.n_kv_heads, c.head_dim, 64, cache_dtype, c.layer_windows)
    caches = pool.caches[: len(prompts)]
    last = model.forward(prompts, caches)  # (B, vocab)
    out = []
    for _ in range(steps):
        tokens = [int(t) for t in np.argmax(last, axis=1)]
        last = model.decode(tokens, caches)
        out.append(last.copy())
    return np.stack(out)


def _both_paths(monkeypatch, model, prompts, steps, **kw):
    monkeypatch.setattr(decode_layer, "ENABLED", True)
    fused = _decode_logits(model, prompts, steps, **kw)
    assert all(decode_layer.fused_decode_layer(b) is not None for b in model.blocks)  # it ran fused
    monkeypatch.setattr(decode_layer, "ENABLED", False)
    unfused = _decode_logits(model, prompts, steps, **kw)
    return fused, unfused


@pytest.mark.parametrize("model_name", ["smollm2", "gemma3"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_the_fused_step_gives_the_unfused_logits_bit_for_bit(request, monkeypatch, model_name, batch_size):
    model = request.getfixturevalue(model_name).model
    prompts = [[2, 651, 6037, 314, 5384], [2, 1276, 314], [2, 9, 10, 11, 12, 13, 14]][:batch_size]
    fused, unfused = _both_paths(monkeypatch, model, prompts, steps=4)
    np.testing.assert_array_equal(fused, unfused)


def test_a_regrouped_block_rebuilds_its_step(monkeypatch, smollm2):
    """regroup_model copies blocks and swaps their attention: the copy must not run the original's
    K/V weights. MHA regrouping (9 KV heads) stays quantised, so it fuses too; its logits equal the
    unfused regrouped model's, and differ from nothing but rounding against the native model."""
    model = smollm2.model
    monkeypatch.setattr(decode_layer, "ENABLED", True)
    _decode_logits(model, [[2, 651, 6037]], 1)  # the native blocks build and keep their steps
    mha = regroup_model(model, 9)
    fused, unfused = _both_paths(monkeypatch, mha, [[2, 651, 6037]], steps=2)
    np.testing.assert_array_equal(fused, unfused)
    monkeypatch.setattr(decode_layer, "ENABLED", True)
    for block in mha.blocks:
        step = decode_layer.fused_decode_layer(block)
        assert step is not None and step.attention is block.attention and step.attention.n_kv_heads == 9


def test_a_dense_matrix_keeps_the_unfused_path(monkeypatch, smollm2):
    """A layer with a float32 matrix (as --kv-heads 1 makes by mean-pooling) is not fused."""
    monkeypatch.setattr(decode_layer, "ENABLED", True)
    mqa = regroup_model(smollm2.model, 1)
    assert all(decode_layer.fused_decode_layer(b) is None for b in mqa.blocks)
