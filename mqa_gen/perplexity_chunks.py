"""Perplexity by llama-perplexity's method: a text cut into chunks, each scored on its second half.

The method of llama.cpp's ``tools/perplexity`` (its default, ``--ppl-stride 0``), which
``mqa-gen perplexity`` runs so that the two tools' figures can be compared:

1. The whole text is tokenised once, with BOS in front when the model adds one (its GGUF's
   ``tokenizer.ggml.add_bos_token``: Gemma 3 yes, SmolLM2 no). A text of fewer than 2 × ctx
   tokens is refused.
2. The tokens are cut into ``n = len(tokens) // ctx`` chunks of ``ctx`` tokens (the tail that does
   not fill a chunk is dropped; ``--chunks`` takes the first few). Where the model adds BOS, the
   first token of *every* chunk is replaced by BOS — the token it covers is not seen at all, as in
   llama-perplexity, which overwrites ``tokens[chunk start]`` before decoding.
3. Each chunk runs through the model from an **empty** KV cache (no context carried over), and
   only positions ``first = ctx // 2`` … ``ctx − 2`` are scored, each predicting the next token:
   ``ctx − 1 − first`` tokens per chunk (255 of 512), every one with at least half a chunk of
   context before it.
4. With ``nll = −log p(token | the chunk before it)`` (nats; log-softmax in float64) over all
   scored tokens so far: ``PPL = exp(mean nll)`` — reported after every chunk, the running value
   ``[1]…,[2]…,`` — and, at the end, its standard error by the delta method,
   ``PPL × sqrt((mean(nll²) − mean(nll)²) / (count − 1))``, exactly as llama-perplexity's
   ``Final estimate: PPL = x +/- y``.

One difference from llama-perplexity: special tokens written in the text (``<|im_start|>``) become
their single id here (the tokenizer's usual behaviour), where llama-perplexity tokenises them as
plain text. Plain prose holds none.

With ``top_k`` > 0, each scored position's distribution is also kept as its top-k log-probabilities
(:class:`~mqa_gen.kl_base.TopK`), for a later run to compare against (:mod:`mqa_gen.kl_base`:
mean KL divergence and top-token agreement, llama-perplexity's ``--kl-divergence``).

The one-window :func:`mqa_gen.perplexity.perplexity` (used by ``bench-cache`` and ``convert``)
stays as it is: it scores every token of one window, as the transformers oracle fixture does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .generate import PREFILL_CHUNK
from .kl_base import TopK, compare_rows, top_k_rows
from .linear import SMALL_BATCH
from .perplexity import PerplexityError

#: The held-out evaluation text shipped with the package: about 13 KB of English prose on twenty
#: unrelated subjects (2,819 SmolLM2 tokens, 2,754 Gemma 3 tokens: five chunks of 512). It was
#: written for this project and is original to it, under the project's Apache-2.0 licence. It is
#: not ``ppl_english.txt`` (the oracle fixtures' text) nor the calibration text of ``convert``.
EVAL_TEXT = Path(__file__).parent / "data" / "eval_english.txt"

#: Tokens per chunk by default (llama-perplexity's usual ``-c 512``).
DEFAULT_CTX = 512

#: The shortest chunk that scores a token: ctx − 1 − ctx // 2 ≥ 1.
MIN_CTX = 3

#: Scored positions run through the model this many at a time, their logits kept only for that
#: long: [64, vocab] float32 is 64 MiB for Gemma 3's 262,144-token vocabulary, where a whole
#: chunk's logits would be 512 MiB. Up to 64 rows every linear layer gives a row the same bits
#: whatever the other rows are (:data:`mqa_gen.linear.SMALL_BATCH`).
LOGIT_ROWS = SMALL_BATCH

#: Rows of logits turned into float64 log-probabilities at once (16 × 262,144 × 8 B = 32 MiB).
_SOFTMAX_ROWS = 16


@dataclass(frozen=True)
class ChunkPlan:
    """The chunks of a text, as llama-perplexity cuts them.

    Attributes:
        chunks: int64 [n_chunks, ctx] — token ids, BOS in column 0 where the model adds one.
        ctx: tokens per chunk.
        n_text_tokens: tokens in the whole text (BOS included where added).
        available: the chunks the text holds (``n_text_tokens // ctx``; ``n_chunks`` ≤ it).
    """

    chunks: np.ndarray
    ctx: int
    n_text_tokens: int
    available: int

    @property
    def n_chunks(self) -> int:
        return int(self.chunks.shape[0])

    @property
    def first(self) -> int:
        """The first scored position of each chunk (``ctx // 2``): it predicts token ``first + 1``."""
        return self.ctx // 2

    @property
    def scored_per_chunk(self) -> int:
        """Tokens scored per chunk: ``ctx − 1 − first``."""
        return self.ctx - 1 - self.first

    @property
    def n_scored(self) -> int:
        return self.n_chunks * self.scored_per_chunk

    def targets(self) -> np.ndarray:
        """int64 [n_chunks, scored_per_chunk]: the token each scored position predicts."""
        return self.chunks[:, self.first + 1 :]


def plan_chunks(ids: Sequence[int], ctx: int, n_chunks: int | None = None, bos_id: int | None = None) -> ChunkPlan:
    """Cut a text's token ids into chunks (steps 1–2 of the module docstring).

    Args:
        ids: the whole text's token ids, BOS first where the model adds one.
        ctx: tokens per chunk (≥ :data:`MIN_CTX`).
        n_chunks: how many chunks to keep from the start; None or -1 = all of them. More than the
            text holds keeps all of them (as llama-perplexity's ``--chunks``).
        bos_id: where the model adds BOS, its id: it replaces the first token of every chunk.

    Raises:
        PerplexityError: ``ctx`` < 3, ``n_chunks`` 0 or < -1, or fewer than 2 × ctx tokens.
    """
    if ctx < MIN_CTX:
        raise PerplexityError(f"--ctx must be at least {MIN_CTX} (a chunk scores the tokens after its first half), "
                              f"got {ctx}")
    if n_chunks is not None and (n_chunks == 0 or n_chunks < -1):
        raise PerplexityError(f"--chunks must be at least 1 (-1 = all), got {n_chunks}")
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.shape[0] < 2 * ctx:
        raise PerplexityError(f"the text has {ids.shape[0]:,} tokens; perplexity with --ctx {ctx} needs at least "
                              f"{2 * ctx:,} (two chunks): use a longer text or a smaller --ctx")
    available = ids.shape[0] // ctx
    n = available if n_chunks in (None, -1) else min(n_chunks, available)
    chunks = ids[: n * ctx].reshape(n, ctx).copy()
    if bos_id is not None:
        chunks[:, 0] = bos_id
    return ChunkPlan(chunks, ctx, int(ids.shape[0]), available)


def plan_text(tokenizer, text: str, ctx: int, n_chunks: int | None = None) -> ChunkPlan:
    """:func:`plan_chunks` of ``text`` tokenised by ``tokenizer`` (BOS first, and first in every
    chunk, when the tokenizer's model adds one).

    Raises:
        PerplexityError: as :func:`plan_chunks`; also an empty text.
    """
    if not text:
        raise PerplexityError("the text is empty")
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    return plan_chunks(tokenizer.encode(text), ctx, n_chunks, bos)


@dataclass
class ChunkScore:
    """What one chunk's scored positions gave.

    Attributes:
        nll: float64 [scored_per_chunk] — −log p(target), nats.
        top: the top-k distributions (:class:`~mqa_gen.kl_base.TopK`) when asked, else None.
        kl: float64 [scored_per_chunk] — KL(base ‖ model) per position when compared, else None.
        same_top: bool [scored_per_chunk] — the model's most likely token is the base's, or None.
    """

    nll: np.ndarray
    top: TopK | None = None
    kl: np.ndarray | None = None
    same_top: np.ndarray | None = None


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 [r, vocab] → float64 [r, vocab] log-probabilities."""
    rows = logits.astype(np.float64)
    top = rows.max(axis=1, keepdims=True)
    rows -= top
    rows -= np.log(np.exp(rows).sum(axis=1, keepdims=True))
    return rows


def score_chunk(model, chunk: np.ndarray, first: int, cache_dtype: str = "float32", *, top_k: int = 0,
                base: TopK | None = None) -> ChunkScore:
    """Run one chunk from an empty KV cache and score positions ``first`` … ``ctx − 2``.

    Args:
        model: a :class:`~mqa_gen.models.base.Decoder` (``new_cache``, ``forward``).
        chunk: int [ctx] token ids.
        first: the first scored position (ctx // 2).
        cache_dtype: the KV-cache storage name the chunk's K/V rows go through.
        top_k: keep each position's top-k log-probabilities (0 = no).
        base: a reference's distributions for these positions (``ctx − 1 − first`` rows), to
            compare against (:func:`mqa_gen.kl_base.compare_rows`).

    Returns:
        A :class:`ChunkScore`.

    The first ``first`` tokens are prefilled in pieces of :data:`~mqa_gen.generate.PREFILL_CHUNK`
    without logits; the rest in pieces of :data:`LOGIT_ROWS` with the logits of every row.
    """
    chunk = np.asarray(chunk, dtype=np.int64).reshape(-1)
    ctx = chunk.shape[0]
    n = ctx - 1 - first
    cache = model.new_cache(ctx, cache_dtype)
    for start in range(0, first, PREFILL_CHUNK):
        model.forward(chunk[start : min(start + PREFILL_CHUNK, first)], cache)
    nll = np.empty(n, dtype=np.float64)
    tops, kls, sames = [], [], []
    for start in range(first, ctx - 1, LOGIT_ROWS):
        stop = min(start + LOGIT_ROWS, ctx - 1)  # the last token is never input: it predicts nothing scored
        logits = model.forward(chunk[start:stop], cache, all_logits=True)  # (rows, vocab) float32
        for s in range(0, stop - start, _SOFTMAX_ROWS):
            logp = _log_softmax(logits[s : s + _SOFTMAX_ROWS])  # (r, vocab) float64
            r = logp.shape[0]
            at = start - first + s  # index of this block among the chunk's scored positions
            targets = chunk[start + s + 1 : start + s + 1 + r]
            nll[at : at + r] = -logp[np.arange(r), targets]
            if top_k:
                tops.append(top_k_rows(logp, top_k, nll[at : at + r]))
            if base is not None:
                kl, same = compare_rows(base.rows(at, at + r), logp)
                kls.append(kl)
                sames.append(same)
    return ChunkScore(
        nll,
        TopK.concatenate(tops) if top_k else None,
        np.concatenate(kls) if base is not None else None,
        np.concatenate(sames) if base is not None else None,
    )


def mean_and_stderr(total: float, total_sq: float, count: int) -> tuple[float, float]:
    """Mean of ``count`` values from their sum and sum of squares, and the standard error of that
    mean, ``sqrt((mean(x²) − mean²) / (count − 1))`` (0 when that is not positive or count < 2),
    as llama-perplexity computes it."""
    if count < 1:
        return float("nan"), float("nan")
    mean = total / count
    var = total_sq / count - mean * mean
    return mean, (float(np.sqrt(var / (count - 1))) if var > 0 and count > 1 else 0.0)


@dataclass
class KLStats:
    """Comparison against a base run (llama-perplexity's ``--kl-divergence``), over all scored
    positions: ``mean_kl`` ± ``kl_stderr`` (nats), ``same_top`` ± ``same_top_stderr`` (fractions of
    positions where both put the same token first), ``base_perplexity`` ± ``base_stderr`` (the
    base's own PPL on the same tokens, from the file)."""

    mean_kl: float
    kl_stderr: float
    same_top: float
    same_top_stderr: float
    base_perplexity: float
    base_stderr: float
    top_k: int


@dataclass
class ChunkedPerplexity:
    """The result of :func:`chunked_perplexity`.

    Attributes:
        perplexity, stderr: the final estimate and its standard error.
        mean_nll: nats per scored token.
        running: the running PPL after each chunk (the ``[i]…`` values).
        token_nll: float64 [n_chunks, scored_per_chunk].
        plan: the :class:`ChunkPlan`.
        seconds: wall time of the scoring.
        top: the top-k distributions of every scored position (chunks in order), when asked.
        kl: the comparison against a base, when one was given.
    """

    perplexity: float
    stderr: float
    mean_nll: float
    running: list[float]
    token_nll: np.ndarray
    plan: ChunkPlan
    seconds: float
    top: TopK | None = None
    kl: KLStats | None = None
    chunk_seconds: list[float] = field(default_factory=list)


def ppl_and_stderr(nll: np.ndarray) -> tuple[float, float, float]:
    """(PPL, its standard error, mean nll) of scored nll values (float64, nats): step 4 of the
    module docstring."""
    nll = np.asarray(nll, dtype=np.float64).reshape(-1)
    mean, se = mean_and_stderr(float(nll.sum()), float((nll * nll).sum()), nll.shape[0])
    ppl = float(np.exp(mean))
    return ppl, ppl * se, mean


def chunked_perplexity(model, plan: ChunkPlan, cache_dtype: str = "float32", *, top_k: int = 0,
                       base: TopK | None = None,
                       on_chunk: Callable[[int, float], None] | None = None) -> ChunkedPerplexity:
    """Score every chunk of ``plan`` (:func:`score_chunk`) and combine them (the module docstring).

    Args:
        model: the model to score (after any KV-head regrouping).
        plan: :func:`plan_chunks` / :func:`plan_text`.
        cache_dtype: KV-cache storage name.
        top_k: keep every scored position's top-k log-probabilities (for a KL base), 0 = no.
        base: a reference's distributions for all ``plan.n_scored`` positions, to compare against.
        on_chunk: called after each chunk with (chunk number from 1, running PPL).

    Raises:
        ValueError: ``base`` does not hold ``plan.n_scored`` positions.
    """
    if base is not None and base.n_positions != plan.n_scored:
        raise ValueError(f"the base holds {base.n_positions} positions, the plan scores {plan.n_scored}")
    s = plan.scored_per_chunk
    token_nll = np.empty((plan.n_chunks, s), dtype=np.float64)
    running, tops, kls, sames, chunk_seconds = [], [], [], [], []
    t0 = time.perf_counter()
    total = 0.0
    for i in range(plan.n_chunks):
        t = time.perf_counter()
        score = score_chunk(model, plan.chunks[i], plan.first, cache_dtype, top_k=top_k,
                            base=None if base is None else base.rows(i * s, (i + 1) * s))
        chunk_seconds.append(time.perf_counter() - t)
        token_nll[i] = score.nll
        total += float(score.nll.sum())
        running.append(float(np.exp(total / ((i + 1) * s))))
        if score.top is not None:
            tops.append(score.top)
        if score.kl is not None:
            kls.append(score.kl)
            sames.append(score.same_top)
        if on_chunk is not None:
            on_chunk(i + 1, running[-1])
    ppl, se, mean = ppl_and_stderr(token_nll)
    kl = None
    if base is not None:
        kl = _kl_stats(np.concatenate(kls), np.concatenate(sames), base)
    return ChunkedPerplexity(ppl, se, mean, running, token_nll, plan, time.perf_counter() - t0,
                             TopK.concatenate(tops) if top_k else None, kl, chunk_seconds)


def _kl_stats(kl: np.ndarray, same: np.ndarray, base: TopK) -> KLStats:
    count = kl.shape[0]
    mean_kl, kl_se = mean_and_stderr(float(kl.sum()), float((kl * kl).sum()), count)
    p = float(same.mean())
    p_se = float(np.sqrt(p * (1 - p) / (count - 1))) if count > 1 else 0.0
    base_ppl, base_se, _ = ppl_and_stderr(base.nll)
    return KLStats(mean_kl, kl_se, p, p_se, base_ppl, base_se, base.k)
