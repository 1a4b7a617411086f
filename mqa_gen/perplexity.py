"""Perplexity of a model on a text: one window of up to N tokens, mean negative log-likelihood, exp.

For token ids x₀ … x_{T-1} (the text's first T tokens, no BOS added):

    nll_i = −log p(x_{i+1} | x₀ … x_i)        i = 0 … T−2   (nats; log-softmax in float64)
    perplexity = exp(mean_i nll_i)

This is what ``scripts/make_fixtures.py`` computes with transformers for
``tests/fixtures/smollm2/perplexity.json`` (the oracle), so the two can be compared directly.
The window runs as one prefill through a fresh KV cache of the chosen dtype, so a float16 cache's
rounding shows in the result. ``mqa-gen bench-cache`` uses it to put a number on what mean-pooling
KV heads (Ainslie et al. 2023, §2.1) costs in quality.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MqaGenError

#: The text shipped with the package for perplexity (English prose, about 850 SmolLM2 tokens).
DEFAULT_TEXT = Path(__file__).parent / "data" / "ppl_english.txt"

#: Tokens in the default window (the oracle fixture uses the same).
DEFAULT_WINDOW = 512

#: Rows of logits turned into float64 at once (bounds the float64 copy to ~50 MB for a 49k vocab).
_CHUNK = 128


class PerplexityError(MqaGenError):
    """A text that cannot be scored: unreadable, or fewer than two tokens."""


@dataclass(frozen=True)
class Perplexity:
    """Result of one window: ``perplexity`` (exp of the mean NLL), ``mean_nll`` (nats per token),
    ``n_tokens`` (tokens in the window; n_tokens − 1 of them are predicted) and ``token_nll``
    (float64 [n_tokens − 1], nats)."""

    perplexity: float
    mean_nll: float
    n_tokens: int
    token_nll: np.ndarray


def token_nll(model, ids: Sequence[int], cache_dtype: str = "float32") -> np.ndarray:
    """−log p(ids[i+1] | ids[:i+1]) for i = 0 … T−2, from one forward pass: float64 [T−1], nats.

    model: anything with ``new_cache(max_seq_len, dtype)`` and ``forward(ids, cache, all_logits=True)``.
    cache_dtype: ``"float32"`` or ``"float16"`` (the cache the window's K/V rows go through).

    Raises:
        PerplexityError: fewer than two ids.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.shape[0] < 2:
        raise PerplexityError(f"perplexity needs at least 2 tokens, got {ids.shape[0]}")
    cache = model.new_cache(ids.shape[0], cache_dtype)
    logits = model.forward(ids, cache, all_logits=True)  # (T, vocab) float32
    targets = ids[1:]
    nll = np.empty(ids.shape[0] - 1, dtype=np.float64)
    for s in range(0, nll.shape[0], _CHUNK):
        rows = logits[s : s + _CHUNK].astype(np.float64)  # (≤ chunk, vocab), positions predicting s+1 …
        rows = rows[: nll.shape[0] - s]
        top = rows.max(axis=1)
        logz = np.log(np.exp(rows - top[:, None]).sum(axis=1)) + top  # log-sum-exp per row
        nll[s : s + rows.shape[0]] = logz - rows[np.arange(rows.shape[0]), targets[s : s + rows.shape[0]]]
    return nll


def perplexity(model, ids: Sequence[int], cache_dtype: str = "float32") -> Perplexity:
    """Perplexity of ``model`` on the token ids ``ids`` (one window; see the module docstring)."""
    nll = token_nll(model, ids, cache_dtype)
    mean = float(nll.mean())
    return Perplexity(float(np.exp(mean)), mean, len(ids), nll)


def window_ids(tokenizer, text: str, max_tokens: int = DEFAULT_WINDOW) -> list[int]:
    """The first ``max_tokens`` token ids of ``text`` (no BOS), as the oracle fixture takes them.

    Raises:
        PerplexityError: the window would hold fewer than two tokens.
    """
    ids = tokenizer.encode(text)[:max_tokens]
    if len(ids) < 2:
        raise PerplexityError(f"the perplexity text has {len(ids)} token(s); at least 2 are needed")
    return ids


def read_text(path: str | Path | None = None) -> str:
    """The text at ``path`` (UTF-8), or the shipped default text when ``path`` is None.

    Raises:
        PerplexityError: the file cannot be read or is not UTF-8.
    """
    path = DEFAULT_TEXT if path is None else Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PerplexityError(f"cannot read perplexity text {path}: {getattr(e, 'strerror', None) or e}") from None

