"""The CLI as llama.cpp and mlx-lm users type it (issue 14, part 1): llama.cpp's flag spellings,
reported seeds, ``-n -1``, ``--ignore-eos``, ``-v``, ``--system-prompt`` and ``--chat-template-file``,
one-line usage errors, exit 141 on a closed stdout, ``info --json``, ``list``, the first-run
progress bar, chat's stdout carrying only answers, and the ``--ctx-size`` warning.

In-process tests (click's CliRunner, the session's SmolLM2) check behaviour; where exit codes and
pipes matter the installed ``mqa-gen`` runs as a real subprocess.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess

import pytest
from click.testing import CliRunner

from mqa_gen.cli import cli

from conftest import REPO, mqa_gen_exe

COUNTING = "1, 2, 3, 4,"  # greedy SmolLM2 continues " 5, 6, 7, 8, …"
QUESTION = "What is the capital of France?"  # greedy SmolLM2 answers in one sentence, then <|im_end|>


def run_json(invoke, *args, input=None) -> dict:
    result = invoke("generate", "--json", "-q", *args, input=input)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def subprocess_env() -> dict:
    return dict(os.environ, NUMBA_NUM_THREADS=os.environ.get("NUMBA_NUM_THREADS", "1"))


# ───────────────────────────── flag aliases ─────────────────────────────


@pytest.mark.parametrize("ours,theirs,key,value", [
    (["--ctx-size", "48"], ["-c", "48"], "ctx_size", 48),
    (["--seed", "7"], ["-s", "7"], "seed", 7),
    (["--temp", "0.7"], ["--temperature", "0.7"], "temperature", 0.7),
    (["--max-tokens", "5"], ["--n-predict", "5"], "max_tokens", 5),
    (["--stop", " 7"], ["-r", " 7"], "stop", [" 7"]),
    (["--stop", " 7"], ["--reverse-prompt", " 7"], "stop", [" 7"]),
], ids=["-c", "-s", "--temperature", "--n-predict", "-r", "--reverse-prompt"])
def test_llama_cpp_spellings_do_what_ours_do(invoke, ours, theirs, key, value):
    base = ["--prompt", COUNTING, "--no-chat", "-n", "12", "--temp", "0.9", "--seed", "3"]
    a = run_json(invoke, *base, *ours)
    b = run_json(invoke, *base, *theirs)
    assert b["settings"][key] == value
    assert a["settings"] == b["settings"]
    assert a["token_ids"] == b["token_ids"] and a["text"] == b["text"]


def test_threads_alias_sets_the_kernel_threads(invoke):
    import numba

    result = invoke("generate", "--prompt", "Hi", "--no-chat", "-n", "1", "-q", "-t", "1")
    assert result.exit_code == 0
    assert numba.get_num_threads() == 1


def test_system_prompt_reaches_the_template(invoke, smollm2):
    tok = smollm2.tokenizer
    # SmolLM2's ChatML, written out by hand: the system message replaces the template's default one.
    expected = tok.encode("<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                          "<|im_start|>assistant\n")
    for flag in ("-sys", "--system-prompt"):
        out = run_json(invoke, "--prompt", "Hi", "-n", "1", flag, "Answer in French.")
        assert out["prompt_tokens"] == len(expected)
    refused = invoke("generate", "--prompt", "Hi", "--no-chat", "-sys", "x")
    assert refused.exit_code == 2 and refused.stderr.startswith("error: --system-prompt")
    assert len(refused.stderr.strip().splitlines()) == 1


def test_chat_keeps_system_and_accepts_the_aliases(smollm2, monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module("mqa_gen.cli.common"), "load_model", lambda name, quiet: smollm2)
    tokens = []
    for flag in ("--system", "-sys", "--system-prompt"):
        result = CliRunner().invoke(cli, ["chat", "--temp", "0", "-n", "1", "-c", "128", flag, "Be brief.", "-q"],
                                    input="Hi\n/stats\n", catch_exceptions=False)
        assert result.exit_code == 0, result.stderr
        tokens.append(re.search(r"last turn: prompt (\d+) tokens", result.stderr).group(1))
    expected = smollm2.tokenizer.encode("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                        "<|im_start|>assistant\n")
    assert tokens == [str(len(expected))] * 3


def test_chat_template_file_helps_a_model_without_one_and_gets_bos_and_eos(tmp_path):
    """A GGUF without a template: refused with --chat, run with --chat-template-file; the template
    sees bos_token and eos_token as the tokenizer's texts (the tiny file's <|im_start|>, <|im_end|>,
    as SmolLM2's tokenizer_config.json names them)."""
    from gguf_factory import write_tiny_llama

    from mqa_gen.loading import load

    tiny = write_tiny_llama(tmp_path / "t.gguf", overrides={"tokenizer.chat_template": None,
                                                           "tokenizer.ggml.bos_token_id": 1,
                                                           "tokenizer.ggml.eos_token_id": 2})["path"]
    template = tmp_path / "t.jinja"
    template.write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}{{ eos_token }}",
                        encoding="utf-8")
    runner = CliRunner()
    refused = runner.invoke(cli, ["generate", "-m", tiny, "--prompt", "the", "--chat", "-n", "1", "-q"])
    assert refused.exit_code == 2 and "--chat-template-file" in refused.stderr
    result = runner.invoke(cli, ["generate", "-m", tiny, "--prompt", "the", "--chat", "-n", "1", "-q", "--json",
                                 "--chat-template-file", str(template)])
    assert result.exit_code == 0, result.stderr
    tok = load(tiny).tokenizer
    expected = tok.encode("<|im_start|>the<|im_end|>")
    assert expected[0] == 1 and expected[-1] == 2  # the specials are single ids
    assert json.loads(result.stdout)["prompt_tokens"] == len(expected)
    # batch's messages lines and chat render through the same file.
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"messages": [{"role": "user", "content": "the"}]}\n', encoding="utf-8")
    batch = runner.invoke(cli, ["batch", str(lines), "-m", tiny, "-n", "1", "-q", "--chat-template-file", str(template)])
    assert batch.exit_code == 0, batch.stderr
    assert json.loads(batch.stdout)["prompt_tokens"] == len(expected)
    chat = runner.invoke(cli, ["chat", "-m", tiny, "-n", "1", "-q", "--chat-template-file", str(template)],
                         input="the\n/stats\n")
    assert chat.exit_code == 0, chat.stderr
    assert f"last turn: prompt {len(expected)} tokens" in chat.stderr
    missing = runner.invoke(cli, ["generate", "-m", tiny, "--prompt", "x", "--chat-template-file", "/no/such.jinja"])
    assert missing.exit_code == 2 and missing.stderr.startswith("error: cannot read chat template file")


