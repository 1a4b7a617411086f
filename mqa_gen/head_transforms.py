"""Exact per-head transforms of an attention layer: the model computes the same function after them.

One layer's projections, in the models' layout (y = x Wᵀ, as GGUF stores them):

    W_q [n_heads·head_dim, d_model]   W_k, W_v [n_kv_heads·head_dim, d_model]   W_o [d_model, n_heads·head_dim]

KV head j serves query heads j·G … (j+1)·G−1, G = n_heads / n_kv_heads. Two families of transforms
leave every score and every output unchanged ("computational invariance"; Jin et al., "Align
Attention Heads Before Merging Them: An Effective Way for Converting MHA to GQA", Findings of
EMNLP 2025, §3):

* **Keys.** RoPE (Su et al. 2021) rotates each *frequency pair* of a q or k head — the two
  coordinates (a, b) it turns together at angle pos·ω_i, ω_i = θ^(−2i/head_dim) — so a pair is best
  read as one complex number z = x_a + i·x_b that RoPE multiplies by e^{i·pos·ω_i}. The score is
  q·k = Σ_i Re(z_q,i · conj(z_k,i)). Multiplying a key head's pair i by a complex number c ≠ 0 and
  the same pair of every query head reading it by 1 / conj(c) leaves each term unchanged, and it
  commutes with RoPE (complex numbers commute). |c| = 1 is a 2×2 rotation: the orthogonal
  transforms that commute with RoPE are exactly these, one rotation per pair (the frequencies
  differ, so no pair may mix with another). :func:`transform_key_pairs`.
* **Values.** A value head may be multiplied by any invertible S [head_dim, head_dim]
  (v → S v) when the slices of W_o that read it are multiplied by S⁻¹ (attention averages
  values, a linear operation, so S passes through it). :func:`transform_values`.

Which coordinates form a pair depends on the file: GGUF llama files store Q/K rows permuted so
that pairs are adjacent, (2i, 2i+1) (``rope_interleaved=True``, llama.cpp's converter permutes
the Hugging Face rows to make it so); Gemma 3 pairs the halves, (i, i + head_dim/2)
(:func:`mqa_gen.kernels.rope`). :func:`rope_pairs` gives both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError


def rope_pairs(head_dim: int, interleaved: bool) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (a, b) of each RoPE frequency pair inside one head: int [head_dim/2] each.

    ``interleaved=True``: (2i, 2i+1), GGUF llama's layout; False: (i, i + head_dim/2). Pair i turns
    at ω_i = θ^(−2i/head_dim) in both layouts (:func:`mqa_gen.batch.rope_cos_sin`).

    Raises:
        ConfigError: an odd head_dim.
    """
    if head_dim % 2:
        raise ConfigError(f"RoPE needs an even head_dim, got {head_dim}")
    i = np.arange(head_dim // 2)
    return (2 * i, 2 * i + 1) if interleaved else (i, i + head_dim // 2)


@dataclass(frozen=True)
class AttentionWeights:
    """One layer's attention projections, float64, in the models' layout (see the module doc).

    Attributes:
        wq: [n_heads·head_dim, d_model]. wk, wv: [n_kv_heads·head_dim, d_model].
        wo: [d_model, n_heads·head_dim].
        n_heads, head_dim: ints; n_kv_heads follows from wk's rows.
        rope_interleaved: which rows form a RoPE pair (:func:`rope_pairs`).

    Raises:
        ConfigError: shapes that do not fit n_heads and head_dim, or n_heads not divisible by the
            KV heads.
    """

    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray
    n_heads: int
    head_dim: int
    rope_interleaved: bool = True

    def __post_init__(self) -> None:
        for name in ("wq", "wk", "wv", "wo"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        H, D = self.n_heads, self.head_dim
        d = self.wq.shape[1] if self.wq.ndim == 2 else -1
        kv_rows = self.wk.shape[0] if self.wk.ndim == 2 else -1
        if (self.wq.shape != (H * D, d) or kv_rows % D or self.wk.shape != (kv_rows, d)
                or self.wv.shape != (kv_rows, d) or self.wo.shape != (d, H * D)
                or kv_rows == 0 or H % (kv_rows // D)):
            raise ConfigError(f"attention weights do not fit {H} heads of {D}: W_q {self.wq.shape}, "
                              f"W_k {self.wk.shape}, W_v {self.wv.shape}, W_o {self.wo.shape}")

    @property
    def n_kv_heads(self) -> int:
        """KV heads (W_k's rows / head_dim)."""
        return self.wk.shape[0] // self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head, G = n_heads / n_kv_heads."""
        return self.n_heads // self.n_kv_heads

    @property
    def d_model(self) -> int:
        """Input and output width."""
        return self.wq.shape[1]

    def replace(self, **changes) -> "AttentionWeights":
        """A copy with some fields changed (:func:`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)

    def key_pairs(self) -> np.ndarray:
        """W_k as complex rows: complex128 [n_kv_heads, head_dim/2, d_model], row i of head j =
        W_k[a_i] + i·W_k[b_i], so that z = row · x is the key's pair i as one complex number."""
        return to_pairs(self.wk, self.head_dim, self.rope_interleaved)

    def query_pairs(self) -> np.ndarray:
        """W_q as complex rows: complex128 [n_heads, head_dim/2, d_model] (as :meth:`key_pairs`)."""
        return to_pairs(self.wq, self.head_dim, self.rope_interleaved)

    def value_heads(self) -> np.ndarray:
        """W_v by head: float64 [n_kv_heads, head_dim, d_model] (a view)."""
        return self.wv.reshape(self.n_kv_heads, self.head_dim, self.d_model)

    def output_slices(self) -> np.ndarray:
        """W_o by query head: float64 [n_heads, d_model, head_dim] (a copy); slice h maps head h's
        attention output o_h [head_dim] to its share of y = Σ_h W_o,h o_h."""
        D = self.head_dim
        return np.stack([self.wo[:, h * D:(h + 1) * D] for h in range(self.n_heads)])


def to_pairs(rows: np.ndarray, head_dim: int, interleaved: bool) -> np.ndarray:
    """Real projection rows [n·head_dim, d_model] → complex128 [n, head_dim/2, d_model] (pair i of
    head j as W[a_i] + i·W[b_i]; :func:`rope_pairs`)."""
    a, b = rope_pairs(head_dim, interleaved)
    heads = np.asarray(rows, dtype=np.float64).reshape(-1, head_dim, rows.shape[-1])  # (n, D, d)
    return heads[:, a] + 1j * heads[:, b]


def from_pairs(pairs: np.ndarray, interleaved: bool) -> np.ndarray:
    """Inverse of :func:`to_pairs`: complex [n, head_dim/2, d_model] → float64 [n·head_dim, d_model]."""
    n, half, d = pairs.shape
    a, b = rope_pairs(2 * half, interleaved)
    heads = np.empty((n, 2 * half, d))
    heads[:, a], heads[:, b] = pairs.real, pairs.imag
    return heads.reshape(n * 2 * half, d)


def transform_key_pairs(w: AttentionWeights, factors: np.ndarray) -> AttentionWeights:
    """Multiply pair i of key head j by ``factors[j, i]`` and the same pair of each query head
    reading it by 1 / conj(factors[j, i]): every q·k, with or without RoPE, is unchanged.

    factors: complex [n_kv_heads, head_dim/2], nonzero; unit modulus = the rotations of Jin et al.
    (orthogonal, commuting with RoPE). Returns new weights (W_v, W_o unchanged).

    Raises:
        ConfigError: a factor array of another shape, or a zero factor.
    """
    factors = np.asarray(factors, dtype=np.complex128)
    KV, G, half = w.n_kv_heads, w.group_size, w.head_dim // 2
    if factors.shape != (KV, half):
        raise ConfigError(f"key factors must have shape {(KV, half)}, got {factors.shape}")
    if np.any(factors == 0):
        raise ConfigError("a key factor of 0 is not invertible")
    keys = w.key_pairs() * factors[:, :, None]  # (KV, D/2, d)
    queries = w.query_pairs().reshape(KV, G, half, -1) / np.conj(factors)[:, None, :, None]  # (KV, G, D/2, d)
    return w.replace(wk=from_pairs(keys, w.rope_interleaved),
                     wq=from_pairs(queries.reshape(w.n_heads, half, -1), w.rope_interleaved))


def transform_values(w: AttentionWeights, maps: np.ndarray) -> AttentionWeights:
    """Multiply value head j by ``maps[j]`` (v_j → S_j v_j) and the W_o slice of each query head
    reading it by S_j⁻¹: the layer's output is unchanged (attention mixes value rows linearly).

    maps: float [n_kv_heads, head_dim, head_dim], invertible (orthogonal for Jin et al.'s
    alignment). Returns new weights (W_q, W_k unchanged).

    Raises:
        ConfigError: maps of another shape. numpy.linalg.LinAlgError: a singular map.
    """
    maps = np.asarray(maps, dtype=np.float64)
    KV, G, D = w.n_kv_heads, w.group_size, w.head_dim
    if maps.shape != (KV, D, D):
        raise ConfigError(f"value maps must have shape {(KV, D, D)}, got {maps.shape}")
    wv = np.einsum("jab,jbd->jad", maps, w.value_heads()).reshape(KV * D, -1)  # S_j W_v,j
    wo = w.wo.copy()
    for h in range(w.n_heads):
        s = maps[h // G]
        wo[:, h * D:(h + 1) * D] = np.linalg.solve(s.T, w.wo[:, h * D:(h + 1) * D].T).T  # W_o,h S⁻¹
    return w.replace(wv=wv, wo=wo)
