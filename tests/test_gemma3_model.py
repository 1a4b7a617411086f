"""Gemma 3 invariants that need no oracle, on tiny synthetic gemma3 GGUF files: a sliding window of
a few tokens so that prompts cross it, decode with the ring-buffer cache = full recompute, and the
sliding-window layers really forget what lies outside their window."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from gguf_factory import write_tiny_llama
from mqa_gen.gguf_file import read_gguf
from mqa_gen.models import build_model, config_from_gguf
from mqa_gen.models.gemma3 import Gemma3Block
from mqa_gen.regroup import regroup_model

WINDOW = 5


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3") / "tiny-gemma3.gguf"
    # 7 layers: 0-4 and 6 slide, 5 is global (Gemma 3's fixed pattern of 6).
    write_tiny_llama(path, arch="gemma3", n_layers=7, n_heads=4, n_kv_heads=1, head_dim=16,
                     context_length=64, sliding_window=WINDOW, rng_seed=3)
    gguf = read_gguf(str(path))
    return build_model(gguf, config_from_gguf(gguf))


def test_config_reads_the_sliding_pattern(tiny_gemma):
    c = tiny_gemma.config
    assert all(isinstance(b, Gemma3Block) for b in tiny_gemma.blocks)
    assert c.layer_windows == (WINDOW,) * 5 + (0, WINDOW)
    assert c.rope_interleaved is False
    assert c.layer_rope_theta(0) == 10_000.0 and c.layer_rope_theta(5) == c.rope_theta


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("float16", 1e-4)])
@pytest.mark.parametrize("prompt_len", [3, WINDOW, 2 * WINDOW + 3])
def test_decode_with_ring_cache_equals_full_recompute(tiny_gemma, dtype, tol, prompt_len):
    ids = np.random.default_rng(prompt_len).integers(0, tiny_gemma.config.vocab_size, 3 * WINDOW + 4)
    cache = tiny_gemma.new_cache(len(ids), dtype)
    tiny_gemma.forward(ids[:prompt_len], cache)
    for t in range(prompt_len, len(ids)):
        step = tiny_gemma.forward(ids[t:t + 1], cache)
        full = tiny_gemma.forward(ids[: t + 1], tiny_gemma.new_cache(len(ids), dtype))
        np.testing.assert_allclose(step, full, atol=tol * np.abs(full).max())


def test_chunked_prefill_across_the_window_equals_one_prefill(tiny_gemma):
    ids = np.arange(4 * WINDOW) % tiny_gemma.config.vocab_size
    whole = tiny_gemma.forward(ids, tiny_gemma.new_cache(len(ids)), all_logits=True)
    cache = tiny_gemma.new_cache(len(ids))
    parts = [tiny_gemma.forward(ids[a:b], cache, all_logits=True) for a, b in ((0, 3), (3, 11), (11, 20))]
    np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-4 * np.abs(whole).max())


@pytest.mark.parametrize("cuts", [(0, 3), (0, 2 * WINDOW + 3), (0, 3, 2 * WINDOW + 3)])
def test_a_prefill_runs_its_last_layer_for_the_last_row_only(tiny_gemma, cuts):
    """A prefill's last layer attends, projects and runs its MLP for each sequence's last row alone
    (what the logits need) yet stores every row's K/V: its logits equal the last row of a forward
    that computes every row, and so does every cached K/V row — in prompts within the window,
    across it (the ring's wrapped path) and prefilled in two chunks."""
    ids = np.random.default_rng(1).integers(0, tiny_gemma.config.vocab_size, cuts[-1])
    seen_rows = []
    last = copy.copy(tiny_gemma.blocks[-1])
    last.attention = copy.copy(last.attention)
    wo = last.attention.wo
    last.attention.wo = lambda o: seen_rows.append(o.shape[0]) or wo(o)
    model = tiny_gemma.replace(blocks=tiny_gemma.blocks[:-1] + [last])
    pruned, full = model.new_cache(len(ids)), model.new_cache(len(ids))
    for a, b in zip(cuts, cuts[1:]):
        seen_rows.clear()
        logits = model.forward(ids[a:b], pruned)
        assert seen_rows == [1]
        every_row = model.forward(ids[a:b], full, all_logits=True)
        np.testing.assert_allclose(logits, every_row[-1], atol=1e-5 * np.abs(every_row).max(), rtol=0)
    for mine, theirs in zip(pruned.layers, full.layers):
        np.testing.assert_array_equal(mine.keys, theirs.keys)
        np.testing.assert_array_equal(mine.values, theirs.values)


def test_sliding_layers_ignore_tokens_outside_the_window(tiny_gemma):
    """With every layer sliding, the last logits depend only on the last WINDOW·layers tokens;
    change a token further back and nothing moves — change one inside and the logits do."""
    local = copy.copy(tiny_gemma)
    local.config = dataclasses.replace(tiny_gemma.config, layer_windows=(WINDOW,) * tiny_gemma.config.n_layers)
    local.blocks = [copy.copy(b) for b in tiny_gemma.blocks]
    for b in local.blocks:
        b.attention = copy.copy(b.attention)
        b.attention.window = WINDOW
    n_layers = local.config.n_layers
    reach = n_layers * (WINDOW - 1)  # how far back information can travel
    ids = np.random.default_rng(0).integers(0, local.config.vocab_size, reach + 6)
    base = local.forward(ids, local.new_cache(len(ids)))
    far = ids.copy()
    far[: len(ids) - reach - 1] = (far[: len(ids) - reach - 1] + 1) % local.config.vocab_size
    np.testing.assert_array_equal(local.forward(far, local.new_cache(len(ids))), base)
    near = ids.copy()
    near[-2] = (near[-2] + 1) % local.config.vocab_size
    assert not np.allclose(local.forward(near, local.new_cache(len(ids))), base)


def test_mha_expansion_of_gemma_is_exact(tiny_gemma):
    ids = np.arange(2 * WINDOW + 1) % tiny_gemma.config.vocab_size
    native = tiny_gemma.forward(ids, tiny_gemma.new_cache(len(ids)))
    mha = regroup_model(tiny_gemma, tiny_gemma.config.n_heads)
    assert mha.config.n_kv_heads == 4
    np.testing.assert_allclose(mha.forward(ids, mha.new_cache(len(ids))), native, atol=1e-5 * np.abs(native).max())


def test_ring_cache_bytes_count_the_window(tiny_gemma):
    c = tiny_gemma.config
    cache = tiny_gemma.new_cache(40)
    per_row = 2 * c.n_kv_heads * c.head_dim * 4
    assert cache.nbytes == per_row * (6 * WINDOW + 40) == c.kv_bytes(40)


def test_reusing_a_wrapped_ring_cache_for_another_prompt_starts_over(tiny_gemma):
    """A cache whose rings have wrapped cannot be cut back to a shared prefix; generation then
    prefills from scratch (regression: it raised) and gives what a fresh cache gives."""
    from mqa_gen.generate import stream_generate
    from mqa_gen.sampling import SamplingParams

    class Tok:  # the few tokenizer methods stream_generate uses, over raw ids
        eos_id = None

        def detokenizer(self):
            class D:
                def add_token(self, token_id):
                    return ""

                def finalize(self):
                    return ""
            return D()

    rng = np.random.default_rng(5)
    first = list(rng.integers(0, tiny_gemma.config.vocab_size, 3 * WINDOW))
    second = first[:4] + list(rng.integers(0, tiny_gemma.config.vocab_size, 6))
    greedy = SamplingParams(temperature=0)
    cache = tiny_gemma.new_cache(40)
    list(stream_generate(tiny_gemma, Tok(), first, params=greedy, max_tokens=5, cache=cache))
    assert cache.length > WINDOW and not cache.can_truncate(4)
    reused = stream_generate(tiny_gemma, Tok(), second, params=greedy, max_tokens=5, cache=cache)
    fresh = stream_generate(tiny_gemma, Tok(), second, params=greedy, max_tokens=5)
    assert [s.token_id for s in reused] == [s.token_id for s in fresh]