def test_chat_templates_receive_the_models_bos_and_eos_texts(smollm2):
    from mqa_gen.chat import render_prompt

    text = render_prompt(smollm2.tokenizer, [{"role": "user", "content": "x"}], "[{{ bos_token }}|{{ eos_token }}]")
    assert text == "[<|im_start|>|<|im_end|>]"  # SmolLM2-135M-Instruct's tokenizer_config.json


# ───────────────────────────── -n -1, --ignore-eos ─────────────────────────────


def test_n_minus_one_runs_to_the_end_of_the_context(invoke):
    out = run_json(invoke, "--prompt", COUNTING, "--no-chat", "-n", "-1", "-c", "24")
    assert out["finish_reason"] == "context"
    assert out["usage"]["total_tokens"] == 24 and out["settings"]["max_tokens"] == -1
    assert out["text"].startswith(" 5, 6, 7, 8,")
    bad = invoke("generate", "--prompt", COUNTING, "--no-chat", "-n", "-2")
    assert bad.exit_code == 2 and bad.stderr.startswith("error: --max-tokens must be")


def test_n_minus_one_in_batch(invoke, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"prompt": COUNTING}) + "\n" + json.dumps({"prompt": COUNTING, "max_tokens": -1}) + "\n",
                    encoding="utf-8")
    flag = invoke("batch", str(path), "--no-chat", "-n", "-1", "-c", "24", "-q")
    assert flag.exit_code == 0, flag.stderr
    first, second = (json.loads(line) for line in flag.stdout.splitlines())
    for line in (first, second):
        assert line["finish_reason"] == "context" and line["prompt_tokens"] + len(line["token_ids"]) == 24
    alone = run_json(invoke, "--prompt", COUNTING, "--no-chat", "-n", "-1", "-c", "24")
    assert first["token_ids"] == alone["token_ids"]


