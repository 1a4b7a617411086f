"""``mqa-gen batch``: every line equals ``generate --json`` for that prompt alone; bad input stops
the run before any work (or becomes an error object with ``--skip-bad``); an interrupted run keeps
its finished lines and ``--resume`` finishes it; ``--logprobs`` against transformers' logits."""

from __future__ import annotations

import json
import math

import pytest

from conftest import load_fixture

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived",
           "1, 2, 3, 4,", "def fibonacci(n):", "Water boils at", "The quick brown fox jumps over the lazy dog because",
           "In 1492,", "Hello"]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def results(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_each_line_equals_generate_json_alone(invoke, tmp_path):
    """8 prompts through 3 slots, greedy and seeded-sampling lines mixed, per-line max_tokens and
    stop strings: each line's token_ids, text and finish_reason are those of `generate --json`."""
    rows = []
    for i, prompt in enumerate(PROMPTS):
        row = {"prompt": prompt, "max_tokens": 4 + i}
        if i % 2:
            row.update(temperature=0.9, top_p=0.9, seed=40 + i)
        if i == 3:
            row["stop"] = ["\n"]
        rows.append(row)
    result = invoke("batch", write_jsonl(tmp_path / "in.jsonl", rows), "--batch-size", "3", "--no-chat", "-q")
    assert result.exit_code == 0, result.output
    lines = results(result.stdout)
    assert [line["id"] for line in lines] == list(range(1, 9))  # line numbers, in input order
    for row, line in zip(rows, lines):
        args = ["generate", "--json", "-q", "--no-chat", "--prompt", row["prompt"], "-n", str(row["max_tokens"])]
        if "seed" in row:
            args += ["--temp", "0.9", "--top-p", "0.9", "--seed", str(row["seed"])]
        for stop in row.get("stop", []):
            args += ["--stop", stop]
        alone = json.loads(invoke(*args).stdout)
        for key in ("prompt_tokens", "token_ids", "text", "finish_reason"):
            assert line[key] == alone[key], (row, key)
        assert len(line["token_ids"]) <= row["max_tokens"]
    assert lines[3]["finish_reason"] in ("stop", "length") and "\n" not in lines[3]["text"]


def test_plain_text_input_and_stdin(invoke, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("The capital of France is\n\nHello\n", encoding="utf-8")
    from_file = invoke("batch", str(path), "-n", "3", "-q", "--seed", "0")
    from_stdin = invoke("batch", "-", "--format", "text", "-n", "3", "-q", "--seed", "0", input=path.read_text())
    assert from_file.exit_code == from_stdin.exit_code == 0
    assert [line["id"] for line in results(from_file.stdout)] == [1, 3]  # the blank line 2 is skipped
    assert from_file.stdout == from_stdin.stdout


BAD_LINES = [
    (b'{"prompt": "hi"}\n{"prompt": "no closing quote}\n', "line 2: invalid JSON"),
    (b'{"prompt": "hi", "temprature": 0.5}\n', "line 1: unknown field 'temprature'"),
    (b'{"prompt": "hi", "top_p": 2}\n', "line 1: top_p must be in [0, 1]"),
    (b'{"prompt": "hi", "max_tokens": "5"}\n', "line 1: max_tokens must be an integer > 0"),
    (b'{"prompt": "hi", "stop": ""}\n', "line 1: stop must be a non-empty string"),
    (b'{"prompt": "hi", "stop": [".", ""]}\n', "line 1: stop must be a non-empty string"),
    (b'{"prompt": "hi", "messages": []}\n', "line 1: give exactly one of prompt or messages"),
    (b'{"messages": [{"role": "user"}]}\n', "line 1: each message must be"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}\n', "line 1: unknown message role 'wizard'"),
    (b'["hi"]\n', "line 1: a line must be a JSON object"),
    (b"The capital of France is\n", "line 1: invalid JSON (Expecting value at column 1); plain-text prompts, "
                                    "one a line, need --format text"),
    (b'{"prompt": "a", "id": 7}\n{"prompt": "b", "id": 7}\n', "line 2: id 7 is used by an earlier line"),
    (b'{"prompt": "caf\xe9"}\n', "line 1: not valid UTF-8"),
    (b'{"prompt": "' + b"word " * 60 + b'"}\n', "line 1: the prompt has"),
    (b"\n\n", "holds no prompts"),
    (b"", "holds no prompts"),
]


@pytest.mark.parametrize("data,message", BAD_LINES, ids=[m.split(":")[-1][:24] for _, m in BAD_LINES])
def test_a_bad_line_stops_the_run_before_any_work(invoke, tmp_path, data, message):
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    result = invoke("batch", str(path), "--ctx-size", "48", "--no-chat", "-q")
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_skip_bad_writes_an_error_object_and_goes_on(invoke, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"prompt": "Hello", "id": "a"}\n{"prompt": 5}\n{"prompt": "Hi", "id": "c", "top_k": 1.5}\n'
                     b'{"prompt": "Water boils at", "id": "d"}\n')
    result = invoke("batch", str(path), "--skip-bad", "-n", "2", "-q")
    assert result.exit_code == 0, result.output
    lines = results(result.stdout)
    assert [line["id"] for line in lines] == ["a", 2, "c", "d"]
    assert lines[1]["error"]["line"] == 2 and "prompt must be" in lines[1]["error"]["message"]
    assert "top_k" in lines[2]["error"]["message"]
    assert len(lines[0]["token_ids"]) == len(lines[3]["token_ids"]) == 2


def test_interrupt_keeps_finished_lines_and_resume_finishes(invoke, smollm2, tmp_path, monkeypatch):
    rows = [{"prompt": p, "max_tokens": 3 + 2 * i} for i, p in enumerate(PROMPTS[:6])]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    decode = smollm2.model.decode
    calls = []

    def interrupted_decode(tokens, caches):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return decode(tokens, caches)

    monkeypatch.setattr(smollm2.model, "decode", interrupted_decode)
    first = invoke("batch", source, "-o", str(out), "--batch-size", "2", "--no-chat")
    assert first.exit_code == 130
    kept = results(out.read_text())
    assert 1 <= len(kept) < 6 and "interrupted" in first.stderr and "--resume" in first.stderr
    with open(out, "a", encoding="utf-8") as f:  # a line cut short by a killed process
        f.write('{"id": 6, "prompt_tok')
    monkeypatch.setattr(smollm2.model, "decode", decode)
    refused = invoke("batch", source, "-o", str(out), "--no-chat")
    assert refused.exit_code == 2 and "--resume" in refused.stderr
    both = invoke("batch", source, "-o", str(out), "--no-chat", "--resume", "--overwrite")
    assert both.exit_code == 2 and "pass one of them" in both.stderr
    second = invoke("batch", source, "-o", str(out), "--batch-size", "2", "--no-chat", "--resume", "-q")
    assert second.exit_code == 0, second.output
    final = results(out.read_text())
    assert [line["id"] for line in final] == list(range(1, 7))  # every line exactly once, in input order
    assert all(line in final for line in kept)
    fresh = results(invoke("batch", source, "--batch-size", "2", "--no-chat", "-q").stdout)

    def unseeded(lines):  # greedy: each run draws other seeds, which change nothing
        return [{k: v for k, v in line.items() if k != "seed"} for line in lines]

    assert unseeded(final) == unseeded(fresh)
    again = invoke("batch", source, "-o", str(out), "--resume", "--no-chat")
    assert again.exit_code == 0 and "nothing to do" in again.stderr and results(out.read_text()) == final
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "Hello", "id": "x"}])
    refused = invoke("batch", other, "-o", str(out), "--resume", "--no-chat")
    assert refused.exit_code == 2 and "another input" in refused.stderr


