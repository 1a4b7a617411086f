"""Choosing the next token from a vector of logits: logits processors, then the sampler.

The token layer (:func:`~mqa_gen.generate.generate_tokens`) takes the model's logits for the last
position (a float32 array of shape ``[vocab]``), runs them through the *logits processors* — each a
function ``(history, logits) -> logits`` that may look at the token ids seen so far — and hands the
result to the *sampler*, which returns one token id and its log-probability. Everything here is
plain NumPy on one vector, cheap next to the model's forward pass.

The chain, in the order it runs::

    logits [vocab] float32, history
      │ 0. suppressed tokens    apply_suppress_tokens      logits processor (make_logits_processors)
      │ 1. repetition penalty   apply_repetition_penalty   logits processor (make_logits_processors)
      ├──────────────────────── the sampler (make_sampler) from here on; it sees no history
      │                         ── temperature 0 stops here: argmax, no randomness ──
      │ 2. temperature          apply_temperature          logits / T
      │ 3. top-k                apply_top_k                keep the k best
      │ 4. top-p                apply_top_p                keep the smallest nucleus with mass >= p
      │ 5. min-p                apply_min_p                keep p_i >= min_p * p_max
      ▼ 6. draw                 draw                       one uniform number, seeded Generator

Every filter (steps 2-5) takes and returns *unnormalised log-weights*: a float64 ``[vocab]`` array
in which ``-inf`` marks a token that can no longer be drawn. Each filter renormalises over the
tokens still alive when it needs probabilities (top-p does), so a later filter sees the distribution
the earlier ones left. Each function validates its own argument and raises
:class:`~mqa_gen.errors.SamplingError` (its ``field`` names the parameter); a filter whose argument
means "off" returns its input unchanged. :func:`make_logits_processors` and :func:`make_sampler`
validate a whole :class:`SamplingParams` once and build only the steps that are on;
:func:`filtered_probs` is the whole chain without the draw, a pure function that tests and callers
can inspect. The sampler and :func:`filtered_probs` drop the removed tokens after each filter (the
filters work on arrays of any length), so after top-k everything else runs on k entries: top-k is a
partition, never a sort of the vocabulary, and top-p sorts only the tokens still alive.

Conventions worth knowing:

* Ties are kept. Top-k keeps every token whose logit equals the k-th best, top-p every token tied
  with the last token of the nucleus, min-p 1.0 every token tied with the best. So the result does
  not depend on token order, and a filter may keep more than k tokens when logits tie. Greedy
  (temperature 0) breaks ties towards the lowest token id, like ``numpy.argmax``.
* The reported log-probability is the log-softmax of the sampler's input — the *processed*
  (penalised) logits — before temperature and filtering: what the model (with the penalty) thinks
  of the token, the number perplexity and ``--json`` output want.
* Every non-greedy step consumes exactly one number from the Generator, however many tokens survive
  the filters; the same seed, parameters and logits give the same tokens.
* Logits with NaN or ``+inf``, or with no finite entry, raise ``ValueError`` here, not
  ``SamplingError`` (they are no sampling setting's fault). ``-inf`` entries are fine and are
  never drawn. The generation loop checks the model's logits before they get here and reports
  non-finite ones as :class:`~mqa_gen.errors.NumericalError` (a damaged model file or prompt
  cache; :meth:`mqa_gen.generate.TokenSequence.check_logits`).

Sources: top-k, Fan et al. 2018, "Hierarchical Neural Story Generation" (arXiv:1805.04833); top-p
(nucleus), Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration" (arXiv:1904.09751);
min-p, Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling for Creative and Coherent LLM
Outputs" (arXiv:2407.01082); repetition penalty, Keskar et al. 2019, "CTRL: A Conditional
Transformer Language Model for Controllable Generation" (arXiv:1909.05858), in the sign-aware form
that llama.cpp and Hugging Face transformers use. The shape of the module (small functions plus
factories for the processors and the sampler) follows mlx-lm's ``sample_utils.py``.
"""

