"""The generation loop: finish reasons, stop strings, seeds — on the real model and in isolation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqa_gen.errors import PromptError, SamplingError
from mqa_gen.generate import _StopStringFilter, stream_generate
from mqa_gen.sampling import SamplingParams

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
    assert s.kv_bytes_per_token == smollm2.config.kv_bytes_per_token(4)
    assert s.peak_rss_bytes > 0 and s.prefill_tokens_per_s > 0 and s.decode_tokens_per_s > 0


def test_stop_string_is_never_printed(smollm2):
    case = GREEDY["counting"]  # continues " 5, 6, 7, 8, ..."
    gen, steps = run(smollm2, case["prompt_ids"], max_tokens=20, stop=[" 7"])
    assert gen.finish_reason == "stop"
    assert gen.text == " 5, 6,"
    assert "".join(s.text for s in steps) == gen.text


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
    with pytest.raises(SamplingError):
        stream_generate(smollm2.model, smollm2.tokenizer, [1], max_tokens=0)
    with pytest.raises(SamplingError):
        stream_generate(smollm2.model, smollm2.tokenizer, [1], params=SamplingParams(top_p=1.5))


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
