"""Perplexity of one window, and how far its next-token distributions moved from a reference's.

bench-cache's study of KV-cache shrinking (MQA / GQA regrouping × cache element types) needs, for
every variant, the perplexity of the perplexity window (:mod:`mqa_gen.perplexity`'s method: one
forward pass from an empty cache over the first T tokens of a text) and its distance from the
native model with an f32 cache on the same positions:

* **KL divergence** KL(reference ‖ variant) per position, over the whole vocabulary (both
  distributions are in memory here, unlike :mod:`mqa_gen.kl_base`, which keeps only a top-k of
  the reference on disk), averaged over the T − 1 positions, in nats;
* **top-1 agreement**: the fraction of positions whose most likely next token is the reference's.

These are llama-perplexity's ``--kl-divergence`` "Mean KLD" and "Same top p" on one window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .perplexity import PerplexityError

#: Rows turned into float64 log-probabilities at once (bounds the temporary memory: rows × vocab × 8 B).
_ROWS = 64


@dataclass
class WindowScore:
    """perplexity: exp(mean nll). mean_nll: nats. n_tokens: window length T (tokens).
    kl_mean: mean KL(reference ‖ model) in nats over T − 1 positions (None without a reference).
    top1_agreement: fraction in [0, 1] of positions with the reference's top token (None without one)."""

    perplexity: float
    mean_nll: float
    n_tokens: int
    kl_mean: float | None = None
    top1_agreement: float | None = None


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    """float32 [r, vocab] → float64 [r, vocab] log-probabilities."""
    x = rows.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


def window_logits(model, ids: Sequence[int], cache_dtype: str = "f32") -> np.ndarray:
    """Logits of every position of one window from an empty cache: float32 [T, vocab].

    model: a :class:`~mqa_gen.models.base.Decoder` (``new_cache``, ``forward(..., all_logits=True)``).

    Raises:
        PerplexityError: fewer than two ids.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.shape[0] < 2:
        raise PerplexityError(f"perplexity needs at least 2 tokens, got {ids.shape[0]}")
    cache = model.new_cache(ids.shape[0], cache_dtype)
    return np.asarray(model.forward(ids, cache, all_logits=True))


def score_window(logits: np.ndarray, ids: Sequence[int], reference: np.ndarray | None = None) -> WindowScore:
    """Perplexity of ``logits`` (float32 [T, vocab], from :func:`window_logits`) on ``ids`` (int [T]),
    and, given ``reference`` logits of the same shape, the mean full-vocabulary KL(reference ‖ model)
    and the top-1 agreement over positions 0 … T − 2 (the ones that predict a token of the window).

    Raises:
        ValueError: shapes that do not match.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    n = ids.shape[0] - 1
    if logits.shape[0] != ids.shape[0] or (reference is not None and reference.shape != logits.shape):
        raise ValueError(f"logits {logits.shape}, reference {None if reference is None else reference.shape} "
                         f"and {ids.shape[0]} ids do not match")
    nll = np.empty(n, dtype=np.float64)
    kl = np.empty(n, dtype=np.float64)
    same = np.empty(n, dtype=bool)
    for s in range(0, n, _ROWS):
        e = min(s + _ROWS, n)
        logq = _log_softmax(logits[s:e])
        nll[s:e] = -logq[np.arange(e - s), ids[s + 1 : e + 1]]
        if reference is not None:
            logp = _log_softmax(reference[s:e])
            kl[s:e] = (np.exp(logp) * (logp - logq)).sum(axis=1)
            same[s:e] = logq.argmax(axis=1) == logp.argmax(axis=1)
    mean = float(nll.mean())
    if reference is None:
        return WindowScore(float(np.exp(mean)), mean, n + 1)
    return WindowScore(float(np.exp(mean)), mean, n + 1, float(kl.mean()), float(same.mean()))
