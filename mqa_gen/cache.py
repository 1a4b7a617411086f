"""The per-layer KV cache: preallocated, head-major, written in place.

Layout per layer: K and V arrays of shape [n_kv_heads, max_seq_len, head_dim], so the decode kernel
reads each KV head's history as one contiguous block. Decode writes row ``length`` in place;
nothing is concatenated or reallocated per token. A float16 cache stores its values as uint16 bit
patterns (Numba has no float16 on the CPU; kernels decode them with a lookup table).

Bytes per token = 2 (K and V) × n_layers × n_kv_heads × head_dim × itemsize — the quantity MQA
shrinks by a factor n_heads relative to MHA (Shazeer 2019).

The cache also remembers which token id produced each stored position (``token_ids``), so a later
prompt can reuse the longest common prefix (:meth:`KVCache.common_prefix`). The model's
``forward`` only writes K/V rows; whoever knows the ids labels them with
:meth:`KVCache.label_tokens` (the generation loop does). A position nobody labelled is "unknown"
(-1) and never matches, so an unlabelled cache is never silently reused. :meth:`KVCache.save` and
:meth:`KVCache.load` persist the stored rows and their ids (format in :mod:`mqa_gen.prompt_cache`).

Sliding-window layers (Gemma 3's local layers attend to the last ``window`` positions only) keep a
ring buffer of ``window`` rows: position p lives in slot p mod capacity. The same rule holds for a
full layer, whose capacity is ``max_seq_len`` (so the slot is p). A ring cannot be rolled back
further than it remembers, see :meth:`KVCache.can_truncate`.
"""

from __future__ import annotations

import mmap

import numpy as np

CACHE_DTYPES = {"float32": np.float32, "float16": np.float16}


def lazy_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zero-filled array on its own anonymous memory mapping: the OS hands out zero pages only as
    they are first written, so an 8k-token cache costs resident memory only for the rows used.
    (``np.zeros`` gets the same from ``calloc`` only while the allocator maps large blocks afresh;
    once glibc has raised its mmap threshold, calloc zeroes reused heap memory and every byte of the
    cache becomes resident at once.)"""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=dtype, count=int(np.prod(shape))).reshape(shape)


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes of K and V one token occupies across all layers (int, bytes)."""
    return 2 * n_layers * n_kv_heads * head_dim * itemsize


