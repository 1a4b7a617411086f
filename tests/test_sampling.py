"""Tests for mqa_gen.sampling.

Expected values come from the definitions (worked out by hand in the comments), not from running
the code. Logits built as ``log(p)`` in float32 give back ``p`` to about 1e-7, hence ``approx``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mqa_gen.errors import MqaGenError, SamplingError
from mqa_gen.sampling import (
    Sampler,
    SamplingParams,
    apply_logits_processors,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    filtered_probs,
    log_softmax,
    make_logits_processors,
    make_repetition_penalty,
    make_sampler,
)

NEG_INF = -np.inf


def f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def log_of(probs) -> np.ndarray:
    """float32 logits whose softmax is ``probs`` (the probs sum to 1)."""
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


def approx(values, abs=1e-6):
    return pytest.approx(np.asarray(values, dtype=np.float64), abs=abs)


def sample_params(**kw) -> SamplingParams:
    """Non-greedy, everything off unless given."""
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    base.update(kw)
    return SamplingParams(**base)


def step(params: SamplingParams, sampler: Sampler, logits: np.ndarray, history) -> tuple[int, float]:
    """One token as the token layer chooses it: ``params``' logits processors, then the sampler."""
    return sampler(apply_logits_processors(make_logits_processors(params), history, logits))


# ------------------------------------------------------------------------------------------------
# Repetition penalty
# ------------------------------------------------------------------------------------------------

def test_penalty_negative_logit_multiplied_once_however_often_it_occurs():
    logits = f32([-2.0, 1.0, 0.5])
    out = apply_repetition_penalty(logits, [0, 0], 1.5, 64)
    # -2.0 * 1.5 = -3.0 (once, not -2.0 * 1.5 * 1.5 = -4.5); tokens 1 and 2 not in the history
    np.testing.assert_array_equal(out, f32([-3.0, 1.0, 0.5]))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(logits, f32([-2.0, 1.0, 0.5]))  # input untouched


def test_penalty_positive_logit_divided():
    out = apply_repetition_penalty(f32([3.0, 1.0, -0.5]), [0], 1.5, 64)
    np.testing.assert_array_equal(out, f32([2.0, 1.0, -0.5]))  # 3.0 / 1.5 = 2.0


@pytest.mark.parametrize("logit", [2.0, -2.0])
def test_penalised_token_probability_drops_whatever_its_sign(logit):
    logits = f32([logit, 0.5, -1.0])
    before = np.exp(log_softmax(logits))[0]
    after = np.exp(log_softmax(apply_repetition_penalty(logits, [0], 1.3, 64)))[0]
    assert after < before


def test_penalty_below_one_encourages():
    out = apply_repetition_penalty(f32([2.0, -2.0, 1.0]), [0, 1], 0.5, 64)
    np.testing.assert_array_equal(out, f32([4.0, -1.0, 1.0]))  # 2/0.5, -2*0.5


def test_penalty_window_last_n():
    logits = f32([1.0, 1.0, 1.0, 1.0])
    # last 2 of [0, 1, 2, 3] are 2 and 3: only they are penalised (1.0 / 2 = 0.5)
    out = apply_repetition_penalty(logits, [0, 1, 2, 3], 2.0, 2)
    np.testing.assert_array_equal(out, f32([1.0, 1.0, 0.5, 0.5]))
    # token 0 occurs early and late: the late occurrence is inside the window
    out = apply_repetition_penalty(logits, [1, 2, 0], 2.0, 1)
    np.testing.assert_array_equal(out, f32([0.5, 1.0, 1.0, 1.0]))


def test_penalty_last_n_zero_off_and_minus_one_whole_history():
    logits = f32([1.0, -1.0, 4.0, 0.0])
    off = apply_repetition_penalty(logits, [0, 1, 2, 3], 2.0, 0)
    np.testing.assert_array_equal(off, logits)
    assert off is not logits  # always a new array
    whole = apply_repetition_penalty(logits, [0, 1, 2, 3], 2.0, -1)
    np.testing.assert_array_equal(whole, f32([0.5, -2.0, 2.0, 0.0]))  # a zero logit stays zero


