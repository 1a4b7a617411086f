"""The real SmolLM2 model against the oracle (transformers on the same GGUF) and against itself."""

from __future__ import annotations

import numpy as np
import pytest

from mqa_gen.generate import forward_logits
from mqa_gen.regroup import regroup_model

from conftest import load_fixture

LOGITS = load_fixture("logits.json")["prompts"]


@pytest.mark.parametrize("case", LOGITS, ids=[c["name"] for c in LOGITS])
def test_last_position_logits_match_transformers(smollm2, case):
    assert smollm2.tokenizer.encode(case["text"]) == case["ids"]
    logits = forward_logits(smollm2.model, case["ids"])[-1]
    np.testing.assert_allclose(logits[case["top_ids"]], case["top_logits"], atol=1e-3, rtol=0)
    assert int(np.argmax(logits)) == case["top_ids"][0]


def test_decode_steps_equal_a_full_forward(smollm2):
    """Cache invariant: logits of each decode step equal those of one forward over all tokens."""
    ids = LOGITS[1]["ids"][:14]
    full = forward_logits(smollm2.model, ids)
    cache = smollm2.model.new_cache(32)
    stepwise = [smollm2.model.forward(ids[:5], cache, all_logits=True)]
    stepwise += [smollm2.model.forward([t], cache)[None] for t in ids[5:]]
    np.testing.assert_allclose(np.concatenate(stepwise), full, atol=1e-4, rtol=0)


def assert_same_logits(actual, expected, rel=1e-5):
    """Equal up to float32 summation order: max |difference| ≤ rel × max |logit|."""
    assert np.abs(actual - expected).max() <= rel * np.abs(expected).max()


def test_mha_expansion_gives_the_native_logits(smollm2):
    ids = LOGITS[0]["ids"]
    native = smollm2.model.new_cache(16)
    mha_model = regroup_model(smollm2.model, smollm2.config.n_heads)
    mha = mha_model.new_cache(16)
    assert mha.bytes_per_token == 3 * native.bytes_per_token
    expected = smollm2.model.forward(ids, native)
    assert_same_logits(mha_model.forward(ids, mha), expected)
    step = [int(np.argmax(expected))]
    assert_same_logits(mha_model.forward(step, mha), smollm2.model.forward(step, native))


def test_float16_cache_stays_close_to_float32(smollm2):
    ids = LOGITS[1]["ids"]
    full = smollm2.model.forward(ids, smollm2.model.new_cache(32))
    half_cache = smollm2.model.new_cache(32, "float16")
    half = smollm2.model.forward(ids, half_cache)
    assert half_cache.nbytes * 2 == smollm2.model.new_cache(32).nbytes
    assert int(np.argmax(half)) == int(np.argmax(full))
    assert np.abs(half - full).max() < 0.05


def test_perplexity_matches_transformers(smollm2):
    from mqa_gen.perplexity import perplexity, read_text, window_ids

    fx = load_fixture("perplexity.json")
    assert window_ids(smollm2.tokenizer, read_text(), fx["n_tokens"]) == fx["ids"]
    result = perplexity(smollm2.model, fx["ids"])
    np.testing.assert_allclose(result.token_nll, fx["token_nll"], atol=1e-3)
    assert result.perplexity == pytest.approx(fx["perplexity"], rel=1e-4)


def test_installed_model_is_the_one_the_fixtures_were_made_from(smollm2_path):
    from mqa_gen.registry import sha256_of

    assert sha256_of(smollm2_path) == load_fixture("logits.json")["model_sha256"]
