"""KV-cache element types: how one K or V row of head_dim float32 values is stored.

A storage type is a small object with a ``name`` (what ``--cache-dtype`` and prompt-cache files
say), the NumPy dtype of the arrays the kernels read, the bytes one element takes, and the two
conversions ``encode`` (float32 rows → stored rows, when a row is written) and ``decode`` (stored
rows → float32, for tests, analysis and the sliding-window prefill path). The attention kernels
never call these: they read stored rows directly through
:func:`mqa_gen.kernels.halfprec.cache_row`, which Numba specialises on the array's dtype.

Adding an element type (llama.cpp's ``q8_0`` blocks, say) is one class here plus one row reader
in ``cache_row``; the cache, the attention block and prompt-cache files only see this protocol.

Bytes per token = 2 (K and V) × n_layers × n_kv_heads × head_dim × ``itemsize`` — the quantity
MQA divides by n_heads / n_kv_heads (Shazeer 2019) and a smaller element type divides by
4 / itemsize.
"""

from __future__ import annotations

import numpy as np


class CacheStorage:
    """One KV-cache element type (the protocol; see the module docstring).

    Attributes:
        name: the type's name, e.g. ``"float32"``.
        array_dtype: NumPy dtype of the stored arrays, as the kernels see them.
        itemsize: bytes per stored element (int).
    """

    name: str
    array_dtype: np.dtype
    itemsize: int

    def encode(self, x: np.ndarray) -> np.ndarray:
        """float32 rows [..., head_dim] → stored rows [..., head_dim] of ``array_dtype`` (may be ``x``)."""
        raise NotImplementedError

    def decode(self, stored: np.ndarray) -> np.ndarray:
        """Stored rows [..., head_dim] → a new float32 array of the same shape."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<KV storage {self.name}>"


class Float32Storage(CacheStorage):
    """float32 elements, stored as they are (4 bytes): logits as transformers' float32 model gives."""

    name = "float32"
    array_dtype = np.dtype(np.float32)
    itemsize = 4

    def encode(self, x: np.ndarray) -> np.ndarray:
        return x

    def decode(self, stored: np.ndarray) -> np.ndarray:
        return np.array(stored, dtype=np.float32)


class Float16Storage(CacheStorage):
    """IEEE float16 elements (2 bytes), llama.cpp's default cache type. Numba has no float16 on the
    CPU, so the arrays hold the uint16 bit patterns; kernels decode them as they read
    (:func:`mqa_gen.kernels.halfprec.half_to_f32`, exact)."""

    name = "float16"
    array_dtype = np.dtype(np.uint16)
    itemsize = 2

    def encode(self, x: np.ndarray) -> np.ndarray:
        return x.astype(np.float16).view(np.uint16)

    def decode(self, stored: np.ndarray) -> np.ndarray:
        return stored.view(np.float16).astype(np.float32)


#: Every storage type by name: the one list ``--cache-dtype`` and prompt-cache files draw from.
STORAGE_TYPES: dict[str, CacheStorage] = {s.name: s for s in (Float32Storage(), Float16Storage())}


def storage_type(kind: str | CacheStorage) -> CacheStorage:
    """The :class:`CacheStorage` for a name in :data:`STORAGE_TYPES` (or a storage object itself).

    Raises:
        ValueError: an unknown name.
    """
    if isinstance(kind, CacheStorage):
        return kind
    storage = STORAGE_TYPES.get(kind)
    if storage is None:
        raise ValueError(f"cache dtype must be one of {', '.join(STORAGE_TYPES)}, got {kind!r}")
    return storage