def test_penalty_one_is_a_no_op_and_accepts_array_and_empty_history():
    logits = f32([1.0, -1.0, 4.0])
    np.testing.assert_array_equal(apply_repetition_penalty(logits, [0, 1, 2], 1.0, -1), logits)
    np.testing.assert_array_equal(apply_repetition_penalty(logits, (), 1.5, 64), logits)
    out = apply_repetition_penalty(logits, np.array([2], dtype=np.int32), 2.0, 64)
    np.testing.assert_array_equal(out, f32([1.0, -1.0, 2.0]))


def test_penalty_keeps_minus_inf():
    out = apply_repetition_penalty(f32([NEG_INF, 1.0]), [0], 1.5, 64)
    assert out[0] == NEG_INF and not np.isnan(out).any()


@pytest.mark.parametrize("history", [[3], [-1], [0.5]])
def test_penalty_rejects_bad_history_ids(history):
    with pytest.raises(ValueError):
        apply_repetition_penalty(f32([0.0, 1.0, 2.0]), history, 1.5, 64)


def test_penalty_processor_runs_before_greedy():
    # [2.0, 1.5] with token 0 penalised by 2 -> [1.0, 1.5]: greedy now picks token 1
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    s = make_sampler(params)
    assert step(params, s, f32([2.0, 1.5]), [0])[0] == 1
    assert step(params, s, f32([2.0, 1.5]), [])[0] == 0
    assert s(f32([2.0, 1.5]))[0] == 0  # the sampler alone knows no history and no penalty


def test_penalty_processor_is_the_penalty_of_the_window():
    params = SamplingParams(repetition_penalty=2.0, repeat_last_n=2)
    [penalty] = make_logits_processors(params)
    logits = f32([1.0, -1.0, 4.0, 3.0])
    # the window is the last 2 of [0, 1, 2]: tokens 1 (-1 * 2 = -2) and 2 (4 / 2 = 2)
    out = penalty([0, 1, 2], logits)
    np.testing.assert_array_equal(out, f32([1.0, -2.0, 2.0, 3.0]))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(logits, f32([1.0, -1.0, 4.0, 3.0]))  # input untouched
    np.testing.assert_array_equal(make_repetition_penalty(2.0, -1)([0, 1, 2], logits), f32([0.5, -2.0, 2.0, 3.0]))


@pytest.mark.parametrize("penalty,last_n", [(1.0, 64), (1.0, -1), (1.3, 0)])
def test_no_processor_when_the_penalty_is_off(penalty, last_n):
    params = SamplingParams(repetition_penalty=penalty, repeat_last_n=last_n)
    assert make_logits_processors(params) == []
    logits = f32([1.0, 2.0])
    assert apply_logits_processors([], [0, 1], logits) is logits


def test_processors_run_in_order():
    double = lambda history, x: x * 2  # noqa: E731
    shift = lambda history, x: x - len(history)  # noqa: E731
    out = apply_logits_processors([double, shift], [7, 8, 9], f32([1.0, 2.0]))
    np.testing.assert_array_equal(out, f32([2.0 - 3, 4.0 - 3]))


# ------------------------------------------------------------------------------------------------
# Off means off: the distribution is the plain softmax
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("top_k", [0, -5, 4, 7])
def test_top_k_off_and_top_p_one_give_plain_softmax(top_k):
    logits = log_of([0.1, 0.2, 0.3, 0.4])
    probs = filtered_probs(logits, sample_params(top_k=top_k, top_p=1.0))
    assert probs == approx([0.1, 0.2, 0.3, 0.4])


@pytest.mark.parametrize("x", [f32([0.3, -1.0, 2.0]), np.array([5.0, NEG_INF, 1.0])])
def test_off_filters_return_input_unchanged(x):
    want = np.asarray(x, dtype=np.float64)
    np.testing.assert_array_equal(apply_top_k(x, 0), want)
    np.testing.assert_array_equal(apply_top_k(x, -1), want)
    np.testing.assert_array_equal(apply_top_k(x, 3), want)  # k >= vocab
    np.testing.assert_array_equal(apply_top_p(x, 1.0), want)
    np.testing.assert_array_equal(apply_min_p(x, 0.0), want)