from __future__ import annotations

import math
import numbers
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mqa_gen.errors import SamplingError

__all__ = [
    "SamplingParams",
    "LogitsProcessor",
    "Sampler",
    "make_logits_processors",
    "apply_logits_processors",
    "make_repetition_penalty",
    "apply_suppress_tokens",
    "draw_seed",
    "make_sampler",
    "filtered_probs",
    "apply_repetition_penalty",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "apply_min_p",
    "draw",
    "log_softmax",
    "softmax",
]

NEG_INF = -np.inf

# A filter maps log-weights [vocab] float64 to log-weights [vocab] float64.
Filter = Callable[[np.ndarray], np.ndarray]

#: A logits processor maps (history: token ids so far, oldest first; logits [vocab] float) to new
#: logits [vocab] of the same dtype, without modifying its input.
LogitsProcessor = Callable[[Sequence[int], np.ndarray], np.ndarray]


# ---------------------------------------------------------------------------------------------
# Argument checks: one per parameter, shared by SamplingParams.validate and the functions below.
# Messages are one line: the parameter (SamplingError.field), the valid range, the value given.
# ---------------------------------------------------------------------------------------------

def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_temperature(temperature: float) -> None:
    if not _is_real(temperature) or not (0.0 <= temperature < math.inf):
        raise SamplingError("temperature", f"must be a finite number >= 0 (0 = greedy), got {temperature!r}")


def _check_top_k(top_k: int) -> None:
    if not _is_int(top_k):
        raise SamplingError("top_k", f"must be an integer (<= 0 = off), got {top_k!r}")


def _check_top_p(top_p: float) -> None:
    if not _is_real(top_p) or not (0.0 <= top_p <= 1.0):
        raise SamplingError("top_p", f"must be in [0, 1] (1 = off), got {top_p!r}")


def _check_min_p(min_p: float) -> None:
    if not _is_real(min_p) or not (0.0 <= min_p <= 1.0):
        raise SamplingError("min_p", f"must be in [0, 1] (0 = off), got {min_p!r}")


def _check_repetition_penalty(penalty: float) -> None:
    if not _is_real(penalty) or not (0.0 < penalty < math.inf):
        raise SamplingError("repetition_penalty", f"must be a finite number > 0 (1 = off), got {penalty!r}")


def _check_repeat_last_n(last_n: int) -> None:
    if not _is_int(last_n) or last_n < -1:
        raise SamplingError(
            "repeat_last_n", f"must be an integer >= -1 (0 = off, -1 = whole history), got {last_n!r}"
        )


def _check_seed(seed: int | None) -> None:
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise SamplingError("seed", f"must be an integer >= 0 or None, got {seed!r}")


def _check_suppress_ids(ids: frozenset[int]) -> None:
    if not isinstance(ids, (frozenset, set)) or not all(_is_int(i) and i >= 0 for i in ids):
        raise SamplingError("suppress_ids", f"must be a set of token ids >= 0, got {ids!r}")


def draw_seed() -> int:
    """A fresh random seed in ``[0, 2**32)`` from the operating system's entropy, for a run asked
    to be random (``--seed -1`` or no seed, as llama.cpp's default): the caller reports it, so the
    run can be repeated exactly by passing it back as the seed."""
    return secrets.randbits(32)


