"""The KV cache: per sequence, one preallocated K/V store per layer, written in place.

Two layers of objects, as mlx-lm's ``models/cache.py`` keeps one class per storage policy:

* a **layer cache** holds one layer's K and V arrays of shape [n_kv_heads, capacity, row_width]
  (head-major, so the decode kernel reads a KV head's history as one contiguous block) and answers
  one call, :meth:`LayerCache.update_and_fetch`: store the new rows, return what the attention
  kernels read. :class:`LayerCache` keeps every position (row p holds position p);
  :class:`RingLayerCache` keeps the last ``window`` positions of a sliding-window layer in a ring
  (position p in slot p mod capacity). Neither concatenates or reallocates per token.
* a **sequence cache**, :class:`KVCache`, holds the layer caches of one sequence, how many
  positions are stored (``length``), and which token id produced each position (``token_ids``), so
  a later prompt can reuse the longest common prefix (:meth:`KVCache.common_prefix`). The model's
  ``forward`` writes rows through the layer caches and advances ``length``; whoever knows the ids
  labels them (:meth:`KVCache.label_tokens`, the generation loop does). A position nobody labelled
  is unknown (-1) and never matches, so an unlabelled cache is never silently reused.

The element type is a storage object (:mod:`mqa_gen.kv_storage`): f32, f16 kept as uint16 bits,
or llama.cpp's q8_0 / q4_0 blocks kept as their bytes; a stored row is ``row_width(head_dim)``
array elements. Bytes per token = 2 (K and V) × n_layers × n_kv_heads × bytes per row (head_dim ×
4 for f32, × 2 for f16, head_dim / 32 × 34 for q8_0, × 18 for q4_0) — the quantity MQA shrinks by a
factor n_heads relative to MHA (Shazeer 2019). Saving and loading a cache is
:mod:`mqa_gen.prompt_cache`'s job.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from .errors import SizeError
from .kv_storage import CacheStorage, storage_type


def lazy_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zero-filled array on its own anonymous memory mapping: the OS hands out zero pages only as
    they are first written, so an 8k-token cache costs resident memory only for the rows used.
    (``np.zeros`` gets the same from ``calloc`` only while the allocator maps large blocks afresh;
    once glibc has raised its mmap threshold, calloc zeroes reused heap memory and every byte of the
    cache becomes resident at once.)"""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=dtype, count=int(np.prod(shape))).reshape(shape)


def _meminfo() -> dict[str, int]:
    """The fields of /proc/meminfo in bytes (empty where there is no such file)."""
    fields = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                fields[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return fields


def memory_limit_bytes() -> int | None:
    """Physical memory plus swap, in bytes (``MemTotal`` + ``SwapTotal`` of /proc/meminfo; where
    there is none, the physical pages ``sysconf`` reports), or None when neither is known: the
    most a KV cache can ever fill, however lazily it is mapped."""
    fields = _meminfo()
    if "MemTotal" in fields:
        return fields["MemTotal"] + fields.get("SwapTotal", 0)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, AttributeError):
        return None


def available_memory_bytes() -> int | None:
    """The memory the kernel says new allocations can take without swapping (``MemAvailable`` of
    /proc/meminfo, bytes), or None where that is not known: the default KV budget of ``batch``."""
    return _meminfo().get("MemAvailable")


def check_cache_fits(n_bytes: int, n_tokens: int, sequences: int = 1) -> None:
    """Refuse a KV cache of ``n_bytes`` bytes (a Python int: no overflow for absurd sizes) for
    ``sequences`` sequences of ``n_tokens`` tokens when it exceeds :func:`memory_limit_bytes`.

    The arrays are mapped lazily (:func:`lazy_zeros`), so a cache costs memory only as it fills;
    but one that could never fill on this machine is a wrong ``--ctx-size`` or a damaged model
    file, and refusing it now beats an ``OSError`` from ``mmap`` or an out-of-memory kill later.

    Raises:
        SizeError: one line with the bytes needed and the machine's memory.
    """
    limit = memory_limit_bytes()
    if limit is not None and n_bytes > limit:
        who = f"{sequences} sequences of {n_tokens:,} tokens" if sequences > 1 else f"a context of {n_tokens:,} tokens"
        raise SizeError(f"the KV cache for {who} needs {n_bytes / 2**30:,.1f} GiB, more than this machine's "
                        f"memory and swap ({limit / 2**30:,.1f} GiB): lower --ctx-size")


