"""``mqa-gen chat``: an interactive conversation whose KV cache persists across turns.

Each turn renders the whole conversation with the model's chat template and hands the one
:class:`~mqa_gen.cache.KVCache` of the session to :func:`~mqa_gen.generate.stream_generate`,
which keeps the longest common prefix (everything up to the new user message) and prefills only
the new tokens. The answer streams to stdout; notes go to stderr.

Commands: ``/reset``, ``/stats``, ``/save FILE``, ``/load FILE``, ``/help``, ``/exit``.
Ctrl-C stops the current answer (what was printed stays in the conversation) and returns to the
prompt; Ctrl-D (end of input) or ``/exit`` leaves with exit code 0.

When a turn would overflow the context (its prompt plus room for an answer, see
:meth:`ChatSession.fit`), the oldest turns are dropped — the system prompt is kept — and the cache
is recomputed from the first token that changed.

Input is read line by line from stdin after writing the prompt ``> `` to stdout, so the session
can be driven by a pipe or a pseudo-terminal (pexpect) as well as by a person.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import click

from ..errors import MqaGenError, PromptError
from ..sampling import SamplingParams
from .common import ensure_kernels, load_model, mib, model_option, set_threads, stderr, threads_option
from .generate import check_generation_options, generation_options

PROMPT = "> "
HELP = (
    "/reset: forget the conversation and the cache   /stats: cache and speed of the last turn\n"
    "/save FILE: save the conversation and its KV cache   /load FILE: load them back\n"
    "/exit (or Ctrl-D): leave   Ctrl-C: stop the current answer"
)


@dataclass
class ChatSession:
    """One conversation: its messages, the KV cache that holds their tokens, and the figures of
    the last turn.

    Args:
        loaded: the :class:`~mqa_gen.loading.LoadedModel` (tokenizer, chat template, GGUF).
        net: the model to run (``loaded.model``, or a copy regrouped by ``--kv-heads``).
        ctx: context size in tokens (the cache's capacity).
        cache_dtype: ``"float32"`` or ``"float16"``.
        system: the system prompt, or None for the template's default.
        params, max_tokens, stop: as for :func:`~mqa_gen.generate.stream_generate`
            (``max_tokens`` caps each answer).

    Attributes:
        messages: ``[{"role": "user"|"assistant", "content": str}, ...]`` after the system prompt.
        cache: the session's :class:`~mqa_gen.cache.KVCache`, capacity ``ctx``.
        last: :class:`~mqa_gen.generate.GenerationStats` of the last turn (None before the first).
    """

    loaded: object
    net: object
    ctx: int
    cache_dtype: str = "float32"
    system: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    messages: list[dict] = field(default_factory=list)
    last: object = None
    last_finish: str | None = None

    def __post_init__(self):
        from ..chat import end_of_turn_ids

        tok = self.loaded.tokenizer
        if tok.chat_template is None:
            raise PromptError("this model has no chat template; use `mqa-gen generate --no-chat`")
        self.cache = self.net.new_cache(self.ctx, self.cache_dtype)
        self.eos_ids = end_of_turn_ids(tok)
        self._model_id: str | None = None

    # ── prompts ──

    @property
    def model_id(self) -> str:
        """:func:`~mqa_gen.prompt_cache.model_identity` of the model, computed on first use."""
        if self._model_id is None:
            from ..prompt_cache import model_identity

            self._model_id = model_identity(self.loaded.gguf)
        return self._model_id

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of the system prompt + ``messages`` + the assistant header (int list)."""
        from ..chat import render_chat

        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        tok = self.loaded.tokenizer
        return tok.encode(render_chat(tok.chat_template, system + messages, add_generation_prompt=True))

    @property
    def reserve(self) -> int:
        """Tokens kept free for the answer when fitting a turn: min(max_tokens, ctx // 4), ≥ 1."""
        return max(1, min(self.max_tokens, self.ctx // 4))

    def fit(self, messages: list[dict]) -> tuple[list[dict], list[int], int]:
        """Drop the oldest turns of ``messages`` (never the last message, never the system
        prompt) until the prompt plus :attr:`reserve` tokens fit the context.

        Returns ``(messages kept, their prompt ids, turns dropped)``.

        Raises:
            PromptError: the system prompt and the last message alone do not fit the context.
        """
        ids = self.prompt_ids(messages)
        dropped = 0
        while len(ids) + self.reserve > self.ctx and len(messages) > 1:
            # A turn is a user message and the assistant's answer; drop the pair.
            cut = 2 if len(messages) > 2 and messages[1]["role"] == "assistant" else 1
            messages = messages[cut:]
            dropped += 1
            ids = self.prompt_ids(messages)
        if len(ids) >= self.ctx:
            raise PromptError(f"this message needs {len(ids)} tokens with the system prompt, but the context "
                              f"is {self.ctx} tokens (raise --ctx-size or write less)")
        return messages, ids, dropped

    # ── a turn ──

    def turn(self, text: str, out=sys.stdout) -> None:
        """Answer the user message ``text``, streaming the reply to ``out``.

        Ctrl-C (KeyboardInterrupt) during the answer stops it; the part printed stays in the
        conversation and the cache stays consistent. Notes (dropped turns, a cut answer) go to stderr.

        Raises:
            PromptError: the message cannot fit the context even alone (nothing is changed).
        """
        from ..generate import stream_generate

        messages, ids, dropped = self.fit(self.messages + [{"role": "user", "content": text}])
        if dropped:
            stderr.print(f"[yellow]context: the conversation would overflow the {self.ctx}-token context; "
                         f"dropped the {dropped} oldest turn(s) (system prompt kept) and recomputed the cache[/yellow]",
                         soft_wrap=True)
        gen = stream_generate(self.net, self.loaded.tokenizer, ids, params=self.params, max_tokens=self.max_tokens,
                              stop=self.stop, eos_ids=self.eos_ids, cache=self.cache)
        interrupted = False
        try:
            for step in gen:
                if step.text:
                    out.write(step.text)
                    out.flush()
        except KeyboardInterrupt:
            interrupted = True
        if interrupted and not gen.text:  # stopped before any text: as if the message was never sent
            self.messages = messages[:-1]
        else:
            self.messages = messages + [{"role": "assistant", "content": gen.text}]
        self.last, self.last_finish = gen.stats, ("interrupted" if interrupted else gen.finish_reason)
        out.write("\n")
        out.flush()
        if interrupted:
            stderr.print("[dim]\\[interrupted][/dim]", soft_wrap=True)
        elif gen.finish_reason == "length":
            stderr.print(f"[dim]\\[answer cut at -n {self.max_tokens} tokens][/dim]", soft_wrap=True)
        elif gen.finish_reason == "context":
            stderr.print(f"[yellow]\\[the {self.ctx}-token context is full; the next turn drops old turns][/yellow]",
                         soft_wrap=True)

    # ── commands ──

    def reset(self) -> None:
        """Forget every message (the system prompt stays) and empty the cache."""
        self.messages = []
        self.cache.reset()
        self.last, self.last_finish = None, None

    def stats_text(self) -> str:
        """Two lines: what the cache holds, and the figures of the last turn."""
        c = self.cache
        lines = [f"cache: {c.length} tokens, {mib(c.used_bytes)} of {mib(c.nbytes)} "
                 f"({c.bytes_per_token:,} B/token, {c.n_kv_heads} KV heads, {c.dtype}); "
                 f"{len(self.messages)} messages"]
        s = self.last
        if s is None:
            lines.append("last turn: none")
        else:
            lines.append(f"last turn: prompt {s.prompt_tokens} tokens = {s.reused_tokens} reused + "
                         f"{s.prefill_tokens} prefilled ({s.prefill_tokens_per_s:,.1f} tok/s), "
                         f"first token after {s.first_token_seconds:.2f} s; answer {s.generated_tokens} "
                         f"tokens ({s.decode_tokens_per_s:,.1f} tok/s), {self.last_finish}")
        return "\n".join(lines)

    def save(self, path: str) -> str:
        """Save the cache and the conversation to ``path`` (atomic); returns a one-line report.

        Raises:
            PromptCacheError: the file cannot be written.
        """
        from ..prompt_cache import save_prompt_cache

        extra = {"system": self.system, "messages": self.messages}
        size = save_prompt_cache(path, self.cache, self.model_id, extra, model_name=self.loaded.config.name)
        return f"saved {self.cache.length} tokens and {len(self.messages)} messages to {path} ({mib(size)})"

    def load(self, path: str) -> str:
        """Replace the cache (and the conversation, when the file has one) from ``path``; returns
        a one-line report. Nothing changes when the file is refused.

        Raises:
            PromptCacheError: the file is missing, corrupt, or made for another model, KV-head
                count or cache dtype.
        """
        from ..prompt_cache import load_prompt_cache

        cache, extra = load_prompt_cache(path, self.model_id, config=self.net.config, dtype=self.cache_dtype,
                                         max_seq_len=self.ctx)
        messages = extra.get("messages")
        valid = isinstance(messages, list) and all(
            isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
            for m in messages)
        self.cache = cache
        if valid:
            system = extra.get("system")
            self.system = system if isinstance(system, str) else None
            self.messages = [{"role": m["role"], "content": m["content"]} for m in messages]
            return f"loaded {cache.length} tokens and {len(messages)} messages from {path}"
        return f"loaded {cache.length} cached tokens from {path} (no conversation in it; yours is kept)"


def run_session(session: ChatSession, stdin=None, stdout=None) -> None:
    """Read lines after the ``> `` prompt until end of input or ``/exit``, answering each."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    while True:
        try:
            stdout.write(PROMPT)
            stdout.flush()
            line = stdin.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, as shells do
            stdout.write("\n")
            continue
        if not line:  # Ctrl-D / end of input
            stdout.write("\n")
            stdout.flush()
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
                    stdout.write("conversation reset (cache emptied)\n")
                elif command == "/stats":
                    stdout.write(session.stats_text() + "\n")
                elif command in ("/save", "/load"):
                    if not arg:
                        stdout.write(f"usage: {command} FILE\n")
                    else:
                        report = session.save(arg) if command == "/save" else session.load(arg)
                        stdout.write(report + "\n")
                elif command == "/help":
                    stdout.write(HELP + "\n")
                else:
                    stdout.write(f"unknown command {command}; /help lists the commands\n")
                stdout.flush()
            else:
                session.turn(text, stdout)
        except MqaGenError as e:  # a refused /load, a message too long for the context, …
            click.echo(f"error: {e}", err=True)
        except KeyboardInterrupt:
            stdout.write("\n")


@click.command()
@model_option
@generation_options
@click.option("--system", default=None, metavar="TEXT", help="System prompt (default: the chat template's own).")
@click.option("-q", "--quiet", is_flag=True, help="No banner or progress on stderr.")
@threads_option
def chat(model, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, stop,
         ctx_size, kv_heads, cache_dtype, system, quiet, threads):
    """Chat with the model; the KV cache persists across turns, so each turn prefills only its new tokens.

    Type a message after the "> " prompt. Commands: /reset, /stats, /save FILE, /load FILE, /help,
    /exit. Ctrl-C stops an answer; Ctrl-D leaves. -n caps each answer.
    """
    from rich.markup import escape

    from ..regroup import regroup_model

    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed)
    check_generation_options(params, max_tokens, ctx_size)
    set_threads(threads)
    loaded = load_model(model, quiet)
    ensure_kernels(quiet)
    net = loaded.model if kv_heads is None else regroup_model(loaded.model, kv_heads)
    ctx = ctx_size or net.config.context_length
    session = ChatSession(loaded, net, ctx, cache_dtype, system, params, max_tokens, tuple(stop))
    if not quiet:
        stderr.print(f"[dim]mqa-gen chat · {escape(loaded.config.name)} · context {ctx} tokens · "
                     f"{net.config.n_kv_heads} KV heads · /help for commands, Ctrl-D to leave[/dim]", soft_wrap=True)
    run_session(session)
