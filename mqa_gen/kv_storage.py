"""KV-cache element types: how one K or V row of head_dim float32 values is stored.

The types and their names are llama.cpp's (``-ctk`` / ``-ctv``): ``f32``, ``f16``, and the block
types ``q8_0`` and ``q4_0`` (32 elements a block sharing one float16 scale: 8 and 4 bits an
element, 34 and 18 bytes a block). ``float32`` and ``float16``, the names earlier versions used,
are accepted everywhere a name is (:func:`storage_type`); what is reported is the canonical name.

A storage type is a small object with a ``name``, the NumPy dtype of the arrays the kernels read,
its block geometry (``block_size`` elements stored in ``block_bytes`` bytes; 1 element for the
float types), and the two conversions ``encode`` (float32 rows → stored rows, when a row is
written) and ``decode`` (stored rows → float32, for tests and analysis). A stored row is
``row_width(head_dim)`` elements of ``array_dtype`` — head_dim for f32 and f16, the row's bytes
for the block types — so a cache layer is an array [n_kv_heads, capacity, row_width]. The
attention kernels never call ``decode``: they read stored rows directly through
:func:`mqa_gen.kernels.cache_rows.cache_row`, which Numba specialises on the array's dtype.

Adding an element type is one class here plus one row reader in ``cache_row``; the cache, the
attention block and prompt-cache files only see this protocol.

Bytes per token = 2 (K and V) × n_layers × n_kv_heads × ``bytes_per_row(head_dim)``, where a row
is head_dim × 4 bytes (f32), × 2 (f16), head_dim / 32 × 34 (q8_0) or head_dim / 32 × 18 (q4_0) —
the quantity MQA divides by n_heads / n_kv_heads (Shazeer 2019) and a smaller element type by
4 / bytes per element.
"""

from __future__ import annotations

import numpy as np


class CacheStorage:
    """One KV-cache element type (the protocol; see the module docstring).

    Attributes:
        name: the type's name as llama.cpp spells it, e.g. ``"f16"``.
        aliases: other names accepted for it (tuple of str).
        array_dtype: NumPy dtype of the stored arrays, as the kernels see them.
        block_size: elements per block (int; 1 for f32 and f16, 32 for q8_0 and q4_0).
        block_bytes: bytes per block (int).
    """

    name: str
    aliases: tuple[str, ...] = ()
    array_dtype: np.dtype
    block_size: int = 1
    block_bytes: int

    @property
    def bytes_per_element(self) -> float:
        """Bytes per element, block scale included: 4, 2, 34/32 or 18/32 (float)."""
        return self.block_bytes / self.block_size

    def check_head_dim(self, head_dim: int) -> None:
        """Refuse a head_dim this type cannot store: not a multiple of the block size.

        Raises:
            ValueError: one line naming the type, the block size and head_dim.
        """
        if head_dim % self.block_size:
            raise ValueError(f"a {self.name} KV cache stores blocks of {self.block_size} elements, so head_dim must "
                             f"be a multiple of {self.block_size}; this model's head_dim is {head_dim} "
                             "(use --cache-dtype f16 or f32)")

    def bytes_per_row(self, head_dim: int) -> int:
        """Bytes one stored K or V row of one KV head takes (int), head_dim checked."""
        self.check_head_dim(head_dim)
        return head_dim // self.block_size * self.block_bytes

    def row_width(self, head_dim: int) -> int:
        """Elements of ``array_dtype`` in one stored row: the last axis of a cache array."""
        return self.bytes_per_row(head_dim) // self.array_dtype.itemsize

    def encode(self, x: np.ndarray) -> np.ndarray:
        """float32 rows [..., head_dim] → stored rows [..., row_width] of ``array_dtype`` (may be ``x``)."""
        raise NotImplementedError

    def decode(self, stored: np.ndarray) -> np.ndarray:
        """Stored rows [..., row_width] → a new float32 array [..., head_dim]."""
        raise NotImplementedError

    def all_finite(self, stored: np.ndarray) -> bool:
        """Whether every value stored rows [..., row_width] represent is finite (a NaN row would turn
        every later score of its head into NaN; prompt-cache files are checked with this)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<KV storage {self.name}>"


def _half_bits_finite(bits: np.ndarray) -> bool:
    """Whether float16 bit patterns (uint16) are all finite (exponent bits not all ones)."""
    return bool(((bits & np.uint16(0x7C00)) != np.uint16(0x7C00)).all())


class Float32Storage(CacheStorage):
    """float32 elements, stored as they are (4 bytes): logits as transformers' float32 model gives."""

    name = "f32"
    aliases = ("float32",)
    array_dtype = np.dtype(np.float32)
    block_bytes = 4

    def encode(self, x: np.ndarray) -> np.ndarray:
        return x

    def decode(self, stored: np.ndarray) -> np.ndarray:
        return np.array(stored, dtype=np.float32)

    def all_finite(self, stored: np.ndarray) -> bool:
        return bool(np.isfinite(stored).all())


class Float16Storage(CacheStorage):
    """IEEE float16 elements (2 bytes), llama.cpp's default cache type. Numba has no float16 on the
    CPU, so the arrays hold the uint16 bit patterns; kernels decode them as they read
    (:func:`mqa_gen.kernels.halfprec.half_to_f32`, exact)."""

    name = "f16"
    aliases = ("float16",)
    array_dtype = np.dtype(np.uint16)
    block_bytes = 2
    _to_half_bits = None  # halfprec's encoder, looked up on first use (importing it loads Numba)

    def encode(self, x: np.ndarray) -> np.ndarray:
        if self._to_half_bits is None:  # once, not on each decode step's two writes per layer
            from .kernels.halfprec import float32_array_to_half_bits

            self._to_half_bits = float32_array_to_half_bits
        return self._to_half_bits(x)

    def decode(self, stored: np.ndarray) -> np.ndarray:
        return stored.view(np.float16).astype(np.float32)

    def all_finite(self, stored: np.ndarray) -> bool:
        return _half_bits_finite(stored)