def kv_bytes(n_tokens: int, windows, n_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes of K and V for ``n_tokens`` tokens (int, bytes) when layer i keeps at most
    ``windows[i]`` positions (0 = all of them: a full-attention layer)."""
    rows = sum(min(n_tokens, w) if w else n_tokens for w in windows)
    return 2 * rows * n_kv_heads * head_dim * itemsize


class KVCache:
    """K and V arrays for every layer, preallocated for ``max_seq_len`` tokens.

    Args:
        n_layers, n_kv_heads, head_dim: model dimensions (ints > 0).
        max_seq_len: capacity in tokens (int > 0).
        dtype: ``"float32"`` or ``"float16"`` (stored as uint16 bits).
        windows: per layer, the sliding window in tokens (0 = full attention); None = all full.

    Attributes:
        keys, values: lists of n_layers arrays [n_kv_heads, capacity(layer), head_dim], dtype
            float32 or uint16; capacity is max_seq_len, or min(window, max_seq_len) for a
            sliding-window layer.
        length: tokens stored (int); positions ``max(0, length - capacity) .. length-1`` are held
            by each layer, in slot ``position % capacity``.
        token_ids: int64 [length] view of the id stored at each position (-1 = unknown).

    Raises:
        ValueError: a dimension ≤ 0, an unknown dtype, or a windows list of the wrong length.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_seq_len: int, dtype: str = "float32",
                 windows=None):
        if min(n_layers, n_kv_heads, head_dim, max_seq_len) <= 0:
            raise ValueError("KV cache dimensions must all be > 0")
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"cache dtype must be one of {', '.join(CACHE_DTYPES)}, got {dtype!r}")
        windows = tuple(int(w) for w in windows) if windows is not None else (0,) * n_layers
        if len(windows) != n_layers or min(windows) < 0:
            raise ValueError(f"windows must give one value >= 0 per layer ({n_layers}), got {windows!r}")
        self.n_layers = n_layers
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.dtype = dtype
        self.windows = windows
        self._capacity = [min(w, max_seq_len) if w else max_seq_len for w in windows]
        storage = np.float32 if dtype == "float32" else np.uint16
        self.keys = [lazy_zeros((n_kv_heads, c, head_dim), storage) for c in self._capacity]
        self.values = [lazy_zeros((n_kv_heads, c, head_dim), storage) for c in self._capacity]
        self._ids = np.full(max_seq_len, -1, dtype=np.int64)  # token id per position, -1 = unknown
        self.length = 0

    @property
    def itemsize(self) -> int:
        """Bytes per stored element: 4 (float32) or 2 (float16)."""
        return np.dtype(CACHE_DTYPES[self.dtype]).itemsize

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token's K and V occupy across all layers while no sliding window is full."""
        return kv_bytes_per_token(self.n_layers, self.n_kv_heads, self.head_dim, self.itemsize)

    def capacity(self, layer: int) -> int:
        """Rows ``layer`` holds: max_seq_len, or its window for a sliding-window layer."""
        return self._capacity[layer]

    def bytes_at(self, n_tokens: int) -> int:
        """Bytes the K/V of ``n_tokens`` tokens occupy (sliding-window layers count ≤ window rows)."""
        return kv_bytes(n_tokens, self.windows, self.n_kv_heads, self.head_dim, self.itemsize)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's arrays (allocated for max_seq_len tokens)."""
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)

    @property
    def used_bytes(self) -> int:
        """Bytes of the ``length`` tokens stored so far."""
        return self.bytes_at(self.length)

    @property
    def remaining(self) -> int:
        """Tokens that still fit."""
        return self.max_seq_len - self.length

    def write(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store K and V rows for the next tokens of one layer at positions length .. length+T-1.

        k, v: float32 [T, n_kv_heads, head_dim]. ``length`` is not advanced: call :meth:`advance`
        once after every layer has written.

        Raises:
            ValueError: the rows do not fit in the remaining capacity.
        """
        T = k.shape[0]
        if self.length + T > self.max_seq_len:
            raise ValueError(f"KV cache full: {self.length} + {T} tokens > capacity {self.max_seq_len}")
        cap = self._capacity[layer]
        if T == 1:  # decode: one row into its slot (the common case, kept short)
            slot = self.length % cap
            self.keys[layer][:, slot, :] = self.to_storage(k[0])
            self.values[layer][:, slot, :] = self.to_storage(v[0])
            return
        end = self.length + T
        n = min(T, cap)  # a ring keeps only the last `cap` of the new rows
        first = end - n
        if first // cap == (end - 1) // cap:  # one contiguous run of slots
            slots = slice(first % cap, (end - 1) % cap + 1)
        else:
            slots = np.arange(first, end) % cap
        self.keys[layer][:, slots, :] = self.to_storage(k[T - n:]).transpose(1, 0, 2)
        self.values[layer][:, slots, :] = self.to_storage(v[T - n:]).transpose(1, 0, 2)

    def to_storage(self, x: np.ndarray) -> np.ndarray:
        """float32 rows in this cache's storage type (float32, or float16 bits as uint16)."""
        return x if self.dtype == "float32" else x.astype(np.float16).view(np.uint16)

    def window_rows(self, layer: int, n_before: int) -> tuple[np.ndarray, np.ndarray]:
        """The K and V (storage dtype, [n_kv_heads, n, head_dim], position order) of the last
        ``n = min(n_before, rows held)`` positions before ``length`` in ``layer`` — what a
        sliding-window prefill needs from a ring before the new rows overwrite it."""
        cap = self._capacity[layer]
        n = min(n_before, self.length, cap)
        slots = np.arange(self.length - n, self.length) % cap
        return self.keys[layer][:, slots, :], self.values[layer][:, slots, :]

    def advance(self, n_tokens: int) -> None:
        """Mark ``n_tokens`` more positions as stored (after every layer wrote them). Their token
        ids start unknown (-1) until :meth:`label_tokens` names them."""
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
        """Record that the last ``len(ids)`` stored positions hold the tokens ``ids`` (ints ≥ 0),
        e.g. right after ``model.forward(ids, cache)``.

        Raises:
            ValueError: more ids than stored positions, or a negative id.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = ids.shape[0]
        if n > self.length:
            raise ValueError(f"cannot label {n} tokens: the cache stores only {self.length}")
        if n and ids.min() < 0:
            raise ValueError("token ids must be >= 0")
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
        for full layers; a ring of ``window`` rows that has wrapped only goes back one position
        (the next token needs positions n − window + 1 .. n − 1, the ring holds length − window ..);
        back to 0 always works (nothing is needed)."""
        if not 0 <= n_tokens <= self.length:
            return False
        return n_tokens == 0 or all(not w or self.length <= c or n_tokens >= self.length - 1
                                    for w, c in zip(self.windows, self._capacity))

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

    def layer_view(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """K and V of one layer's stored tokens as float32 [n_kv_heads, n, head_dim] copies in
        position order, n = min(length, capacity(layer)) (for tests and analysis; the kernels read
        the raw arrays)."""
        k, v = self.window_rows(layer, self.length)
        if self.dtype == "float16":
            k, v = k.view(np.float16), v.view(np.float16)
        return k.astype(np.float32), v.astype(np.float32)

    def save(self, path, model_id: str, extra: dict | None = None) -> int:
        """Write the ``length`` stored rows, their token ids and ``model_id`` (see
        :func:`mqa_gen.prompt_cache.model_identity`) to ``path`` atomically; returns bytes written.

        Only the stored rows are written (not the whole capacity). ``extra`` is a JSON-able dict
        kept in the file (``mqa-gen chat`` keeps the conversation there).

        Raises:
            PromptCacheError: the file cannot be written (the previous file, if any, is untouched).
        """
        from .prompt_cache import save_prompt_cache

        return save_prompt_cache(path, self, model_id, extra)

    @classmethod
    def load(cls, path, model_id: str, *, config=None, dtype: str | None = None,
             max_seq_len: int | None = None) -> "KVCache":
        """Read a cache written by :meth:`save`, refusing it unless it matches.

        Args:
            model_id: the identity of the model that will use it; a file made by another model is refused.
            config: the (possibly regrouped) model's config: n_layers, n_kv_heads and head_dim must match.
            dtype: the cache dtype the caller expects (``"float32"``/``"float16"``); None accepts either.
            max_seq_len: capacity of the returned cache (default: the stored length); if it is smaller
                than the stored length, only the first ``max_seq_len`` positions are kept.

        Raises:
            PromptCacheError: missing, truncated, corrupt, another format version, another model,
                other KV heads or dtype. The message is one line.
        """
        from .prompt_cache import load_prompt_cache

        cache, _extra = load_prompt_cache(path, model_id, config=config, dtype=dtype, max_seq_len=max_seq_len)
        return cache
