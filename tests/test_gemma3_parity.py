"""The real Gemma 3 270M (true MQA: 4 query heads, 1 KV head; sliding-window layers) against the
oracle — transformers' Gemma3ForCausalLM on the same GGUF, fp32 (tests/fixtures/gemma3/, written by
``scripts/make_fixtures.py --model-name gemma3-270m``)."""

from __future__ import annotations

import importlib
import numpy as np
import pytest

from mqa_gen.generate import forward_logits
from mqa_gen.regroup import regroup_model

from conftest import load_fixture

LOGITS = load_fixture("logits.json", "gemma3")["prompts"]
GREEDY = load_fixture("greedy.json", "gemma3")["prompts"]
CONFIG = load_fixture("config.json", "gemma3")


def test_config_agrees_with_what_the_oracle_used(gemma3):
    c = gemma3.config
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff) == (
        CONFIG["num_hidden_layers"], CONFIG["hidden_size"], CONFIG["num_attention_heads"],
        CONFIG["num_key_value_heads"], CONFIG["head_dim"], CONFIG["intermediate_size"])
    sliding = [i for i, w in enumerate(c.layer_windows) if w]
    assert sliding == CONFIG["sliding_layers"] and set(c.layer_windows[i] for i in sliding) == {CONFIG["sliding_window"]}
    assert c.rope_theta == CONFIG["rope_theta"] and c.rope_local_theta == CONFIG["rope_local_base_freq"]
    assert CONFIG["query_pre_attn_scalar"] == c.head_dim  # our score scale 1/√head_dim is the oracle's
    assert CONFIG["final_logit_softcapping"] is None and CONFIG["attn_logit_softcapping"] is None
    assert CONFIG["gguf_norm_weights_are_param_plus_1"]  # so the stored gains are used as they are
    assert gemma3.model.embed_scale == pytest.approx(CONFIG["embed_scale"], rel=1e-7)


@pytest.mark.parametrize("case", LOGITS, ids=[c["name"] for c in LOGITS])
def test_last_position_logits_match_transformers(gemma3, case):
    assert gemma3.tokenizer.encode(case["text"]) == case["ids"]
    logits = forward_logits(gemma3.model, case["ids"])[-1]
    np.testing.assert_allclose(logits[case["top_ids"]], case["top_logits"], atol=1e-3, rtol=0)
    assert int(np.argmax(logits)) == case["top_ids"][0]


@pytest.mark.parametrize("case", GREEDY, ids=[c["name"] for c in GREEDY])
def test_greedy_continuations_match_transformers(gemma3, case):
    """32 greedy tokens through the cache, the long prompt (784 tokens) crossing the 512 window."""
    from mqa_gen.generate import stream_generate
    from mqa_gen.sampling import SamplingParams

    assert gemma3.tokenizer.encode(case["prompt"]) == case["prompt_ids"]
    steps = list(stream_generate(gemma3.model, gemma3.tokenizer, case["prompt_ids"],
                                 params=SamplingParams(temperature=0), max_tokens=len(case["continuation_ids"]),
                                 eos_ids=case["stop_ids"]))
    generated = [s.token_id for s in steps if s.finish_reason != "eos"]
    assert generated == case["continuation_ids"]


def test_decode_across_the_window_equals_a_full_forward(gemma3):
    """Cache invariant on the real model: prefill 500 tokens, then decode 30 steps through position
    512 (every sliding layer's ring wraps); each step's logits equal one forward over all tokens."""
    ids = next(c for c in LOGITS if c["name"] == "long_window")["ids"][:530]
    cache = gemma3.model.new_cache(600)
    gemma3.model.forward(ids[:500], cache)
    for t in range(500, 530, 7):
        if t > cache.length:  # prefill the tokens between two checked steps
            gemma3.model.forward(ids[cache.length:t], cache)
        step = gemma3.model.forward([ids[t]], cache)
        full = forward_logits(gemma3.model, ids[: t + 1])[-1]
        np.testing.assert_allclose(step, full, atol=1e-4 * np.abs(full).max(), rtol=0)
    assert cache.nbytes == gemma3.config.kv_bytes(600)  # rings hold 512 rows, global layers 600


def test_mha_expansion_gives_the_native_logits(gemma3):
    ids = LOGITS[0]["ids"]
    native = gemma3.model.forward(ids, gemma3.model.new_cache(16))
    mha = regroup_model(gemma3.model, gemma3.config.n_heads)
    np.testing.assert_allclose(mha.forward(ids, mha.new_cache(16)), native, atol=1e-5 * np.abs(native).max(), rtol=0)


def test_perplexity_matches_transformers(gemma3):
    from mqa_gen.perplexity import perplexity

    fx = load_fixture("perplexity.json", "gemma3")
    result = perplexity(gemma3.model, fx["ids"])
    np.testing.assert_allclose(result.token_nll, fx["token_nll"], atol=2e-3)
    assert result.perplexity == pytest.approx(fx["perplexity"], rel=1e-4)


def test_installed_model_is_the_one_the_fixtures_were_made_from(gemma3_path):
    from mqa_gen.registry import sha256_of

    assert sha256_of(gemma3_path) == CONFIG["model_sha256"]


def test_cli_generate_streams_the_oracle_continuation(gemma3, monkeypatch):
    """`mqa-gen generate -m gemma3-270m --no-chat` (in-process, the session's loaded model): the
    JSON token ids are the oracle's greedy continuation; the stop set holds <eos> and <end_of_turn>."""
    import json

    from click.testing import CliRunner

    from mqa_gen.cli import cli
    from mqa_gen.cli.generate import build_prompt_ids

    monkeypatch.setattr(importlib.import_module("mqa_gen.cli.common"), "load_model", lambda name, quiet: gemma3)
    case = GREEDY[0]
    result = CliRunner().invoke(cli, ["generate", "-m", "gemma3-270m", "--no-chat", "--temp", "0", "-n", "32",
                                      "--json", "--prompt", case["prompt"]], catch_exceptions=False)
    assert result.exit_code == 0
    out = json.loads(result.stdout)
    assert out["token_ids"] == case["continuation_ids"] and out["finish_reason"] == "length"
    _, eos_ids, used_chat = build_prompt_ids(gemma3, case["prompt"], None)
    tok = gemma3.tokenizer
    assert not used_chat  # the file has no chat template
    assert eos_ids == {tok.token_to_id("<eos>"), tok.token_to_id("<end_of_turn>")} == set(case["stop_ids"])