def test_draw_frequencies_match_softmax():
    # 20,000 seeded draws from probs [0.1, 0.2, 0.3, 0.4]; chi-square with 3 degrees of freedom
    # stays under 16.27 with probability 0.999 (and the seed makes the test deterministic).
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    s = make_sampler(sample_params(seed=1234))
    logits = log_of(probs)
    n = 20_000
    counts = np.bincount([s(logits)[0] for _ in range(n)], minlength=4)
    expected = n * probs
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.27, (counts, chi2)


def test_draw_frequencies_match_filtered_probs_with_filters_on():
    # The sampler's fast path (it drops removed tokens as it goes) must draw from filtered_probs.
    # 5 tokens survive; chi-square with 4 degrees of freedom stays under 18.47 with prob. 0.999.
    logits = f32([0.3, 2.0, -1.0, 1.2, 0.9, 1.5, NEG_INF, -3.0])
    params = sample_params(temperature=0.7, top_k=6, top_p=0.97, min_p=0.02,
                           repetition_penalty=1.2, seed=4321)
    history = [1, 2]
    probs = filtered_probs(logits, params, history)
    alive = probs > 0
    assert alive.sum() == 5
    s = make_sampler(params)
    n = 20_000
    counts = np.bincount([step(params, s, logits, history)[0] for _ in range(n)], minlength=logits.size)
    assert counts[~alive].sum() == 0
    expected = n * probs[alive]
    chi2 = float(((counts[alive] - expected) ** 2 / expected).sum())
    assert chi2 < 18.47, (counts, chi2)


# ------------------------------------------------------------------------------------------------
# Temperature
# ------------------------------------------------------------------------------------------------

def test_temperature_exact():
    logits = f32([0.0, math.log(4.0)])
    # weights exp(l / T): T=2 -> 1, 2 -> [1/3, 2/3]; T=0.5 -> 1, 16 -> [1/17, 16/17]
    assert filtered_probs(logits, sample_params(temperature=2.0)) == approx([1 / 3, 2 / 3])
    assert filtered_probs(logits, sample_params(temperature=0.5)) == approx([1 / 17, 16 / 17])


def test_temperature_zero_is_argmax_and_one_hot():
    logits = f32([0.1, 3.0, -2.0, 2.9])
    np.testing.assert_array_equal(
        filtered_probs(logits, SamplingParams(temperature=0.0)), [0.0, 1.0, 0.0, 0.0]
    )
    s = make_sampler(SamplingParams(temperature=0.0, top_k=3, top_p=0.5, seed=None))
    assert {s(logits)[0] for _ in range(20)} == {1}


@pytest.mark.parametrize("temperature", [1e-30, 1e-6])
def test_tiny_temperature_is_argmax_without_nan(temperature):
    probs = filtered_probs(f32([0.0, 1.0, NEG_INF, 0.999]), sample_params(temperature=temperature))
    assert not np.isnan(probs).any()
    assert probs == approx([0.0, 1.0, 0.0, 0.0])


def test_temperature_overflow_falls_back_without_nan():
    # 1e30 / 1e-300 overflows float64: the result must still be argmax, not NaN
    probs = filtered_probs(f32([1e30, -1e30, 0.0, NEG_INF]), sample_params(temperature=1e-300))
    np.testing.assert_array_equal(probs, [1.0, 0.0, 0.0, 0.0])
    x = apply_temperature(f32([1e30, 2.0, NEG_INF]), 1e-300)
    assert not np.isnan(x).any() and not np.isposinf(x).any()


def test_huge_temperature_is_uniform_over_finite_tokens():
    probs = filtered_probs(f32([0.0, 50.0, NEG_INF]), sample_params(temperature=1e30))
    assert probs == approx([0.5, 0.5, 0.0])


# ------------------------------------------------------------------------------------------------
# Top-k
# ------------------------------------------------------------------------------------------------

def test_top_k_exact():
    logits = f32([1.0, 4.0, 2.0, 3.0])
    # keep 4.0 and 3.0: weights e^4, e^3 -> [1/(1+e^-1), e^-1/(1+e^-1)] on tokens 1 and 3
    a = 1.0 / (1.0 + math.exp(-1.0))
    assert filtered_probs(logits, sample_params(top_k=2)) == approx([0.0, a, 0.0, 1.0 - a])


