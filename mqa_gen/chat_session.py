"""A conversation whose KV cache persists across turns.

Each turn renders the whole conversation with the model's chat template and hands the one
:class:`~mqa_gen.cache.KVCache` of the session to :func:`~mqa_gen.generate.stream_generate`,
which keeps the longest common prefix (everything up to the new user message) and prefills only
the new tokens.

When a turn would overflow the context (its prompt plus room for an answer, see
:meth:`ChatSession.fit`), the oldest turns are dropped — the system prompt is kept — and the cache
is recomputed from the first token that changed.

A turn runs in three steps, so that a front end can print as it goes and stop an answer midway::

    turn = session.begin("What is the capital of France?")   # fit the context, start the answer
    for step in turn.generation:                              # GenerationStep s, text streaming
        print(step.text, end="")
    session.commit(turn)                                      # the answer joins the conversation

``mqa-gen chat`` (:mod:`mqa_gen.cli.chat`) is the terminal front end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .chat import end_of_turn_ids, render_prompt
from .errors import PromptError
from .generate import Generation, GenerationStats, stream_generate
from .prompt_cache import load_prompt_cache, model_identity, save_prompt_cache
from .sampling import SamplingParams
from .tokenizer import check_utf8


@dataclass
class ChatTurn:
    """One answer in progress (from :meth:`ChatSession.begin`).

    Attributes:
        messages: the conversation the prompt was made from: the kept messages and the new user
            message (after the system prompt, which is not in it).
        dropped: how many of the oldest turns were dropped to fit the context.
        generation: iterate it for the answer's :class:`~mqa_gen.generate.GenerationStep` s.
    """

    messages: list[dict]
    dropped: int
    generation: Generation

    @property
    def finish_reason(self) -> str:
        """The generation's finish reason, or ``"interrupted"`` when it was stopped before one."""
        return self.generation.finish_reason or "interrupted"


@dataclass
class ChatSession:
    """One conversation: its messages, the KV cache that holds their tokens, and the figures of
    the last turn.

    Args:
        loaded: the :class:`~mqa_gen.loading.LoadedModel` (tokenizer, chat template, GGUF).
        net: the model to run (``loaded.model``, or a copy regrouped to other KV heads).
        ctx: context size in tokens (the cache's capacity).
        cache_dtype: the KV cache type (``"f32"``, ``"f16"``, ``"q8_0"``, ``"q4_0"``; aliases accepted).
        system: the system prompt, or None for the template's default.
        params, max_tokens, stop: as for :func:`~mqa_gen.generate.stream_generate`
            (``max_tokens`` caps each answer).
        chat_template: a Jinja chat template to use instead of the model's (None = the model's).

    Attributes:
        messages: ``[{"role": "user"|"assistant", "content": str}, ...]`` after the system prompt.
        cache: the session's :class:`~mqa_gen.cache.KVCache`, capacity ``ctx``.
        last: :class:`~mqa_gen.generate.GenerationStats` of the last turn (None before the first).
        last_finish: the last turn's :attr:`ChatTurn.finish_reason` (None before the first).

    Raises:
        PromptError: the model has no chat template and none is given, or the system prompt is not
            valid UTF-8.
    """

    loaded: object
    net: object
    ctx: int
    cache_dtype: str = "f32"
    system: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    chat_template: str | None = None
    messages: list[dict] = field(default_factory=list)
    last: GenerationStats | None = None
    last_finish: str | None = None

    def __post_init__(self):
        tok = self.loaded.tokenizer
        if tok.chat_template is None and self.chat_template is None:
            raise PromptError("this model has no chat template; give one with --chat-template-file, "
                              "or use `mqa-gen generate --no-chat`")
        if self.system is not None:
            check_utf8(self.system, "the system prompt")
        self.cache = self.net.new_cache(self.ctx, self.cache_dtype)
        self.eos_ids = end_of_turn_ids(tok)
        self._model_id: str | None = None

    # ── prompts ──

    @property
    def model_id(self) -> str:
        """:func:`~mqa_gen.prompt_cache.model_identity` of the model, computed on first use."""
        if self._model_id is None:
            self._model_id = model_identity(self.loaded.gguf)
        return self._model_id

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of the system prompt + ``messages`` + the assistant header (int list)."""
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        tok = self.loaded.tokenizer
        return tok.encode(render_prompt(tok, system + messages, self.chat_template))

    @property
    def reserve(self) -> int:
        """Tokens kept free for the answer when fitting a turn: min(max_tokens, ctx // 4), ≥ 1
        (ctx // 4 when ``max_tokens`` is -1, no limit)."""
        cap = self.ctx // 4 if self.max_tokens < 0 else min(self.max_tokens, self.ctx // 4)
        return max(1, cap)

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

    def begin(self, text: str) -> ChatTurn:
        """Start answering the user message ``text``: fit the conversation to the context and set
        up the generation on the session's cache. Iterate ``turn.generation``, then :meth:`commit`.

        Raises:
            PromptError: the message is not valid UTF-8 (lone surrogates, :func:`~mqa_gen.tokenizer.check_utf8`)
                or cannot fit the context even alone (nothing is changed).
        """
        check_utf8(text, "this message")
        messages, ids, dropped = self.fit(self.messages + [{"role": "user", "content": text}])
        gen = stream_generate(self.net, self.loaded.tokenizer, ids, params=self.params, max_tokens=self.max_tokens,
                              stop=self.stop, eos_ids=self.eos_ids, cache=self.cache)
        return ChatTurn(messages, dropped, gen)

    def commit(self, turn: ChatTurn) -> None:
        """Make the answer part of the conversation, however far it got: a finished answer, or the
        text an interruption left (the cache is consistent either way). An answer stopped before
        any text is dropped with its user message, as if the message was never sent."""
        gen = turn.generation
        if gen.finish_reason is None and not gen.text:
            self.messages = turn.messages[:-1]
        else:
            self.messages = turn.messages + [{"role": "assistant", "content": gen.text}]
        self.last, self.last_finish = gen.stats, turn.finish_reason

    # ── the conversation as a whole ──

    def reset(self) -> None:
        """Forget every message (the system prompt stays) and empty the cache."""
        self.messages = []
        self.cache.reset()
        self.last, self.last_finish = None, None

    def save(self, path: str) -> int:
        """Save the cache and the conversation to ``path`` (atomic); returns the file's size in bytes.

        Raises:
            PromptCacheError: the file cannot be written.
        """
        extra = {"system": self.system, "messages": self.messages}
        return save_prompt_cache(path, self.cache, self.model_id, extra, model_name=self.loaded.config.name)

    def load(self, path: str) -> bool:
        """Replace the cache (and the conversation, when the file has one) from ``path``. Nothing
        changes when the file is refused.

        Returns:
            True when the file held a conversation (now the session's), False when it held only a
            cache (the session's messages are kept).

        Raises:
            PromptCacheError: the file is missing, corrupt, or made for another model, KV-head
                count or cache dtype.
        """
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
        return valid
