"""A memory-mapped cache of the repacked quantised weights, so a warm start does not repack.

Repacking a GGUF file's quantised tensors into the kernels' tiled layout (:mod:`mqa_gen.kernels.quant`)
takes 0.25 s for SmolLM2-135M and about 1.8 s for Gemma 3 270M on a 2-core machine. The first load
of a model file writes the repacked arrays to one cache file; later loads map that file
(copy-on-write, so the arrays are ordinary writable ndarrays and the kernels' cached
specialisations still match) and skip the repacking; the kernels then read the weights straight
from the page cache, shared between processes.

The same file keeps one thing that is not a weight: the BPE merges a SentencePiece vocabulary
implies (int32 id pairs), which :mod:`mqa_gen.gguf_tokenizer` derives in 0.3–0.7 s for Gemma 3
and reads back from here (entry ``tokenizer.derived_merges``, its kind naming the code's digest).

Where: ``$MQA_GEN_REPACK_DIR``, else ``$XDG_CACHE_HOME/mqa-gen/repacked`` (``~/.cache/mqa-gen/repacked``),
beside the Numba kernel cache. One file per model *path* (named by a hash of its real path), so a
model file that changes replaces its old entry instead of adding one. ``MQA_GEN_NO_REPACK_CACHE=1``
turns the cache off; deleting the folder clears it. Models whose quantised tensors hold less than
:data:`MIN_CACHED_BYTES` are not cached (repacking them takes a few ms; the test suite's small
synthetic models would only litter the folder).

File format (no pickle): ``MAGIC`` (8 bytes), the index length (uint64 little-endian), the index
(UTF-8 JSON), zero padding to :data:`ALIGN`, then the arrays, each at an offset that is a multiple
of :data:`ALIGN`. The index holds the format version, the model :func:`fingerprint`, the total
file size, and per tensor its ggml type, shape and arrays (dtype, shape, offset, CRC-32).

Safety: the fingerprint is a SHA-256 of the model file's size, modification time (ns), inode, its
first :data:`HEAD_BYTES` and last :data:`TAIL_BYTES` bytes (the header: all metadata and the
tensor table of the files we ship), the layout of every tensor (name, type, shape, offset, size)
and the source of the repacking code. Rewriting a model file in place changes its mtime; replacing
it (a download, ``convert``) changes its inode too; a new mqa-gen with other repacking code changes
the code digest; each gives another fingerprint, and the entry is rebuilt. It costs about 2 ms
(``prompt_cache.model_identity`` costs 120 ms for Gemma: it serialises the 262k-token vocabulary).
Each array's CRC-32 is checked when the tensor is first taken from the cache (25 ms for SmolLM2,
60 ms for Gemma; it also brings the pages in, which the first prefill reads anyway). A file that
is missing, truncated, of another format or fingerprint, or whose arrays fail their CRC, is
silently rebuilt: the tensors concerned are repacked from the GGUF file, and the whole entry is
rewritten atomically (:func:`mqa_gen.atomic_file.atomic_write`) at the end of the load, so
concurrent first loads each write a complete file and the last rename wins. A cache that cannot
be written (read-only home, full disk) only costs repacking again next time.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .atomic_file import atomic_write
from .gguf_file import GGUFFile
from .kernels.numba_cache import user_cache_dir

MAGIC = b"MQAREPK1"
#: Format version, stored in the index; a file of another version is rebuilt.
VERSION = 1
#: Every array starts at a multiple of this many bytes (a cache line; NumPy's views need alignment).
ALIGN = 64
#: Bytes at the start and end of the model file that go into the fingerprint.
HEAD_BYTES = 1 << 20
TAIL_BYTES = 1 << 16
#: Models whose quantised tensors hold fewer bytes than this are not cached.
MIN_CACHED_BYTES = 8 << 20

_LENGTH = struct.Struct("<Q")


def cache_dir() -> str:
    """The folder of repacked-weight files: ``$MQA_GEN_REPACK_DIR``, else ``repacked`` beside
    the Numba kernel cache (``$XDG_CACHE_HOME/mqa-gen/repacked`` or ``~/.cache/mqa-gen/repacked``)."""
    return os.environ.get("MQA_GEN_REPACK_DIR") or os.path.join(os.path.dirname(user_cache_dir()), "repacked")


def cache_enabled() -> bool:
    """False when ``MQA_GEN_NO_REPACK_CACHE`` is set to anything but ``""`` or ``0``."""
    return os.environ.get("MQA_GEN_NO_REPACK_CACHE", "") in ("", "0")


def _code_digest() -> bytes:
    """SHA-256 of the sources that decide the repacked layout (the kernels' quant module and
    :mod:`mqa_gen.linear`), so another mqa-gen version never reads a layout it did not write."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for source in (here / "kernels" / "quant.py", here / "linear.py", Path(__file__).resolve()):
        h.update(source.read_bytes())
    return h.digest()