def test_top_k_keeps_ties_at_the_boundary():
    out = apply_top_k(f32([3.0, 2.0, 2.0, 1.0]), 2)
    np.testing.assert_array_equal(out, [3.0, 2.0, 2.0, NEG_INF])


def test_top_k_near_ties_are_not_rounded_together():
    # 4e-25 and 0.0 are distinct float32 logits; 2 best are tokens 0 and 1, token 2 must never come
    logits = f32([1.0, 4.0655367e-25, 0.0])
    params = sample_params(top_k=2)
    assert filtered_probs(logits, params)[2] == 0.0
    s = make_sampler(dataclasses.replace(params, seed=0))
    assert 2 not in {s(logits)[0] for _ in range(200)}


finite_logits = hnp.arrays(
    np.float32,
    st.integers(2, 64),
    elements=st.floats(-30.0, 30.0, width=32),
)


@settings(max_examples=200, deadline=None)
@given(logits=finite_logits, data=st.data())
def test_top_k_never_samples_outside_the_k_best(logits, data):
    n = logits.size
    k = data.draw(st.integers(1, n), label="k")
    temperature = data.draw(st.floats(0.05, 20.0), label="temperature")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    kth_best = np.sort(logits)[n - k]
    params = sample_params(temperature=temperature, top_k=k, seed=seed)
    s = make_sampler(params)
    for _ in range(10):
        token, logprob = s(logits)
        assert logits[token] >= kth_best
        assert math.isfinite(logprob)
    probs = filtered_probs(logits, params)
    assert np.all(probs[logits < kth_best] == 0.0)
    assert probs.sum() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------
# Top-p
# ------------------------------------------------------------------------------------------------

# Token order is shuffled on purpose: token 1 is the best (0.5), then 3 (0.3), 0 (0.15), 2 (0.05).
SHUFFLED = [0.15, 0.5, 0.05, 0.3]


@pytest.mark.parametrize(
    "top_p, expected",
    [
        # sorted masses 0.5, 0.8, 0.95, 1.0: the smallest prefix reaching p
        (0.4, [0.0, 1.0, 0.0, 0.0]),                       # 0.5 >= 0.4
        (0.7, [0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]),           # 0.8 >= 0.7
        (0.9, [0.15 / 0.95, 0.5 / 0.95, 0.0, 0.3 / 0.95]),  # 0.95 >= 0.9
        (0.99, SHUFFLED),                                  # needs all four
    ],
)
def test_top_p_keeps_smallest_prefix_reaching_p(top_p, expected):
    assert filtered_probs(log_of(SHUFFLED), sample_params(top_p=top_p)) == approx(expected)


def test_top_p_renormalises_after_top_k():
    logits = log_of([0.4, 0.3, 0.2, 0.1])
    # without top-k: 0.4 < 0.5 <= 0.7 -> tokens 0, 1 -> [4/7, 3/7, 0, 0]
    assert filtered_probs(logits, sample_params(top_p=0.5)) == approx([4 / 7, 3 / 7, 0, 0])
    # top-k 2 first: [4/7, 3/7]; 4/7 = 0.571 >= 0.5 -> token 0 alone
    assert filtered_probs(logits, sample_params(top_k=2, top_p=0.5)) == approx([1, 0, 0, 0])


@pytest.mark.parametrize("top_p", [0.0, 1e-9])
def test_top_p_zero_or_tiny_keeps_only_the_best(top_p):
    logits = np.random.default_rng(0).normal(0.0, 1.0, 50).astype(np.float32)
    best = int(np.argmax(logits))
    probs = filtered_probs(logits, sample_params(top_p=top_p, temperature=5.0))
    np.testing.assert_array_equal(probs, np.eye(50)[best])
    want_logprob = float(log_softmax(logits)[best])
    for seed in range(200):
        s = make_sampler(sample_params(top_p=top_p, temperature=5.0, seed=seed))
        token, logprob = s(logits)
        assert token == best
        assert logprob == pytest.approx(want_logprob)


def test_top_p_keeps_ties_with_the_last_token():
    # probs 0.4, 0.4, 0.2: top_p 0.3 reaches with one token, and its tie comes along
    probs = filtered_probs(log_of([0.4, 0.4, 0.2]), sample_params(top_p=0.3))
    assert probs == approx([0.5, 0.5, 0.0])


