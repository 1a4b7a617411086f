"""``mqa-gen chat``: an interactive conversation whose KV cache persists across turns.

The conversation itself — its messages, the one KV cache, fitting turns into the context — is
:class:`~mqa_gen.chat_session.ChatSession`; this module is its terminal: the ``> `` prompt, the
answer streamed to stdout, notes on stderr, and the slash commands ``/reset``, ``/stats``,
``/save FILE``, ``/load FILE``, ``/help``, ``/exit``.

Ctrl-C stops the current answer (what was printed stays in the conversation) and returns to the
prompt; Ctrl-D (end of input) or ``/exit`` leaves with exit code 0.

Input is read line by line from stdin, so the session can be driven by a pipe or a
pseudo-terminal (pexpect) as well as by a person. On a terminal (stdin and stdout both), lines are
read with Python's ``readline`` module when it is available: line editing and the history of this
session (arrow keys, Ctrl-R). The ``> `` prompt, the replies of the slash commands and the notes go
to stdout only when it is a terminal; otherwise to stderr, so ``mqa-gen chat > answers.txt`` or
``| tee`` gets the answers alone.
"""

from __future__ import annotations

import sys

import click

from ..chat_session import ChatSession
from ..errors import MqaGenError
from .common import (
    chat_template_option,
    generation_options,
    mib,
    model_option,
    read_chat_template,
    setup_generation,
    stderr,
    system_prompt_option,
    threads_option,
)

PROMPT = "> "
HELP = (
    "/reset: forget the conversation and the cache   /stats: cache and speed of the last turn\n"
    "/save FILE: save the conversation and its KV cache   /load FILE: load them back\n"
    "/exit (or Ctrl-D): leave   Ctrl-C: stop the current answer"
)


def answer(session: ChatSession, text: str, out) -> None:
    """One turn: stream the answer to ``text`` to ``out``, with notes on stderr (dropped turns, an
    answer cut by -n, a full context, Ctrl-C).

    Raises:
        PromptError: the message cannot fit the context even alone (nothing is changed).
    """
    turn = session.begin(text)
    if turn.dropped:
        stderr.print(f"[yellow]context: the conversation would overflow the {session.ctx}-token context; "
                     f"dropped the {turn.dropped} oldest turn(s) (system prompt kept) and recomputed the "
                     "cache[/yellow]", soft_wrap=True)
    try:
        for step in turn.generation:
            if step.text:
                out.write(step.text)
                out.flush()
    except KeyboardInterrupt:
        pass  # the answer so far stays: commit() keeps it
    session.commit(turn)
    out.write("\n")
    out.flush()
    reason = turn.finish_reason
    if reason == "interrupted":
        stderr.print("[dim]\\[interrupted][/dim]", soft_wrap=True)
    elif reason == "length":
        stderr.print(f"[dim]\\[answer cut at -n {session.max_tokens} tokens][/dim]", soft_wrap=True)
    elif reason == "context":
        stderr.print(f"[yellow]\\[the {session.ctx}-token context is full; the next turn drops old turns][/yellow]",
                     soft_wrap=True)


def stats_text(session: ChatSession) -> str:
    """Two lines for ``/stats``: what the cache holds, and the figures of the last turn."""
    c = session.cache
    lines = [f"cache: {c.length} tokens, {mib(c.used_bytes)} of {mib(c.nbytes)} "
             f"({c.bytes_per_token:,} B/token, {c.n_kv_heads} KV heads, {c.dtype}); "
             f"{len(session.messages)} messages"]
    s = session.last
    if s is None:
        lines.append("last turn: none")
    else:
        lines.append(f"last turn: prompt {s.prompt_tokens} tokens = {s.reused_tokens} reused + "
                     f"{s.prefill_tokens} prefilled ({s.prefill_tokens_per_s:,.1f} tok/s), "
                     f"first token after {s.first_token_seconds:.2f} s; answer {s.generated_tokens} "
                     f"tokens ({s.decode_tokens_per_s:,.1f} tok/s), {session.last_finish}")
    return "\n".join(lines)


def save_report(session: ChatSession, path: str) -> str:
    """``/save FILE``: save, and say what was saved.

    Raises:
        PromptCacheError: the file cannot be written.
    """
    size = session.save(path)
    return f"saved {session.cache.length} tokens and {len(session.messages)} messages to {path} ({mib(size)})"


