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
* ``length``  — ``max_tokens`` tokens were generated;
* ``stop``    — a stop string appeared (no part of it is yielded);
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
from .errors import PromptError, SamplingError
from .sampling import (
    LogitsProcessor,
    SamplingParams,
    apply_logits_processors,
    make_logits_processors,
    make_sampler,
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
    its ``logprob`` (natural log) and, on the last step, the ``finish_reason``."""

    token_id: int
    text: str
    logprob: float
    finish_reason: str | None = None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


class _StopStringFilter:
    """Holds back text that might be the start of a stop string; reports the first stop found."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to print now, whether a stop string was hit)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
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


def generate_tokens(
    model,
    prompt_ids: Sequence[int],
    cache: KVCache,
    sampler: Callable[[np.ndarray], tuple[int, float]],
    *,
    logits_processors: Sequence[LogitsProcessor] = (),
    prefill_chunk: int = PREFILL_CHUNK,
    on_prefilled: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, float]]:
    """The token layer: yield ``(token_id, logprob)`` for each new token, without end.

    1. Reuse: keep the longest common prefix of ``cache`` and the prompt, but leave at least one
       prompt token to prefill (its logits choose the first token); keep nothing when a
       sliding-window ring can no longer go back that far (:meth:`~mqa_gen.cache.KVCache.can_truncate`).
    2. Prefill the rest of the prompt, ``prefill_chunk`` tokens per forward pass.
    3. Decode: processors, then the sampler, on the last logits; yield; feed the token back.

    Every position written to the cache is labelled with its token id, so the cache can be reused
    (step 1) by a later call. The token just yielded is fed back only when the next one is asked
    for, so a caller that stops leaves the cache holding the prompt and every token but the last.
    The iterator ends by itself only when the cache is full.

    Args:
        model: ``forward(tokens, cache) -> logits`` float32 [vocab] for one sequence.
        prompt_ids: the prompt's token ids (at least one, fewer than the cache's capacity).
        cache: the sequence's KV cache; updated in place.
        sampler: ``sampler(logits [vocab]) -> (token_id, logprob)`` (:func:`~mqa_gen.sampling.make_sampler`).
        logits_processors: each ``(history, logits) -> logits``, run in order before the sampler;
            ``history`` is the prompt and the tokens generated so far (int list, oldest first).
        prefill_chunk: prompt tokens per prefill pass (> 0). Chunks change the logits only by
            float32 rounding (the products sum in another order).
        on_prefilled: called once, with the number of reused prompt tokens, when the whole prompt
            is in the cache (before the first token is sampled).

    Yields:
        ``(token_id, logprob)``: Python int and float; ``logprob`` is the log-softmax of the
        processed logits at the token.

    Raises:
        ValueError: ``prefill_chunk`` < 1; the prompt does not fit the cache (from the model).
    """
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    history = list(prompt_ids)
    reused = min(cache.common_prefix(history), len(history) - 1)
    if not cache.can_truncate(reused):
        reused = 0
    cache.truncate(reused)
    for start in range(reused, len(history), prefill_chunk):
        chunk = history[start : start + prefill_chunk]
        logits = model.forward(chunk, cache)
        cache.label_tokens(chunk)
    if on_prefilled is not None:
        on_prefilled(reused)
    while True:
        token, logprob = sampler(apply_logits_processors(logits_processors, history, logits))
        yield token, logprob
        if cache.length >= cache.max_seq_len:  # no room to feed the token back
            return
        history.append(token)
        logits = model.forward([token], cache)
        cache.label_tokens([token])


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
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)

    def __iter__(self) -> Iterator[GenerationStep]:
        detok = self.tokenizer.detokenizer()
        stops = _StopStringFilter(self.stop)
        cache, stats = self.cache, self.stats
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

        tokens = generate_tokens(self.model, self.prompt_ids, cache, make_sampler(self.params),
                                 logits_processors=make_logits_processors(self.params),
                                 prefill_chunk=self.prefill_chunk, on_prefilled=prefilled)
        try:
            for token, logprob in tokens:
                now = time.perf_counter()
                if not stats.first_token_seconds:
                    stats.first_token_seconds = now - t0
                stats.decode_seconds = now - decode_start
                reason = None
                if token in self.eos_ids:
                    piece, reason = detok.finalize(), "eos"
                else:
                    self.token_ids.append(token)
                    piece = detok.add_token(token)
                    stats.generated_tokens = len(self.token_ids)
                    if len(self.token_ids) >= self.max_tokens:
                        piece, reason = piece + detok.finalize(), "length"
                    elif len(self.prompt_ids) + len(self.token_ids) >= cache.max_seq_len:
                        piece, reason = piece + detok.finalize(), "context"  # prompt + generated fill it
                out, hit = stops.push(piece)
                if hit:
                    reason = "stop"
                elif reason is not None:
                    out += stops.flush()
                self.text += out
                if reason is not None:
                    self.finish_reason = reason
                    yield GenerationStep(token, out, logprob, reason)
                    return
                yield GenerationStep(token, out, logprob)
        finally:
            tokens.close()
            if decode_start is not None:
                stats.decode_seconds = time.perf_counter() - decode_start
            stats.kv_cache_bytes = cache.used_bytes
            stats.peak_rss_bytes = peak_rss_bytes()


def validate_generation(params: SamplingParams, max_tokens: int, ctx_size: int | None = None) -> None:
    """Check a generation's settings, as :func:`stream_generate` does before it starts.

    Raises:
        SamplingError: a sampling parameter out of range, ``max_tokens`` <= 0 or ``ctx_size`` <= 0;
            ``field`` names the setting (``"top_p"``, ``"max_tokens"``, ``"ctx_size"``, …).
    """
    params.validate()
    if max_tokens <= 0:
        raise SamplingError("max_tokens", f"must be > 0, got {max_tokens}")
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
    cache_dtype: str = "float32",
    cache: KVCache | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
) -> Generation:
    """Start generating from ``prompt_ids`` (int token ids); iterate the result to run it.

    Args:
        model: an object with ``config``, ``forward(tokens, cache)`` and ``new_cache(n, dtype)``
            (e.g. :class:`~mqa_gen.models.llama.LlamaModel`).
        params: sampling parameters (validated here); default greedy.
        max_tokens: most tokens to generate (> 0).
        stop: strings that end generation; no part of them is emitted.
        eos_ids: ids that end generation; default the tokenizer's EOS.
        ctx_size: context in tokens (prompt + generated, > 0); default the model's context length.
        cache_dtype: ``"float32"`` or ``"float16"`` for a new cache.
        cache: a cache to use instead of a new one (its capacity is the context). If it holds
            tokens, the longest common prefix with the prompt is reused and the rest of it dropped
            (see the module docstring); it is updated in place as generation runs.
        prefill_chunk: prompt tokens per prefill pass (see :func:`generate_tokens`).

    Raises:
        PromptError: an empty prompt, or one that leaves no room in the context.
        SamplingError: invalid sampling parameters, ``max_tokens`` ≤ 0 or ``ctx_size`` ≤ 0
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
    return Generation(model, tokenizer, prompt_ids, params, max_tokens, list(stop), frozenset(eos_ids), cache,
                      prefill_chunk)


def forward_logits(model, prompt_ids: Sequence[int]) -> np.ndarray:
    """Logits at every position of ``prompt_ids`` from one fresh forward pass: float32 [T, vocab]."""
    cache = model.new_cache(len(prompt_ids))
    return model.forward(prompt_ids, cache, all_logits=True)
