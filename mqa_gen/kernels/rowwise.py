"""Row-wise kernels: RMSNorm, RoPE, SwiGLU, GeGLU and softmax, all float32.

Sources: RMSNorm — Zhang & Sennrich 2019; RoPE — Su et al. 2021 (RoFormer); SwiGLU and GeGLU —
Shazeer 2020.

These run on one thread: they touch a few kilobytes per token, less work than it costs to start a
parallel region (which, on a busy machine, can mean waiting for a time slice).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .bits import exp32
from .flags import FASTMATH


@njit(cache=True, fastmath=FASTMATH)
def rmsnorm(x, weight, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]²) + eps) * weight.

    x, out: float32 [T, d]; weight: float32 [d]; eps: float. The mean of squares is accumulated in
    float32 as the reference (Hugging Face ``LlamaRMSNorm``) does.
    """
    T, d = x.shape
    for t in range(T):
        ss = np.float32(0.0)
        for i in range(d):
            ss += x[t, i] * x[t, i]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(d) + np.float32(eps))
        for i in range(d):
            out[t, i] = (x[t, i] * inv) * weight[i]


@njit(cache=True, fastmath=FASTMATH)
def rope(x, cos, sin, interleaved):
    """Rotate x in place by the RoPE angles of each row's position.

    x: float32 [T, H, head_dim]; cos, sin: float32 [T, head_dim // 2] (angle = pos · θ^(-2i/head_dim)).
    ``interleaved=True`` rotates adjacent pairs (x[2i], x[2i+1]) — RoFormer's form, and how GGUF
    stores llama Q/K (its converter permutes the rows to make this so). ``interleaved=False``
    rotates the halves (x[i], x[i + head_dim/2]) — the "NeoX" form Hugging Face uses.
    """
    T, H, D = x.shape
    half = D // 2
    for t in range(T):
        for h in range(H):
            for i in range(half):
                if interleaved:
                    a, b = 2 * i, 2 * i + 1
                else:
                    a, b = i, i + half
                x0 = x[t, h, a]
                x1 = x[t, h, b]
                x[t, h, a] = x0 * cos[t, i] - x1 * sin[t, i]
                x[t, h, b] = x0 * sin[t, i] + x1 * cos[t, i]


# error_model="numpy" on the gated activations: with Numba's default ("python") every division
# checks its divisor for zero to raise ZeroDivisionError, and that branch kept the loop from
# vectorising — 2.6 ns an element instead of 0.22 here, the same bits (1 + e^x is never 0).
# They write over `up` rather than into a third array: with an output that might be `gate`, LLVM
# guards the vector loop with an overlap check, and the MLP's in-place call (output = gate) failed
# it and ran the scalar loop (3.3 ns an element). Reading and writing `up` at the same index is
# safe without a check.
@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def swiglu(gate, up):
    """up ← silu(gate) ⊙ up, with silu(g) = g / (1 + e^-g). gate, up: float32 [T, d_ff]; gate is
    read only."""
    T, F = gate.shape
    for t in range(T):
        for i in range(F):
            g = gate[t, i]
            up[t, i] = g / (np.float32(1.0) + exp32(-g)) * up[t, i]


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def geglu_tanh(gate, up):
    """up ← gelu_tanh(gate) ⊙ up, gelu_tanh(g) = g/2 · (1 + tanh(√(2/π) (g + 0.044715 g³))).

    GELU with the tanh approximation (Hendrycks & Gimpel 2016), gated as in GeGLU (Shazeer 2020);
    Gemma's MLP (Hugging Face ``gelu_pytorch_tanh``). gate, up: float32 [T, d_ff]; gate is read only.
    Computed as g · σ(2u) — the same function, since (1 + tanh u)/2 = σ(2u) — because exp
    vectorises and tanh does not (3× faster here; :func:`exp32` vectorises where NumPy's does not).
    """
    T, F = gate.shape
    c2 = np.float32(2.0 * np.sqrt(2.0 / np.pi))
    for t in range(T):
        for i in range(F):
            g = gate[t, i]
            u2 = c2 * (g + np.float32(0.044715) * g * g * g)
            up[t, i] = g / (np.float32(1.0) + exp32(-u2)) * up[t, i]


