"""``mqa-gen perplexity``: output contract, running values, bad input and the KL-base round trip.

In-process (click's CliRunner with the session's SmolLM2, the ``invoke`` fixture), on the shipped
evaluation text with small chunks (--ctx 64) so that each run takes seconds. The method's values
are checked against oracles in tests/test_perplexity_chunks.py; here the CLI must report them.
"""

from __future__ import annotations

import json
import re

import pytest

from mqa_gen.perplexity_chunks import EVAL_TEXT, chunked_perplexity, plan_text

TEXT = str(EVAL_TEXT)
SMALL = ["--ctx", "64", "--chunks", "4", "-t", "1"]


def run_json(invoke, *args, input=None) -> dict:
    result = invoke("perplexity", *args, "--json", input=input)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def one_error_line(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def small_reference(smollm2):
    """The library's result for SMALL, computed once."""
    plan = plan_text(smollm2.tokenizer, EVAL_TEXT.read_text(encoding="utf-8"), 64, 4)
    return chunked_perplexity(smollm2.model, plan)


def test_json_reports_the_method_and_its_values(invoke, small_reference):
    out = run_json(invoke, TEXT, *SMALL)
    assert set(out) == {"model", "text", "text_tokens", "ctx", "chunks", "chunks_available", "first_scored",
                        "scored_per_chunk", "scored_tokens", "add_bos", "kv_heads", "cache_dtype", "int8_dot",
                        "perplexity", "perplexity_stderr", "mean_nll", "running_perplexity", "seconds", "kl", "saved_kl_base"}
    assert (out["ctx"], out["chunks"], out["first_scored"], out["scored_per_chunk"], out["scored_tokens"]) == \
        (64, 4, 32, 31, 124)
    assert out["text_tokens"] == small_reference.plan.n_text_tokens > 2200
    assert out["chunks_available"] == out["text_tokens"] // 64
    assert (out["kv_heads"], out["add_bos"], out["kl"], out["saved_kl_base"]) == (3, False, None, None)
    assert out["perplexity"] == pytest.approx(small_reference.perplexity, rel=1e-9)
    assert out["perplexity_stderr"] == pytest.approx(small_reference.stderr, rel=1e-9)
    assert out["running_perplexity"] == pytest.approx(small_reference.running, rel=1e-9)
    assert 1 < out["perplexity"] < 1000 and out["perplexity_stderr"] > 0


def test_stderr_has_the_running_values_and_stdout_the_final_estimate(invoke, small_reference):
    result = invoke("perplexity", TEXT, *SMALL)
    assert result.exit_code == 0, result.stderr
    running = re.search(r"^(\[\d+\]\d+\.\d{4},)+$", result.stderr, re.M)
    assert running, result.stderr
    values = re.findall(r"\[(\d+)\](\d+\.\d{4}),", running.group(0))
    assert [int(i) for i, _ in values] == [1, 2, 3, 4]
    assert [float(v) for _, v in values] == [round(v, 4) for v in small_reference.running]
    assert result.stdout == (f"Final estimate: PPL = {small_reference.perplexity:.4f} +/- "
                             f"{small_reference.stderr:.5f}\n")
    quiet = invoke("perplexity", TEXT, *SMALL, "-q")
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == result.stdout


def test_stdin_and_the_llama_cpp_spelling_of_ctx(invoke, small_reference):
    out = run_json(invoke, "-", "-c", "64", "--chunks", "4", "-q", input=EVAL_TEXT.read_text(encoding="utf-8"))
    assert out["perplexity"] == pytest.approx(small_reference.perplexity, rel=1e-9)


def test_cache_dtype_and_kv_heads_flow_through(invoke, small_reference):
    half = run_json(invoke, TEXT, *SMALL, "-q", "--cache-dtype", "float16")
    assert half["cache_dtype"] in ("float16", "f16")
    assert half["perplexity"] == pytest.approx(small_reference.perplexity, rel=0.01)
    mha = run_json(invoke, TEXT, *SMALL, "-q", "--kv-heads", "9")  # exact expansion: the same model
    assert mha["kv_heads"] == 9 and mha["perplexity"] == pytest.approx(small_reference.perplexity, rel=1e-4)


def test_int8_dot_products_flow_through(invoke, small_reference, smollm2):
    """--int8-dot scores the text with rounded activations: another perplexity, near the float32
    one (the measured cost is in BENCHMARKS.md), and the process's model is switched off after."""
    fast = run_json(invoke, TEXT, *SMALL, "-q", "--int8-dot")
    assert fast["int8_dot"] is True
    assert fast["perplexity"] != small_reference.perplexity
    assert fast["perplexity"] == pytest.approx(small_reference.perplexity, rel=0.05)
    again = run_json(invoke, TEXT, *SMALL, "-q")
    assert again["int8_dot"] is False and again["perplexity"] == pytest.approx(small_reference.perplexity, rel=1e-9)


def test_kl_base_round_trip(invoke, tmp_path):
    base = tmp_path / "base.klb"
    saved = run_json(invoke, TEXT, "--ctx", "64", "--chunks", "2", "-q", "--save-kl-base", str(base))
    assert saved["saved_kl_base"] == {"path": str(base), "top_k": 32, "positions": 62, "bytes": base.stat().st_size}

    same = run_json(invoke, TEXT, "--ctx", "64", "--chunks", "2", "-q", "--kl-base", str(base))
    kl = same["kl"]
    assert abs(kl["mean_kl"]) < 1e-12 and kl["same_top_percent"] == 100.0
    assert kl["base_perplexity"] == pytest.approx(saved["perplexity"], rel=1e-9)
    assert (kl["base_kv_heads"], kl["top_k"]) == (3, 32)

    mqa = run_json(invoke, TEXT, "--ctx", "64", "--chunks", "2", "-q", "--kl-base", str(base), "--kv-heads", "1")
    assert mqa["kl"]["mean_kl"] > 0.05 and mqa["kl"]["mean_kl_stderr"] > 0
    assert mqa["kl"]["same_top_percent"] < 100
    assert mqa["perplexity"] > saved["perplexity"]

    text = invoke("perplexity", TEXT, "--ctx", "64", "--chunks", "2", "-q", "--kl-base", str(base), "--kv-heads", "1")
    lines = text.stdout.splitlines()
    assert lines[0].startswith("Final estimate: PPL = ") and lines[1].startswith(f"KL divergence from {base}")
    assert lines[2].startswith("Same top token: ") and lines[3].startswith("Base estimate: PPL = ")

    one_error_line(invoke("perplexity", TEXT, "--ctx", "32", "--chunks", "2", "--kl-base", str(base)),
                   "--ctx 64; this run uses --ctx 32")
    one_error_line(invoke("perplexity", TEXT, "--ctx", "64", "--chunks", "3", "--kl-base", str(base)),
                   "use --chunks 2")
    other = tmp_path / "other.txt"
    other.write_text(EVAL_TEXT.read_text(encoding="utf-8")[::-1], encoding="utf-8")
    one_error_line(invoke("perplexity", str(other), "--ctx", "64", "--chunks", "2", "--kl-base", str(base)),
                   "another text")


def test_bad_input_is_one_error_line(invoke, tmp_path):
    one_error_line(invoke("perplexity", str(tmp_path / "missing.txt")), "cannot read text file", "No such file")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    one_error_line(invoke("perplexity", str(empty)), "is empty")
    one_error_line(invoke("perplexity", "-", input=""), "stdin is empty")
    short = tmp_path / "short.txt"
    short.write_text("The tide comes in twice a day. " * 10)
    line = one_error_line(invoke("perplexity", str(short)), "needs at least 1,024", "--ctx 512")
    assert re.search(r"the text has \d+ tokens", line)
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\u00e9 ".encode("latin-1") * 300)
    one_error_line(invoke("perplexity", str(binary)), "not UTF-8")
    one_error_line(invoke("perplexity", TEXT, "--ctx", "2"), "--ctx must be at least 3")
    one_error_line(invoke("perplexity", TEXT, "--ctx", "8193"), "above the model's context of 8,192")
    one_error_line(invoke("perplexity", TEXT, "--chunks", "0"), "--chunks must be at least 1")
    one_error_line(invoke("perplexity", TEXT, "--kv-heads", "2"), "2")
    one_error_line(invoke("perplexity", TEXT, "--cache-dtype", "bf16"), "--cache-dtype")
    one_error_line(invoke("perplexity", TEXT, "--kl-base", str(tmp_path / "none.klb")), "does not exist")
    one_error_line(invoke("perplexity", TEXT, "--kl-base", str(short)), "not a KL-base file")
    one_error_line(invoke("perplexity", TEXT, "--kl-base", "a", "--save-kl-base", "b"), "not both")
    one_error_line(invoke("perplexity", TEXT, "--kl-top-k", "8"), "give --save-kl-base too")
    one_error_line(invoke("perplexity", TEXT, "--save-kl-base", str(tmp_path / "no" / "x.klb")), "does not exist")
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    one_error_line(invoke("perplexity", TEXT, "--save-kl-base", str(notes)), "exists and is not a KL-base file")
    assert notes.read_text() == "keep me\n"