def test_resume_retries_the_lines_that_failed(invoke, tmp_path):
    """Error lines written by --skip-bad are not results: a resume after fixing the input runs them."""
    out = tmp_path / "out.jsonl"
    bad = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hello", "id": "a"}, {"prompt": "Hi", "id": "b", "top_p": 2}])
    assert invoke("batch", bad, "-o", str(out), "--skip-bad", "-n", "2", "-q").exit_code == 0
    assert "error" in results(out.read_text())[1]
    fixed = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hello", "id": "a"}, {"prompt": "Hi", "id": "b"}])
    assert invoke("batch", fixed, "-o", str(out), "--resume", "-n", "2", "-q").exit_code == 0
    lines = results(out.read_text())
    assert [line["id"] for line in lines] == ["a", "b"] and all("error" not in line for line in lines)


def test_logprobs_are_transformers_log_softmax(invoke, tmp_path):
    """The first token's top alternatives and logprobs against transformers' last-position logits
    (tests/fixtures: top logits and logsumexp, float32 model), through generate and batch."""
    case = load_fixture("logits.json")["prompts"][0]
    expected_ids = case["top_ids"][:5]
    expected = [logit - case["logsumexp"] for logit in case["top_logits"][:5]]
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": case["text"], "logprobs": 5}])
    via_batch = results(invoke("batch", path, "--no-chat", "-n", "2", "-q").stdout)[0]
    via_generate = json.loads(invoke("generate", "--json", "-q", "--no-chat", "--prompt", case["text"], "-n", "2",
                                     "--logprobs", "5").stdout)
    for out in (via_batch, via_generate):
        content = out["logprobs"]["content"]
        assert [t["id"] for t in content] == out["token_ids"]
        first = content[0]
        assert [t["id"] for t in first["top_logprobs"]] == expected_ids
        for got, want in zip(first["top_logprobs"], expected):
            assert math.isclose(got["logprob"], want, abs_tol=2e-3)
        assert first["logprob"] == first["top_logprobs"][0]["logprob"]  # greedy took the best
    assert via_batch["logprobs"] == via_generate["logprobs"]
    assert invoke("generate", "--prompt", "hi", "--logprobs", "2").exit_code == 2  # needs --json


def test_output_onto_the_input_file_is_refused_and_keeps_the_prompts(invoke, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": p} for p in PROMPTS[:2]])
    before = open(path, "rb").read()
    result = invoke("batch", path, "-o", path, "--overwrite", "-n", "2", "--no-chat", "-q")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"error: -o {path} is the input file: the results would replace "
                                                  "the prompts; write them to another file"]
    assert open(path, "rb").read() == before


def test_kv_budget_caps_the_batch_and_says_how_many_fit(invoke, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": p} for p in PROMPTS[:3]])
    # SmolLM2, 3 KV heads, float32: 46,080 B/token; 256 tokens = 11.25 MiB a sequence.
    result = invoke("batch", path, "--ctx-size", "256", "--kv-budget", "25", "-n", "2", "--no-chat")
    assert result.exit_code == 0, result.output
    assert "2 sequences of 256 tokens fit in 25.0 MiB of KV cache (46,080 B/token" in result.stderr
    assert "mean batch" in result.stderr and "of 2)" in result.stderr
    too_small = invoke("batch", path, "--ctx-size", "256", "--kv-budget", "5", "--no-chat")
    assert too_small.exit_code == 2 and "needs 11.2 MiB" in too_small.stderr
    tiny = invoke("batch", path, "--ctx-size", "256", "--kv-budget", "0.001", "--no-chat")  # 1,048.6 bytes
    assert tiny.exit_code == 2 and "budget of 1.0 KiB" in tiny.stderr