def load_report(session: ChatSession, path: str) -> str:
    """``/load FILE``: load, and say what was loaded.

    Raises:
        PromptCacheError: the file is refused (the session is unchanged).
    """
    if session.load(path):
        return f"loaded {session.cache.length} tokens and {len(session.messages)} messages from {path}"
    return f"loaded {session.cache.length} cached tokens from {path} (no conversation in it; yours is kept)"


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _line_reader(stdin, ui):
    """``read() -> line`` ("" at end of input) that shows the prompt first: Python's ``input()``
    over readline (line editing, this session's history) when stdin and the prompt's stream are
    the process's terminal; else the prompt written to ``ui`` and a plain ``readline()``."""
    if stdin is sys.stdin and ui is sys.stdout and _isatty(stdin) and _isatty(ui):
        try:
            import readline  # noqa: F401 - importing it is what gives input() line editing
        except ImportError:  # not on every platform (Windows); input() still works without it
            pass

        def read() -> str:
            try:
                return input(PROMPT) + "\n"
            except EOFError:
                return ""

        return read

    def read() -> str:
        ui.write(PROMPT)
        ui.flush()
        return stdin.readline()

    return read


def run_session(session: ChatSession, stdin=None, stdout=None, ui=None) -> None:
    """Read lines after the ``> `` prompt until end of input or ``/exit``, answering each.

    Answers go to ``stdout``; the prompt and the replies of slash commands to ``ui`` (default:
    stdout when it is a terminal, else stderr, so piped stdout carries only the answers)."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    if hasattr(stdin, "reconfigure"):  # a line that is not UTF-8 reaches the session as surrogates and
        stdin.reconfigure(errors="surrogateescape")  # is refused there, not a UnicodeDecodeError here
    ui = ui or (stdout if _isatty(stdout) else sys.stderr)
    read = _line_reader(stdin, ui)
    while True:
        try:
            line = read()
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, as shells do
            ui.write("\n")
            continue
        if not line:  # Ctrl-D / end of input
            ui.write("\n")
            ui.flush()
            return
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        try:
            if text.startswith("/"):
                command, _, arg = text.strip().partition(" ")
                arg = arg.strip()
                if command in ("/exit", "/quit"):
                    return
                elif command == "/reset":
                    session.reset()
                    ui.write("conversation reset (cache emptied)\n")
                elif command == "/stats":
                    ui.write(stats_text(session) + "\n")
                elif command in ("/save", "/load"):
                    if not arg:
                        ui.write(f"usage: {command} FILE\n")
                    else:
                        report = save_report(session, arg) if command == "/save" else load_report(session, arg)
                        ui.write(report + "\n")
                elif command == "/help":
                    ui.write(HELP + "\n")
                else:
                    ui.write(f"unknown command {command}; /help lists the commands\n")
                ui.flush()
            else:
                answer(session, text, stdout)
        except MqaGenError as e:  # a refused /load, a message too long for the context, …
            click.echo(f"error: {e}", err=True)
        except KeyboardInterrupt:
            ui.write("\n")


@click.command()
@model_option
@generation_options
@system_prompt_option("--system")
@chat_template_option
@click.option("-q", "--quiet", is_flag=True, help="No banner or progress on stderr.")
@threads_option
def chat(model, system, chat_template_file, quiet, threads, **options):
    """Chat with the model; the KV cache persists across turns, so each turn prefills only its new tokens.

    Type a message after the "> " prompt. Commands: /reset, /stats, /save FILE, /load FILE, /help,
    /exit. Ctrl-C stops an answer; Ctrl-D leaves. -n caps each answer. When stdout is not a
    terminal, the prompt and command replies go to stderr, so stdout carries only the answers.
    """
    from rich.markup import escape

    template = read_chat_template(chat_template_file)
    setup = setup_generation(model, quiet, threads, **options)
    session = ChatSession(setup.loaded, setup.net, setup.ctx, setup.cache_dtype, system, setup.params,
                          setup.max_tokens, setup.stop, template)
    if not quiet:
        stderr.print(f"[dim]mqa-gen chat · {escape(setup.loaded.config.name)} · context {setup.ctx} tokens · "
                     f"{setup.net.config.n_kv_heads} KV heads · seed {setup.params.seed} · /help for commands, "
                     "Ctrl-D to leave[/dim]", soft_wrap=True)
    run_session(session)