def _allocation_error(n_tokens: int, error: BaseException) -> SizeError:
    """An allocation that failed although :func:`check_cache_fits` passed (address space, limits)."""
    return SizeError(f"cannot allocate a KV cache of {n_tokens:,} tokens ({type(error).__name__}: "
                     f"{error}): lower --ctx-size")


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, storage: str | CacheStorage = "f32") -> int:
    """Bytes of K and V one token occupies across all layers (int, bytes): 2 × n_layers ×
    n_kv_heads × the storage type's bytes per row of head_dim elements.

    Raises:
        ValueError: an unknown storage name, or a head_dim the block type cannot store.
    """
    return 2 * n_layers * n_kv_heads * storage_type(storage).bytes_per_row(head_dim)


def kv_bytes(n_tokens: int, windows, n_kv_heads: int, head_dim: int, storage: str | CacheStorage = "f32") -> int:
    """Bytes of K and V for ``n_tokens`` tokens (int, bytes) when layer i keeps at most
    ``windows[i]`` positions (0 = all of them: a full-attention layer).

    Raises:
        ValueError: as :func:`kv_bytes_per_token`.
    """
    rows = sum(min(n_tokens, w) if w else n_tokens for w in windows)
    return 2 * rows * n_kv_heads * storage_type(storage).bytes_per_row(head_dim)


def _cache_bytes(n_kv_heads: int, head_dim: int, max_seq_len: int, storage: CacheStorage, windows) -> int:
    """Bytes one sequence's cache maps for ``max_seq_len`` tokens: K and V of every layer (a
    sliding-window layer holds at most its window) and the int64 token id of each position."""
    return kv_bytes(max_seq_len, windows, n_kv_heads, head_dim, storage) + 8 * max_seq_len


