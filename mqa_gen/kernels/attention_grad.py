"""Attention kernels for training: a forward that keeps its softmax probabilities, and the backward.

The model's kernels (:mod:`mqa_gen.kernels.attention`) are causal, read a float32/float16 KV cache
and throw the probabilities away — right for generation. Training the
:class:`~mqa_gen.layer.MultiQueryAttention` layer needs two more things, added here:

* :func:`attention_forward` — softmax(q kᵀ · scale) v, causal or not, that also returns the
  probabilities P it computed (and optionally applies an attention-weight dropout mask), in the
  dtype of its inputs (float32 or float64 — every accumulator takes the arrays' dtype, so the
  float64 gradient check is exact to float64 rounding);
* :func:`attention_backward` — given dO and the saved P: dQ, dK, dV. dK and dV of a KV head are
  summed over the G = n_heads / n_kv_heads query heads that read it (Shazeer 2019; Ainslie et
  al. 2023).

For one query head h reading KV head g = h // G, one sequence, rows t, key positions s:

    S[t, s]  = scale · q[t, h] · k[s, g]          (s ≤ t when causal)
    P[t, s]  = softmax_s S[t, s]                   P̃ = P ⊙ M   (M: dropout mask, 0 or 1/(1-p))
    o[t, h]  = Σ_s P̃[t, s] v[s, g]
    dP̃[t, s] = dO[t, h] · v[s, g]                  dP = dP̃ ⊙ M
    dS[t, s] = P[t, s] (dP[t, s] − Σ_s' P[t, s'] dP[t, s'])      (softmax Jacobian)
    dq[t, h] = scale Σ_s dS[t, s] k[s, g]
    dk[s, g] = scale Σ_{h in g} Σ_t dS[t, s] q[t, h]
    dv[s, g] = Σ_{h in g} Σ_t P̃[t, s] dO[t, h]

Layout (token-major, as the projections come out of ``x @ W`` reshaped):
q, dq, o, dO: [B, T, n_heads, head_dim]; k, v, dk, dv: [B, T, n_kv_heads, head_dim];
P, M, dS: [B, n_heads, T, T]. All arrays of one call share one dtype, float32 or float64.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .flags import FASTMATH

#: Key positions handled by one task of the dK/dV pass (rows of dk/dv owned by that task).
KEY_BLOCK = 16


def _zero(a):  # pragma: no cover - replaced by the overload inside jitted code
    """A zero of ``a``'s dtype (only callable from jitted code)."""
    raise NotImplementedError("_zero is only callable from Numba-jitted code")


