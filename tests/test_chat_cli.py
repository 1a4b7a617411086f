"""``mqa-gen chat``: the cache persists across turns; commands; context overflow; a real terminal.

In-process tests feed stdin through click's CliRunner with the session's model (stdout is then not
a terminal, so the answers alone are on stdout and the prompt and command replies on stderr); the
last tests
drives the installed ``mqa-gen chat`` in a pseudo-terminal with pexpect, as a person would:
two turns (the second reusing the first's cache), Ctrl-C in the middle of an answer, ``/reset``
and Ctrl-D.
"""

from __future__ import annotations

import importlib
import os
import re

import pytest
from click.testing import CliRunner

from mqa_gen.cli import cli

from conftest import REPO, mqa_gen_exe

STATS = re.compile(r"last turn: prompt (\d+) tokens = (\d+) reused \+ (\d+) prefilled")
CACHE = re.compile(r"cache: (\d+) tokens, .*?; (\d+) messages")


@pytest.fixture
def chat(smollm2, monkeypatch):
    """Run ``mqa-gen chat ARGS`` in-process with the lines of ``stdin``; returns the result."""
    module = importlib.import_module("mqa_gen.cli.common")
    monkeypatch.setattr(module, "load_model", lambda name, quiet: smollm2)

    def run(lines, *args):
        stdin = "".join(line + "\n" for line in lines)
        return CliRunner().invoke(cli, ["chat", "--temp", "0", *args], input=stdin, catch_exceptions=False)

    return run


def stats_of(output: str) -> list[tuple[int, int, int]]:
    return [tuple(map(int, m)) for m in STATS.findall(output)]


def test_turns_reuse_the_cache_and_save_load_restore_the_conversation(chat, tmp_path):
    path = tmp_path / "talk.cache"
    result = chat([
        "What is the capital of France?",
        "/stats",
        "And of Germany?",
        "/stats",
        f"/save {path}",
        "/reset",
        "/stats",
        f"/load {path}",
        "/stats",
        "And of Italy?",
        "/stats",
        "/exit",
    ], "--ctx-size", "256", "-n", "12")
    assert result.exit_code == 0, result.stderr
    assert "Paris" in result.stdout and "Berlin" in result.stdout
    out = result.stderr  # stdout is not a terminal: the replies of the commands are on stderr
    (p1, r1, f1), (p2, r2, f2), (p3, r3, f3) = stats_of(out)
    assert r1 == 0 and f1 == p1
    # The second turn's prompt starts with the first turn's prompt and answer: all reused.
    assert r2 >= p1 and f2 == p2 - r2 and f2 < 20
    caches = [tuple(map(int, m)) for m in CACHE.findall(out)]
    assert caches[2] == (0, 0)  # after /reset
    assert caches[3][0] == caches[1][0] and caches[3][1] == 4  # /load: the tokens and 4 messages are back
    assert f"saved {caches[1][0]} tokens and 4 messages to {path}" in out
    assert r3 >= p2 and f3 < 20  # the reloaded cache serves the next turn


def test_commands_and_refused_files_keep_the_session_going(chat, tmp_path):
    junk = tmp_path / "junk.cache"
    junk.write_bytes(os.urandom(1000))
    result = chat(["/help", "/nope", f"/load {junk}", "/load", "/stats"], "--ctx-size", "64", "-n", "4")
    assert result.exit_code == 0  # end of input leaves normally
    assert "/reset" in result.stderr and "unknown command /nope" in result.stderr
    assert "usage: /load FILE" in result.stderr and "last turn: none" in result.stderr
    assert result.stdout == ""  # no answers asked for, and nothing else goes to a piped stdout
    assert f"error: prompt cache {junk} is not a prompt-cache file" in result.stderr


def test_a_file_for_other_kv_heads_is_refused_in_chat(chat, tmp_path):
    path = tmp_path / "mha.cache"
    made = chat(["Hi", f"/save {path}"], "--ctx-size", "128", "-n", "3", "--kv-heads", "9")
    assert made.exit_code == 0 and path.exists()
    refused = chat([f"/load {path}", "/stats"], "--ctx-size", "128", "-n", "3")
    assert "made with 9 KV heads, this run uses 3" in refused.stderr
    assert "cache: 0 tokens" in refused.stderr