def _check_logits(logits: np.ndarray) -> np.ndarray:
    """``logits`` as a 1-D float array; ValueError for shapes or values no model should give."""
    x = np.asarray(logits)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"logits must be a non-empty 1-D array [vocab], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    top = x.max()  # one pass: NaN propagates, +inf or an all -inf vector shows here too
    if not np.isfinite(top):
        if np.isnan(top):
            raise ValueError("logits contain NaN")
        if top > 0:
            raise ValueError("logits contain +inf")
        raise ValueError("logits have no finite entry: every token is masked")
    return x


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingParams:
    """Everything that decides how the next token is chosen; check it with :meth:`validate`.

    Attributes:
        temperature: divides the logits; ``0`` = greedy (argmax, no randomness). Finite, >= 0.
        top_k: keep the ``top_k`` best tokens; ``<= 0`` = off (so is ``>= vocab``).
        top_p: nucleus mass in [0, 1]; ``>= 1`` = off; ``0`` (or tiny) keeps only the best token.
        min_p: in [0, 1]; keep tokens with ``p >= min_p * p_max``; ``0`` = off.
        repetition_penalty: > 0; ``1`` = off; > 1 discourages repeats, < 1 encourages them.
        repeat_last_n: how many of the most recent tokens the penalty looks at; ``0`` = off,
            ``-1`` = the whole history.
        seed: seeds the ``numpy.random.Generator``; ``None`` = fresh entropy each run (front ends
            that report the seed draw one with :func:`draw_seed` instead).
        suppress_ids: token ids that can never be drawn (their logits become ``-inf`` before
            anything else runs), as llama.cpp's ``--ignore-eos`` biases its end-of-generation ids;
            empty = off.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    suppress_ids: frozenset[int] = frozenset()

    def validate(self) -> None:
        """Check every field.

        Raises:
            SamplingError: the first field out of its range; ``field`` names it, the one-line
                message gives its valid range.
        """
        _check_temperature(self.temperature)
        _check_top_k(self.top_k)
        _check_top_p(self.top_p)
        _check_min_p(self.min_p)
        _check_repetition_penalty(self.repetition_penalty)
        _check_repeat_last_n(self.repeat_last_n)
        _check_seed(self.seed)
        _check_suppress_ids(self.suppress_ids)

    @property
    def greedy(self) -> bool:
        """True when the chain ends in argmax (temperature 0)."""
        return self.temperature == 0


# ---------------------------------------------------------------------------------------------
# Softmax helpers (float64, -inf safe)
# ---------------------------------------------------------------------------------------------

def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-softmax of a 1-D array, in float64.

    Args:
        x: ``[vocab]`` logits or log-weights, ``-inf`` allowed, at least one finite.

    Returns:
        ``[vocab]`` float64 log-probabilities; ``-inf`` where ``x`` is ``-inf``. Never NaN.
    """
    x = np.asarray(x, dtype=np.float64)
    shifted = x - x.max()  # <= 0, -inf stays -inf; the max is finite so no inf - inf
    return shifted - math.log(np.exp(shifted).sum())  # the sum is >= 1


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax of a 1-D array, in float64.

    Args:
        x: ``[vocab]`` logits or log-weights, ``-inf`` allowed, at least one finite.

    Returns:
        ``[vocab]`` float64 probabilities summing to 1; exactly 0 where ``x`` is ``-inf``.
    """
    e = np.exp(np.asarray(x, dtype=np.float64) - np.max(x))
    return e / e.sum()


# ---------------------------------------------------------------------------------------------
# 1. Logits processors: repetition penalty
# ---------------------------------------------------------------------------------------------

def apply_repetition_penalty(
    logits: np.ndarray, history: Sequence[int], penalty: float, last_n: int
) -> np.ndarray:
    """Penalise tokens that occur among the last ``last_n`` tokens of ``history``.

    A penalised positive logit is divided by ``penalty``, a negative one multiplied by it, so with
    ``penalty > 1`` the token's probability drops whatever the sign of its logit (a zero logit stays
    zero). Each distinct token is penalised once, however often it occurs in the window. Source:
    Keskar et al. 2019 (CTRL, arXiv:1909.05858); the sign-aware form is llama.cpp's and
    transformers' ``RepetitionPenaltyLogitsProcessor``.

    Args:
        logits: ``[vocab]`` float array (float32 from the model); not modified.
        history: token ids seen so far (prompt and generated), oldest first; a list, tuple or
            integer array.
        penalty: > 0; ``1`` = off.
        last_n: window of most recent tokens; ``0`` = off, ``-1`` = the whole history.

    Returns:
        A new ``[vocab]`` array of the same dtype as ``logits``.

    Raises:
        SamplingError: ``penalty`` <= 0 or not finite, ``last_n`` < -1 or not an integer.
        ValueError: a history id outside ``[0, vocab)`` or not an integer.
    """
    _check_repetition_penalty(penalty)
    _check_repeat_last_n(last_n)
    out = np.array(logits, copy=True)
    if penalty == 1 or last_n == 0 or len(history) == 0:
        return out
    if last_n > 0:
        try:  # slice before converting: the history may be the whole context
            history = history[-last_n:]
        except TypeError:  # a Sequence without slicing, e.g. a deque
            history = list(history)[-last_n:]
    window = np.asarray(history)
    if not np.issubdtype(window.dtype, np.integer):
        raise ValueError(f"history must hold integer token ids, got dtype {window.dtype}")
    ids = np.unique(window)  # each distinct token once
    if ids[0] < 0 or ids[-1] >= out.shape[-1]:
        raise ValueError(f"history holds token ids outside [0, {out.shape[-1]})")
    seen = out[ids]
    out[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return out


def make_repetition_penalty(penalty: float, last_n: int) -> LogitsProcessor:
    """The repetition penalty as a logits processor: ``(history, logits) ->``
    :func:`apply_repetition_penalty` ``(logits, history, penalty, last_n)``.

    Raises:
        SamplingError: ``penalty`` <= 0 or not finite, ``last_n`` < -1 or not an integer.
    """
    _check_repetition_penalty(penalty)
    _check_repeat_last_n(last_n)

    def repetition_penalty(history: Sequence[int], logits: np.ndarray) -> np.ndarray:
        return apply_repetition_penalty(logits, history, penalty, last_n)

    return repetition_penalty


def apply_suppress_tokens(logits: np.ndarray, ids: frozenset[int]) -> np.ndarray:
    """``logits`` with the entries of ``ids`` set to ``-inf``, so they are never drawn.

    Args:
        logits: ``[vocab]`` float array; not modified. ids: token ids in ``[0, vocab)``.

    Returns:
        A new ``[vocab]`` array of the same dtype (``logits`` itself when ``ids`` is empty).

    Raises:
        ValueError: an id outside ``[0, vocab)``.
    """
    if not ids:
        return logits
    index = np.fromiter(ids, dtype=np.int64, count=len(ids))
    if index.min() < 0 or index.max() >= logits.shape[-1]:
        raise ValueError(f"suppressed token ids outside [0, {logits.shape[-1]})")
    out = np.array(logits, copy=True)
    out[index] = NEG_INF
    return out


def make_logits_processors(params: SamplingParams) -> list[LogitsProcessor]:
    """The logits processors ``params`` asks for, in the order they run: the suppressed tokens
    (when ``suppress_ids`` is not empty), then the repetition penalty, when it is on
    (``repetition_penalty != 1`` and ``repeat_last_n != 0``).

    Returns:
        A list (empty when every processor is off) of functions ``(history, logits) -> logits``.

    Raises:
        SamplingError: a parameter out of range (``field`` names it).
    """
    params.validate()
    processors: list[LogitsProcessor] = []
    if params.suppress_ids:
        ids = params.suppress_ids
        processors.append(lambda history, logits: apply_suppress_tokens(logits, ids))
    if params.repetition_penalty != 1 and params.repeat_last_n != 0:
        processors.append(make_repetition_penalty(params.repetition_penalty, params.repeat_last_n))
    return processors


def apply_logits_processors(
    processors: Sequence[LogitsProcessor], history: Sequence[int], logits: np.ndarray
) -> np.ndarray:
    """Run ``logits`` [vocab] through each processor in turn; returns ``logits`` itself when there
    are none."""
    for process in processors:
        logits = process(history, logits)
    return logits


# ---------------------------------------------------------------------------------------------
# 2-5. Filters on log-weights [vocab] float64; -inf = removed
# ---------------------------------------------------------------------------------------------

def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Scale logits by ``1 / temperature`` (the softmax temperature of the Boltzmann distribution).

    The division is done in float64 without shifting first, so distinct float32 logits stay
    distinct (subtracting the maximum first would round near-ties together, and top-k would then
    keep a token outside the k best). Only if the best token overflows (a temperature under about
    1e-270) is the maximum subtracted first, so the result never holds ``+inf`` or NaN and its
    maximum is finite.

    Args:
        logits: ``[vocab]`` float array, ``-inf`` allowed, at least one finite entry.
        temperature: > 0 and finite (temperature 0, greedy, is handled by the sampler, not here).

    Returns:
        ``[vocab]`` float64 log-weights ``logits / temperature``; ``-inf`` stays ``-inf``.

    Raises:
        SamplingError: ``temperature`` <= 0 or not finite.
    """
    _check_temperature(temperature)
    if temperature == 0:
        raise SamplingError("temperature", "must be > 0 here; temperature 0 means greedy (argmax)")
    x = np.asarray(logits, dtype=np.float64)
    with np.errstate(over="ignore"):  # overflow is handled here, not warned about
        y = x / temperature
        if not np.isfinite(y.max()):
            # the best token overflowed (to +inf, or all to -inf): shift first, so the best is 0
            y = (x - x.max()) / temperature
    # A finite logit far below the best may still overflow to -inf: its probability, exp of a
    # difference beyond -1e290, is 0 in float64 either way.
    return y