# ------------------------------------------------------------------------------------------------
# Min-p
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "min_p, expected",
    [
        # p_max = 0.5; keep p >= min_p * 0.5
        (0.2, [0.15 / 0.95, 0.5 / 0.95, 0.0, 0.3 / 0.95]),  # threshold 0.1: drops 0.05
        (0.5, [0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]),            # threshold 0.25: keeps 0.5, 0.3
        (0.9, [0.0, 1.0, 0.0, 0.0]),                        # threshold 0.45
        (1.0, [0.0, 1.0, 0.0, 0.0]),                        # only the best
    ],
)
def test_min_p_exact(min_p, expected):
    assert filtered_probs(log_of(SHUFFLED), sample_params(min_p=min_p)) == approx(expected)


def test_min_p_sees_the_tempered_distribution():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    # T=1: 0.05/0.5 = 0.1 < 0.2, token 3 dropped.
    # T=2: weights p^(1/2), ratio sqrt(0.1) = 0.316 >= 0.2, kept.
    at_1 = filtered_probs(log_of(probs), sample_params(min_p=0.2))
    assert at_1[3] == 0.0
    at_2 = filtered_probs(log_of(probs), sample_params(min_p=0.2, temperature=2.0))
    root = np.sqrt(probs)
    assert at_2 == approx(root / root.sum())


# ------------------------------------------------------------------------------------------------
# Ties and -inf
# ------------------------------------------------------------------------------------------------

def test_ties_at_the_top():
    logits = f32([1.0, 1.0, 0.0])
    for params in (sample_params(top_k=1), sample_params(top_p=0.0), sample_params(min_p=1.0)):
        assert filtered_probs(logits, params) == approx([0.5, 0.5, 0.0])
    assert make_sampler(SamplingParams(temperature=0.0))(logits)[0] == 0  # lowest id, as argmax


@pytest.mark.parametrize(
    "params",
    [
        sample_params(),
        sample_params(top_k=3),
        sample_params(top_k=1),
        sample_params(top_p=0.9),
        sample_params(top_p=0.0),
        sample_params(min_p=0.5),
        sample_params(repetition_penalty=1.3),
        sample_params(temperature=0.3, top_k=4, top_p=0.8, min_p=0.05, repetition_penalty=1.1),
    ],
)
def test_minus_inf_logits_never_sampled(params):
    logits = f32([NEG_INF, 0.0, NEG_INF, 0.0, NEG_INF])
    probs = filtered_probs(logits, params, history=[0, 1, 2])
    assert not np.isnan(probs).any()
    assert probs[[0, 2, 4]].tolist() == [0.0, 0.0, 0.0]
    s = make_sampler(dataclasses.replace(params, seed=3))
    for _ in range(300):
        token, logprob = step(params, s, logits, [0, 1, 2])
        assert token in (1, 3)
        assert math.isfinite(logprob)
    assert make_sampler(SamplingParams(temperature=0.0))(logits)[0] == 1


def test_plain_softmax_with_minus_inf_is_exact():
    np.testing.assert_array_equal(
        filtered_probs(f32([NEG_INF, 0.0, NEG_INF, 0.0, NEG_INF]), sample_params()),
        [0.0, 0.5, 0.0, 0.5, 0.0],
    )


@pytest.mark.parametrize(
    "logits",
    [
        f32([0.0, np.nan, 1.0]),
        f32([0.0, np.inf, 1.0]),
        f32([NEG_INF, NEG_INF]),
        f32([]),
        f32([[0.0, 1.0]]),
    ],
)
def test_bad_logits_raise_value_error(logits):
    with pytest.raises(ValueError):
        make_sampler(sample_params(seed=0))(logits)
    with pytest.raises(ValueError):
        make_sampler(SamplingParams())(logits)


masked_logits = hnp.arrays(
    np.float32,
    st.integers(1, 40),
    elements=st.one_of(st.floats(-2.0**100, 2.0**100, width=32), st.just(float("-inf"))),
).filter(lambda a: np.isfinite(a).any())


