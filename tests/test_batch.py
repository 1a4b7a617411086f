"""A batch of sequences equals each sequence run alone: prefill, decode and mixed steps, for both
real models (Gemma 3's sliding-window rings included, one prompt past its 512-token window)."""

from __future__ import annotations

import numpy as np
import pytest

from mqa_gen.batch import Batch
from mqa_gen.cache import KVCache
from mqa_gen.perplexity import read_text

#: Prompt lengths per model: different, so the sequences sit at different positions throughout.
PROMPT_LENGTHS = {"smollm2": (5, 23, 61), "gemma3": (5, 40, 530)}
DECODE_STEPS = 5


def _assert_close(batched: np.ndarray, alone: np.ndarray) -> None:
    np.testing.assert_allclose(batched, alone, atol=1e-5 * np.abs(alone).max(), rtol=0)


@pytest.mark.parametrize("model_name", ["smollm2", "gemma3"])
def test_batched_steps_equal_each_sequence_alone(request, model_name):
    loaded = request.getfixturevalue(model_name)
    model = loaded.model
    text_ids = loaded.tokenizer.encode(read_text())
    prompts = [text_ids[i * 7: i * 7 + n] for i, n in enumerate(PROMPT_LENGTHS[model_name])]
    ctx = max(map(len, prompts)) + DECODE_STEPS + 8

    # Each sequence alone: prefill, DECODE_STEPS greedy decode steps, then a 3-token chunk.
    alone_logits, fed = [], []
    for prompt in prompts:
        cache = model.new_cache(ctx)
        steps = [model.forward(prompt, cache)]
        tokens = []
        for _ in range(DECODE_STEPS):
            tokens.append(int(np.argmax(steps[-1])))
            steps.append(model.forward([tokens[-1]], cache))
        tokens += [11, 12, 13]
        steps.append(model.forward(tokens[-3:], cache, all_logits=True))
        alone_logits.append(steps)
        fed.append(tokens)

    # All three together, through the batched calls.
    caches = [model.new_cache(ctx) for _ in prompts]
    first = model.forward(prompts, caches)  # (3, vocab): batched prefill of unequal lengths
    assert first.shape == (3, model.config.vocab_size)
    for b in range(3):
        _assert_close(first[b], alone_logits[b][0])
    for step in range(DECODE_STEPS):
        logits = model.decode([fed[b][step] for b in range(3)], caches)  # one token each
        for b in range(3):
            _assert_close(logits[b], alone_logits[b][step + 1])
    assert [c.length for c in caches] == [len(p) + DECODE_STEPS for p in prompts]
    # A mixed step: every sequence brings three tokens, scored at every position.
    mixed = model.forward([fed[b][-3:] for b in range(3)], caches, all_logits=True)
    for b in range(3):
        _assert_close(mixed[b], alone_logits[b][-1])


def test_a_mixed_step_of_prefill_and_decode_equals_alone(smollm2):
    """One sequence prefills while two decode, in one step (what continuous batching does)."""
    model = smollm2.model
    ids = smollm2.tokenizer.encode(read_text())[:40]
    alone_new = model.forward(ids[:30], model.new_cache(64))
    alone_a, alone_b = model.new_cache(64), model.new_cache(64)
    model.forward(ids[:10], alone_a)
    model.forward(ids[5:25], alone_b)
    step_a = model.forward([ids[10]], alone_a)
    step_b = model.forward([ids[25]], alone_b)

    a, b, new = model.new_cache(64), model.new_cache(64), model.new_cache(64)
    model.forward([ids[:10], ids[5:25]], [a, b])
    out = model.forward([[ids[10]], ids[:30], [ids[25]]], [a, new, b])
    for got, expected in zip(out, (step_a, alone_new, step_b)):
        _assert_close(got, expected)


def test_batch_describes_rows_and_positions():
    caches = [KVCache(1, 1, 4, 16) for _ in range(3)]
    caches[1].advance(5)
    batch = Batch(caches, [2, 1, 3], head_dim=4)
    assert not batch.decode and batch.n_rows == 6
    assert batch.positions.tolist() == [0, 1, 5, 0, 1, 2]
    assert [batch.rows(b) for b in range(3)] == [slice(0, 2), slice(2, 3), slice(3, 6)]
    assert Batch(caches, [1, 1, 1], head_dim=4).decode
    with pytest.raises(ValueError, match="twice"):
        Batch([caches[0], caches[0]], [1, 1], head_dim=4)
    with pytest.raises(ValueError, match="capacity"):
        Batch(caches, [1, 12, 1], head_dim=4)
    with pytest.raises(ValueError, match="at least one"):
        Batch(caches, [1, 0, 1], head_dim=4)