def apply_top_k(logprobs: np.ndarray, top_k: int) -> np.ndarray:
    """Keep the ``top_k`` tokens with the highest log-weight (Fan et al. 2018, arXiv:1805.04833).

    Uses a partition (O(vocab)), not a sort. Tokens tied with the k-th best are all kept.

    Args:
        logprobs: ``[vocab]`` float log-weights, ``-inf`` = already removed.
        top_k: number of tokens to keep; ``<= 0`` or ``>= vocab`` = off.

    Returns:
        ``[vocab]`` float64 log-weights with every token below the k-th best set to ``-inf``.

    Raises:
        SamplingError: ``top_k`` is not an integer.
    """
    _check_top_k(top_k)
    x = np.asarray(logprobs, dtype=np.float64)
    n = x.shape[-1]
    if top_k <= 0 or top_k >= n:
        return x
    kth_best = np.partition(x, n - top_k)[n - top_k]
    return np.where(x >= kth_best, x, NEG_INF)


def apply_top_p(logprobs: np.ndarray, top_p: float) -> np.ndarray:
    """Nucleus filter (Holtzman et al. 2019, arXiv:1904.09751).

    Sorts the surviving tokens by probability (renormalised over the survivors) and keeps the
    smallest prefix whose mass is ``>= top_p``, plus any token tied with the last one kept. Only the
    survivors are sorted, so after top-k this sorts k entries, not the vocabulary. ``top_p`` 0 (or
    tiny) keeps only the best token.

    Args:
        logprobs: ``[vocab]`` float log-weights, ``-inf`` = already removed, at least one finite.
        top_p: in [0, 1]; ``1`` = off.

    Returns:
        ``[vocab]`` float64 log-weights with the tokens outside the nucleus set to ``-inf``.

    Raises:
        SamplingError: ``top_p`` outside [0, 1].
    """
    _check_top_p(top_p)
    x = np.asarray(logprobs, dtype=np.float64)
    if top_p >= 1.0:
        return x
    vals = np.sort(x[x > NEG_INF])[::-1]  # descending
    probs = softmax(vals)
    # The nucleus is usually a short prefix: accumulate a growing prefix until it holds top_p.
    # (A prefix of a cumulative sum is the cumulative sum of the prefix, so this is exact.)
    end = min(256, vals.size)
    while True:
        mass = np.cumsum(probs[:end])
        if mass[-1] >= top_p or end == vals.size:
            break
        end = min(8 * end, vals.size)
    # first position where the prefix mass reaches top_p; rounding can leave mass[-1] a hair under 1
    last = min(int(np.searchsorted(mass, top_p, side="left")), end - 1)
    return np.where(x >= vals[last], x, NEG_INF)