def test_n_minus_one_in_chat_answers_until_the_end_of_turn(invoke):
    result = invoke("chat", "--temp", "0", "-n", "-1", "-c", "256", "-q", input=f"{QUESTION}\n/stats\n")
    assert result.exit_code == 0, result.stderr
    assert "Paris" in result.stdout and re.search(r"answer \d+ tokens .*, eos", result.stderr)


def test_ignore_eos_runs_past_the_end_of_turn(invoke, smollm2):
    tok = smollm2.tokenizer
    end_ids = {tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>"), tok.eos_id}
    normal = run_json(invoke, "--prompt", QUESTION, "-n", "40")
    assert normal["finish_reason"] == "eos" and len(normal["token_ids"]) < 40
    ignored = run_json(invoke, "--prompt", QUESTION, "-n", "40", "--ignore-eos")
    assert ignored["finish_reason"] == "length" and len(ignored["token_ids"]) == 40
    assert ignored["token_ids"][: len(normal["token_ids"])] == normal["token_ids"]  # greedy: same answer first
    assert not end_ids & set(ignored["token_ids"])  # the end ids are never sampled
    assert ignored["settings"]["ignore_eos"] is True


# ───────────────────────────── seeds and --json ─────────────────────────────


def test_a_random_seed_is_drawn_reported_and_repeats_the_run(invoke):
    args = ["--prompt", "Once upon a time", "--no-chat", "-n", "12", "--temp", "1.0"]
    first = invoke("generate", *args, "--json")
    seed = json.loads(first.stdout)["settings"]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**32
    assert re.search(rf"\bseed {seed}\b", first.stderr)  # the stats line says it too
    again = run_json(invoke, *args, "--seed", str(seed))
    assert again["token_ids"] == json.loads(first.stdout)["token_ids"]
    drawn = {run_json(invoke, *args, "--seed", "-1")["settings"]["seed"] for _ in range(2)}
    assert len(drawn) == 2  # two draws from 2**32 values
    bad = invoke("generate", *args, "--seed", "-2")
    assert bad.exit_code == 2 and bad.stderr.strip() == "error: --seed must be an integer >= 0 (-1 = random), got -2"


def test_json_echoes_settings_usage_and_the_stop_string(invoke):
    out = run_json(invoke, "--prompt", COUNTING, "--no-chat", "-n", "20", "--stop", " 7", "--stop", " 6",
                   "--temp", "0", "--top-k", "5", "--top-p", "0.9", "--min-p", "0.05", "--repeat-penalty", "1.1",
                   "--repeat-last-n", "16", "--seed", "11", "-c", "200", "--kv-heads", "9", "--cache-dtype", "float16")
    assert out["text"] == " 5," and out["finish_reason"] == "stop" and out["stop_string"] == " 6"  # the earlier one
    assert out["settings"] == {"temperature": 0.0, "top_k": 5, "top_p": 0.9, "min_p": 0.05, "repeat_penalty": 1.1,
                               "repeat_last_n": 16, "seed": 11, "max_tokens": 20, "stop": [" 7", " 6"],
                               "ignore_eos": False, "ctx_size": 200, "kv_heads": 9, "cache_dtype": "f16",  # llama.cpp's name
                               "int8_dot": False}
    usage = out["usage"]
    assert usage["prompt_tokens"] == out["prompt_tokens"]
    assert usage["completion_tokens"] == len(out["token_ids"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    plain = run_json(invoke, "--prompt", COUNTING, "--no-chat", "-n", "3")
    assert plain["stop_string"] is None and plain["finish_reason"] == "length"


def test_batch_lines_get_their_own_reported_seeds(invoke, tmp_path):
    rows = [{"prompt": "Once upon a time", "temperature": 1.0, "max_tokens": 8},
            {"prompt": "Once upon a time", "temperature": 1.0, "max_tokens": 8},
            {"prompt": "Once upon a time", "temperature": 1.0, "max_tokens": 8, "seed": 5}]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = invoke("batch", str(path), "--no-chat", "-q")
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    seeds = [line["seed"] for line in lines]
    assert seeds[2] == 5 and seeds[0] != seeds[1] and all(isinstance(s, int) for s in seeds)
    for line in lines:  # each line repeats alone with its reported seed
        alone = run_json(invoke, "--prompt", "Once upon a time", "--no-chat", "-n", "8", "--temp", "1.0",
                         "--seed", str(line["seed"]))
        assert alone["token_ids"] == line["token_ids"]
    fixed = invoke("batch", str(path), "--no-chat", "-q", "-s", "9")
    assert [json.loads(line)["seed"] for line in fixed.stdout.splitlines()] == [9, 9, 5]


# ───────────────────────────── -v, usage errors ─────────────────────────────


@pytest.mark.parametrize("where", ["group", "verb"])
def test_verbose_shows_the_traceback_of_a_bug(monkeypatch, where):
    import mqa_gen.cli.info as info

    def broken(model):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(info, "model_info", broken)
    quiet = CliRunner().invoke(cli, ["info"])
    assert quiet.exit_code == 1 and quiet.stderr == "error: ZeroDivisionError: a bug\n"
    args = ["-v", "info"] if where == "group" else ["info", "--verbose"]
    loud = CliRunner().invoke(cli, args)
    assert loud.exit_code == 1 and isinstance(loud.exception, ZeroDivisionError)  # raised, not caught


USAGE_ERRORS = [
    (["generate", "--frobnicate"], "error: no such option '--frobnicate' (try 'mqa-gen generate --help')"),
    (["generate", "--prompt", "hi", "-n", "abc"],
     "error: invalid value for '-n' / '--max-tokens' / '--n-predict': 'abc' is not a valid integer "
     "(try 'mqa-gen generate --help')"),
    (["generate", "--prompt", "hi", "--logprobs", "30"],
     "error: invalid value for '--logprobs': 30 is not in the range 0<=x<=20 (try 'mqa-gen generate --help')"),
    (["bench-cache", "--ppl-text", "/no/such/file"],
     "error: invalid value for '--ppl-text': File '/no/such/file' does not exist (try 'mqa-gen bench-cache --help')"),
    (["batch"], "error: missing argument 'INPUT' (try 'mqa-gen batch --help')"),
    (["frobnicate"], "error: no such command 'frobnicate' (try 'mqa-gen --help')"),
    (["--frobnicate"], "error: no such option '--frobnicate' (try 'mqa-gen --help')"),
]


@pytest.mark.parametrize("args,line", USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_click_usage_errors_are_one_line_exit_2(args, line):
    result = CliRunner().invoke(cli, args, prog_name="mqa-gen")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == line + "\n"


def test_no_verb_still_shows_the_help():
    result = CliRunner().invoke(cli, [], prog_name="mqa-gen")
    assert "error:" not in result.output and "Commands:" in result.output and "list" in result.output


def test_usage_error_from_the_installed_entry_point():
    proc = subprocess.run([mqa_gen_exe(), "generate", "--prompt", "hi", "--top-k", "1.5"], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=subprocess_env())
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("error: invalid value for '--top-k': '1.5' is not a valid integer "
                           "(try 'mqa-gen generate --help')\n")


def test_the_installed_entry_point_delivers_everything_before_its_fast_exit(tmp_path):
    """The console script ends with ``os._exit`` (no interpreter teardown, issue 15): the JSON on
    stdout, the stats and the saved-cache line on stderr and the prompt-cache file are complete,
    and the next run reuses that file."""
    cache = tmp_path / "p.cache"
    args = [mqa_gen_exe(), "generate", "--prompt", COUNTING, "--no-chat", "--temp", "0", "-n", "3",
            "--prompt-cache", str(cache)]
    first = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=300, cwd=REPO,
                           env=subprocess_env())
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["text"] == " 5,"
    assert "prompt cache" in first.stderr and "saved to" in first.stderr
    second = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=REPO, env=subprocess_env())
    assert second.returncode == 0, second.stderr
    assert second.stdout == " 5,"
    assert "reused" in second.stderr


# ───────────────────────────── a closed stdout ─────────────────────────────


@pytest.mark.parametrize("args,stdin", [
    (["generate", "--prompt", "Once upon a time", "--no-chat", "-n", "200", "--ignore-eos"], None),
    (["batch", "-", "--format", "text", "--no-chat", "-n", "40", "-b", "1"], "Once upon a time\n" * 20),
], ids=["generate", "batch"])
def test_a_closed_stdout_ends_quietly_with_141(args, stdin):
    """`mqa-gen … | head -c 5`: read five bytes, close the pipe; the next write fails (EPIPE)."""
    proc = subprocess.Popen([mqa_gen_exe(), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO, env=subprocess_env())
    if stdin is not None:
        proc.stdin.write(stdin.encode())
    proc.stdin.close()
    assert len(proc.stdout.read(5)) == 5
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141
    assert "Traceback" not in stderr and "error" not in stderr.lower()


# ───────────────────────────── info, list ─────────────────────────────


def test_info_json(smollm2_path):
    result = CliRunner().invoke(cli, ["info", "--json", "-m", smollm2_path])
    assert result.exit_code == 0, result.stderr
    facts = json.loads(result.stdout)
    # SmolLM2-135M's config.json: 30 layers, 576 wide, 9 heads of 64, 3 KV heads, 8192 positions.
    assert (facts["architecture"], facts["n_layers"], facts["d_model"], facts["n_heads"], facts["n_kv_heads"],
            facts["head_dim"], facts["context_length"]) == ("llama", 30, 576, 9, 3, 64, 8192)
    assert facts["path"] == smollm2_path and facts["size_bytes"] == os.path.getsize(smollm2_path)
    assert facts["kv_bytes_per_token"]["native"]["f32"] == 2 * 30 * 3 * 64 * 4
    assert facts["kv_bytes_per_token"]["mqa"]["f16"] == 2 * 30 * 1 * 64 * 2
    # llama.cpp's blocks of 32: 34 bytes (q8_0) and 18 bytes (q4_0) per 32 elements.
    assert facts["kv_bytes_per_token"]["native"]["q8_0"] == 2 * 30 * 3 * 64 // 32 * 34
    assert facts["kv_bytes_per_token"]["mha"]["q4_0"] == 2 * 30 * 9 * 64 // 32 * 18
    assert facts["tensor_types"]["Q4_1"] > 0 and facts["attention"] == "GQA"


def test_info_piped_keeps_the_whole_path(smollm2_path):
    proc = subprocess.run([mqa_gen_exe(), "info", "-m", smollm2_path], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert len(smollm2_path) > 80  # longer than rich's default width off a terminal
    assert any(smollm2_path in line for line in proc.stdout.splitlines())


def test_list_shows_known_models_installed_or_not(monkeypatch):
    from mqa_gen import registry
    from mqa_gen.gguf_file import read_gguf
    from mqa_gen.models import config_from_gguf

    result = CliRunner().invoke(cli, ["list", "--json"])
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == list(registry.KNOWN_MODELS)
    smol = rows[0]
    assert smol["name"] == "smollm2-135m-instruct" and smol["default"] and smol["installed"]
    assert smol["path"] == registry.resolve_model("smollm2-135m-instruct")
    for r in rows:
        if r["installed"] and r["ready"]:  # the registry's head counts are the file's
            config = config_from_gguf(read_gguf(r["path"]))
            assert (r["n_heads"], r["n_kv_heads"]) == (config.n_heads, config.n_kv_heads)
            assert r["size_bytes"] == os.path.getsize(r["path"])
    table = CliRunner().invoke(cli, ["list"])
    assert all(name in table.stdout for name in registry.KNOWN_MODELS)
    monkeypatch.setattr(registry, "_package_dirs", lambda package: [])  # nothing installed
    bare = json.loads(CliRunner().invoke(cli, ["list", "--json"]).stdout)
    assert all(not r["installed"] and r["path"] is None and r["size_bytes"] is None for r in bare)
    assert "pip install" in CliRunner().invoke(cli, ["list"]).stdout


# ───────────────────────────── first run: the progress bar ─────────────────────────────


def test_compile_kernels_reports_progress_per_module():
    from mqa_gen.kernels.warmup import WARMED_MODULES, compile_kernels

    calls = []
    compile_kernels(progress=lambda done, total: calls.append((done, total)))
    n = len(WARMED_MODULES)
    assert calls == [(i, n) for i in range(n + 1)]


def test_first_run_shows_a_progress_bar_on_stderr(monkeypatch):
    import mqa_gen.kernels as kernels
    from rich.console import Console

    import mqa_gen.cli.common as common

    monkeypatch.setattr(kernels, "kernels_are_compiled", lambda: False)
    captured = io.StringIO()
    monkeypatch.setattr(common, "stderr", Console(file=captured, width=200, force_terminal=False))
    common.ensure_kernels(quiet=False)
    text = captured.getvalue()
    n = len(kernels.warmup.WARMED_MODULES)
    assert "Compiling the Numba kernels" in text and "kernel modules" in text and f"{n}/{n}" in text


def test_the_compile_counter_counts_numba_compilations():
    import numba
    from numba.core import event

    from mqa_gen.cli.common import compile_counter

    seen = []
    counter = compile_counter(seen.append)

    @numba.njit(cache=False)
    def twice(x):
        return 2 * x

    with event.install_listener("numba:compile", counter):
        twice(1)      # one specialisation (int64)
        twice(1.5)    # a second (float64)
        twice(2)      # already compiled: no event
    assert counter.count == 2 and seen == [1, 2]


# ───────────────────────────── chat's streams ─────────────────────────────


def test_piped_chat_stdout_carries_only_the_answers():
    proc = subprocess.run([mqa_gen_exe(), "chat", "--temp", "0", "-n", "16", "-c", "256"],
                          input=f"{QUESTION}\n/stats\n/help\n", capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The capital of France is Paris") and proc.stdout.count("\n") == 1
    assert "> " in proc.stderr and "last turn: prompt" in proc.stderr and "/reset" in proc.stderr


def test_chat_line_editing_and_history_on_a_terminal():
    pexpect = pytest.importorskip("pexpect")
    env = dict(subprocess_env(), TERM="dumb")
    child = pexpect.spawn(mqa_gen_exe(), ["chat", "-n", "4", "-c", "128"], cwd=str(REPO), env=env,
                          encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        child.expect_exact("> ")
        child.send("stats\x01/\r")  # Ctrl-A: to the start of the line, then "/": the line is /stats
        child.expect_exact("last turn: none")
        child.expect_exact("> ")
        child.send("\x10\r")  # Ctrl-P: the previous line of the history, again
        child.expect_exact("last turn: none")
        child.expect_exact("> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


# ───────────────────────────── --ctx-size above the trained context ─────────────────────────────


@pytest.mark.parametrize("verb", ["generate", "batch", "chat"])
def test_ctx_size_above_the_trained_context_warns_in_one_line(invoke, tmp_path, verb):
    args = {"generate": ["--prompt", "Hi", "--no-chat"], "batch": ["-", "--format", "text", "--no-chat"],
            "chat": []}[verb]
    stdin = {"generate": None, "batch": "Hi\n", "chat": "/exit\n"}[verb]
    over = invoke(verb, *args, "-n", "1", "-q", "-c", "8200", "--cache-dtype", "float16", input=stdin)
    assert over.exit_code == 0, over.stderr
    warnings = [line for line in over.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --ctx-size 8,200 is above the 8,192-token context the model was trained on; "
                        "text past it may degrade"]
    within = invoke(verb, *args, "-n", "1", "-q", "-c", "8192", "--cache-dtype", "float16", input=stdin)
    assert "warning" not in within.stderr