@settings(max_examples=300, deadline=None)
@given(
    logits=masked_logits,
    temperature=st.one_of(st.just(0.0), st.floats(1e-30, 1e30)),
    top_k=st.integers(-2, 50),
    top_p=st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0)),
    min_p=st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0)),
    penalty=st.floats(0.01, 100.0),
    last_n=st.integers(-1, 5),
    seed=st.integers(0, 2**63),
    history=st.lists(st.integers(0, 39), max_size=8),
)
def test_any_valid_params_give_a_distribution_and_a_finite_token(
    logits, temperature, top_k, top_p, min_p, penalty, last_n, seed, history
):
    history = [h % logits.size for h in history]
    params = SamplingParams(temperature, top_k, top_p, min_p, penalty, last_n, seed)
    probs = filtered_probs(logits, params, history)
    assert np.isfinite(probs).all()
    assert probs.sum() == pytest.approx(1.0)
    assert np.all(probs[np.isneginf(logits)] == 0.0)
    token, logprob = step(params, make_sampler(params), logits, history)
    assert isinstance(token, int) and isinstance(logprob, float)
    assert np.isfinite(logits[token]) and probs[token] > 0.0
    assert math.isfinite(logprob) and logprob <= 0.0


# ------------------------------------------------------------------------------------------------
# Log-probability reported
# ------------------------------------------------------------------------------------------------

def test_logprob_is_of_penalised_logits_before_temperature():
    # [2.0, 0.0], token 0 penalised by 2 -> [1.0, 0.0]; logprob of token 0 = 1 - log(e + 1)
    want = 1.0 - math.log(math.e + 1.0)
    greedy = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert step(greedy, make_sampler(greedy), f32([2.0, 0.0]), [0]) == (0, pytest.approx(want))
    # temperature and top-k change what is drawn, not the reported logprob
    hot = sample_params(temperature=5.0, top_k=1, repetition_penalty=2.0, seed=1)
    assert step(hot, make_sampler(hot), f32([2.0, 0.0]), [0]) == (0, pytest.approx(want))


def test_sampled_logprob_matches_token():
    s = make_sampler(sample_params(temperature=2.0, seed=5))
    logits = log_of([0.25, 0.75])
    seen = set()
    for _ in range(100):
        token, logprob = s(logits)
        assert logprob == pytest.approx(math.log([0.25, 0.75][token]), abs=1e-6)
        seen.add(token)
    assert seen == {0, 1}


# ------------------------------------------------------------------------------------------------
# Reproducibility
# ------------------------------------------------------------------------------------------------

def _run(params: SamplingParams, steps: int, vocab: int, flat: bool) -> list[tuple[int, float]]:
    rng = np.random.default_rng(99)  # the logits sequence, the same for every run
    sampler = make_sampler(params)
    history: list[int] = [1, 2, 3]
    out = []
    for _ in range(steps):
        logits = np.zeros(vocab, np.float32) if flat else rng.normal(0, 2, vocab).astype(np.float32)
        token, logprob = step(params, sampler, logits, history)
        history.append(token)
        out.append((token, logprob))
    return out


def test_same_seed_same_tokens():
    params = sample_params(temperature=0.8, top_k=40, top_p=0.95, min_p=0.02,
                           repetition_penalty=1.1, seed=7)
    a = _run(params, 100, 500, flat=False)
    b = _run(params, 100, 500, flat=False)
    assert a == b


def test_different_seeds_differ_on_a_flat_distribution():
    a = _run(sample_params(seed=7), 50, 1000, flat=True)
    b = _run(sample_params(seed=8), 50, 1000, flat=True)
    assert [t for t, _ in a] != [t for t, _ in b]
    assert len({t for t, _ in a}) > 10  # it really samples


