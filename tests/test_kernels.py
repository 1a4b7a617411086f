"""Each Numba kernel against a plain-NumPy reference written from the defining equations."""

from __future__ import annotations

import numpy as np
import pytest

from mqa_gen.kernels import (
    attention_decode,
    attention_prefill,
    geglu_tanh,
    rmsnorm,
    rope,
    softmax_inplace,
    swiglu,
)
from mqa_gen.kernels.attention import DECODE_BLOCK, decode_partial_shape

RNG = np.random.default_rng(1234)


def reference_attention(q, K, V, start, window=0):
    """softmax(q kᵀ/√D) v with causal masking (and, with ``window`` > 0, only the last ``window``
    keys); q [T,H,D], K/V [KV,S,D] float32 → [T,H,D] float64."""
    T, H, D = q.shape
    G = H // K.shape[0]
    out = np.zeros((T, H, D))
    for t in range(T):
        n = start + t + 1
        first = max(0, n - window) if window else 0
        for h in range(H):
            s = K[h // G, first:n].astype(np.float64) @ q[t, h] / np.sqrt(D)
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ V[h // G, first:n]
    return out


def random(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("n_kv_heads", [1, 3, 9])
@pytest.mark.parametrize("T,start", [(1, 0), (2, 0), (17, 0), (5, 11)])
@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_attention_matches_numpy(n_kv_heads, T, start, storage):
    H, D, S = 9, 64, 40
    K, V, q = random(n_kv_heads, S, D), random(n_kv_heads, S, D), random(T, H, D)
    if storage == "float16":
        K, V = K.astype(np.float16).astype(np.float32), V.astype(np.float16).astype(np.float32)
        k_arg, v_arg = K.astype(np.float16).view(np.uint16), V.astype(np.float16).view(np.uint16)
    else:
        k_arg, v_arg = K, V
    expected = reference_attention(q, K, V, start)
    scale = np.float32(1 / np.sqrt(D))

    out = np.empty_like(q)
    attention_prefill(q, k_arg, v_arg, start, scale, 0, out)
    np.testing.assert_allclose(out, expected, atol=2e-5)

    # The decode kernel answers the last row alone (the cache as a one-slot pool).
    last = decode_one(q[-1], k_arg, v_arg, start + T, scale)
    np.testing.assert_allclose(last, expected[-1], atol=2e-5)


@pytest.mark.parametrize("window", [1, 4, 16])
@pytest.mark.parametrize("T,start", [(1, 0), (9, 0), (6, 9)])
def test_sliding_window_prefill_matches_numpy(window, T, start):
    H, KV, D, S = 4, 1, 32, 20
    K, V, q = random(KV, S, D), random(KV, S, D), random(T, H, D)
    out = np.empty_like(q)
    attention_prefill(q, K, V, start, np.float32(1 / np.sqrt(D)), window, out)
    np.testing.assert_allclose(out, reference_attention(q, K, V, start, window), atol=2e-5)


def test_geglu_tanh_matches_formula():
    gate, up = random(3, 50) * 4, random(3, 50)
    g = gate.astype(np.float64)
    expected = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3))) * up
    gate_before = gate.copy()
    geglu_tanh(gate, up)  # up ← act(gate) ⊙ up
    np.testing.assert_allclose(up, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(gate, gate_before)


@pytest.mark.parametrize("length", [1, DECODE_BLOCK - 1, DECODE_BLOCK, DECODE_BLOCK + 1, 3 * DECODE_BLOCK + 7])
def test_decode_across_block_boundaries(length):
    H, KV, D = 4, 1, 16
    K, V, q = random(KV, length, D), random(KV, length, D), random(1, H, D)
    out = decode_one(q[0], K, V, length, np.float32(0.25))
    np.testing.assert_allclose(out, reference_attention(q, K, V, length - 1)[0], atol=2e-5)


def decode_one(q, K, V, length, scale):
    """The decode kernel for one sequence: q [H, D] over the first ``length`` rows of K, V [KV, S, D]."""
    H, D = q.shape
    partial = np.empty(decode_partial_shape(1, length, H, D), np.float32)
    out = np.empty((1, H, D), np.float32)
    one = np.ones(1, np.int64)
    attention_decode(q[None], K[None], V[None], one * 0, one * length, scale, partial, out)
    return out[0]


@pytest.mark.parametrize("storage", [np.float32, np.uint16])
def test_batched_decode_is_each_sequence_alone_bit_for_bit(storage):
    """B sequences in one pool, each at its own length (across block boundaries), give exactly
    what each gives alone; and each matches NumPy."""
    H, KV, D, S = 6, 2, 32, 3 * DECODE_BLOCK + 9
    lengths = np.array([1, DECODE_BLOCK, 3 * DECODE_BLOCK + 9, 17, DECODE_BLOCK + 1], np.int64)
    B, P = len(lengths), len(lengths) + 2
    K32, V32 = random(P, KV, S, D), random(P, KV, S, D)
    if storage is np.uint16:
        K32, V32 = K32.astype(np.float16).astype(np.float32), V32.astype(np.float16).astype(np.float32)
        K, V = K32.astype(np.float16).view(np.uint16), V32.astype(np.float16).view(np.uint16)
    else:
        K, V = K32, V32
    slots = np.array([3, 0, 6, 2, 5], np.int64)  # any slots, in any order
    q = random(B, H, D)
    scale = np.float32(1 / np.sqrt(D))
    partial = np.empty(decode_partial_shape(B, S, H, D), np.float32)
    out = np.empty((B, H, D), np.float32)
    attention_decode(q, K, V, slots, lengths, scale, partial, out)
    for b in range(B):
        alone = decode_one(q[b], K[slots[b]], V[slots[b]], lengths[b], scale)
        np.testing.assert_array_equal(out[b], alone)
        expected = reference_attention(q[b][None], K32[slots[b]], V32[slots[b]], lengths[b] - 1)[0]
        np.testing.assert_allclose(out[b], expected, atol=2e-5)


def test_rmsnorm():
    x, w = random(7, 33), random(33)
    out = np.empty_like(x)
    rmsnorm(x, w, 1e-5, out)
    expected = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_rotates_each_pair_by_its_angle(interleaved):
    T, H, D = 5, 3, 8
    x = random(T, H, D)
    angles = RNG.uniform(-np.pi, np.pi, (T, D // 2))
    rotated = x.copy()
    rope(rotated, np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32), interleaved)
    # Reference: view each pair as a complex number and multiply by e^{iθ} (RoFormer eq. 34).
    if interleaved:
        z = x[..., 0::2] + 1j * x[..., 1::2]
    else:
        z = x[..., : D // 2] + 1j * x[..., D // 2:]
    z = z * np.exp(1j * angles)[:, None, :]
    expected = np.empty_like(x)
    if interleaved:
        expected[..., 0::2], expected[..., 1::2] = z.real, z.imag
    else:
        expected[..., : D // 2], expected[..., D // 2:] = z.real, z.imag
    np.testing.assert_allclose(rotated, expected, atol=1e-6)


def test_swiglu():
    g, u = random(3, 50), random(3, 50)
    expected = g / (1 + np.exp(-g.astype(np.float64))) * u
    g_before = g.copy()
    swiglu(g, u)  # u ← silu(g) ⊙ u
    np.testing.assert_allclose(u, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(g, g_before)


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("length", [1, 7, 8, 9, 40])
def test_causal_softmax_rows_matches_float64_softmax(length, window):
    """Every row length around the 8-wide maximum's blocks, keys before the block's first query
    row (first_index < first_position), and a sliding window."""
    from mqa_gen.kernels.rowwise import causal_softmax_rows

    G, R, past = 2, min(length, 6), 3
    L = past + R + length - min(length, 6)  # keys first_index .. first_index + L - 1
    first_index, first_position = 10, 10 + L - R
    scores = random(G, R, L) * 6
    scores[0, 0, 0] = -np.inf  # a masked key
    expected = np.zeros((G, R, L))
    for r in range(R):
        stop = first_position + r - first_index + 1
        begin = max(0, stop - window) if window else 0
        z = scores[:, r, begin:stop].astype(np.float64) * 0.3
        z = np.exp(z - z.max(axis=-1, keepdims=True))
        expected[:, r, begin:stop] = z / z.sum(axis=-1, keepdims=True)
    causal_softmax_rows(scores, 0.3, first_index, first_position, window)
    np.testing.assert_allclose(scores, expected, rtol=2e-6, atol=1e-7)


def test_softmax_handles_minus_inf():
    row = np.array([1.0, -np.inf, 3.0, 2.0], np.float32)
    expected = np.exp(row - 3.0) / np.exp(row - 3.0).sum()
    softmax_inplace(row)
    np.testing.assert_allclose(row, expected, rtol=1e-6)
    assert row[1] == 0.0


@pytest.mark.parametrize("decoder", ["half_to_f32", "half_to_f32_portable"])
def test_half_decoding_is_numpys_float16_cast_for_every_bit_pattern(decoder):
    from numba import njit

    from mqa_gen.kernels import halfprec

    convert = getattr(halfprec, decoder)

    @njit
    def decode(src, out):
        for i in range(src.shape[0]):
            out[i] = convert(src[i])

    patterns = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    out = np.empty(65536, np.float32)
    decode(patterns, out)
    expected = patterns.view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    assert np.isnan(out[nan]).all()
    np.testing.assert_array_equal(out.view(np.uint32)[~nan], expected.view(np.uint32)[~nan])  # ±0, subnormals too


def test_exp32_is_within_half_a_microunit_of_exact_exp():
    from numba import njit

    from mqa_gen.kernels.bits import exp32

    @njit
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = exp32(x[i])

    x = np.concatenate([np.linspace(-87.0, 88.0, 200_001), [0.0, -1e-30, 1e-30]]).astype(np.float32)
    out = np.empty_like(x)
    apply(x, out)
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out - exact) / exact) < 5e-7
    assert out[-3] == 1.0
    below = np.array([-87.5, -200.0, -np.inf], np.float32)  # underflow goes to 0, as softmax masks need
    apply(below, out[:3])
    np.testing.assert_array_equal(out[:3], 0.0)


def test_nibble_conversions_match_integer_arithmetic_for_every_byte():
    from numba import njit

    from mqa_gen.kernels.bits import high_nibble_f32, low_nibble_f32

    @njit
    def split(codes, low, high):
        for i in range(codes.shape[0]):
            low[i] = low_nibble_f32(codes[i])
            high[i] = high_nibble_f32(codes[i])

    codes = np.arange(256, dtype=np.uint8)
    low, high = np.empty(256, np.float32), np.empty(256, np.float32)
    split(codes, low, high)
    np.testing.assert_array_equal(low, (codes & 15).astype(np.float32))
    np.testing.assert_array_equal(high, (codes >> 4).astype(np.float32))


def test_bit_pattern_to_float32():
    from numba import njit

    from mqa_gen.kernels.bits import float32_from_bits

    @njit
    def convert(bits, out):
        for i in range(bits.shape[0]):
            out[i] = float32_from_bits(bits[i])

    values = np.array([0.0, -0.0, 1.5, -2.75e-38, 3.4e38, np.inf], np.float32)
    out = np.empty_like(values)
    convert(values.view(np.uint32).astype(np.int64), out)
    np.testing.assert_array_equal(out.view(np.uint32), values.view(np.uint32))


def test_half_rows_to_f32_is_numpys_cast_for_a_row_range():
    """Every bit pattern once (subnormals, infinities, NaNs included), rows [3, 9) of each head."""
    from mqa_gen.kernels.halfprec import half_rows_to_f32

    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(2, 16, 2048)
    out = np.full((2, 6, 2048), 7.0, np.float32)
    half_rows_to_f32(bits, 3, 9, out)
    expected = bits[:, 3:9].view(np.float16).astype(np.float32)
    number = ~np.isnan(expected)
    np.testing.assert_array_equal(out.view(np.uint32)[number], expected.view(np.uint32)[number])
    assert np.array_equal(np.isnan(out), np.isnan(expected))


@pytest.mark.parametrize("shape", [(5,), (300, 3, 64)])  # below and above the size NumPy keeps
def test_float32_array_to_half_bits_is_numpys_cast(shape):
    """Bits equal to NumPy's float16 cast for every non-NaN value (rounding ties, overflow to inf,
    subnormals); a NaN stays a NaN."""
    from mqa_gen.kernels.halfprec import float32_array_to_half_bits

    n = int(np.prod(shape))
    patterns = (np.arange(n, dtype=np.uint64) * 0x9E3779B1 % (1 << 32)).astype(np.uint32)
    patterns[: min(n, 4)] = [0x33000000, 0x33000001, 0x477FEFFF, 0x7F800001][: min(n, 4)]  # ties, overflow, NaN
    x = patterns.view(np.float32).reshape(shape)
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16)
        got = float32_array_to_half_bits(x)
    assert got.dtype == np.uint16 and got.shape == x.shape
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], expected.view(np.uint16)[~nan])
    assert np.isnan(got.view(np.float16)[nan]).all()
