"""Prompt-cache files: a KV cache and its token ids on disk, refused unless they fit the model.

A prompt cache lets a later run skip the prefill of a prompt prefix it has already seen
(``mqa-gen generate --prompt-cache FILE``, ``/save`` and ``/load`` in ``mqa-gen chat``,
:func:`save_prompt_cache` / :func:`load_prompt_cache` in Python).

File format (version 1): an uncompressed NumPy ``.npz`` archive (a zip of ``.npy`` arrays; every
member has a CRC-32, so flipped bytes are detected), read with ``allow_pickle=False`` — no pickle
is ever written or accepted. Members:

* ``meta``: uint8 [n] — UTF-8 JSON: ``format`` (``"mqa-gen-prompt-cache"``), ``version`` (1),
  ``model_id`` (see :func:`model_identity`), ``model_name``, ``n_layers``, ``n_kv_heads``,
  ``head_dim``, ``dtype`` (``"float32"``/``"float16"``), ``length`` (tokens stored), ``extra``
  (a JSON object for the caller, e.g. a chat's messages), ``windows`` (per layer, the sliding
  window, 0 = full attention; absent means all full);
* ``tokens``: int64 [length] — the token id at each stored position (-1 = unknown);
* ``k_0`` … ``k_{L-1}``, ``v_0`` … ``v_{L-1}``: [n_kv_heads, rows, head_dim], float32, or
  uint16 holding float16 bit patterns — the rows the layer holds, in position order: ``length``
  rows, or for a sliding-window layer the last min(length, window) positions.

Writes are atomic: the archive goes to a temporary file in the destination's folder, is flushed
and fsynced, then ``os.replace``-d over the destination (and the folder is fsynced), so a crash or
kill at any moment leaves either the old file or the new one, never a mixture. A killed writer may
leave its temporary ``.<name>.*.tmp`` file behind; it is never read.

Every refusal is a :class:`PromptCacheError` whose message is one line naming the file, which the
CLI prints as ``error: …`` with exit code 2.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from .atomic_file import atomic_write
from .cache import KVCache
from .errors import MqaGenError
from .kv_storage import STORAGE_TYPES

FORMAT = "mqa-gen-prompt-cache"
VERSION = 1
#: Bytes hashed from the start and from the end of every tensor's data for the identity.
SAMPLE_BYTES = 1024
ZIP_MAGIC = b"PK\x03\x04"  # an .npz archive is a zip file


class PromptCacheError(MqaGenError):
    """A prompt-cache file that is missing, unreadable, truncated, corrupt, of another format
    version, or made for another model, KV-head count or cache dtype (exit code 2)."""


# ───────────────────────────── model identity ─────────────────────────────


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    return repr(value)


def _file_offset(array: np.ndarray) -> int:
    """Offset of a memory-mapped tensor's first byte from the start of the mapping it views."""
    root = array
    while isinstance(root.base, np.ndarray):
        root = root.base
    return int(array.ctypes.data - root.ctypes.data)


def model_identity(gguf) -> str:
    """A digest naming one model file's content, for telling whose KV cache a file holds.

    ``gguf`` is a :class:`mqa_gen.gguf_file.GGUFFile` (``LoadedModel.gguf``). The digest is the
    SHA-256 (hex, 64 characters) of: every metadata key and value (canonical JSON, keys sorted),
    and per tensor in file order its name, ggml type, shape, byte offset and byte size, plus the
    first and last :data:`SAMPLE_BYTES` bytes of its data. It reads a few KiB of weights (so two
    fine-tunes with the same layout still differ), never the whole file: about 20 ms for
    SmolLM2-135M.
    """
    h = hashlib.sha256()
    h.update(b"mqa-gen model identity v1\0")
    h.update(json.dumps(gguf.metadata, sort_keys=True, default=_json_default, ensure_ascii=False).encode())
    for name, t in gguf.tensors.items():
        data = np.asarray(t.data)
        layout = [name, t.type_name, list(t.shape), _file_offset(data), int(data.nbytes)]
        h.update(b"\0" + json.dumps(layout).encode())
        flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)  # a view: tensors are contiguous
        h.update(flat[:SAMPLE_BYTES].tobytes())
        h.update(flat[-SAMPLE_BYTES:].tobytes())
    return h.hexdigest()


# ───────────────────────────── save ─────────────────────────────