def test_samplers_do_not_share_state():
    params = sample_params(seed=11)
    s1, s2 = make_sampler(params), make_sampler(params)
    logits = np.zeros(100, np.float32)
    first = [s1(logits)[0] for _ in range(20)]
    assert [s2(logits)[0] for _ in range(20)] == first


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -1.0),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", "hot"),
        ("top_p", 1.5),
        ("top_p", -0.1),
        ("top_p", float("nan")),
        ("min_p", 2.0),
        ("min_p", -0.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", float("inf")),
        ("repeat_last_n", -2),
        ("repeat_last_n", 1.5),
        ("top_k", 2.5),
        ("seed", -1),
        ("seed", 1.5),
        ("suppress_ids", frozenset({-1})),
        ("suppress_ids", [2]),
    ],
)
def test_invalid_params_raise_sampling_error_naming_the_parameter(field, value):
    params = SamplingParams(**{field: value})
    for build in (params.validate, lambda: make_sampler(params), lambda: make_logits_processors(params),
                  lambda: filtered_probs(f32([0.0, 1.0]), params)):
        with pytest.raises(SamplingError, match=field) as info:
            build()
        assert info.value.field == field
        assert str(info.value) == f"{field} {info.value.reason}" and repr(value) in info.value.reason
        assert "\n" not in str(info.value)


def test_suppressed_tokens_are_never_drawn_and_the_rest_renormalised():
    from mqa_gen.sampling import apply_suppress_tokens

    logits = f32([3.0, 1.0, 2.0, 0.5])
    assert apply_suppress_tokens(logits, frozenset()) is logits
    out = apply_suppress_tokens(logits, frozenset({0, 2}))
    assert out.dtype == logits.dtype and list(out[[1, 3]]) == [1.0, 0.5] and np.all(out[[0, 2]] == NEG_INF)
    assert logits[0] == 3.0  # the input is not modified
    params = SamplingParams(suppress_ids=frozenset({0}))
    assert make_sampler(params)(apply_logits_processors(make_logits_processors(params), [], logits))[0] == 2
    probs = filtered_probs(apply_logits_processors(make_logits_processors(SamplingParams(
        temperature=1.0, suppress_ids=frozenset({0}))), [], logits), SamplingParams(temperature=1.0))
    e = np.exp([0.0, 1.0, 2.0, 0.5]) * [0, 1, 1, 1]  # token 0 gone, the others in proportion
    np.testing.assert_allclose(probs, e / e.sum())
    with pytest.raises(ValueError, match="outside"):
        apply_suppress_tokens(logits, frozenset({4}))


def test_draw_seed_gives_32_bit_seeds():
    from mqa_gen.sampling import draw_seed

    seeds = {draw_seed() for _ in range(8)}
    assert len(seeds) == 8 and all(0 <= s < 2**32 for s in seeds)


def test_sampling_error_is_a_usage_error():
    assert issubclass(SamplingError, MqaGenError) and SamplingError.exit_code == 2


def test_sampling_error_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(SamplingError("top_p", "must be in [0, 1] (1 = off), got 1.5")))
    assert (error.field, error.reason, str(error)) == ("top_p", "must be in [0, 1] (1 = off), got 1.5",
                                                        "top_p must be in [0, 1] (1 = off), got 1.5")


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.0, top_p=0.0, min_p=1.0, top_k=-3),
        SamplingParams(temperature=2.5, top_p=1.0, min_p=0.0, top_k=10**6),
        SamplingParams(repetition_penalty=0.5, repeat_last_n=-1, seed=0),
        SamplingParams(repeat_last_n=0, seed=2**64 - 1),
        SamplingParams(temperature=1, top_k=np.int64(5), top_p=np.float32(0.5)),
    ],
)
def test_valid_edges_pass(params):
    params.validate()
    step(params, make_sampler(params), f32([0.0, 1.0, 2.0]), [1])


def test_each_function_validates_its_own_argument():
    x = f32([0.0, 1.0])
    cases = [
        (lambda: apply_temperature(x, -1.0), "temperature"),
        (lambda: apply_temperature(x, 0.0), "temperature"),  # greedy is the sampler's job
        (lambda: apply_top_k(x, 1.5), "top_k"),
        (lambda: apply_top_p(x, 1.5), "top_p"),
        (lambda: apply_min_p(x, -0.1), "min_p"),
        (lambda: apply_repetition_penalty(x, [0], 0.0, 64), "repetition_penalty"),
        (lambda: apply_repetition_penalty(x, [0], 1.5, -2), "repeat_last_n"),
        (lambda: make_repetition_penalty(float("nan"), 64), "repetition_penalty"),
        (lambda: make_repetition_penalty(1.5, 0.5), "repeat_last_n"),
    ]
    for call, name in cases:
        with pytest.raises(SamplingError, match=name) as info:
            call()
        assert info.value.field == name