@njit(cache=True, fastmath=FASTMATH, inline="always")
def row_max(row):
    """The largest entry of a float32 [n] row; -inf when it is empty or holds only -inf and NaN.

    Eight running maxima, merged at the end: one running maximum is a chain of dependent compares
    (0.46 ns an element here, 0.18 with eight) that LLVM vectorises only with the ``nnan`` flag,
    which :data:`~mqa_gen.kernels.flags.FASTMATH` leaves out. A NaN entry never wins a compare.
    """
    n = row.shape[0]
    whole = n - n % 8
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = np.float32(-np.inf)
    for i in range(0, whole, 8):
        m0 = row[i] if row[i] > m0 else m0
        m1 = row[i + 1] if row[i + 1] > m1 else m1
        m2 = row[i + 2] if row[i + 2] > m2 else m2
        m3 = row[i + 3] if row[i + 3] > m3 else m3
        m4 = row[i + 4] if row[i + 4] > m4 else m4
        m5 = row[i + 5] if row[i + 5] > m5 else m5
        m6 = row[i + 6] if row[i + 6] > m6 else m6
        m7 = row[i + 7] if row[i + 7] > m7 else m7
    m = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    for i in range(whole, n):
        m = row[i] if row[i] > m else m
    return m


@njit(cache=True, fastmath=FASTMATH, inline="always")
def scaled_softmax_inplace(row, scale):
    """row ← softmax(scale · row) for a float32 [n] row, in place; scale: float32 > 0.

    Computed as e^{scale·(x − max x)} / Σ: for scale > 0 the same function as scaling first, one
    pass fewer. -inf entries become 0. A row of only -inf or NaN gives NaN, never a
    ZeroDivisionError (see :func:`~mqa_gen.kernels.attention.attention_decode`): the total is ≥ 1
    otherwise.
    """
    m = row_max(row)
    total = np.float32(0.0)
    for i in range(row.shape[0]):
        e = exp32((row[i] - m) * scale)
        row[i] = e
        total += e
    inv = np.float32(1.0) / total if total > 0 else np.float32(np.nan)
    for i in range(row.shape[0]):
        row[i] *= inv


@njit(cache=True, fastmath=FASTMATH)
def softmax_inplace(row):
    """Numerically stable softmax over a float32 [n] row, in place; -inf entries become 0, a row
    of only -inf or NaN becomes NaN."""
    scaled_softmax_inplace(row, np.float32(1.0))


@njit(cache=True, fastmath=FASTMATH)
def causal_softmax_rows(scores, scale, first_index, first_position, window):
    """Scale, mask and softmax a block of attention scores in place (one pass over each row's
    allowed keys, zeros elsewhere).

    scores: float32 [G, R, L]: G query heads × R query rows × L keys, key j at cache index
    first_index + j. Query row r sits at cache index first_position + r and may read the keys at
    indices ≤ its own, and with ``window`` > 0 only the last ``window`` of them (as
    :func:`~mqa_gen.kernels.attention.attention_prefill`); every row's own key is in the block.
    scale: float > 0.

    One thread, like the other row-wise kernels: it runs between two BLAS products, and a
    parallel region there made the whole attention 2–3× slower (Numba's and OpenBLAS's worker
    threads each spinning for the cores while the other works). Each row's allowed keys are taken
    as a slice indexed from 0: loops over ``range(begin, stop)`` did not vectorise (4× slower).
    """
    G, R, L = scores.shape
    scale32 = np.float32(scale)
    for task in range(G * R):
        g, r = task // R, task % R
        pos = first_position + r
        stop = min(L, pos - first_index + 1)  # keys 0 .. stop-1 are at or before the row
        begin = max(0, pos - window + 1 - first_index) if window > 0 else 0
        row = scores[g, r]
        scaled_softmax_inplace(row[begin:stop], scale32)
        row[:begin] = 0.0
        row[stop:] = 0.0


def warm_up() -> None:
    """Call each kernel here once on tiny inputs, with every argument type the model passes, so
    Numba compiles (or loads from its disk cache) each specialisation before the first token."""
    f32 = np.float32
    x = np.ones((2, 8), f32)
    rmsnorm(x, np.ones(8, f32), 1e-5, np.empty_like(x))
    gain = np.ones(8, f32)
    gain.flags.writeable = False  # float32 norm weights are read-only views of the GGUF mapping
    rmsnorm(x, gain, 1e-5, np.empty_like(x))
    swiglu(x, np.ones_like(x))
    geglu_tanh(x, np.ones_like(x))
    softmax_inplace(np.ones(4, f32))
    causal_softmax_rows(np.ones((2, 2, 4), f32), 0.5, 0, 2, 0)
    q = np.ones((2, 2, 4), f32)
    cos, sin = np.ones((2, 2), f32), np.zeros((2, 2), f32)
    rope(q, cos, sin, True)
    rope(q, cos, sin, False)
