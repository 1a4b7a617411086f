"""One forward step over several sequences: who they are, where they stand, which rows are whose.

The model runs B sequences at once. Sequence b brings ``n_b`` new tokens (a prompt chunk, or one
token when it decodes) and its own :class:`~mqa_gen.cache.KVCache`, whose ``length`` is the
position of its first new token; sequences in one step may sit at different positions. The new
tokens of all sequences are laid end to end as N = Σ n_b rows, so every weight matrix multiplies
all of them in one product (decode: each weight is read once for all B rows); only attention
splits the rows again, sequence by sequence, each against its own cache.

``decode`` marks the explicit decode step: every sequence brings exactly one token. Attention then
runs the split-K decode kernel, for all B sequences in one call when their caches share a
:class:`~mqa_gen.cache.KVCachePool` (``pool``, ``slots``); otherwise the prefill kernel (which also
handles a single row, e.g. a sequence that finishes its prompt beside others that prefill).
"""

from __future__ import annotations

import numpy as np

from .cache import KVCache


class Batch:
    """The sequences of one forward step.

    Args:
        caches: one :class:`~mqa_gen.cache.KVCache` per sequence (B of them, distinct objects).
        counts: new tokens per sequence, ints ≥ 1 [B].
        head_dim: the model's head_dim (for the RoPE tables).
        scratch: the decode kernel's work buffers (:class:`~mqa_gen.attention.DecodeScratch`), or
            None when the step does not decode.

    Attributes:
        starts: int64 [B], each sequence's first new position (its cache's length).
        offsets: int64 [B + 1]; sequence b owns rows offsets[b] .. offsets[b+1] − 1.
        positions: int64 [N], the absolute position of every row.
        decode: True when every sequence brings exactly one token.
        pool: the :class:`~mqa_gen.cache.KVCachePool` every cache belongs to, or None (caches of
            their own, or of several pools). slots: int64 [B], each cache's slot in ``pool``.

    Raises:
        ValueError: a count < 1, a cache listed twice, or a sequence that does not fit its cache.
    """

    def __init__(self, caches: list[KVCache], counts, head_dim: int, scratch=None):
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != (len(caches),) or not len(caches):
            raise ValueError("a batch needs one token count per cache, and at least one sequence")
        if counts.min() < 1:
            raise ValueError("every sequence in a batch needs at least one new token")
        if len({id(c) for c in caches}) != len(caches):
            raise ValueError("a KV cache appears twice in one batch")
        for cache, n in zip(caches, counts):
            if cache.length + n > cache.max_seq_len:
                raise ValueError(f"{cache.length} + {n} tokens exceed the KV cache capacity {cache.max_seq_len}")
        self.caches = caches
        self.starts = np.array([c.length for c in caches], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.decode = bool(counts.max() == 1)
        self.positions = self.starts if self.decode else np.concatenate(
            [np.arange(s, s + n) for s, n in zip(self.starts, counts)])
        pools = {id(c.pool) for c in caches}
        self.pool = caches[0].pool if len(pools) == 1 else None
        self.slots = np.array([c.slot for c in caches], dtype=np.int64) if self.pool is not None else None
        self.head_dim = head_dim
        self.scratch = scratch
        self._rope: dict[float, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def size(self) -> int:
        """B, the number of sequences."""
        return len(self.caches)

    @property
    def n_rows(self) -> int:
        """N, the new tokens of all sequences together."""
        return int(self.offsets[-1])

    @property
    def last_rows(self) -> np.ndarray:
        """int64 [B]: the index of each sequence's last new row (the rows whose logits a prefill returns)."""
        return self.offsets[1:] - 1

    def rows(self, b: int) -> slice:
        """The rows of sequence ``b``."""
        return slice(int(self.offsets[b]), int(self.offsets[b + 1]))

    def rope(self, theta: float) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin, float32 [N, head_dim/2], of every row's position for RoPE base ``theta``
        (computed once per step and base; see :func:`rope_cos_sin`)."""
        table = self._rope.get(theta)
        if table is None:
            table = self._rope[theta] = rope_cos_sin(self.positions, self.head_dim, theta)
        return table

    def advance(self) -> None:
        """After the last layer: every cache now stores its sequence's new tokens."""
        for b, cache in enumerate(self.caches):
            cache.advance(int(self.offsets[b + 1] - self.offsets[b]))


def rope_cos_sin(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of the RoPE angles pos · θ^(-2i/head_dim), i < head_dim/2 (Su et al. 2021).

    positions: int [T] absolute token positions. Returns two float32 [T, head_dim/2] arrays;
    the angles are computed in float64 so long positions keep their precision.
    """
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (D/2,)
    angles = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]  # (T, D/2)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