class LayerCache:
    """One full-attention layer's K and V: position p is stored in row p.

    Args:
        n_kv_heads, capacity, head_dim: ints > 0 (capacity in positions).
        storage: the element type (:class:`~mqa_gen.kv_storage.CacheStorage`).

    Attributes:
        keys, values: [n_kv_heads, capacity, row_width] arrays of ``storage.array_dtype``
            (row_width = ``storage.row_width(head_dim)``: head_dim, or a q8_0 / q4_0 row's bytes).
        window: 0 (every earlier position is attended to).
    """

    window = 0

    def __init__(self, n_kv_heads: int, capacity: int, head_dim: int, storage: CacheStorage,
                 arrays: tuple[np.ndarray, np.ndarray] | None = None):
        self.capacity, self.storage = capacity, storage
        if arrays is None:  # its own arrays; else views of a pool's (KVCachePool)
            width = storage.row_width(head_dim)
            arrays = tuple(lazy_zeros((n_kv_heads, capacity, width), storage.array_dtype) for _ in "kv")
        self.keys, self.values = arrays

    @property
    def nbytes(self) -> int:
        """Bytes held by the K and V arrays (the whole capacity)."""
        return self.keys.nbytes + self.values.nbytes

    def slot(self, position: int) -> int:
        """The row that holds ``position``."""
        return position % self.capacity

    def update_and_fetch(self, k: np.ndarray, v: np.ndarray, position: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Store the K/V rows of T new tokens at positions position .. position+T-1 and return what
        the attention kernels read for them.

        k, v: float32 [T, n_kv_heads, head_dim]. Returns ``(keys, values, start)``: stored arrays
        [n_kv_heads, S, row_width] in which new token t sits at index start + t and may attend to
        every index ≤ start + t (a sliding-window layer's kernel applies the window itself). For
        one new token that means all rows 0 .. start, in any order (softmax ignores order).

        Raises:
            ValueError: the rows do not fit in the capacity.
        """
        if position + k.shape[0] > self.capacity:
            raise ValueError(f"KV cache full: {position} + {k.shape[0]} tokens > capacity {self.capacity}")
        self._store(k, v, position)
        return self.keys, self.values, position

    def _store(self, k: np.ndarray, v: np.ndarray, position: int) -> None:
        T, cap = k.shape[0], self.capacity
        encode = self.storage.encode
        if T == 1:  # one row into its slot: the decode step's write, kept short
            slot = position % cap
            self.keys[:, slot, :] = encode(k[0])
            self.values[:, slot, :] = encode(v[0])
            return
        end = position + T
        n = min(T, cap)  # a ring keeps only the last `cap` of the new rows
        first = end - n
        if first // cap == (end - 1) // cap:  # one contiguous run of slots
            slots = slice(first % cap, (end - 1) % cap + 1)
        else:
            slots = np.arange(first, end) % cap
        self.keys[:, slots, :] = encode(k[T - n:]).transpose(1, 0, 2)
        self.values[:, slots, :] = encode(v[T - n:]).transpose(1, 0, 2)

    def rows(self, end: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Stored K and V [n_kv_heads, m, row_width] of positions end − m .. end − 1, in position
        order, m = min(n, end, capacity) (copies; for saving, tests and the ring prefill path)."""
        m = min(n, end, self.capacity)
        slots = np.arange(end - m, end) % self.capacity
        return self.keys[:, slots, :], self.values[:, slots, :]

    def load_rows(self, k: np.ndarray, v: np.ndarray, positions: np.ndarray) -> None:
        """Put stored rows k, v [n_kv_heads, m, row_width] (``storage.array_dtype``) at ``positions``
        (int [m], each < the sequence capacity; a ring keeps those it holds): for loading a cache."""
        slots = positions % self.capacity
        self.keys[:, slots, :] = k
        self.values[:, slots, :] = v

    def can_truncate(self, length: int, n_tokens: int) -> bool:
        """Whether a sequence of ``length`` positions may be cut back to ``n_tokens``: always here."""
        return True


class RingLayerCache(LayerCache):
    """A sliding-window layer's K and V: a ring of ``capacity`` = min(window, max_seq_len) rows,
    position p in slot p mod capacity (Gemma 3's local layers attend to the last ``window``
    positions only, Beltagy et al. 2020). Once the ring has wrapped it no longer holds the rows a
    rollback would need (:meth:`can_truncate`)."""

    def __init__(self, n_kv_heads: int, capacity: int, head_dim: int, storage: CacheStorage, window: int,
                 arrays: tuple[np.ndarray, np.ndarray] | None = None):
        super().__init__(n_kv_heads, capacity, head_dim, storage, arrays)
        self.window = window

    def update_and_fetch(self, k: np.ndarray, v: np.ndarray, position: int) -> tuple[np.ndarray, np.ndarray, int]:
        """As :meth:`LayerCache.update_and_fetch`. One new token: the ring itself, start =
        min(position, capacity − 1) (all rows held are in its window). Several tokens that fit
        before the ring wraps: the ring, start = position. Several that wrap it: a new array
        [the window's older rows | the new rows] in position order, start = the older rows' count
        (read before the new rows overwrite them)."""
        T, cap = k.shape[0], self.capacity
        if T == 1:
            self._store(k, v, position)
            return self.keys, self.values, min(position, cap - 1)
        if position + T <= cap:  # rows still in position order
            self._store(k, v, position)
            return self.keys, self.values, position
        old_k, old_v = self.rows(position, self.window - 1)  # (KV, n_old, D)
        encode = self.storage.encode
        keys = np.concatenate([old_k, encode(k).transpose(1, 0, 2)], axis=1)
        values = np.concatenate([old_v, encode(v).transpose(1, 0, 2)], axis=1)
        self._store(k, v, position)
        return keys, values, old_k.shape[1]

    def can_truncate(self, length: int, n_tokens: int) -> bool:
        """A ring that has wrapped only goes back one position (the next token needs positions
        n − window + 1 .. n − 1; the ring holds length − window ..); back to 0 always works."""
        return n_tokens == 0 or length <= self.capacity or n_tokens >= length - 1


class KVCache:
    """The KV cache of one sequence: a layer cache per layer, preallocated for ``max_seq_len`` tokens.

    Args:
        n_layers, n_kv_heads, head_dim: model dimensions (ints > 0).
        max_seq_len: capacity in tokens (int > 0).
        dtype: a storage name (``"f32"``, ``"f16"``, ``"q8_0"``, ``"q4_0"``, or the aliases
            ``"float32"``, ``"float16"``) or a :class:`~mqa_gen.kv_storage.CacheStorage`.
        windows: per layer, the sliding window in tokens (0 = full attention); None = all full.
        pool, slot: set by :class:`KVCachePool` for a cache stored in its slot ``slot``.

    Attributes:
        layers: one :class:`LayerCache` (or :class:`RingLayerCache`) per layer.
        storage: the element type; ``dtype`` is its name.
        length: tokens stored (int); layer i holds positions max(0, length − capacity_i) .. length − 1.
        token_ids: int64 [length] view of the id stored at each position (-1 = unknown).

    Raises:
        ValueError: a dimension ≤ 0, an unknown dtype, a head_dim the dtype's blocks cannot hold
            (q8_0 and q4_0 need a multiple of 32), or a windows list of the wrong length.
        SizeError: a cache larger than this machine's memory and swap (:func:`check_cache_fits`),
            or one whose arrays cannot be mapped.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_seq_len: int,
                 dtype: str | CacheStorage = "f32", windows=None, *, pool: "KVCachePool | None" = None,
                 slot: int = 0):
        if min(n_layers, n_kv_heads, head_dim, max_seq_len) <= 0:
            raise ValueError("KV cache dimensions must all be > 0")
        self.storage = storage_type(dtype)
        self.storage.check_head_dim(head_dim)
        windows = tuple(int(w) for w in windows) if windows is not None else (0,) * n_layers
        if len(windows) != n_layers or min(windows) < 0:
            raise ValueError(f"windows must give one value >= 0 per layer ({n_layers}), got {windows!r}")
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.max_seq_len = max_seq_len
        self.windows = windows
        self.pool, self.slot = pool, slot
        if pool is None:  # a pool checked the whole of its arrays already
            check_cache_fits(_cache_bytes(n_kv_heads, head_dim, max_seq_len, self.storage, windows), max_seq_len)

        def arrays(layer: int):
            return None if pool is None else (pool.keys[layer][slot], pool.values[layer][slot])

        try:
            self.layers = [RingLayerCache(n_kv_heads, min(w, max_seq_len), head_dim, self.storage, w, arrays(i))
                           if w else LayerCache(n_kv_heads, max_seq_len, head_dim, self.storage, arrays(i))
                           for i, w in enumerate(windows)]
            self._ids = np.full(max_seq_len, -1, dtype=np.int64)  # token id per position, -1 = unknown
        except (MemoryError, OverflowError, OSError, ValueError) as e:
            raise _allocation_error(max_seq_len, e) from None
        self.length = 0

    @property
    def dtype(self) -> str:
        """The storage type's canonical name: ``"f32"``, ``"f16"``, ``"q8_0"`` or ``"q4_0"``."""
        return self.storage.name

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token's K and V occupy across all layers while no sliding window is full."""
        return kv_bytes_per_token(self.n_layers, self.n_kv_heads, self.head_dim, self.storage)

    def capacity(self, layer: int) -> int:
        """Rows ``layer`` holds: max_seq_len, or its window for a sliding-window layer."""
        return self.layers[layer].capacity

    def bytes_at(self, n_tokens: int) -> int:
        """Bytes the K/V of ``n_tokens`` tokens occupy (sliding-window layers count ≤ window rows)."""
        return kv_bytes(n_tokens, self.windows, self.n_kv_heads, self.head_dim, self.storage)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's arrays (allocated for max_seq_len tokens)."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def used_bytes(self) -> int:
        """Bytes of the ``length`` tokens stored so far."""
        return self.bytes_at(self.length)

    @property
    def remaining(self) -> int:
        """Tokens that still fit."""
        return self.max_seq_len - self.length

    def advance(self, n_tokens: int) -> None:
        """Mark ``n_tokens`` more positions as stored (after every layer wrote them). Their token
        ids start unknown (-1) until :meth:`label_tokens` names them.

        Raises:
            ValueError: past the capacity.
        """
        if self.length + n_tokens > self.max_seq_len:
            raise ValueError("KV cache advanced past its capacity")
        self._ids[self.length : self.length + n_tokens] = -1
        self.length += n_tokens

    @property
    def token_ids(self) -> np.ndarray:
        """Read-only int64 [length] view: the token id stored at each position, -1 where unknown."""
        view = self._ids[: self.length]
        view.flags.writeable = False
        return view

    def label_tokens(self, ids) -> None:
        """Record that the last ``len(ids)`` stored positions hold the tokens ``ids`` (ints ≥ -1; -1
        = unknown), e.g. right after ``model.forward(ids, cache)``.

        Raises:
            ValueError: more ids than stored positions, or an id below -1.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = ids.shape[0]
        if n > self.length:
            raise ValueError(f"cannot label {n} tokens: the cache stores only {self.length}")
        if n and ids.min() < -1:
            raise ValueError("token ids must be >= 0 (or -1 for unknown)")
        self._ids[self.length - n : self.length] = ids

    def common_prefix(self, ids) -> int:
        """How many leading ``ids`` (ints) equal the stored positions' token ids: an int in
        0 .. min(len(ids), length). Unknown positions never match."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = min(ids.shape[0], self.length)
        mismatch = np.flatnonzero(self._ids[:n] != ids[:n])
        return int(mismatch[0]) if mismatch.size else n

    def can_truncate(self, n_tokens: int) -> bool:
        """Whether :meth:`truncate` to ``n_tokens`` keeps every row the next token needs: always
        for full layers; a sliding-window ring that has wrapped goes back only one position; back to
        0 always works (nothing is needed)."""
        if not 0 <= n_tokens <= self.length:
            return False
        return all(layer.can_truncate(self.length, n_tokens) for layer in self.layers)

    def truncate(self, n_tokens: int) -> None:
        """Keep only the first ``n_tokens`` positions (0 ≤ n_tokens ≤ length); nothing is copied.

        Raises:
            ValueError: n_tokens outside 0 .. length, or further back than a sliding-window ring
                remembers (see :meth:`can_truncate`; :meth:`reset` always works).
        """
        if not 0 <= n_tokens <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {n_tokens}")
        if not self.can_truncate(n_tokens):
            raise ValueError(f"cannot truncate to {n_tokens} tokens: a sliding-window layer no longer "
                             f"holds the rows before position {self.length}")
        self.length = n_tokens

    def reset(self) -> None:
        """Forget every stored token (``truncate(0)``, allowed for every cache)."""
        self.length = 0

    def resized(self, max_seq_len: int) -> "KVCache":
        """A new cache of capacity ``max_seq_len`` (≥ length) holding this one's stored rows and token
        ids (for a cache that grows as its owner appends: a copy, not an in-place change).

        Raises:
            ValueError: max_seq_len < length.
        """
        if max_seq_len < self.length:
            raise ValueError(f"cannot resize a cache of {self.length} tokens to {max_seq_len}")
        new = KVCache(self.n_layers, self.n_kv_heads, self.head_dim, max_seq_len, self.storage, self.windows)
        for old_layer, new_layer in zip(self.layers, new.layers):
            k, v = old_layer.rows(self.length, self.length)
            new_layer.load_rows(k, v, np.arange(self.length - k.shape[1], self.length))
        new.advance(self.length)
        new.label_tokens(self.token_ids)
        return new

    def layer_view(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """K and V of one layer's stored tokens as float32 [n_kv_heads, n, head_dim] copies in
        position order, n = min(length, capacity(layer)) (for tests and analysis; the kernels read
        the stored arrays)."""
        k, v = self.layers[layer].rows(self.length, self.length)
        return self.storage.decode(k), self.storage.decode(v)


class KVCachePool:
    """The KV caches of up to ``n_slots`` sequences decoding together, in one pair of arrays per
    layer, [n_slots, n_kv_heads, capacity, row_width], so a decode step hands every sequence's cache
    to the attention kernel in one call (llama.cpp's server slots share one KV buffer the same way).

    Each slot is an ordinary :class:`KVCache` (``caches[i]``, whose layer arrays are views of slot
    i): it prefills, reuses prefixes and truncates as any cache does. A finished sequence's slot is
    reused by :meth:`KVCache.reset`. The arrays are lazily mapped (:func:`lazy_zeros`): only the
    rows written take memory.

    Args:
        n_slots: sequences (int > 0). The rest as :class:`KVCache` (one sequence's dimensions).

    Raises:
        ValueError: a dimension ≤ 0, an unknown dtype, a head_dim the dtype cannot store, or a bad
            windows list.
        SizeError: the slots together need more than this machine's memory and swap.
    """

    def __init__(self, n_slots: int, n_layers: int, n_kv_heads: int, head_dim: int, max_seq_len: int,
                 dtype: str | CacheStorage = "f32", windows=None):
        if min(n_slots, n_layers, n_kv_heads, head_dim, max_seq_len) <= 0:
            raise ValueError("KV cache pool dimensions must all be > 0")
        storage = storage_type(dtype)
        width = storage.row_width(head_dim)  # checks head_dim
        windows = tuple(int(w) for w in windows) if windows is not None else (0,) * n_layers
        capacities = [min(w, max_seq_len) if w else max_seq_len for w in windows]
        check_cache_fits(n_slots * _cache_bytes(n_kv_heads, head_dim, max_seq_len, storage, windows), max_seq_len,
                         n_slots)
        try:
            self.keys = [lazy_zeros((n_slots, n_kv_heads, cap, width), storage.array_dtype) for cap in capacities]
            self.values = [lazy_zeros((n_slots, n_kv_heads, cap, width), storage.array_dtype) for cap in capacities]
        except (MemoryError, OverflowError, OSError, ValueError) as e:
            raise _allocation_error(max_seq_len, e) from None
        self.caches = [KVCache(n_layers, n_kv_heads, head_dim, max_seq_len, storage, windows, pool=self, slot=i)
                       for i in range(n_slots)]

    @property
    def n_slots(self) -> int:
        """Sequences the pool holds."""
        return len(self.caches)

    def update_and_fetch_rows(self, layer: int, k: np.ndarray, v: np.ndarray, slots: np.ndarray,
                              positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A decode step's write for B sequences at once: row b of k, v (float32 [B, n_kv_heads,
        head_dim]) is position ``positions[b]`` of the sequence in slot ``slots[b]`` (int64 [B]).

        Returns ``(keys, values, lengths)``: this layer's pool arrays [n_slots, n_kv_heads,
        capacity, row_width] and int64 [B], the rows each new token attends to — the positions
        0 .. positions[b], or for a sliding-window ring every row it holds (in slot order; softmax
        ignores order), as :meth:`RingLayerCache.update_and_fetch` returns for one token.
        """
        keys, values = self.keys[layer], self.values[layer]
        capacity = keys.shape[2]
        encode = self.caches[0].storage.encode
        rows = positions % capacity
        heads = np.arange(keys.shape[1])
        keys[slots[:, None], heads[None, :], rows[:, None]] = encode(k)  # (B, KV, D)
        values[slots[:, None], heads[None, :], rows[:, None]] = encode(v)
        return keys, values, np.minimum(positions, capacity - 1) + 1
