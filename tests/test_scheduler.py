"""Continuous batching gives each prompt what it gets alone: the scheduler against
``stream_generate`` one prompt at a time (greedy and seeded sampling, refilled slots, Gemma 3 past
its sliding window), the slot pool against per-sequence caches, and every linear kernel computing
a row the same way whatever else is in the batch."""

from __future__ import annotations

import numpy as np
import pytest

from mqa_gen.cache import KVCache, KVCachePool
from mqa_gen.generate import stream_generate
from mqa_gen.linear import SMALL_BATCH, DenseLinear
from mqa_gen.perplexity import read_text
from mqa_gen.sampling import SamplingParams
from mqa_gen.scheduler import Request, Scheduler


def prompts_of(loaded, lengths):
    """Prompts of the given token lengths, cut from the held-out text at different offsets."""
    ids = loaded.tokenizer.encode(read_text())
    return [ids[11 * i: 11 * i + n] for i, n in enumerate(lengths)]


def alone(loaded, request: Request, ctx: int, cache_dtype: str):
    """``generate`` for one request: (token_ids, finish_reason, logprobs of each step)."""
    gen = stream_generate(loaded.model, loaded.tokenizer, request.prompt_ids, params=request.params,
                          max_tokens=request.max_tokens, stop=request.stop, eos_ids=request.eos_ids,
                          ctx_size=ctx, cache_dtype=cache_dtype)
    logprobs = [step.logprob for step in gen if step.finish_reason != "eos"]
    return gen.token_ids, gen.finish_reason, logprobs


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_each_prompt_gets_what_it_gets_alone(smollm2, sampled):
    """8 prompts of different lengths and limits through 3 slots (so slots are refilled while
    others decode): the same ids, finish reasons and logprobs as each prompt run alone."""
    lengths = [3, 40, 9, 17, 2, 61, 25, 5]
    eos = frozenset([smollm2.tokenizer.eos_id])
    requests = [Request(p, SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i) if sampled else SamplingParams(),
                        max_tokens=4 + 3 * (i % 4), eos_ids=eos, stop=(".",) if i == 6 else (), logprobs=0, id=i)
                for i, p in enumerate(prompts_of(smollm2, lengths))]
    scheduler = Scheduler(smollm2.model, smollm2.tokenizer, batch_size=3, ctx_size=96, cache_dtype="float16")
    done = list(scheduler.run(requests))
    assert sorted(c.request.id for c in done) == list(range(8))
    assert [c.request.id for c in done] != list(range(8))  # finished out of order: slots were refilled
    assert scheduler.stats.mean_batch > 2
    for c in done:
        ids, reason, logprobs = alone(smollm2, c.request, 96, "float16")
        assert c.token_ids == ids and c.finish_reason == reason
        assert [t.logprob for t in c.logprobs] == logprobs
        assert len(ids) <= c.request.max_tokens


def test_gemma3_past_its_window_and_a_full_context(gemma3):
    """Gemma 3 (MQA, sliding-window rings) with one prompt past its 512-token window, and one
    sequence that runs into its context (finish ``context``) beside the others."""
    prompts = prompts_of(gemma3, [530, 6, 20])
    requests = [Request(p, SamplingParams(), max_tokens=n, id=i) for i, (p, n) in enumerate(zip(prompts, (40, 9, 6)))]
    ctx = 540
    scheduler = Scheduler(gemma3.model, gemma3.tokenizer, batch_size=2, ctx_size=ctx)
    done = {c.request.id: c for c in scheduler.run(requests)}
    assert done[0].finish_reason == "context" and len(done[0].token_ids) == ctx - 530
    for c in done.values():
        ids, reason, _ = alone(gemma3, c.request, ctx, "float32")
        assert (c.token_ids, c.finish_reason) == (ids, reason)


def test_a_request_that_cannot_run_is_refused_before_work(smollm2):
    scheduler = Scheduler(smollm2.model, smollm2.tokenizer, batch_size=2, ctx_size=16)
    with pytest.raises(Exception, match="context is 16 tokens"):
        list(scheduler.run([Request(list(range(1, 17)))]))
    with pytest.raises(Exception, match="max_tokens"):
        list(scheduler.run([Request([1, 2], max_tokens=0)]))


