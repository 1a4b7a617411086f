"""Generation: the token layer (reuse, chunked prefill, decode) and the text layer (finish reasons,
stop strings, seeds) — on the real model and in isolation."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqa_gen.errors import PromptError, SamplingError
from mqa_gen.generate import _StopStringFilter, generate_tokens, stream_generate, validate_generation
from mqa_gen.sampling import SamplingParams, make_logits_processors, make_sampler

from conftest import load_fixture

GREEDY = {c["name"]: c for c in load_fixture("greedy.json")["prompts"]}


def run(smollm2, prompt_ids, **kw):
    gen = stream_generate(smollm2.model, smollm2.tokenizer, prompt_ids, **kw)
    steps = list(gen)
    return gen, steps


def test_greedy_stops_on_eos_like_transformers(smollm2):
    case = GREEDY["capital_france"]
    assert case["finish_reason"] == "eos"
    gen, steps = run(smollm2, case["prompt_ids"], max_tokens=64)
    assert gen.finish_reason == "eos" == steps[-1].finish_reason
    assert gen.token_ids == case["continuation_ids"][:-1]  # the EOS id itself is not output
    assert gen.text == "".join(s.text for s in steps) == smollm2.tokenizer.decode(gen.token_ids)


def test_length_and_stats(smollm2):
    case = GREEDY["counting"]
    gen, _ = run(smollm2, case["prompt_ids"], max_tokens=5)
    assert gen.finish_reason == "length"
    assert gen.token_ids == case["continuation_ids"][:5]
    s = gen.stats
    assert (s.prompt_tokens, s.generated_tokens) == (len(case["prompt_ids"]), 5)
    # The cache holds the prompt and every generated token but the last (never fed back).
    assert s.kv_cache_bytes == (len(case["prompt_ids"]) + 4) * s.kv_bytes_per_token
    assert s.kv_bytes_per_token == smollm2.config.kv_bytes_per_token("f32")
    assert s.peak_rss_bytes > 0 and s.prefill_tokens_per_s > 0 and s.decode_tokens_per_s > 0


def test_stop_string_is_never_printed(smollm2):
    case = GREEDY["counting"]  # continues " 5, 6, 7, 8, ..."
    gen, steps = run(smollm2, case["prompt_ids"], max_tokens=20, stop=[" 7"])
    assert gen.finish_reason == "stop"
    assert gen.text == " 5, 6,"
    assert "".join(s.text for s in steps) == gen.text


def test_stop_string_names_the_stop_that_matched(smollm2):
    case = GREEDY["counting"]  # continues " 5, 6, 7, 8, ..."
    gen, _ = run(smollm2, case["prompt_ids"], max_tokens=20, stop=[" 8", " 7", "6"])
    assert (gen.text, gen.stop_string) == (" 5, ", "6")  # the earliest in the text, not the first given
    gen, _ = run(smollm2, case["prompt_ids"], max_tokens=3)
    assert gen.finish_reason == "length" and gen.stop_string is None


@pytest.mark.parametrize("stops,pieces,matched", [
    (["ab", "b"], ["xab"], "ab"),    # found at 1 and 2: the earlier wins
    (["b", "ab"], ["xab"], "ab"),
    (["ab", "a"], ["xab"], "ab"),    # both at 1: the first given wins
    (["a", "ab"], ["x", "ab"], "a"),
])
def test_stop_filter_reports_the_matched_stop(stops, pieces, matched):
    f = _StopStringFilter(stops)
    for p in pieces:
        _, hit = f.push(p)
    assert hit and f.matched == matched


def test_max_tokens_minus_one_runs_to_a_full_context(smollm2):
    case = GREEDY["counting"]
    ctx = len(case["prompt_ids"]) + 9
    gen, _ = run(smollm2, case["prompt_ids"], max_tokens=-1, ctx_size=ctx)
    assert gen.finish_reason == "context" and len(case["prompt_ids"]) + len(gen.token_ids) == ctx
    capped, _ = run(smollm2, case["prompt_ids"], max_tokens=9, ctx_size=ctx)
    assert capped.token_ids == gen.token_ids[:9]


def test_suppressed_ids_are_never_sampled(smollm2):
    case = GREEDY["counting"]
    free, _ = run(smollm2, case["prompt_ids"], max_tokens=2)
    banned = frozenset({free.token_ids[0]})
    gen, _ = run(smollm2, case["prompt_ids"], params=SamplingParams(suppress_ids=banned), max_tokens=2)
    assert gen.token_ids[0] != free.token_ids[0]


def test_context_limit(smollm2):
    case = GREEDY["counting"]
    ctx = len(case["prompt_ids"]) + 3
    gen, _ = run(smollm2, case["prompt_ids"], max_tokens=50, ctx_size=ctx)
    assert gen.finish_reason == "context"
    assert len(case["prompt_ids"]) + len(gen.token_ids) == ctx
    with pytest.raises(PromptError, match="context"):
        stream_generate(smollm2.model, smollm2.tokenizer, case["prompt_ids"], ctx_size=len(case["prompt_ids"]))


def test_same_seed_same_tokens(smollm2):
    ids = GREEDY["story"]["prompt_ids"]
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=42)
    first, _ = run(smollm2, ids, params=params, max_tokens=12)
    again, _ = run(smollm2, ids, params=params, max_tokens=12)
    other, _ = run(smollm2, ids, params=SamplingParams(temperature=1.0, top_p=0.95, seed=43), max_tokens=12)
    assert first.token_ids == again.token_ids and first.text == again.text
    assert other.token_ids != first.token_ids


def test_bad_requests(smollm2):
    with pytest.raises(PromptError):
        stream_generate(smollm2.model, smollm2.tokenizer, [])
    for kw, field in [({"max_tokens": 0}, "max_tokens"), ({"ctx_size": -4}, "ctx_size"),
                      ({"params": SamplingParams(top_p=1.5)}, "top_p")]:
        with pytest.raises(SamplingError) as info:
            stream_generate(smollm2.model, smollm2.tokenizer, [1], **kw)
        assert info.value.field == field and str(info.value).startswith(field + " ")


@pytest.mark.parametrize("args,field", [
    ((SamplingParams(temperature=-1.0), 5), "temperature"),
    ((SamplingParams(repeat_last_n=-3), 5), "repeat_last_n"),
    ((SamplingParams(), 0), "max_tokens"),
    ((SamplingParams(), -2), "max_tokens"),
    ((SamplingParams(), 5, 0), "ctx_size"),
])
def test_validate_generation_names_the_field(args, field):
    with pytest.raises(SamplingError) as info:
        validate_generation(*args)
    assert info.value.field == field
    validate_generation(SamplingParams(), 1, None)
    validate_generation(SamplingParams(), 1, 1)
    validate_generation(SamplingParams(), -1, 1)  # -1: until end of text or a full context


# ───────────────────────────── the token layer ─────────────────────────────


def recording(logits_seen, histories=None):
    """A logits processor that changes nothing and keeps a copy of each step's logits (and the
    history length it was given)."""
    def record(history, logits):
        logits_seen.append(np.array(logits))
        if histories is not None:
            histories.append(len(history))
        return logits
    return record


def test_token_layer_yields_what_stream_generate_yields(smollm2):
    """Seeded sampling with the repetition penalty on: the text layer adds text and stops, nothing else."""
    ids = GREEDY["story"]["prompt_ids"]
    params = SamplingParams(temperature=0.9, top_p=0.9, repetition_penalty=1.3, repeat_last_n=16, seed=7)
    gen, steps = run(smollm2, ids, params=params, max_tokens=12, eos_ids=[])
    assert gen.finish_reason == "length"
    model = smollm2.model
    tokens = generate_tokens(model, ids, model.new_cache(64), make_sampler(params),
                             logits_processors=make_logits_processors(params))
    assert list(islice(tokens, 12)) == [(s.token_id, s.logprob) for s in steps]


def test_token_layer_greedy_is_transformers_and_processors_see_the_history(smollm2):
    case = GREEDY["counting"]
    ids, n = case["prompt_ids"], 6
    lengths, reused = [], []
    tokens = generate_tokens(smollm2.model, ids, smollm2.model.new_cache(64), make_sampler(SamplingParams()),
                             logits_processors=[recording([], lengths)], on_prefilled=reused.append)
    assert [t for t, _ in islice(tokens, n)] == case["continuation_ids"][:n]
    assert reused == [0]
    assert lengths == list(range(len(ids), len(ids) + n))  # the prompt, then one more token per step


def test_chunked_prefill_equals_one_pass(smollm2):
    """Chunks of 3 over a 10-token prompt (forward calls of 3, 3, 3, 1 tokens) give the same greedy
    tokens as one 10-token pass, and logits equal to float32 rounding at every step."""
    model = smollm2.model
    prompt = GREEDY["counting"]["prompt_ids"][:10]
    assert len(prompt) == 10
    n = 8

    def run_chunked(chunk):
        calls, seen = [], []
        forward = model.forward

        class Counting:  # the model, recording how many tokens each forward call gets
            def forward(self, tokens, cache):
                calls.append(len(tokens))
                return forward(tokens, cache)

        cache = model.new_cache(32)
        tokens = generate_tokens(Counting(), prompt, cache, make_sampler(SamplingParams()),
                                 logits_processors=[recording(seen)], prefill_chunk=chunk)
        ids = [t for t, _ in islice(tokens, n)]
        return ids, seen, calls, cache

    one_ids, one_logits, one_calls, one_cache = run_chunked(512)
    ids, logits, calls, cache = run_chunked(3)
    assert one_calls == [10] + [1] * (n - 1)
    assert calls == [3, 3, 3, 1] + [1] * (n - 1)
    assert ids == one_ids
    # Chunked or not, the logits differ by float32 rounding only (sums in another order): 1e-5 of
    # their scale, as a reloaded prompt cache (tests/test_prompt_cache.py).
    for a, b in zip(logits, one_logits, strict=True):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    last = model.forward(prompt, model.new_cache(32), all_logits=True)[-1]  # a bare forward over the prompt
    assert np.abs(logits[0] - last).max() <= 1e-5 * np.abs(last).max()
    assert cache.token_ids.tolist() == one_cache.token_ids.tolist() == prompt + ids[:-1]


def test_token_layer_reuses_the_cached_prefix_and_ends_when_the_cache_is_full(smollm2):
    case = GREEDY["counting"]
    ids, model = case["prompt_ids"], smollm2.model
    greedy = make_sampler(SamplingParams())
    cache = model.new_cache(len(ids) + 3)
    reused = []
    # Capacity prompt + 3: tokens 1-3 are fed back, the 4th has no room, and the iterator ends.
    first = list(generate_tokens(model, ids, cache, greedy, on_prefilled=reused.append))
    assert [t for t, _ in first] == case["continuation_ids"][:4]
    assert cache.length == cache.max_seq_len
    # The same prompt again: all but its last token come from the cache.
    again = generate_tokens(model, ids, cache, greedy, on_prefilled=reused.append)
    assert next(again)[0] == first[0][0]
    assert reused == [0, len(ids) - 1] and cache.length == len(ids)
    with pytest.raises(ValueError, match="prefill_chunk"):
        next(generate_tokens(model, ids, cache, greedy, prefill_chunk=0))


@pytest.mark.parametrize("pieces,stops,printed,hit", [
    (["Hello", " wor", "ld!"], ["world"], "Hello ", True),
    (["a<", "|e", "nd|>b"], ["<|end|>"], "a", True),
    (["ab", "c"], ["x"], "abc", False),
    (["a", "b"], ["bx"], "ab", False),  # "b" held back, then flushed at the end
])
def test_stop_filter(pieces, stops, printed, hit):
    f = _StopStringFilter(stops)
    out, seen = "", False
    for p in pieces:
        text, seen = f.push(p)
        out += text
        if seen:
            break
    if not seen:
        out += f.flush()
    assert (out, seen) == (printed, hit)


@given(st.lists(st.text(alphabet="ab.", max_size=4), max_size=8), st.text(alphabet="ab.", min_size=1, max_size=3))
def test_stop_filter_prints_exactly_the_text_before_the_first_stop(pieces, stop):
    f = _StopStringFilter([stop])
    out = ""
    for p in pieces:
        text, hit = f.push(p)
        out += text
        if hit:
            break
    else:
        out += f.flush()
    full = "".join(pieces)
    expected = full[: full.find(stop)] if stop in full else full
    assert out == expected


def test_chunked_prefill_across_gemma3_sliding_windows(gemma3):
    """Gemma 3's 512-token ring layers: a 784-token prompt prefilled in chunks of 300 (the second
    ends past the window, the third wraps the ring) gives the transformers oracle's greedy tokens
    and one pass's logits."""
    case = next(c for c in load_fixture("greedy.json", "gemma3")["prompts"] if c["name"] == "long_window")
    model, prompt, n = gemma3.model, case["prompt_ids"], 3
    assert len(prompt) > 600

    def run_chunked(size):
        seen = []
        tokens = generate_tokens(model, prompt, model.new_cache(1024), make_sampler(SamplingParams()),
                                 logits_processors=[recording(seen)], prefill_chunk=size)
        return [t for t, _ in islice(tokens, n)], seen

    one_ids, one_logits = run_chunked(len(prompt))
    ids, logits = run_chunked(300)
    assert ids == one_ids == case["continuation_ids"][:n]
    for a, b in zip(logits, one_logits, strict=True):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