def apply_min_p(logprobs: np.ndarray, min_p: float) -> np.ndarray:
    """Min-p filter (Nguyen et al. 2024, arXiv:2407.01082): keep tokens with ``p >= min_p * p_max``.

    Compared in log space, ``log p - log p_max >= log min_p``, which does not need normalising.
    The best token (and any tied with it) always survives.

    Args:
        logprobs: ``[vocab]`` float log-weights, ``-inf`` = already removed, at least one finite.
        min_p: in [0, 1]; ``0`` = off.

    Returns:
        ``[vocab]`` float64 log-weights with the tokens under the threshold set to ``-inf``.

    Raises:
        SamplingError: ``min_p`` outside [0, 1].
    """
    _check_min_p(min_p)
    x = np.asarray(logprobs, dtype=np.float64)
    if min_p == 0:
        return x
    return np.where(x - x.max() >= math.log(min_p), x, NEG_INF)


# ---------------------------------------------------------------------------------------------
# 6. Draw
# ---------------------------------------------------------------------------------------------

def draw(logprobs: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one token from ``softmax(logprobs)`` by inverting the CDF with one uniform number.

    Exactly one ``rng.random()`` per call, whatever the number of survivors, so a seeded run's
    random stream does not depend on the filters. Tokens with probability 0 (``-inf`` log-weight,
    or an ``exp`` that underflows) are never returned.

    Args:
        logprobs: ``[vocab]`` float log-weights, ``-inf`` = removed, at least one finite.
        rng: the generator to draw from.

    Returns:
        The token id, a Python int in ``[0, vocab)``.
    """
    p = softmax(logprobs)
    cdf = np.cumsum(p)
    u = rng.random() * cdf[-1]
    # side="right" returns the first i with cdf[i] > u: a zero-probability token has cdf[i] equal
    # to cdf[i - 1] (or 0 for i = 0), so it can never be that i.
    j = int(np.searchsorted(cdf, u, side="right"))
    if j >= p.size:  # u rounded up to cdf[-1]: take the last token that can be drawn
        j = int(np.flatnonzero(p)[-1])
    return j


# ---------------------------------------------------------------------------------------------
# The chain
# ---------------------------------------------------------------------------------------------

def _filters(params: SamplingParams) -> list[Filter]:
    """Steps 3-5 of the chain (after temperature) for ``params``: only the filters that are on."""
    chain: list[Filter] = []
    if params.top_k > 0:
        chain.append(lambda x: apply_top_k(x, params.top_k))
    if params.top_p < 1.0:
        chain.append(lambda x: apply_top_p(x, params.top_p))
    if params.min_p > 0.0:
        chain.append(lambda x: apply_min_p(x, params.min_p))
    return chain


def _candidates(
    logits: np.ndarray, temperature: float, chain: Sequence[Filter]
) -> tuple[np.ndarray | None, np.ndarray]:
    """Temperature, then each filter of ``chain``, dropping the removed tokens after each one.

    The filters do not care how long their input is, and a removed token (``-inf``) plays no further
    part in any of them, so after top-k the rest of the chain and the draw work on k entries rather
    than the whole vocabulary.

    Returns:
        ``(ids, vals)``: the surviving token ids (int64, ascending; ``None`` when no filter ran and
        every token is still a candidate) and their float64 log-weights.
    """
    x = apply_temperature(logits, temperature)
    ids = None
    for f in chain:
        x = f(x)
        keep = np.flatnonzero(x > NEG_INF)
        ids = keep if ids is None else ids[keep]
        x = x[keep]
    return ids, x


def filtered_probs(
    logits: np.ndarray, params: SamplingParams, history: Sequence[int] = ()
) -> np.ndarray:
    """The distribution the sampler draws from: the whole chain (processors, then the sampler's
    steps) except the draw. Pure.

    Args:
        logits: ``[vocab]`` float array (float32 from the model), ``-inf`` allowed.
        params: the sampling parameters.
        history: token ids seen so far, for the logits processors (the repetition penalty).

    Returns:
        ``[vocab]`` float64 probabilities summing to 1, zero for every filtered-out token. For
        temperature 0, one-hot at the argmax of the penalised logits.

    Raises:
        SamplingError: ``params`` out of range.
        ValueError: logits not 1-D, with NaN or ``+inf``, or with no finite entry; bad history ids.
    """
    processors = make_logits_processors(params)
    x = apply_logits_processors(processors, history, _check_logits(logits))
    out = np.zeros(x.shape[-1], dtype=np.float64)
    if params.greedy:
        out[int(np.argmax(x))] = 1.0
        return out
    ids, vals = _candidates(x, params.temperature, _filters(params))
    if ids is None:
        return softmax(vals)
    out[ids] = softmax(vals)
    return out


def top_logprobs(logits: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The ``n`` most likely tokens of ``logits`` (float [vocab], the processed logits the sampler
    sees) with their log-softmax values: ``[(token_id, logprob), …]``, best first, ties by lower
    id (OpenAI's ``top_logprobs``; llama-server's ``n_probs`` before sampling)."""
    lp = log_softmax(logits)
    n = min(n, lp.shape[0])
    best = np.argpartition(-lp, n - 1)[:n]
    best = best[np.lexsort((best, -lp[best]))]
    return [(int(i), float(lp[i])) for i in best]


def _logprob(logits: np.ndarray, token: int) -> float:
    """``log_softmax(logits)[token]`` without building the whole log-softmax vector."""
    top = float(logits.max())
    total = float(np.exp(np.asarray(logits, dtype=np.float64) - top).sum())
    return float(logits[token]) - top - math.log(total)


class Sampler:
    """Argmax, or temperature, the filters and a seeded draw; see :func:`make_sampler`.

    Holds its own ``numpy.random.Generator`` (seeded from ``params.seed``), so two samplers made
    from the same params produce the same tokens for the same logits sequence, independently.
    It sees no history: the repetition penalty runs before it, as a logits processor
    (:func:`make_logits_processors`).
    """

    def __init__(self, params: SamplingParams) -> None:
        params.validate()
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self._chain = _filters(params)

    def __call__(self, logits: np.ndarray) -> tuple[int, float]:
        """Choose the next token.

        Args:
            logits: ``[vocab]`` float array for the last position: the model's float32 logits after
                the logits processors.

        Returns:
            ``(token_id, logprob)``: a Python int and a finite Python float, the log-softmax of
            ``logits`` (before temperature and filters) at the chosen token.

        Raises:
            ValueError: logits not 1-D, with NaN or ``+inf``, or with no finite entry.
        """
        p = self.params
        x = _check_logits(logits)
        if p.greedy:
            token = int(np.argmax(x))
        else:
            ids, vals = _candidates(x, p.temperature, self._chain)
            j = draw(vals, self.rng)
            token = j if ids is None else int(ids[j])
        return token, _logprob(x, token)

    def __repr__(self) -> str:
        return f"Sampler({self.params!r})"


def make_sampler(params: SamplingParams) -> Sampler:
    """Build the sampler for ``params``: the chain of the filters that are on, a seeded Generator.
    The repetition penalty is not in it: see :func:`make_logits_processors`.

    Args:
        params: the sampling parameters (all of them are validated).

    Returns:
        A :class:`Sampler`; call it as ``sampler(logits) -> (token_id, logprob)``.

    Raises:
        SamplingError: a parameter out of range (``field`` names it; the message gives its range).
    """
    return Sampler(params)
