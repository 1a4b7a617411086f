"""Prompt-cache files: a KV cache and its token ids on disk, refused unless they fit the model.

A prompt cache lets a later run skip the prefill of a prompt prefix it has already seen
(``mqa-gen generate --prompt-cache FILE``, ``/save`` and ``/load`` in ``mqa-gen chat``,
:func:`save_prompt_cache` / :func:`load_prompt_cache` in Python).

File format (version 2): an uncompressed NumPy ``.npz`` archive (a zip of ``.npy`` arrays; every
member has a CRC-32, so flipped bytes are detected). No pickle is ever written or accepted: the
reader parses each member's ``.npy`` header itself and takes only the dtype and shape it expects.
Members:

* ``meta``: uint8 [n] — UTF-8 JSON: ``format`` (``"mqa-gen-prompt-cache"``), ``version`` (2),
  ``model_id`` (see :func:`model_identity`), ``model_name``, ``n_layers``, ``n_kv_heads``,
  ``head_dim``, ``dtype`` (the cache type's name: ``"f32"``, ``"f16"``, ``"q8_0"``, ``"q4_0"``;
  files written before those names say ``"float32"``/``"float16"``, read as f32/f16), ``length`` (tokens stored), ``extra``
  (a JSON object for the caller, e.g. a chat's messages), ``windows`` (per layer, the sliding
  window, 0 = full attention; absent means all full), ``digest`` (:func:`arrays_digest` of the
  members below: a SHA-256 in hex);
* ``tokens``: int64 [length] — the token id at each stored position (-1 = unknown);
* ``k_0`` … ``k_{L-1}``, ``v_0`` … ``v_{L-1}``: [n_kv_heads, rows, row_width] as the cache
  stores them (:mod:`mqa_gen.kv_storage`): float32; uint16 holding float16 bit patterns; int8
  q8_0 or uint8 q4_0 blocks (row_width = head_dim / 32 × 34 or × 18 bytes) — the rows the layer
  holds, in position order: ``length`` rows, or for a sliding-window layer the last
  min(length, window) positions.

Writes are atomic: the archive goes to a temporary file in the destination's folder, is flushed
and fsynced, then ``os.replace``-d over the destination (and the folder is fsynced), so a crash or
kill at any moment leaves either the old file or the new one, never a mixture. A killed writer may
leave its temporary ``.<name>.*.tmp`` file behind; it is never read.

Reading trusts nothing in the file before checking it against what the file can hold: only a
regular file is opened (a FIFO or a device would block or never end); every member must be stored
uncompressed (so nothing inflates beyond the file's own size), appear once, and have exactly the
size its ``.npy`` header and the ``meta`` dimensions imply before any array is allocated; the
layer count must match the members present. Then the ``digest`` must match the arrays: the CRC-32
catches damage, the digest catches K/V data changed by a tool that rewrote a member whole
(zeroed, scaled, duplicated), which would otherwise silently change the generated text. It is a
check of integrity, not of authenticity: whoever can write the file can also write a new digest.

Version 1 files (before the digest) are refused with a note to delete them: their K/V data cannot
be verified, and a prompt cache is derived data that the next run rebuilds with one prefill, so
refusing costs seconds where accepting could silently change the output.

Every refusal is a :class:`PromptCacheError` whose message is one line naming the file, which the
CLI prints as ``error: …`` with exit code 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zipfile
from typing import Any

import numpy as np

from .atomic_file import atomic_write
from .cache import KVCache
from .errors import MqaGenError
from .kv_storage import STORAGE_NAMES, storage_type

FORMAT = "mqa-gen-prompt-cache"
VERSION = 2
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
        PromptCacheError: ``path`` holds something other than a prompt-cache file (a save replaces
            only its own kind: chat's ``/save`` pointed at a document must not erase it), the folder
            does not exist or the file cannot be written; the previous file at ``path``, if any, is
            left as it was and the temporary file is removed.
    """
    path = os.fspath(path)
    if os.path.lexists(path) and not (os.path.isfile(path) and os.path.getsize(path) == 0):
        with _Archive(path) as archive:  # refuses a directory, a FIFO, any other file
            archive.meta_bytes()
    n = cache.length
    arrays: dict[str, np.ndarray] = {"tokens": np.array(cache.token_ids, dtype=np.int64)}
    for layer in range(cache.n_layers):
        # (KV, rows, D): the rows held, in position order; not the capacity
        arrays[f"k_{layer}"], arrays[f"v_{layer}"] = cache.layers[layer].rows(n, n)
    meta = {
        "format": FORMAT, "version": VERSION, "model_id": model_id,
        "model_name": model_name,
        "n_layers": cache.n_layers, "n_kv_heads": cache.n_kv_heads, "head_dim": cache.head_dim,
        "dtype": cache.dtype, "length": n, "extra": extra or {}, "windows": list(cache.windows),
        "digest": arrays_digest(arrays),
    }
    try:
        meta_bytes = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as e:
        raise PromptCacheError(f"cannot save prompt cache {path}: extra data is not JSON: {e}") from None
    arrays = {"meta": np.frombuffer(meta_bytes, dtype=np.uint8), **arrays}

    try:
        with atomic_write(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            size = os.path.getsize(tmp)
        return size
    except OSError as e:
        raise PromptCacheError(f"cannot save prompt cache {path}: {e.strerror or e}") from None


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 (hex) of a prompt cache's arrays: ``tokens``, then ``k_0``, ``v_0``, ``k_1`` … in
    that order, each as its name, dtype and shape, then its bytes (C order). About 20 ms per
    30 MB (the cache of 700 SmolLM2 tokens) with the CPU's SHA instructions."""
    h = hashlib.sha256(b"mqa-gen prompt-cache arrays v2\0")
    n_layers = (len(arrays) - 1) // 2
    for name in ["tokens"] + [f"{kv}_{i}" for i in range(n_layers) for kv in "kv"]:
        array = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{array.dtype.str}:{list(array.shape)}\0".encode())
        h.update(array.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


# ───────────────────────────── load ─────────────────────────────


def read_prompt_cache_meta(path: str | os.PathLike[str]) -> dict:
    """The ``meta`` record of a prompt-cache file (without reading the K/V arrays).

    Raises:
        PromptCacheError: missing, unreadable, not a prompt-cache file, or another format version.
    """
    path = os.fspath(path)
    with _Archive(path) as archive:
        return _meta(archive, path)


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
        dtype: the cache type the caller uses (a name or alias, e.g. ``"q8_0"``, ``"float16"``);
            None accepts the file's.
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
    with _Archive(path) as archive:
        meta = _meta(archive, path)
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
        storage = storage_type(meta["dtype"])  # checked by _meta; an old alias reads as its type
        if dtype is not None and storage is not storage_type(dtype):
            raise PromptCacheError(f"prompt cache {path} holds a KV cache of type {storage.name}, "
                                   f"this run uses --cache-dtype {storage_type(dtype).name}")
        n = meta["length"]
        windows = meta["windows"]
        width = storage.row_width(meta["head_dim"])
        shapes = {"tokens": ((n,), np.dtype(np.int64))}
        for layer, window in enumerate(windows):
            row_shape = (meta["n_kv_heads"], min(n, window) if window else n, width)
            shapes[f"k_{layer}"] = shapes[f"v_{layer}"] = (row_shape, storage.array_dtype)
        for name, (shape, array_dtype) in shapes.items():  # sizes first: nothing read or allocated yet
            archive.check_member(name, shape, array_dtype)
        arrays = {name: archive.read(name, shape, array_dtype) for name, (shape, array_dtype) in shapes.items()}
    if arrays_digest(arrays) != meta["digest"]:
        raise PromptCacheError(f"prompt cache {path} is corrupt: its K/V data does not match the digest "
                               "saved with it (changed after it was written); delete it or choose another file")
    for name, array in arrays.items():
        if name != "tokens" and not storage.all_finite(array):
            raise PromptCacheError(f"prompt cache {path} is corrupt: {name} holds NaN or infinite values")
    tokens = arrays["tokens"]
    keep = n if max_seq_len is None else min(n, max_seq_len)
    capacity = max(max_seq_len or n, 1)
    if keep < n and any(w and n > w for w in windows):
        raise PromptCacheError(f"prompt cache {path} holds {n} tokens, more than this run's context "
                               f"{keep}, and its sliding-window layers cannot be cut back")
    cache = KVCache(meta["n_layers"], meta["n_kv_heads"], meta["head_dim"], capacity, storage, windows)
    for layer, window in enumerate(windows):
        k, v = arrays[f"k_{layer}"], arrays[f"v_{layer}"]
        positions = np.arange(n - k.shape[1], n)
        wanted = (positions < keep) & (positions >= keep - cache.capacity(layer))
        cache.layers[layer].load_rows(k[:, wanted, :], v[:, wanted, :], positions[wanted])
    if n and tokens.min() < -1:
        raise PromptCacheError(f"prompt cache {path} is corrupt: negative token ids")
    cache.advance(keep)
    cache.label_tokens(tokens[:keep])  # unknown (-1) positions stay unknown
    return cache, meta.get("extra", {})


class _Archive:
    """A prompt-cache file opened for reading, as a context manager: the checks of the module
    docstring on the file and its zip directory, then members read one at a time, each checked
    before its data is read. Every failure is one :class:`PromptCacheError` line."""

    def __init__(self, path: str):
        self.path = path
        self.file = None

    def __enter__(self) -> "_Archive":
        path = self.path
        try:
            # O_NONBLOCK: opening a FIFO without a writer would wait forever; the file is then
            # checked to be a regular file before a byte is read.
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise PromptCacheError(f"prompt cache {path} does not exist") from None
        except OSError as e:
            raise PromptCacheError(f"cannot read prompt cache {path}: {e.strerror or e}") from None
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise PromptCacheError(f"prompt cache {path} is a directory")
            if not stat.S_ISREG(mode):
                raise PromptCacheError(f"prompt cache {path} is not a regular file (a FIFO, socket or device); "
                                       "choose a file")
            self.file = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        try:
            self._check_file()
        except BaseException:
            self.file.close()
            raise
        return self

    def _check_file(self) -> None:
        path, f = self.path, self.file
        try:
            magic = f.read(4)
        except OSError as e:
            raise PromptCacheError(f"cannot read prompt cache {path}: {e.strerror or e}") from None
        if magic != ZIP_MAGIC:
            what = "an empty file" if not magic else "not a NumPy .npz archive"
            raise PromptCacheError(f"prompt cache {path} is not a prompt-cache file ({what}); "
                                   "delete it or choose another file")
        try:
            self.zip = zipfile.ZipFile(f)
            infos = self.zip.infolist()
        except OSError as e:
            raise PromptCacheError(f"cannot read prompt cache {path}: {e.strerror or e}") from None
        except Exception as e:  # BadZipFile, ValueError, EOFError, … on a damaged directory
            raise PromptCacheError(f"prompt cache {path} is truncated or corrupt ({_short(e)}); "
                                   "delete it or choose another file") from None
        self.members: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if name in self.members:
                raise PromptCacheError(f"prompt cache {path} is corrupt: the array {name!r} appears twice")
            if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
                raise PromptCacheError(f"prompt cache {path} is corrupt: the array {name!r} is compressed "
                                       "(mqa-gen never writes that); delete it or choose another file")
            self.members[name] = info

    def __exit__(self, *exc) -> bool:
        self.file.close()
        return False

    def _header(self, name: str) -> tuple[zipfile.ZipExtFile, tuple, np.dtype, int]:
        """Open member ``name`` and read its ``.npy`` header: (stream at the data, shape, dtype,
        header bytes). numpy's own parser, which reads at most 10,000 header bytes and never
        unpickles."""
        info = self.members.get(name)
        if info is None:
            raise PromptCacheError(f"prompt cache {self.path} is corrupt: the array {name!r} is missing")
        stream = None
        try:
            stream = self.zip.open(info)
            version = np.lib.format.read_magic(stream)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f".npy format version {version} (NumPy writes 1.0 or 2.0)")
            shape, fortran, dtype = read_header(stream)
            if fortran and len(shape) > 1:
                raise ValueError("Fortran-ordered array")
            return stream, shape, dtype, stream.tell()
        except PromptCacheError:
            raise
        except Exception as e:  # BadZipFile, ValueError (bad header, object dtype), EOFError
            if stream is not None:
                stream.close()
            raise PromptCacheError(f"prompt cache {self.path} is corrupt or truncated ({name}: {_short(e)})") from None

    def check_member(self, name: str, shape: tuple, dtype: np.dtype) -> None:
        """Refuse member ``name`` unless its header says ``dtype`` and ``shape`` and the zip
        directory gives it exactly the bytes they need (read before any data is)."""
        stream, got_shape, got_dtype, header = self._header(name)
        stream.close()
        if tuple(got_shape) != tuple(shape) or got_dtype != dtype:
            raise PromptCacheError(f"prompt cache {self.path} is corrupt: {name} is {got_dtype}{list(got_shape)}, "
                                   f"expected {dtype}{list(shape)}")
        n_bytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if self.members[name].file_size != header + n_bytes:
            raise PromptCacheError(f"prompt cache {self.path} is corrupt: {name} does not hold the "
                                   f"{n_bytes:,} bytes its header promises")

    def read(self, name: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
        """Member ``name`` as a read-only ``dtype`` array of ``shape`` (checked by
        :meth:`check_member` first); reading to its end checks the zip CRC."""
        self.check_member(name, shape, dtype)
        n_bytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        stream = self._header(name)[0]
        try:
            with stream:
                data = stream.read(n_bytes + 1)  # one past the end: reaches EOF, so the CRC is checked
        except Exception as e:  # BadZipFile (CRC), EOFError, OSError
            raise PromptCacheError(f"prompt cache {self.path} is corrupt or truncated ({name}: {_short(e)})") from None
        if len(data) != n_bytes:
            raise PromptCacheError(f"prompt cache {self.path} is corrupt or truncated ({name}: "
                                   f"{len(data):,} bytes, expected {n_bytes:,})")
        return np.frombuffer(data, dtype=dtype).reshape(shape)

    def meta_bytes(self) -> bytes:
        """The ``meta`` member's bytes (uint8, 1-D; its size is bounded by the file's)."""
        if "meta" not in self.members:
            raise PromptCacheError(f"prompt cache {self.path} is not a prompt-cache file (no meta record)")
        stream, shape, dtype, header = self._header("meta")
        stream.close()
        if dtype != np.uint8 or len(shape) != 1:
            raise PromptCacheError(f"prompt cache {self.path} is not a prompt-cache file (unreadable meta record)")
        return self.read("meta", shape, dtype).tobytes()


_META_TYPES = {"format": str, "version": int, "model_id": str, "n_layers": int, "n_kv_heads": int,
               "head_dim": int, "dtype": str, "length": int, "digest": str}


def _meta(archive: _Archive, path: str) -> dict:
    """The checked ``meta`` record of an open archive, its dimensions consistent with the members
    the archive holds (so that nothing sized by them can be larger than the file)."""
    try:
        meta = json.loads(archive.meta_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nesting 10⁵ deep
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
    # meta + tokens + K and V per layer: checked before any list is built per layer
    if len(archive.members) != 2 + 2 * meta["n_layers"]:
        raise PromptCacheError(f"prompt cache {path} is corrupt: {len(archive.members)} arrays for "
                               f"{meta['n_layers']:,} layers")
    if meta["dtype"] not in STORAGE_NAMES:
        raise PromptCacheError(f"prompt cache {path} is corrupt: unknown cache dtype {meta['dtype']!r}")
    if meta["head_dim"] % STORAGE_NAMES[meta["dtype"]].block_size:
        raise PromptCacheError(f"prompt cache {path} is corrupt: a {meta['dtype']} cache cannot have head_dim "
                               f"{meta['head_dim']}")
    windows = meta.setdefault("windows", [0] * meta["n_layers"])
    if (not isinstance(windows, list) or len(windows) != meta["n_layers"]
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in windows)):
        raise PromptCacheError(f"prompt cache {path} is corrupt: meta field 'windows' is invalid")
    if not isinstance(meta.get("extra", {}), dict):
        raise PromptCacheError(f"prompt cache {path} is corrupt: meta field 'extra' is not an object")
    return meta


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