@overload(_zero, inline="always")
def _zero_overload(a):
    # Accumulators take the arrays' dtype: float32 stays float32 (vectorises), float64 stays exact.
    if isinstance(a, types.Array) and a.dtype == types.float32:
        return lambda a: np.float32(0.0)
    return lambda a: np.float64(0.0)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def attention_forward(q, k, v, scale, causal, mask, use_mask, probs, store_probs, out):
    """Softmax attention over whole sequences, keeping the probabilities.

    Args:
        q: [B, T, n_heads, head_dim]; k, v: [B, T, n_kv_heads, head_dim] (RoPE already applied).
        scale: scalar of the arrays' dtype, usually 1/√head_dim.
        causal: row t attends to positions 0..t when True, to all T positions when False.
        mask: [B, n_heads, T, T] attention-weight dropout multipliers (0 or 1/(1-p)), read only
            when ``use_mask``; pass a [0, 0, 0, 0] array otherwise.
        probs: [B, n_heads, T, T], overwritten with P (zeros above the diagonal when causal)
            when ``store_probs``; otherwise a [0, 0, 0, 0] array (each task then uses a scratch
            row, so inference needs no T×T memory).
        out: [B, T, n_heads, head_dim], overwritten with Σ_s (P ⊙ M)[t, s] v[s].
    """
    B, T, H, D = q.shape
    KV = k.shape[2]
    G = H // KV
    for task in prange(B * KV * T):
        b = task // (KV * T)
        g = (task // T) % KV
        t = task % T
        n = t + 1 if causal else T
        scratch = np.empty(0 if store_probs else T, dtype=q.dtype)
        for j in range(G):
            h = g * G + j
            row = probs[b, h, t] if store_probs else scratch
            for s in range(n):
                acc = _zero(q)
                for d in range(D):
                    acc += q[b, t, h, d] * k[b, s, g, d]
                row[s] = acc * scale
            m = row[0]
            for s in range(1, n):
                if row[s] > m:
                    m = row[s]
            total = _zero(q)
            for s in range(n):
                e = np.exp(row[s] - m)
                row[s] = e
                total += e
            inv = (_zero(q) + 1) / total
            for s in range(n):
                row[s] *= inv
            for s in range(n, T):
                row[s] = 0
            for d in range(D):
                out[b, t, h, d] = 0
            for s in range(n):
                p = row[s]
                if use_mask:
                    p *= mask[b, h, t, s]
                for d in range(D):
                    out[b, t, h, d] += p * v[b, s, g, d]


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def attention_backward(q, k, v, probs, mask, use_mask, dout, scale, causal, need_dq, ds, dq, dk, dv):
    """Gradients of :func:`attention_forward` with respect to q, k and v.

    Args:
        q, k, v, scale, causal, mask, use_mask: as given to :func:`attention_forward`.
        probs: [B, n_heads, T, T], the P that forward stored.
        dout: [B, T, n_heads, head_dim], gradient of the loss with respect to the output.
        need_dq: compute ``dq`` (False skips that product; ``dq`` is then left untouched).
        ds: [B, n_heads, T, T] scratch, overwritten with scale · dS.
        dq: [B, T, n_heads, head_dim]; dk, dv: [B, T, n_kv_heads, head_dim]; overwritten. dk and
            dv of KV head g sum the contributions of its G query heads.

    Two passes so that no two tasks write the same element: rows (b, g, t) compute dS and dq;
    then blocks of KEY_BLOCK key positions (b, g, s-block) accumulate dk and dv.
    """
    B, T, H, D = q.shape
    KV = k.shape[2]
    G = H // KV
    for task in prange(B * KV * T):
        b = task // (KV * T)
        g = (task // T) % KV
        t = task % T
        n = t + 1 if causal else T
        for j in range(G):
            h = g * G + j
            row = ds[b, h, t]
            p_row = probs[b, h, t]
            rowdot = _zero(q)
            for s in range(n):
                acc = _zero(q)
                for d in range(D):
                    acc += dout[b, t, h, d] * v[b, s, g, d]
                if use_mask:
                    acc *= mask[b, h, t, s]
                row[s] = acc
                rowdot += p_row[s] * acc
            for s in range(n):
                row[s] = scale * p_row[s] * (row[s] - rowdot)
            for s in range(n, T):
                row[s] = 0
            if need_dq:
                for d in range(D):
                    dq[b, t, h, d] = 0
                for s in range(n):
                    w = row[s]
                    for d in range(D):
                        dq[b, t, h, d] += w * k[b, s, g, d]
    n_blocks = (T + KEY_BLOCK - 1) // KEY_BLOCK
    for task in prange(B * KV * n_blocks):
        b = task // (KV * n_blocks)
        g = (task // n_blocks) % KV
        s0 = (task % n_blocks) * KEY_BLOCK
        s1 = min(s0 + KEY_BLOCK, T)
        for s in range(s0, s1):
            for d in range(D):
                dk[b, s, g, d] = 0
                dv[b, s, g, d] = 0
        for j in range(G):
            h = g * G + j
            for t in range(s0 if causal else 0, T):
                s_end = min(s1, t + 1) if causal else s1
                for s in range(s0, s_end):
                    w = ds[b, h, t, s]
                    p = probs[b, h, t, s]
                    if use_mask:
                        p *= mask[b, h, t, s]
                    for d in range(D):
                        dk[b, s, g, d] += w * q[b, t, h, d]
                        dv[b, s, g, d] += p * dout[b, t, h, d]