def test_a_slot_counts_as_busy_from_its_first_streamed_token(smollm2):
    """Another thread (a server's /health, its queue limit) reads ``busy_slots`` while the worker
    steps: from the first token streamed — sampled before the request joins the decoding ones — to
    the last, the request's slot is busy, and free once it has finished."""
    scheduler = Scheduler(smollm2.model, smollm2.tokenizer, batch_size=2, ctx_size=32)
    seen = []
    request = Request(prompts_of(smollm2, [5])[0], SamplingParams(), max_tokens=3,
                      on_token=lambda step, logprob: seen.append((scheduler.busy_slots, scheduler.active)))
    done = list(scheduler.run([request]))
    assert [c.request for c in done] == [request] and len(seen) == 3
    assert seen[0] == (1, 0)  # the first token: streamed before the sequence decodes, its slot already held
    assert all(busy == 1 for busy, _ in seen) and scheduler.busy_slots == 0


@pytest.mark.parametrize("windows", [(0, 0), (0, 4)])
def test_the_pool_stores_rows_as_separate_caches_do(windows):
    """Three pool slots written by the batched decode write hold what three caches of their own
    hold after the same rows (full and sliding-window layers), and the decode lengths agree."""
    rng = np.random.default_rng(0)
    KV, D, S = 2, 8, 16
    pool = KVCachePool(3, 2, KV, D, S, "float16", windows)
    own = [KVCache(2, KV, D, S, "float16", windows) for _ in range(3)]
    slots = np.array([2, 0, 1])
    starts = np.array([0, 3, 7])
    for b, n in enumerate(starts):  # bring each sequence to its start
        for cache in (pool.caches[slots[b]], own[b]):
            for layer in range(2):
                cache.layers[layer].update_and_fetch(np.ones((n, KV, D), np.float32) * b, np.zeros((n, KV, D), np.float32), 0)
            cache.advance(int(n))
    for step in range(6):
        positions = starts + step
        k = rng.standard_normal((3, KV, D)).astype(np.float32)
        v = rng.standard_normal((3, KV, D)).astype(np.float32)
        for layer in range(2):
            keys, values, lengths = pool.update_and_fetch_rows(layer, k, v, slots, positions)
            for b in range(3):
                ok, ov, start = own[b].layers[layer].update_and_fetch(k[b:b + 1], v[b:b + 1], int(positions[b]))
                assert lengths[b] == start + 1
                np.testing.assert_array_equal(keys[slots[b]], ok)
                np.testing.assert_array_equal(values[slots[b]], ov)


def test_every_linear_kernel_gives_a_row_the_same_bits_in_any_batch(smollm2, gemma3):
    """A decode step of B rows must give each row exactly what one row alone gives (so batched
    greedy text equals the text alone): every weight type of both models, and dense weights."""
    rng = np.random.default_rng(1)
    linears = {}
    for loaded in (smollm2, gemma3):
        m = loaded.model
        for w in [m.output] + [getattr(b.attention, n) for b in m.blocks for n in ("wq", "wk", "wv", "wo")] + \
                 [getattr(b.mlp, n) for b in m.blocks for n in vars(b.mlp) if hasattr(getattr(b.mlp, n), "out_features")]:
            linears.setdefault(getattr(w, "type_name", "dense"), w)
    linears["dense"] = DenseLinear(rng.standard_normal((96, 64)))
    assert {"Q4_1", "Q8_0", "Q4_K", "Q5_0", "Q6_K", "dense"} <= set(linears)
    for name, w in linears.items():
        x = rng.standard_normal((SMALL_BATCH, w.in_features)).astype(np.float32)
        rows_alone = np.stack([w(x[i:i + 1])[0] for i in range(SMALL_BATCH)])
        for n in (2, 7, 33, SMALL_BATCH):
            np.testing.assert_array_equal(w(x[:n]), rows_alone[:n], err_msg=name)
