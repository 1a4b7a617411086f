"""The ``mqa-gen`` CLI: oracle continuations through ``--json``, streaming, errors and exit codes.

Most tests run in-process with click's CliRunner, reusing the session's loaded model; one runs the
installed ``mqa-gen`` entry point as a real subprocess.
"""

from __future__ import annotations

import importlib
import json
import subprocess

import pytest
from click.testing import CliRunner

from mqa_gen.cli import cli

from conftest import REPO, load_fixture, mqa_gen_exe

GREEDY = load_fixture("greedy.json")["prompts"]


@pytest.mark.parametrize("case", GREEDY, ids=[c["name"] for c in GREEDY])
def test_greedy_continuations_equal_transformers(invoke, case):
    n = len(case["continuation_ids"])
    mode = "--chat" if case["mode"] == "chat" else "--no-chat"
    result = invoke("generate", "--prompt", case["prompt"], mode, "--temp", "0", "-n", str(n), "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["prompt_tokens"] == len(case["prompt_ids"])
    expected = case["continuation_ids"]
    if case["finish_reason"] == "eos":
        expected, reason = expected[:-1], "eos"  # we do not output the EOS id
    else:
        reason = "length"
    assert out["token_ids"] == expected
    assert out["finish_reason"] == reason
    assert set(out["stats"]) >= {"prompt_tokens", "generated_tokens", "prefill_tokens_per_s", "decode_tokens_per_s",
                                 "kv_cache_bytes", "peak_rss_bytes", "load_seconds"}


def test_stdout_carries_only_the_text(invoke):
    case = GREEDY[0]
    result = invoke("generate", "--prompt", case["prompt"], "--no-chat", "-n", "8")
    assert result.exit_code == 0
    assert result.stdout == case["continuation_text"][: len(result.stdout)] and result.stdout
    assert "prompt" in result.stderr and "tok/s" in result.stderr and "KV cache" in result.stderr
    quiet = invoke("generate", "--prompt", case["prompt"], "--no-chat", "-n", "8", "--quiet")
    assert quiet.stdout == result.stdout and quiet.stderr == ""


def test_prompt_from_stdin_and_file(invoke, tmp_path):
    from_arg = invoke("generate", "--prompt", "The capital of France is", "--no-chat", "-n", "4", "-q")
    from_stdin = invoke("generate", "--prompt", "-", "--no-chat", "-n", "4", "-q", input="The capital of France is")
    path = tmp_path / "p.txt"
    path.write_text("The capital of France is", encoding="utf-8")
    from_file = invoke("generate", "--prompt-file", str(path), "--no-chat", "-n", "4", "-q")
    assert from_arg.stdout == from_stdin.stdout == from_file.stdout != ""


def test_stop_and_context_messages(invoke):
    stopped = invoke("generate", "--prompt", "1, 2, 3, 4,", "--no-chat", "-n", "20", "--stop", " 7", "--json")
    assert json.loads(stopped.stdout)["text"] == " 5, 6,"
    full = invoke("generate", "--prompt", "1, 2, 3, 4,", "--no-chat", "-n", "20", "--ctx-size", "14")
    assert full.exit_code == 0
    assert "context" in full.stderr


@pytest.mark.parametrize("kv_heads,bytes_per_token", [(1, "15,360"), (9, "138,240")])
def test_kv_heads_regrouping_shows_in_stats(invoke, kv_heads, bytes_per_token):
    result = invoke("generate", "--prompt", "Hello", "--no-chat", "-n", "3", "--kv-heads", str(kv_heads))
    assert result.exit_code == 0
    assert f"{bytes_per_token} B/token" in result.stderr


@pytest.mark.parametrize("args,fragment", [
    (["--top-p", "1.5"], "--top-p"),
    (["--temp", "-1"], "--temp"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--min-p", "2"], "--min-p"),
    (["--kv-heads", "2"], "valid: 1, 3, 9"),
    (["--ctx-size", "3"], "context"),
])
def test_bad_values_give_one_line_and_exit_2(invoke, args, fragment):
    result = invoke("generate", "--prompt", "The capital of France is", "--no-chat", *args)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0]


@pytest.mark.parametrize("verb", ["generate", "chat"])
@pytest.mark.parametrize("args,option,value", [
    (["--ctx-size", "0"], "--ctx-size", "0"),
    (["-n", "-3"], "--max-tokens", "-3"),
    (["--repeat-last-n", "-2"], "--repeat-last-n", "-2"),
    (["--repeat-penalty", "0"], "--repeat-penalty", "0.0"),
    (["--seed", "-5"], "--seed", "-5"),
    (["--top-k", "1", "--top-p", "-0.5"], "--top-p", "-0.5"),
])
def test_the_library_checks_values_and_the_error_names_the_option(monkeypatch, verb, args, option, value):
    """Checked before the model loads; the one line names the option as typed, not the library's field."""
    monkeypatch.setattr(importlib.import_module("mqa_gen.cli.common"), "load_model",
                        lambda *a: pytest.fail("the model was loaded before the options were checked"))
    prompt = ["--prompt", "hi"] if verb == "generate" else []
    result = CliRunner().invoke(cli, [verb, *prompt, *args], input="", catch_exceptions=False)
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {option} must be ") and lines[0].endswith(f"got {value}")


@pytest.mark.parametrize("args", [["--prompt", ""], ["--prompt", " \n"], [], ["--prompt-file", "/no/such/file"]])
def test_missing_or_empty_prompt(invoke, args):
    result = invoke("generate", *args)
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:")


def test_interrupt_keeps_the_text_and_exits_130(invoke, smollm2, monkeypatch):
    forward = smollm2.model.forward
    calls = []

    def interrupted_forward(tokens, cache, all_logits=False):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return forward(tokens, cache, all_logits)

    monkeypatch.setattr(smollm2.model, "forward", interrupted_forward)
    result = invoke("generate", "--prompt", "1, 2, 3, 4,", "--no-chat", "-n", "20")
    assert result.exit_code == 130
    assert result.stdout == " 5,"  # tokens " ", "5", "," were sampled and printed before Ctrl-C
    assert "interrupted" in result.stderr


def test_info_reports_the_cache_cost(smollm2_path):
    result = CliRunner().invoke(cli, ["info", "-m", smollm2_path])
    assert result.exit_code == 0, result.output
    assert "46,080" in result.stdout and "n_kv_heads" in result.stdout and "Q4_1" in result.stdout


def test_installed_entry_point_streams_a_real_continuation():
    exe = mqa_gen_exe()
    case = GREEDY[0]
    proc = subprocess.run([exe, "generate", "--prompt", case["prompt"], "--no-chat", "--temp", "0", "-n", "20"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == case["continuation_text"][: len(proc.stdout)]
    assert proc.stdout.startswith(" Paris")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("load,expected", [(0.2, 2), (0.6, 1), (1.4, 1), (5.0, 1)])
def test_default_threads_leave_busy_cores_alone(monkeypatch, load, expected):
    from mqa_gen.cli.common import idle_cores

    monkeypatch.setattr("os.getloadavg", lambda: (load, load, load))
    assert idle_cores(2) == expected


def test_help_lists_every_command_and_an_unknown_one_exits_2():
    from mqa_gen.cli import COMMANDS

    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:  # verbs are imported on use; --help must still list them all
        assert name in result.output
    assert set(COMMANDS) == {"generate", "batch", "chat", "convert", "info", "bench-cache", "perplexity", "list",
                             "serve"}
    unknown = CliRunner().invoke(cli, ["frobnicate"])
    assert unknown.exit_code == 2 and len(unknown.stderr.strip().splitlines()) == 1