class _BlockStorage(CacheStorage):
    """A llama.cpp block type: per 32 elements, a float16 scale d (2 bytes, little-endian) then the
    codes; rows are arrays of the blocks' bytes (see :mod:`mqa_gen.kernels.cache_rows`).
    ``kernel_name`` names the kernel there that writes float32 rows [N, head_dim] as blocks (uint8
    [N, row bytes]); it is looked up on first use, so importing this module compiles nothing."""

    block_size = 32
    kernel_name: str
    _kernel = None

    def encode(self, x: np.ndarray) -> np.ndarray:
        """float32 [..., head_dim] → [..., head_dim / 32 · block_bytes] of ``array_dtype``, the
        blocks ggml's reference quantiser writes for the same values (byte for byte).

        Raises:
            ValueError: head_dim not a multiple of 32.
        """
        head_dim = x.shape[-1]
        flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, head_dim)
        out = np.empty((flat.shape[0], self.bytes_per_row(head_dim)), np.uint8)
        if self._kernel is None:
            from .kernels import cache_rows

            self._kernel = getattr(cache_rows, self.kernel_name)
        self._kernel(flat, out)
        return out.view(self.array_dtype).reshape(x.shape[:-1] + (out.shape[1],))

    def _blocks(self, stored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """stored [..., nb · block_bytes] → (scales float32 [..., nb, 1], code bytes uint8 [..., nb,
        block_bytes − 2])."""
        raw = np.ascontiguousarray(stored).view(np.uint8)
        blocks = raw.reshape(raw.shape[:-1] + (raw.shape[-1] // self.block_bytes, self.block_bytes))
        scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16).astype(np.float32)
        return scales, blocks[..., 2:]

    def all_finite(self, stored: np.ndarray) -> bool:
        raw = np.ascontiguousarray(stored).view(np.uint8)
        blocks = raw.reshape(raw.shape[:-1] + (raw.shape[-1] // self.block_bytes, self.block_bytes))
        return _half_bits_finite(np.ascontiguousarray(blocks[..., :2]).view(np.uint16))  # codes are always finite


class Q8_0Storage(_BlockStorage):
    """llama.cpp's q8_0 (ggml ``block_q8_0``): per 32 elements a float16 scale d and 32 int8 codes q,
    x = d·q — 34 bytes per 32 elements, 8.5 bits each. The arrays are int8 (the codes' type)."""

    name = "q8_0"
    array_dtype = np.dtype(np.int8)
    block_bytes = 34

    kernel_name = "quantize_q8_0"

    def decode(self, stored: np.ndarray) -> np.ndarray:
        scales, codes = self._blocks(stored)
        x = scales * codes.view(np.int8).astype(np.float32)  # (..., nb, 32)
        return x.reshape(x.shape[:-2] + (-1,))


class Q4_0Storage(_BlockStorage):
    """llama.cpp's q4_0 (ggml ``block_q4_0``): per 32 elements a float16 scale d and 16 bytes of
    4-bit codes q (byte j: element j in the low nibble, element j + 16 in the high one),
    x = d·(q − 8) — 18 bytes per 32 elements, 4.5 bits each. The arrays are uint8."""

    name = "q4_0"
    array_dtype = np.dtype(np.uint8)
    block_bytes = 18

    kernel_name = "quantize_q4_0"

    def decode(self, stored: np.ndarray) -> np.ndarray:
        scales, nibbles = self._blocks(stored)
        codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).astype(np.float32) - 8  # (..., nb, 32)
        x = scales * codes
        return x.reshape(x.shape[:-2] + (-1,))


#: Every storage type by canonical name, in order of size: what ``--cache-dtype`` offers and
#: prompt-cache files name.
STORAGE_TYPES: dict[str, CacheStorage] = {s.name: s for s in (Float32Storage(), Float16Storage(), Q8_0Storage(),
                                                              Q4_0Storage())}
#: Every accepted name (canonical names, then aliases) → its storage type.
STORAGE_NAMES: dict[str, CacheStorage] = {**STORAGE_TYPES,
                                          **{alias: s for s in STORAGE_TYPES.values() for alias in s.aliases}}


def storage_type(kind: str | CacheStorage) -> CacheStorage:
    """The :class:`CacheStorage` for a name in :data:`STORAGE_NAMES` (a canonical name such as
    ``"q8_0"`` or an alias such as ``"float16"``), or a storage object itself.

    Raises:
        ValueError: an unknown name.
    """
    if isinstance(kind, CacheStorage):
        return kind
    storage = STORAGE_NAMES.get(kind) if isinstance(kind, str) else None
    if storage is None:
        raise ValueError(f"cache dtype must be one of {', '.join(STORAGE_TYPES)} (or float32, float16), got {kind!r}")
    return storage


def canonical_name(kind: str | CacheStorage) -> str:
    """The canonical name of a storage type name or alias (``"float16"`` → ``"f16"``).

    Raises:
        ValueError: an unknown name.
    """
    return storage_type(kind).name