def save_prompt_cache(path: str | os.PathLike[str], cache: KVCache, model_id: str, extra: dict | None = None,
                      model_name: str = "") -> int:
    """Atomically write ``cache``'s ``length`` stored rows and token ids to ``path``.

    Args:
        path: destination (any name; ``.npz`` is not appended).
        cache: the cache to save; only positions ``0 .. length-1`` are written.
        model_id: :func:`model_identity` of the model that filled the cache.
        extra: JSON-able dict stored with it (None: ``{}``).
        model_name: a readable model name, quoted when the file is refused for another model.

    Returns:
        The size of the written file, in bytes.

    Raises:
        PromptCacheError: the folder does not exist or the file cannot be written; the previous
            file at ``path``, if any, is left as it was and the temporary file is removed.
    """
    path = os.fspath(path)
    n = cache.length
    meta = {
        "format": FORMAT, "version": VERSION, "model_id": model_id,
        "model_name": model_name,
        "n_layers": cache.n_layers, "n_kv_heads": cache.n_kv_heads, "head_dim": cache.head_dim,
        "dtype": cache.dtype, "length": n, "extra": extra or {}, "windows": list(cache.windows),
    }
    try:
        meta_bytes = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise PromptCacheError(f"cannot save prompt cache {path}: extra data is not JSON: {e}") from None
    arrays: dict[str, np.ndarray] = {
        "meta": np.frombuffer(meta_bytes, dtype=np.uint8),
        "tokens": np.array(cache.token_ids, dtype=np.int64),
    }
    for layer in range(cache.n_layers):
        # (KV, rows, D): the rows held, in position order; not the capacity
        arrays[f"k_{layer}"], arrays[f"v_{layer}"] = cache.layers[layer].rows(n, n)

    try:
        with atomic_write(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            size = os.path.getsize(tmp)
        return size
    except OSError as e:
        raise PromptCacheError(f"cannot save prompt cache {path}: {e.strerror or e}") from None


# ───────────────────────────── load ─────────────────────────────


def read_prompt_cache_meta(path: str | os.PathLike[str]) -> dict:
    """The ``meta`` record of a prompt-cache file (without reading the K/V arrays).

    Raises:
        PromptCacheError: missing, unreadable, not a prompt-cache file, or another format version.
    """
    path = os.fspath(path)
    with _open(path) as npz:
        return _meta(npz, path)


def load_prompt_cache(
    path: str | os.PathLike[str],
    model_id: str,
    *,
    config=None,
    dtype: str | None = None,
    max_seq_len: int | None = None,
) -> tuple[KVCache, dict]:
    """Read a prompt-cache file into a new :class:`KVCache`, refusing anything that does not fit.

    Args:
        path: the file.
        model_id: :func:`model_identity` of the model that will use the cache.
        config: object with ``n_layers``, ``n_kv_heads``, ``head_dim`` (the model's config, after
            any ``--kv-heads`` regrouping) that the file must match; None skips these checks.
        dtype: ``"float32"``/``"float16"`` the caller uses; None accepts the file's.
        max_seq_len: capacity of the returned cache (default: the stored length, at least 1); when
            smaller than the stored length only the first ``max_seq_len`` positions are kept.

    Returns:
        ``(cache, extra)``: the cache with ``length`` positions and their token ids restored, and
        the ``extra`` dict saved with it.

    Raises:
        PromptCacheError: missing or unreadable file, truncated or corrupt archive (zip CRC
            mismatch, missing members, wrong shapes or dtypes), another format version, another
            model, KV-head count, layer count, head size or cache dtype. One line naming the file.
    """
    path = os.fspath(path)
    with _open(path) as npz:
        meta = _meta(npz, path)
        if meta["model_id"] != model_id:
            name = f" ({meta['model_name']})" if meta.get("model_name") else ""
            raise PromptCacheError(f"prompt cache {path} was made by a different model{name}; "
                                   "use the same model or another cache file")
        if config is not None:
            if meta["n_kv_heads"] != config.n_kv_heads:
                raise PromptCacheError(f"prompt cache {path} was made with {meta['n_kv_heads']} KV head{'s' if meta['n_kv_heads'] != 1 else ''}, "
                                       f"this run uses {config.n_kv_heads} (--kv-heads must match)")
            if (meta["n_layers"], meta["head_dim"]) != (config.n_layers, config.head_dim):
                raise PromptCacheError(f"prompt cache {path} has {meta['n_layers']} layers of head size "
                                       f"{meta['head_dim']}, the model {config.n_layers} of {config.head_dim}")
            if tuple(meta["windows"]) != tuple(config.layer_windows):
                raise PromptCacheError(f"prompt cache {path} has other sliding windows than the model")
        if dtype is not None and meta["dtype"] != dtype:
            raise PromptCacheError(f"prompt cache {path} holds a {meta['dtype']} cache, "
                                   f"this run uses --cache-dtype {dtype}")
        n = meta["length"]
        keep = n if max_seq_len is None else min(n, max_seq_len)
        capacity = max(max_seq_len or n, 1)
        windows = meta["windows"]
        if keep < n and any(w and n > w for w in windows):
            raise PromptCacheError(f"prompt cache {path} holds {n} tokens, more than this run's context "
                                   f"{keep}, and its sliding-window layers cannot be cut back")
        cache = KVCache(meta["n_layers"], meta["n_kv_heads"], meta["head_dim"], capacity, meta["dtype"], windows)
        storage = cache.storage.array_dtype
        tokens = _array(npz, "tokens", path, (n,), np.dtype(np.int64))
        for layer, window in enumerate(windows):
            rows = min(n, window) if window else n
            row_shape = (meta["n_kv_heads"], rows, meta["head_dim"])
            k = _array(npz, f"k_{layer}", path, row_shape, storage)
            v = _array(npz, f"v_{layer}", path, row_shape, storage)
            positions = np.arange(n - rows, n)
            wanted = (positions < keep) & (positions >= keep - cache.capacity(layer))
            cache.layers[layer].load_rows(k[:, wanted, :], v[:, wanted, :], positions[wanted])
    if n and tokens.min() < -1:
        raise PromptCacheError(f"prompt cache {path} is corrupt: negative token ids")
    cache.advance(keep)
    cache.label_tokens(tokens[:keep])  # unknown (-1) positions stay unknown
    return cache, meta.get("extra", {})


class _open:
    """``np.load`` of an archive as a context manager, with every failure as one line."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        path = self.path
        if not os.path.exists(path):
            raise PromptCacheError(f"prompt cache {path} does not exist")
        if os.path.isdir(path):
            raise PromptCacheError(f"prompt cache {path} is a directory")
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise PromptCacheError(f"cannot read prompt cache {path}: {e.strerror or e}") from None
        if magic != ZIP_MAGIC:
            what = "an empty file" if not magic else "not a NumPy .npz archive"
            raise PromptCacheError(f"prompt cache {path} is not a prompt-cache file ({what}); "
                                   "delete it or choose another file")
        try:
            self.npz = np.load(path, allow_pickle=False)
        except OSError as e:
            raise PromptCacheError(f"cannot read prompt cache {path}: {e.strerror or e}") from None
        except Exception as e:  # BadZipFile, ValueError (not an .npy/.npz), EOFError on truncation
            raise PromptCacheError(f"prompt cache {path} is truncated or corrupt ({_short(e)}); "
                                   "delete it or choose another file") from None
        return self.npz

    def __exit__(self, *exc):
        self.npz.close()
        return False


def _array(npz, name: str, path: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """Member ``name`` read and checked; a CRC mismatch, truncation or wrong shape is refused."""
    try:
        array = npz[name]
    except KeyError:
        raise PromptCacheError(f"prompt cache {path} is corrupt: the array {name!r} is missing") from None
    except Exception as e:  # BadZipFile (CRC), ValueError (object array / bad header), EOFError, zlib
        raise PromptCacheError(f"prompt cache {path} is corrupt or truncated ({name}: {_short(e)})") from None
    if array.shape != shape or array.dtype != dtype:
        raise PromptCacheError(f"prompt cache {path} is corrupt: {name} is {array.dtype}{list(array.shape)}, "
                               f"expected {dtype}{list(shape)}")
    return array


_META_TYPES = {"format": str, "version": int, "model_id": str, "n_layers": int, "n_kv_heads": int,
               "head_dim": int, "dtype": str, "length": int}


def _meta(npz, path: str) -> dict:
    """The checked ``meta`` record of an open archive."""
    if "meta" not in npz.files:
        raise PromptCacheError(f"prompt cache {path} is not a prompt-cache file (no meta record)")
    raw = _array_any(npz, "meta", path)
    try:
        meta = json.loads(raw.tobytes().decode("utf-8")) if raw.dtype == np.uint8 and raw.ndim == 1 else None
    except (UnicodeDecodeError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PromptCacheError(f"prompt cache {path} is not a prompt-cache file (unreadable meta record)")
    if meta.get("version") != VERSION:
        raise PromptCacheError(f"prompt cache {path} has format version {meta.get('version')!r}; "
                               f"this mqa-gen reads version {VERSION} (delete the file to rebuild it)")
    for key, kind in _META_TYPES.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise PromptCacheError(f"prompt cache {path} is corrupt: meta field {key!r} is missing or invalid")
    if min(meta["n_layers"], meta["n_kv_heads"], meta["head_dim"]) <= 0 or meta["length"] < 0:
        raise PromptCacheError(f"prompt cache {path} is corrupt: invalid dimensions in its meta record")
    if meta["dtype"] not in STORAGE_TYPES:
        raise PromptCacheError(f"prompt cache {path} is corrupt: unknown cache dtype {meta['dtype']!r}")
    windows = meta.setdefault("windows", [0] * meta["n_layers"])
    if (not isinstance(windows, list) or len(windows) != meta["n_layers"]
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in windows)):
        raise PromptCacheError(f"prompt cache {path} is corrupt: meta field 'windows' is invalid")
    if not isinstance(meta.get("extra", {}), dict):
        raise PromptCacheError(f"prompt cache {path} is corrupt: meta field 'extra' is not an object")
    return meta


def _array_any(npz, name: str, path: str) -> np.ndarray:
    try:
        return npz[name]
    except Exception as e:
        raise PromptCacheError(f"prompt cache {path} is corrupt or truncated ({name}: {_short(e)})") from None


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