def test_overflow_drops_the_oldest_turns_and_keeps_the_system_prompt(chat):
    questions = ["Name a color.", "Name a fruit.", "Name an animal.", "Name a country.", "Name a planet."]
    lines = []
    for q in questions:
        lines += [q, "/stats"]
    result = chat(lines, "--ctx-size", "96", "-n", "8", "--system", "Answer in one word.")
    assert result.exit_code == 0, result.stderr
    assert "dropped the 1 oldest turn(s) (system prompt kept)" in result.stderr
    stats = stats_of(result.stderr)
    assert len(stats) == len(questions)  # every question was answered
    assert all(p + 1 <= 96 for p, _, _ in stats)
    # A turn after a drop recomputes everything after the system prompt, and reuses the system prompt.
    dropped_turns = [(p, r, f) for p, r, f in stats[1:] if f > 20]
    assert dropped_turns and all(r > 0 for _, r, _ in dropped_turns)
    messages = [int(m[1]) for m in CACHE.findall(result.stderr)]
    assert max(messages) <= 8 and messages[-1] < 2 * len(questions)


def test_a_message_longer_than_the_context_is_refused_not_fatal(chat):
    result = chat(["word " * 200, "/stats"], "--ctx-size", "64", "-n", "4")
    assert result.exit_code == 0
    assert "error: this message needs" in result.stderr and "context is 64 tokens" in result.stderr
    assert "0 messages" in result.stderr


def test_no_chat_template_is_one_line_exit_2(tmp_path):
    from gguf_factory import write_tiny_llama

    tiny = write_tiny_llama(tmp_path / "t.gguf", overrides={"tokenizer.chat_template": None})["path"]
    result = CliRunner().invoke(cli, ["chat", "-m", tiny, "-q"], input="hi\n")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: this model has no chat template; give one with --chat-template-file, "
                     "or use `mqa-gen generate --no-chat`"]


# ───────────────────────────── a real terminal ─────────────────────────────


def test_real_terminal_session_with_pexpect():
    pexpect = pytest.importorskip("pexpect")
    exe = mqa_gen_exe()
    env = dict(os.environ, NUMBA_NUM_THREADS=os.environ.get("NUMBA_NUM_THREADS", "1"), TERM="dumb")
    # -n 256: the counting answer below must still be streaming when Ctrl-C lands; at 64 tokens it could
    # end (~0.4 s on a quiet machine) before the signal arrived, and the test then waited for "[interrupted]".
    args = ["chat", "--ctx-size", "512", "-n", "256", "--temp", "0", "--system", "You are a helpful assistant."]
    child = pexpect.spawn(exe, args, cwd=str(REPO), env=env, encoding="utf-8", timeout=120, dimensions=(40, 200))
    prompt = "\n> "

    def ask(line):
        child.sendline(line)
        child.expect_exact(prompt)
        return child.before

    try:
        child.expect_exact("> ")  # the first prompt, after loading the model
        answer = ask("What is the capital of France?")
        assert "Paris" in answer
        first = stats_of(ask("/stats"))[0]
        answer = ask("And of Germany?")
        assert "Berlin" in answer
        second = stats_of(ask("/stats"))[0]
        assert first[1] == 0 and second[1] > first[0]  # the second turn reused the whole first turn
        assert second[2] < 20

        # Ctrl-C in the middle of a long answer: back at the prompt, the session goes on.
        child.sendline("Count from 1 to 100, separated by commas.")
        child.expect_exact("separated by commas.")  # the terminal's echo of the line
        child.expect(r"\d")  # the answer has begun
        child.sendintr()
        child.expect_exact("[interrupted]")
        child.expect_exact(prompt)
        m = CACHE.search(ask("/stats"))
        assert m and int(m.group(2)) == 6  # the cut answer stays in the conversation
        assert "interrupted" in child.before

        assert "conversation reset" in ask("/reset")
        assert CACHE.search(ask("/stats")).group(1) == "0"

        child.sendeof()  # Ctrl-D
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.signalstatus
