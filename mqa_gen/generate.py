"""Generation in two layers: a token layer that runs the model, a text layer that makes text.

**Token layer** — :func:`generate_tokens` yields ``(token_id, logprob)`` pairs: it reuses the
longest prefix of the prompt the cache already holds, prefills the rest in chunks, then decodes
one token at a time into the KV cache, running the logits processors and the sampler
(:mod:`mqa_gen.sampling`) on each step's logits. It knows nothing of text, stop strings or limits:
it runs until its caller stops asking.

**Text layer** — :func:`stream_generate` returns a :class:`Generation`; iterating it yields one
:class:`GenerationStep` per sampled token, carrying the text that became printable at that step
(whole UTF-8 characters only, with any text that may still turn into a ``stop`` string held back),
and keeps :class:`GenerationStats`. The last step carries the ``finish_reason``:

* ``eos``     — an end-of-sequence id was sampled (not yielded as text, not in ``token_ids``);
* ``length``  — ``max_tokens`` tokens were generated (``max_tokens=-1``: no limit but the context);
* ``stop``    — a stop string appeared (no part of it is yielded; ``stop_string`` says which);
* ``context`` — prompt + generated tokens filled the context (``ctx_size``).

A cache handed in may already hold tokens (a reloaded prompt cache, the previous turn of a chat):
the longest common prefix of its token ids and the prompt is kept, the rest of the cache is
dropped, and only the remaining prompt tokens are prefilled (at least one, since the logits of the
last prompt position are needed). ``stats.reused_tokens`` says how many were reused. After the
generation the cache holds the prompt and every generated token but the last, each labelled with
its id, so it can be reused again or saved (:func:`mqa_gen.prompt_cache.save_prompt_cache`).

The split follows mlx-lm's ``generate_step`` (tokens) and ``stream_generate`` (text); the loop
reads like llama2.c's ``generate``. The CLI only prints what the text layer yields.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from .cache import KVCache
from .errors import NumericalError, PromptError, SamplingError
from .sampling import (
    LogitsProcessor,
    SamplingParams,
    apply_logits_processors,
    make_logits_processors,
    make_sampler,
    top_logprobs,
)
from .tokenizer import Tokenizer

#: Prompt tokens per prefill call. Bounds the activations a long prompt needs at once ([chunk,
#: hidden] per layer) while keeping the matrix products large enough to run at full speed.
PREFILL_CHUNK = 512


@dataclass
class GenerationStats:
    """Figures of one generation. Times in seconds, speeds in tokens/s, sizes in bytes.

    ``prompt_tokens`` counts the whole prompt, ``reused_tokens`` the part found in the cache (not
    recomputed); ``prefill_tokens`` = the difference, what the prefill actually ran.
    ``first_token_seconds`` is the time from the start of the iteration to the first sampled token
    (cache reuse + prefill + sampling).
    """

    prompt_tokens: int = 0
    reused_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    first_token_seconds: float = 0.0
    kv_cache_bytes: int = 0
    kv_cache_capacity_bytes: int = 0
    kv_bytes_per_token: int = 0
    n_kv_heads: int = 0
    peak_rss_bytes: int = 0

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens the prefill computed (the prompt minus the reused prefix)."""
        return self.prompt_tokens - self.reused_tokens

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prefilled (not reused) tokens per second of prefill."""
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first generated token comes from the prefill's logits; decode steps are the rest.
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def as_dict(self) -> dict:
        """Plain dict with the derived speeds, for ``--json``."""
        d = asdict(self)
        d["prefill_tokens"] = self.prefill_tokens
        d["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        return d


@dataclass
class GenerationStep:
    """One sampled token: ``token_id``, the ``text`` made printable by it (may be empty),
    its ``logprob`` (natural log), on the last step the ``finish_reason``, and when asked the
    ``top_logprobs`` of that step, ``[(token_id, logprob), …]`` best first."""

    token_id: int
    text: str
    logprob: float
    finish_reason: str | None = None
    top_logprobs: list[tuple[int, float]] | None = None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


class _StopStringFilter:
    """Holds back text that might be the start of a stop string; reports the first stop found."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.matched: str | None = None

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to print now, whether a stop string was hit). After a hit,
        ``matched`` is the stop string found (the earliest in the text; on a tie, the first given)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [(i, n) for n, i in enumerate(self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            at, which = min(hits)
            self.matched = self.stops[which]
            out, self.pending = self.pending[:at], ""
            return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TokenSequence:
    """The token layer's state for one sequence, advanced one step at a time: the longest cached
    prefix reused, the rest of the prompt prefilled in chunks, then sample → feed back → sample.

    :func:`generate_tokens` drives one of these with ``model.forward``; the continuous-batching
    scheduler (:mod:`mqa_gen.scheduler`) drives many, feeding their tokens back in one batched
    decode step. Either way a sequence sees the same logits, so it samples the same tokens.

    Args:
        prompt_ids: the prompt's token ids (at least one, fewer than the cache's capacity).
        cache: the sequence's KV cache; updated in place.
        sampler: ``sampler(logits [vocab]) -> (token_id, logprob)`` (:func:`~mqa_gen.sampling.make_sampler`).
        logits_processors: each ``(history, logits) -> logits``, run in order before the sampler;
            ``history`` is the prompt and the tokens generated so far (int list, oldest first).
        prefill_chunk: prompt tokens per prefill pass (> 0).
        top_logprobs: how many of the most likely alternatives :meth:`sample` records in
            ``last_top_logprobs`` (0 = none).

    Attributes:
        history: the prompt and every token fed back so far.
        reused: prompt tokens found in the cache (set by :meth:`prefill`).
        last_top_logprobs: ``[(token_id, logprob), …]`` of the last step, best first (when asked).

    Raises:
        ValueError: ``prefill_chunk`` < 1.
    """

    def __init__(self, prompt_ids: Sequence[int], cache: KVCache, sampler: Callable[[np.ndarray], tuple[int, float]],
                 logits_processors: Sequence[LogitsProcessor] = (), prefill_chunk: int = PREFILL_CHUNK,
                 top_logprobs: int = 0):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.history = list(prompt_ids)
        self.cache, self.sampler = cache, sampler
        self.logits_processors, self.prefill_chunk = logits_processors, prefill_chunk
        self.top_logprobs = top_logprobs
        self.reused = 0
        self.logits: np.ndarray | None = None  # the last position's logits, float32 [vocab]
        self.last_top_logprobs: list[tuple[int, float]] = []

    def prefill(self, model) -> None:
        """Keep the longest common prefix of the cache and the prompt, but leave at least one
        prompt token to prefill (its logits choose the first token); keep nothing when a
        sliding-window ring can no longer go back that far (:meth:`~mqa_gen.cache.KVCache.can_truncate`).
        Then run the rest through ``model.forward`` in chunks, labelling each position."""
        cache, history = self.cache, self.history
        reused = min(cache.common_prefix(history), len(history) - 1)
        if not cache.can_truncate(reused):
            reused = 0
        cache.truncate(reused)
        for start in range(reused, len(history), self.prefill_chunk):
            chunk = history[start : start + self.prefill_chunk]
            self.logits = model.forward(chunk, cache)
            cache.label_tokens(chunk)
        self.reused = reused

    def sample(self) -> tuple[int, float]:
        """Logits processors, then the sampler, on the last logits: ``(token_id, logprob)``, the
        log-softmax of the processed logits at the token.

        Raises:
            NumericalError: the logits hold NaN or ±inf (see :meth:`check_logits`).
        """
        self.check_logits()
        logits = apply_logits_processors(self.logits_processors, self.history, self.logits)
        token, logprob = self.sampler(logits)
        if self.top_logprobs:
            self.last_top_logprobs = top_logprobs(logits, self.top_logprobs)
        return token, logprob

    def check_logits(self) -> None:
        """Refuse NaN or infinite logits before they reach the sampler. A model with finite weights
        and a finite cache cannot compute them, so they mean damaged weights (garbage or NaN in the
        model file that load-time checks could not see) or a damaged reused prompt cache: a
        :class:`~mqa_gen.errors.NumericalError`, exit code 2, not a ``ValueError`` from the sampler.
        One ``max`` over the vocabulary (NaN and +inf propagate; about 10 µs for 49k logits).

        Raises:
            NumericalError: one line naming the position and the likely cause.
        """
        top = self.logits.max()
        if np.isfinite(top):
            return
        finite = np.isfinite(self.logits)
        what = "NaN" if np.isnan(self.logits).any() else "infinite"
        cause = "a damaged model file (its weights)"
        if self.reused:
            cause += f" or a damaged prompt cache (its {self.reused} reused tokens)"
        raise NumericalError(f"the model computed {what} logits ({int((~finite).sum()):,} of {finite.size:,}) "
                             f"at position {len(self.history) - 1}: likely {cause}")

    @property
    def can_feed(self) -> bool:
        """Whether the cache has room to take a sampled token back."""
        return self.cache.length < self.cache.max_seq_len

    def accept(self, token: int, logits: np.ndarray) -> None:
        """``token`` was just run through the model into this sequence's cache, giving ``logits``
        (float32 [vocab]): label it, add it to the history and keep the logits for the next step."""
        self.cache.label_tokens([token])
        self.history.append(token)
        self.logits = logits

    def feed(self, model, token: int) -> None:
        """Run ``token`` through ``model.forward`` alone and :meth:`accept` it."""
        self.accept(token, model.forward([token], self.cache))


def generate_tokens(
    model,
    prompt_ids: Sequence[int],
    cache: KVCache,
    sampler: Callable[[np.ndarray], tuple[int, float]],
    *,
    logits_processors: Sequence[LogitsProcessor] = (),
    prefill_chunk: int = PREFILL_CHUNK,
    on_prefilled: Callable[[int], None] | None = None,
    sequence: TokenSequence | None = None,
) -> Iterator[tuple[int, float]]:
    """The token layer: yield ``(token_id, logprob)`` for each new token, without end.

    1. Reuse the longest cached prefix and prefill the rest, ``prefill_chunk`` tokens per forward
       pass (:meth:`TokenSequence.prefill`).
    2. Decode: processors, then the sampler, on the last logits; yield; feed the token back.

    Every position written to the cache is labelled with its token id, so the cache can be reused
    by a later call. The token just yielded is fed back only when the next one is asked for, so a
    caller that stops leaves the cache holding the prompt and every token but the last. The
    iterator ends by itself only when the cache is full.

    Args:
        model: ``forward(tokens, cache) -> logits`` float32 [vocab] for one sequence.
        prompt_ids, cache, sampler, logits_processors, prefill_chunk: see :class:`TokenSequence`
            (chunks change the logits only by float32 rounding: the products sum in another order).
        on_prefilled: called once, with the number of reused prompt tokens, when the whole prompt
            is in the cache (before the first token is sampled).
        sequence: a :class:`TokenSequence` to drive instead of a new one made from the arguments
            above (its caller then reads e.g. ``last_top_logprobs`` after each step).

    Yields:
        ``(token_id, logprob)``: Python int and float; ``logprob`` is the log-softmax of the
        processed logits at the token.

    Raises:
        ValueError: ``prefill_chunk`` < 1; the prompt does not fit the cache (from the model).
    """
    seq = sequence or TokenSequence(prompt_ids, cache, sampler, logits_processors, prefill_chunk)
    seq.prefill(model)
    if on_prefilled is not None:
        on_prefilled(seq.reused)
    while True:
        token, logprob = seq.sample()
        yield token, logprob
        if not seq.can_feed:  # no room to feed the token back
            return
        seq.feed(model, token)


class SequenceText:
    """The text layer's state for one sequence: sampled ids in, printable text and the finish
    reason out (see the module docstring for the reasons).

    Args:
        tokenizer: for the streaming detokenizer.
        prompt_tokens: the prompt's length. max_tokens: most tokens to generate; -1 = no limit
            but the context.
        capacity: the cache's capacity in tokens (prompt + generated may not exceed it).
        stop: stop strings. eos_ids: end-of-generation ids.

    Attributes:
        token_ids: the generated ids (an end-of-generation id is not one).
        text: the text so far (stop strings and held-back text excluded).
        finish_reason: None until the sequence ends.
        stop_string: the stop string that ended it (finish reason ``stop``), else None.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_tokens: int, max_tokens: int, capacity: int,
                 stop: Sequence[str], eos_ids: frozenset[int]):
        self.detok = tokenizer.detokenizer()
        self.stops = _StopStringFilter(stop)
        self.prompt_tokens, self.max_tokens, self.capacity = prompt_tokens, max_tokens, capacity
        self.eos_ids = eos_ids
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_string: str | None = None

    def push(self, token: int, logprob: float) -> GenerationStep:
        """Take the next sampled token; return its :class:`GenerationStep` (the last one carries the
        finish reason)."""
        reason = None
        if token in self.eos_ids:
            piece, reason = self.detok.finalize(), "eos"
        else:
            self.token_ids.append(token)
            piece = self.detok.add_token(token)
            if 0 <= self.max_tokens <= len(self.token_ids):
                piece, reason = piece + self.detok.finalize(), "length"
            elif self.prompt_tokens + len(self.token_ids) >= self.capacity:
                piece, reason = piece + self.detok.finalize(), "context"  # prompt + generated fill it
        out, hit = self.stops.push(piece)
        if hit:
            reason = "stop"
            self.stop_string = self.stops.matched
        elif reason is not None:
            out += self.stops.flush()
        self.text += out
        self.finish_reason = reason
        return GenerationStep(token, out, logprob, reason)


@dataclass
class Generation:
    """The text layer: a generation in progress. Iterate it for :class:`GenerationStep` s;
    ``token_ids``, ``text``, ``finish_reason`` and ``stats`` are kept current, so they are valid
    after an interruption too."""

    model: object
    tokenizer: Tokenizer
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop: Sequence[str]
    eos_ids: frozenset[int]
    cache: KVCache
    prefill_chunk: int = PREFILL_CHUNK
    top_logprobs: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_string: str | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)

    def __iter__(self) -> Iterator[GenerationStep]:
        cache, stats = self.cache, self.stats
        text = SequenceText(self.tokenizer, len(self.prompt_ids), self.max_tokens, cache.max_seq_len,
                            self.stop, self.eos_ids)
        text.token_ids = self.token_ids  # one list: this attribute stays current as tokens arrive
        stats.prompt_tokens = len(self.prompt_ids)
        stats.kv_bytes_per_token = cache.bytes_per_token
        stats.kv_cache_capacity_bytes = cache.nbytes
        stats.n_kv_heads = cache.n_kv_heads
        t0 = time.perf_counter()
        decode_start = None  # set once the prompt is in the cache

        def prefilled(reused: int) -> None:
            nonlocal decode_start
            decode_start = time.perf_counter()
            stats.reused_tokens = reused
            stats.prefill_seconds = decode_start - t0

        seq = TokenSequence(self.prompt_ids, cache, make_sampler(self.params), make_logits_processors(self.params),
                            self.prefill_chunk, self.top_logprobs)
        tokens = generate_tokens(self.model, self.prompt_ids, cache, seq.sampler, on_prefilled=prefilled,
                                 sequence=seq)
        try:
            for token, logprob in tokens:
                now = time.perf_counter()
                if not stats.first_token_seconds:
                    stats.first_token_seconds = now - t0
                stats.decode_seconds = now - decode_start
                step = text.push(token, logprob)
                step.top_logprobs = seq.last_top_logprobs if self.top_logprobs else None
                stats.generated_tokens = len(self.token_ids)
                self.text = text.text
                yield step
                if step.finish_reason is not None:
                    self.finish_reason = step.finish_reason
                    self.stop_string = text.stop_string
                    return
        finally:
            tokens.close()
            if decode_start is not None:
                stats.decode_seconds = time.perf_counter() - decode_start
            stats.kv_cache_bytes = cache.used_bytes
            stats.peak_rss_bytes = peak_rss_bytes()


def validate_generation(params: SamplingParams, max_tokens: int, ctx_size: int | None = None) -> None:
    """Check a generation's settings, as :func:`stream_generate` does before it starts.

    Raises:
        SamplingError: a sampling parameter out of range, ``max_tokens`` 0 or below -1 (-1 = no
            limit but the context), or ``ctx_size`` <= 0; ``field`` names the setting (``"top_p"``,
            ``"max_tokens"``, ``"ctx_size"``, …).
    """
    params.validate()
    if max_tokens <= 0 and max_tokens != -1:
        raise SamplingError("max_tokens", f"must be > 0 (or -1: until end of text or a full context), got {max_tokens}")
    if ctx_size is not None and ctx_size <= 0:
        raise SamplingError("ctx_size", f"must be > 0, got {ctx_size}")


def stream_generate(
    model,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    *,
    params: SamplingParams | None = None,
    max_tokens: int = 256,
    stop: Iterable[str] = (),
    eos_ids: Iterable[int] | None = None,
    ctx_size: int | None = None,
    cache_dtype: str = "f32",
    cache: KVCache | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
    top_logprobs: int = 0,
) -> Generation:
    """Start generating from ``prompt_ids`` (int token ids); iterate the result to run it.

    Args:
        model: an object with ``config``, ``forward(tokens, cache)`` and ``new_cache(n, dtype)``
            (e.g. :class:`~mqa_gen.models.llama.LlamaModel`).
        params: sampling parameters (validated here); default greedy.
        max_tokens: most tokens to generate (> 0), or -1: until end of text or a full context.
        stop: strings that end generation; no part of them is emitted.
        eos_ids: ids that end generation; default the tokenizer's EOS.
        ctx_size: context in tokens (prompt + generated, > 0); default the model's context length.
        cache_dtype: the type of a new cache (``"f32"``, ``"f16"``, ``"q8_0"``, ``"q4_0"``; aliases accepted).
        cache: a cache to use instead of a new one (its capacity is the context). If it holds
            tokens, the longest common prefix with the prompt is reused and the rest of it dropped
            (see the module docstring); it is updated in place as generation runs.
        prefill_chunk: prompt tokens per prefill pass (see :func:`generate_tokens`).
        top_logprobs: with N > 0, every step also carries the N most likely tokens and their
            logprobs (``GenerationStep.top_logprobs``), as OpenAI's ``top_logprobs``.

    Raises:
        PromptError: an empty prompt, or one that leaves no room in the context.
        SamplingError: invalid sampling parameters, ``max_tokens`` 0 or < -1, or ``ctx_size`` ≤ 0
            (see :func:`validate_generation`).
        ValueError: ``cache`` has other layer, KV-head or head-size dimensions than the model.
    """
    params = params or SamplingParams()
    validate_generation(params, max_tokens, ctx_size)
    prompt_ids = list(prompt_ids)
    if not prompt_ids:
        raise PromptError("the prompt is empty")
    if cache is None:
        ctx = ctx_size or model.config.context_length
        if len(prompt_ids) >= ctx:
            raise PromptError(
                f"the prompt has {len(prompt_ids)} tokens but the context is {ctx} tokens "
                "(raise --ctx-size or shorten the prompt)"
            )
        cache = model.new_cache(ctx, cache_dtype)
    else:
        c = model.config
        if (cache.n_layers, cache.n_kv_heads, cache.head_dim) != (c.n_layers, c.n_kv_heads, c.head_dim):
            raise ValueError(
                f"the cache has {cache.n_layers} layers × {cache.n_kv_heads} KV heads × {cache.head_dim}, "
                f"the model {c.n_layers} × {c.n_kv_heads} × {c.head_dim}"
            )
        if len(prompt_ids) >= cache.max_seq_len:
            raise PromptError(
                f"the prompt has {len(prompt_ids)} tokens but the context is {cache.max_seq_len} tokens "
                "(raise --ctx-size or shorten the prompt)"
            )
    if eos_ids is None:
        eos_ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    if top_logprobs < 0:
        raise SamplingError("logprobs", f"must be >= 0, got {top_logprobs}")
    return Generation(model, tokenizer, prompt_ids, params, max_tokens, list(stop), frozenset(eos_ids), cache,
                      prefill_chunk, top_logprobs)


def forward_logits(model, prompt_ids: Sequence[int]) -> np.ndarray:
    """Logits at every position of ``prompt_ids`` from one fresh forward pass: float32 [T, vocab]."""
    cache = model.new_cache(len(prompt_ids))
    return model.forward(prompt_ids, cache, all_logits=True)
