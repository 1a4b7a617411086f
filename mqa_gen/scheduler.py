"""Continuous batching: many prompts, up to ``batch_size`` of them decoding together.

The scheduler keeps ``batch_size`` *slots*, each a sequence's KV cache in one
:class:`~mqa_gen.cache.KVCachePool`. Every step:

1. **Admit**: while a slot is free and a request waits, the request takes the slot: its prompt is
   prefilled alone (in chunks, as ``generate`` does) and its first token sampled.
2. **Decode**: every running sequence feeds its last token back in one batched forward pass
   (:meth:`~mqa_gen.models.base.Decoder.decode`: each weight matrix read once for all of them, the
   attention of all of them in one kernel call), then samples its next token.
3. **Retire**: a sequence that ended (end of text, ``max_tokens``, a stop string, a full context)
   leaves at once, and its slot goes to the next request in step 1.

This is llama-server's slots and vLLM's scheduler reduced to what a CPU needs: a prompt's prefill
runs between decode steps rather than mixed into them, and capacity is whole sequences of
``ctx_size`` tokens. Each sequence keeps its own sampler (and seed), logits processors, stop
strings, ``max_tokens`` and finish reason, and the kernels compute a row the same way whatever
else is in the batch, so every result equals that prompt run alone by ``generate``: the same ids
for greedy decoding, and for seeded sampling with the same seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from .cache import KVCachePool
from .errors import PromptError
from .generate import PREFILL_CHUNK, GenerationStep, SequenceText, TokenSequence, validate_generation
from .logprobs import TokenLogprob
from .sampling import SamplingParams, make_logits_processors, make_sampler
from .tokenizer import Tokenizer


@dataclass
class Request:
    """One prompt to generate for.

    Attributes:
        prompt_ids: the prompt's token ids (at least one, fewer than the context).
        params: its sampling parameters (its own seed).
        max_tokens: most tokens to generate (> 0; -1 = until end of text or a full context).
        stop: stop strings. eos_ids: ids that end the generation.
        logprobs: None, or N ≥ 0 to keep each generated token's logprob and its N most likely
            alternatives.
        id: the caller's name for it, handed back in its :class:`Completion`.
        on_token: called with each sampled token's :class:`~mqa_gen.generate.GenerationStep` and
            its :class:`~mqa_gen.logprobs.TokenLogprob` (None when logprobs are not asked, or for
            an end-of-generation id), from the thread running the scheduler (for streaming).
    """

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    eos_ids: frozenset[int] = frozenset()
    logprobs: int | None = None
    id: object = None
    on_token: Callable[[GenerationStep, TokenLogprob | None], None] | None = None


@dataclass
class Completion:
    """A finished request: what ``generate --json`` reports for the same prompt alone.

    Attributes:
        request: the :class:`Request`.
        token_ids: generated ids (no end-of-generation id). text: their text (no stop string).
        finish_reason: ``eos``, ``length``, ``stop`` or ``context``.
        logprobs: one :class:`~mqa_gen.logprobs.TokenLogprob` per id of ``token_ids``, or None
            when not asked.
        first_token_seconds: from admission to its first token (prefill + sampling), seconds.
        seconds: from admission to the end, seconds.
        reused_tokens: prompt tokens found in the slot's cache (``reuse_prefix``), not prefilled.
    """

    request: Request
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None
    first_token_seconds: float
    seconds: float
    reused_tokens: int = 0


class _Running:
    """A request in a slot: its token layer, its text layer and its figures."""

    def __init__(self, request: Request, slot: int, tokens: TokenSequence, text: SequenceText):
        self.request, self.slot, self.tokens, self.text = request, slot, tokens, text
        self.started = time.perf_counter()
        self.first_token_seconds = 0.0
        self.logprobs: list[TokenLogprob] | None = None if request.logprobs is None else []
        self.last_token = -1

    def take(self, token: int, logprob: float) -> bool:
        """Record a sampled token; True when the sequence is finished."""
        if not self.first_token_seconds:
            self.first_token_seconds = time.perf_counter() - self.started
        self.last_token = token
        step = self.text.push(token, logprob)
        entry = None
        if self.logprobs is not None and step.finish_reason != "eos":  # one per id of token_ids
            entry = TokenLogprob(token, logprob, list(self.tokens.last_top_logprobs))
            self.logprobs.append(entry)
        if self.request.on_token is not None:
            self.request.on_token(step, entry)
        return step.finish_reason is not None

    def completion(self) -> Completion:
        return Completion(self.request, self.text.token_ids, self.text.text, self.text.finish_reason,
                          self.logprobs, self.first_token_seconds, time.perf_counter() - self.started,
                          self.tokens.reused)


@dataclass
class SchedulerStats:
    """Running figures of a :class:`Scheduler`: requests finished, tokens generated, decode steps
    and the rows they ran, and seconds spent prefilling and decoding."""

    finished: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    decode_rows: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def mean_batch(self) -> float:
        """Sequences per decode step, on average."""
        return self.decode_rows / self.decode_steps if self.decode_steps else 0.0


class Scheduler:
    """Runs requests with continuous batching (see the module docstring).

    Args:
        model: a :class:`~mqa_gen.models.base.Decoder` (``forward``, ``decode``, ``config``).
        tokenizer: for each sequence's text.
        batch_size: slots, the most sequences decoding together (> 0).
        ctx_size: each slot's capacity in tokens (prompt + generated); default the model's context.
        cache_dtype: the KV caches' storage name.
        prefill_chunk: prompt tokens per prefill pass.
        reuse_prefix: give a request the free slot whose cache shares the longest prefix with its
            prompt and keep that prefix (llama-server's ``cache_prompt``): a shared system prompt or
            a growing conversation is prefilled once. Off by default, because the reused positions'
            K/V were computed in other chunks, so logits may differ from a fresh prefill by float32
            rounding — the exactness of ``--prompt-cache`` — where ``batch`` promises each result
            equals the prompt run alone.

    Attributes:
        pool: the slots' :class:`~mqa_gen.cache.KVCachePool`. stats: :class:`SchedulerStats`.

    Raises:
        ValueError: batch_size or ctx_size < 1.
    """

    def __init__(self, model, tokenizer: Tokenizer, *, batch_size: int = 8, ctx_size: int | None = None,
                 cache_dtype: str = "f32", prefill_chunk: int = PREFILL_CHUNK, reuse_prefix: bool = False):
        c = model.config
        self.ctx_size = ctx_size or c.context_length
        if batch_size < 1 or self.ctx_size < 1:
            raise ValueError("batch_size and ctx_size must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.prefill_chunk = prefill_chunk
        self.reuse_prefix = reuse_prefix
        self.pool = KVCachePool(batch_size, c.n_layers, c.n_kv_heads, c.head_dim, self.ctx_size, cache_dtype,
                                c.layer_windows)
        self.stats = SchedulerStats()
        self._free = list(range(batch_size - 1, -1, -1))  # a stack: slot 0 is used first
        self._running: list[_Running] = []

    @property
    def batch_size(self) -> int:
        """Slots."""
        return self.pool.n_slots

    @property
    def active(self) -> int:
        """Sequences decoding now."""
        return len(self._running)

    @property
    def busy_slots(self) -> int:
        """Slots a request holds: those decoding and the one being prefilled (which holds its slot
        before it joins the decoding ones, while its first token is already streamed). Other threads
        read this one to tell whether a slot is free."""
        return self.pool.n_slots - len(self._free)

    def check(self, request: Request) -> None:
        """Refuse a request that cannot run, before any work.

        Raises:
            PromptError: an empty prompt or one that leaves no room in a slot's context.
            SamplingError: a sampling parameter or ``max_tokens`` out of range.
        """
        validate_generation(request.params, request.max_tokens)
        if not request.prompt_ids:
            raise PromptError("the prompt is empty")
        if len(request.prompt_ids) >= self.ctx_size:
            raise PromptError(f"the prompt has {len(request.prompt_ids)} tokens but the context is "
                              f"{self.ctx_size} tokens (raise --ctx-size or shorten the prompt)")

    def run(self, requests: Iterable[Request], on_step: Callable[["Scheduler"], None] | None = None
            ) -> Iterator[Completion]:
        """Run every request; yield each :class:`Completion` as it finishes (not in input order).

        ``requests`` is read lazily, one request whenever a slot is free, so it may be a generator.
        ``on_step(scheduler)`` is called after every admission and decode step (for progress).
        Stopping the iteration early (``close()``, an exception such as KeyboardInterrupt) leaves
        the unfinished sequences unfinished; the slots are freed.

        Raises:
            PromptError, SamplingError: a request that cannot run (:meth:`check`).
        """
        pending = iter(requests)
        exhausted = False

        def next_request() -> Request | None:
            nonlocal exhausted
            request = None if exhausted else next(pending, None)
            exhausted = request is None
            return request

        try:
            while True:
                yield from self.step(next_request, on_step)
                if exhausted and not self._running:
                    return
        finally:
            self.cancel_all()

    def step(self, next_request: Callable[[], Request | None],
             on_step: Callable[["Scheduler"], None] | None = None) -> Iterator[Completion]:
        """One scheduling step: admit requests while a slot is free and ``next_request()`` gives one
        (None: none waits now), then one batched decode step if any sequence runs. Yields the
        completions that finished in it. :meth:`run` is a loop of these; a server calls it from its
        own loop, with requests arriving between steps.

        Raises:
            PromptError, SamplingError: a request that cannot run (:meth:`check`).
        """
        while self._free:
            request = next_request()
            if request is None:
                break
            done = self._admit(request)
            if on_step is not None:
                on_step(self)
            if done is not None:
                yield done
        if self._running:
            yield from self._decode_step()
            if on_step is not None:
                on_step(self)

    def cancel(self, request: Request) -> bool:
        """Stop a running request now and free its slot (a client that went away). Returns whether
        it was running."""
        for seq in self._running:
            if seq.request is request:
                self._running.remove(seq)
                self._free.append(seq.slot)
                return True
        return False

    def cancel_all(self) -> None:
        """Stop every running request and free all slots."""
        for seq in self._running:
            self._free.append(seq.slot)
        self._running.clear()

    def _admit(self, request: Request) -> Completion | None:
        """Put a request in a free slot: prefill it alone and sample its first token. Returns its
        completion when that token already ends it."""
        self.check(request)
        if self.reuse_prefix:  # the free slot whose cached tokens share the longest prefix with the prompt
            slot = max(self._free, key=lambda i: self.pool.caches[i].common_prefix(request.prompt_ids))
            self._free.remove(slot)
            cache = self.pool.caches[slot]  # TokenSequence.prefill keeps the common prefix, drops the rest
        else:
            slot = self._free.pop()
            cache = self.pool.caches[slot]
            cache.reset()  # nothing reused across requests: a prompt's logits must not depend on the one before
        params = request.params
        tokens = TokenSequence(request.prompt_ids, cache, make_sampler(params), make_logits_processors(params),
                               self.prefill_chunk, request.logprobs or 0)
        text = SequenceText(self.tokenizer, len(request.prompt_ids), request.max_tokens, cache.max_seq_len,
                            request.stop, request.eos_ids)
        seq = _Running(request, slot, tokens, text)
        t0 = time.perf_counter()
        tokens.prefill(self.model)
        self.stats.prefill_seconds += time.perf_counter() - t0
        self.stats.prompt_tokens += len(request.prompt_ids)
        if seq.take(*tokens.sample()):
            return self._retire(seq)
        self._running.append(seq)
        return None

    def _decode_step(self) -> Iterator[Completion]:
        """One batched decode step for every running sequence, then each samples its next token."""
        running = self._running
        t0 = time.perf_counter()
        logits = self.model.decode([seq.last_token for seq in running], [seq.tokens.cache for seq in running])
        self.stats.decode_seconds += time.perf_counter() - t0
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(running)
        still = []
        finished = []
        for seq, row in zip(running, logits):
            seq.tokens.accept(seq.last_token, row)
            if seq.take(*seq.tokens.sample()):
                finished.append(seq)
            else:
                still.append(seq)
        self._running = still
        for seq in finished:
            yield self._retire(seq)

    def _retire(self, seq: _Running) -> Completion:
        self._free.append(seq.slot)
        self.stats.finished += 1
        self.stats.generated_tokens += len(seq.text.token_ids)
        return seq.completion()


def kv_fit(cache_bytes_per_sequence: int, budget_bytes: int) -> int:
    """How many sequences of ``cache_bytes_per_sequence`` KV bytes fit in ``budget_bytes`` (≥ 0)."""
    return int(budget_bytes // max(cache_bytes_per_sequence, 1))