def fingerprint(gguf: GGUFFile) -> str:
    """A hex SHA-256 naming ``gguf``'s file content and this code's repacked layout (see the module
    docstring for what goes in and why it is safe).

    Raises:
        OSError: the file cannot be read.
    """
    h = hashlib.sha256()
    h.update(f"mqa-gen repacked v{VERSION}\0".encode())
    h.update(_code_digest())
    with open(gguf.path, "rb") as f:
        st = os.fstat(f.fileno())
        h.update(f"{st.st_size}|{st.st_mtime_ns}|{st.st_ino}\0".encode())
        h.update(f.read(HEAD_BYTES))
        f.seek(max(0, st.st_size - TAIL_BYTES))
        h.update(f.read(TAIL_BYTES))
    base = gguf.mapping.ctypes.data if gguf.mapping is not None else 0
    layout = [[name, t.type_name, list(t.shape), int(t.data.ctypes.data - base) if base else 0, int(t.data.nbytes)]
              for name, t in gguf.tensors.items()]
    h.update(json.dumps(layout).encode())
    return h.hexdigest()


class RepackCache:
    """The repacked arrays of one model file: those found in its cache file, and those repacked
    during this load (added with :meth:`put`), saved together by :meth:`save`.

    Build it with :meth:`open`; :func:`mqa_gen.linear.linear_from_gguf` asks :meth:`get` for each
    quantised tensor before repacking it and gives the result to :meth:`put`.
    """

    def __init__(self, path: str, fingerprint: str, entries: dict, mapping: np.ndarray | None):
        self.path = path
        self.fingerprint = fingerprint
        self._entries = entries  # name → index entry of the file on disk (unverified until get)
        self._mapping = mapping  # that file, uint8, mapped copy-on-write
        self._arrays: dict[str, tuple[str, tuple[int, ...], tuple[np.ndarray, ...]]] = {}
        self.hits = 0
        self.misses = 0

    @classmethod
    def open(cls, gguf: GGUFFile) -> "RepackCache | None":
        """The cache of ``gguf``'s file, with the arrays of a valid cache file mapped; None when the
        cache is turned off or the file's fingerprint cannot be taken. Never raises for a bad cache
        file: it is treated as absent (and rebuilt by :meth:`save`)."""
        if not cache_enabled():
            return None
        try:
            key = fingerprint(gguf)
        except OSError:
            return None
        name = hashlib.sha256(os.path.realpath(gguf.path).encode()).hexdigest()[:32] + ".bin"
        path = os.path.join(cache_dir(), name)
        return cls(path, key, *_read_index(path, key))

    def get(self, name: str, type_name: str, shape: tuple[int, int]) -> tuple[np.ndarray, ...] | None:
        """The repacked arrays (codes, scales[, mins]) of tensor ``name`` from the cache file, or None
        when the file lacks it, has it with another type or shape, or its data fails the CRC."""
        entry = self._entries.get(name)
        arrays = None
        if entry is not None and entry.get("type") == type_name and tuple(entry.get("shape", ())) == tuple(shape):
            arrays = _map_arrays(self._mapping, entry)
        if arrays is None:
            self.misses += 1
            return None
        self.hits += 1
        self._arrays[name] = (type_name, tuple(shape), arrays)
        return arrays

    def put(self, name: str, type_name: str, shape: tuple[int, int], arrays: tuple[np.ndarray, ...]) -> None:
        """Record tensor ``name``'s freshly repacked arrays, for :meth:`save`."""
        self._arrays[name] = (type_name, tuple(shape), tuple(arrays))

    def save(self) -> bool:
        """Write the cache file if this load repacked anything and the model is large enough
        (:data:`MIN_CACHED_BYTES`); atomically, and quietly giving up on any OS error.

        Returns:
            True when a file was written.
        """
        arrays_by_name, self._arrays = self._arrays, {}  # keep no array alive past the load
        if not self.misses or sum(a.nbytes for _, _, arrays in arrays_by_name.values() for a in arrays) < MIN_CACHED_BYTES:
            return False
        tensors, offset, blobs = {}, 0, []
        for name, (type_name, shape, arrays) in arrays_by_name.items():
            described = []
            for a in arrays:
                a = np.ascontiguousarray(a)
                offset = -(-offset // ALIGN) * ALIGN
                described.append({"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset,
                                  "crc32": zlib.crc32(a)})
                blobs.append((offset, a))
                offset += a.nbytes
            tensors[name] = {"type": type_name, "shape": list(shape), "arrays": described}
        data_bytes = -(-offset // ALIGN) * ALIGN
        index = {"version": VERSION, "fingerprint": self.fingerprint, "data_bytes": data_bytes, "tensors": tensors}
        text = json.dumps(index).encode()
        data_start = -(-(len(MAGIC) + _LENGTH.size + len(text)) // ALIGN) * ALIGN
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with atomic_write(self.path, mode=0o644) as tmp:
                with open(tmp, "wb") as f:
                    f.write(MAGIC + _LENGTH.pack(len(text)) + text)
                    for off, a in blobs:
                        f.seek(data_start + off)
                        f.write(memoryview(a).cast("B"))
                    f.truncate(data_start + data_bytes)
        except OSError:
            return False
        return True


def _read_index(path: str, key: str) -> tuple[dict, np.ndarray | None]:
    """The tensors of the cache file at ``path`` (name → entry, each array's ``offset`` made
    absolute) and the whole file mapped copy-on-write (uint8; the same file the index came from,
    even if another process renames a new one over ``path`` meanwhile), or ({}, None) when it is
    missing, unreadable, of another format or fingerprint, or shorter than its index says."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(len(MAGIC) + _LENGTH.size)
            if len(head) != len(MAGIC) + _LENGTH.size or head[: len(MAGIC)] != MAGIC:
                return {}, None
            (length,) = _LENGTH.unpack_from(head, len(MAGIC))
            if length > size:
                return {}, None
            index = json.loads(f.read(length).decode())
            mapping = np.memmap(f, dtype=np.uint8, mode="c").view(np.ndarray)
        data_start = -(-(len(MAGIC) + _LENGTH.size + length) // ALIGN) * ALIGN
        if (not isinstance(index, dict) or index.get("version") != VERSION or index.get("fingerprint") != key
                or size != data_start + int(index.get("data_bytes", -1))):
            return {}, None
        tensors = index["tensors"]
        for entry in tensors.values():
            for a in entry["arrays"]:
                a["offset"] = data_start + int(a["offset"])
        return tensors, mapping
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}, None


def _map_arrays(mapping: np.ndarray | None, entry: dict) -> tuple[np.ndarray, ...] | None:
    """The arrays of one tensor's index ``entry``: views of ``mapping`` (the cache file mapped
    copy-on-write, so writable plain ndarrays whose pages stay the page cache's until written), or
    None when the entry is malformed, out of the file's bounds, or an array fails its CRC-32."""
    if mapping is None:
        return None
    try:
        arrays = []
        for a in entry["arrays"]:
            dtype, shape = np.dtype(a["dtype"]), tuple(int(n) for n in a["shape"])
            if dtype.hasobject:
                return None
            start = int(a["offset"])
            if start < 0 or start % ALIGN:
                return None
            nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            array = mapping[start:start + nbytes].view(dtype).reshape(shape)  # ValueError when out of bounds
            if zlib.crc32(array) != int(a["crc32"]):
                return None
            arrays.append(array)
        return tuple(arrays)
    except (OSError, ValueError, KeyError, TypeError):
        return None
