"""Open a GGUF file with the ``gguf`` package and expose its metadata as plain Python values.

Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md. Parsing and dequantisation are
done by the ``gguf`` package (llama.cpp's reference Python reader); this module only turns its
failures into one-line :class:`~mqa_gen.errors.ModelFileError` messages, refuses a truncated file
before any weight is read (every read is bounds-checked), and reads the large metadata arrays fast.

Why a reader subclass: ``gguf.GGUFReader`` builds one NumPy view of the memory map per array
*element*, about 250,000 views for SmolLM2's 49,152 tokens and 48,900 merges, which takes 3 s or
more. :class:`_FastReader` (made by :func:`_reader_class`) overrides only how an array value is
cut into parts: an array of numbers becomes one view of the whole array; an array of strings is
found with :mod:`struct` in one pass and decoded in one call (:func:`_decode_strings`; 262,144
tokens took 0.6 s one string at a time), its strings kept in the reader's ``string_arrays``.
:func:`read_gguf`'s metadata equals the stock reader's ``ReaderField.contents()`` for every key
(tests compare them), and everything else is the package's own code.
"""

from __future__ import annotations

import functools
import mmap
import os
import stat
import struct
from dataclasses import dataclass, field as dataclass_field
from typing import Any

import numpy as np

from .errors import ModelFileError, UnsupportedModelError

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as stored in the file.

    ``data`` is the memory-mapped raw array the ``gguf`` package returns: for quantised types a
    uint8 array of shape [rows, bytes_per_row]; for F32/F16 the values with shape [rows, cols].
    ``shape`` is in PyTorch order (rows first), i.e. the reverse of GGUF's ``ne`` order.
    ``type_name`` is the ggml type name, e.g. ``"Q4_1"``, ``"Q8_0"``, ``"F32"``.
    """

    name: str
    type_name: str
    shape: tuple[int, ...]
    data: np.ndarray
    ggml_type: Any  # gguf.GGMLQuantizationType


@dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF file: ``metadata`` maps each key to a Python value (str, int, float, bool or
    list), ``tensors`` maps each tensor name to a :class:`GGUFTensor`; ``path`` is absolute and
    ``size_bytes`` is the file size in bytes."""

    path: str
    size_bytes: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    mapping: Any = dataclass_field(default=None, repr=False, compare=False)  # the reader's np.memmap of the file
    #: A :class:`~mqa_gen.repack_cache.RepackCache` that :func:`~mqa_gen.linear.linear_from_gguf` takes
    #: repacked weights from (and gives new ones to); None: always repack. Set by ``mqa_gen.loading.load``.
    repacked: Any = dataclass_field(default=None, repr=False, compare=False)

    def get(self, key: str, default: Any = None) -> Any:
        """``metadata[key]``, or ``default`` when the file lacks the key."""
        return self.metadata.get(key, default)

    def release(self, tensor: GGUFTensor) -> None:
        """Drop the file pages under ``tensor``'s bytes from this process's resident memory
        (``madvise(MADV_DONTNEED)`` on the read-only mapping; touched again, they are read back
        from the file). Loaders call it once a tensor has been copied — repacked or dequantised —
        so the mapped file does not sit in memory beside the weights made from it. A no-op where
        madvise is unavailable."""
        mm = getattr(self.mapping, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = tensor.data.ctypes.data - self.mapping.ctypes.data
        first = start // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            mm.madvise(mmap.MADV_DONTNEED, first, start + tensor.data.nbytes - first)
        except (OSError, ValueError):
            pass


class _Truncated(Exception):
    """Raised inside the reader when a read would run past the end of the file; ``what`` says
    which part of the file was being read."""

    def __init__(self, what: str, offset: int):
        super().__init__(what)
        self.what, self.offset = what, offset


class _UnknownTensorType(Exception):
    """A tensor whose ggml type id the installed ``gguf`` package does not know."""

    def __init__(self, name: str, type_id: int):
        super().__init__(name)
        self.name, self.type_id = name, type_id


def _decode_strings(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> list[str] | None:
    """The UTF-8 strings at ``data[starts[i] : starts[i] + lengths[i]]`` (data: uint8 [size]),
    decoded in one call: gathered with a NUL between each two, decoded, split. None when one is
    not valid UTF-8 or holds a NUL (the caller then takes them one by one)."""
    n = starts.size
    if n == 0:
        return []
    to = np.zeros(n, dtype=np.int64)  # where string i starts in the joined bytes
    np.cumsum(lengths[:-1] + 1, out=to[1:])
    joined = np.zeros(int(to[-1] + lengths[-1]), dtype=np.uint8)  # the NULs stay between strings
    total = int(lengths.sum())
    if total:
        within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        joined[np.repeat(to, lengths) + within] = data[np.repeat(starts, lengths) + within]
    try:
        strings = joined.tobytes().decode("utf-8").split("\0")
    except UnicodeDecodeError:
        return None
    return strings if len(strings) == n else None


@functools.cache
def _reader_class():
    """The :class:`gguf.GGUFReader` subclass we parse with (built on first use because importing
    ``gguf`` takes about 0.3 s, which ``mqa-gen --help`` should not pay)."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

    known_types = {t.value for t in GGMLQuantizationType}
    u64 = struct.Struct("<Q")

    class _FastReader(GGUFReader):
        """GGUFReader with bounds-checked reads and bulk array parsing (see the module docstring).
        ``string_arrays``: key → the decoded strings of each array of strings read in bulk."""

        def __init__(self, *args, **kwargs):
            self.string_arrays: dict[str, list[str]] = {}
            self._decoded: list[str] | None = None
            super().__init__(*args, **kwargs)

        def _get(self, offset, dtype, count=1, override_order=None):
            # Bounds-check every read: the stock reader silently returns a short view past the end
            # of the file and fails later with an unrelated NumPy error.
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > self.data.shape[0]:
                raise _Truncated("the header", int(offset))  # renamed per tensor in _build_tensors
            return super()._get(offset, dtype, count, override_order)

        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            itype = GGUFValueType(raw_itype[0])
            n = int(alen[0])
            offs = orig_offs + 12
            plain = self.data.view(np.ndarray)  # plain views: a memmap view costs ~10x more to make
            size = plain.shape[0]
            nptype = self.gguf_scalar_to_np.get(itype)
            if nptype is not None:
                # One part holding the whole array; contents() concatenates the parts' values, so
                # contents() is unchanged (contents(i) for i > 0 is not; nothing here uses it).
                end = offs + np.dtype(nptype).itemsize * n
                if end > size:
                    raise _Truncated("the header", offs)
                bulk = plain[offs:end].view(nptype)
                return end - orig_offs, [raw_itype, alen, bulk], [2], [GGUFValueType.ARRAY, itype]
            if itype == GGUFValueType.STRING:
                if offs + 8 * n > size:  # each string takes at least its 8-byte length
                    raise _Truncated("the header", offs)
                buffer = memoryview(plain)
                starts, lengths = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
                unpack = u64.unpack_from
                try:
                    for i in range(n):  # each string's length precedes it: one pass, in order
                        length = unpack(buffer, offs)[0]
                        starts[i], lengths[i] = offs + 8, length
                        offs += 8 + length
                except (struct.error, OverflowError):  # a length past the end of the file (or of int64)
                    raise _Truncated("the header", offs) from None
                if offs > size:
                    raise _Truncated("the header", offs)
                strings = _decode_strings(plain, starts, lengths)
                if strings is not None:  # contents() is [] then; read_gguf takes `strings`
                    self._decoded = strings
                    return offs - orig_offs, [raw_itype, alen], [], [GGUFValueType.ARRAY, itype]
                # Not valid UTF-8, or a string holds a NUL: one part per string (a memoryview: ~5x
                # cheaper to make than an array view), for contents() and its error.
                parts = [raw_itype, alen] + [buffer[a : a + k] for a, k in zip(starts.tolist(), lengths.tolist())]
                return offs - orig_offs, parts, list(range(2, 2 + n)), [GGUFValueType.ARRAY, itype]
            return super()._get_field_parts(orig_offs, raw_type)  # arrays of arrays: rare, small

        def _push_field(self, field, skip_sum=False):
            # Called by _build_fields right after _get_field_parts parsed this field's value.
            if self._decoded is not None:
                self.string_arrays[field.name], self._decoded = self._decoded, None
            return super()._push_field(field, skip_sum)

        def _build_tensors(self, start_offs, fields):
            by_offset = {}
            for field in fields:
                _len, name_data, _n_dims, _dims, raw_dtype, offset_tensor = field.parts
                name = bytes(name_data).decode("utf-8", errors="replace")
                if int(raw_dtype[0]) not in known_types:
                    raise _UnknownTensorType(name, int(raw_dtype[0]))
                by_offset[int(start_offs + offset_tensor[0])] = name
            try:
                return super()._build_tensors(start_offs, fields)
            except _Truncated as e:
                name = by_offset.get(e.offset)
                raise _Truncated(f"tensor {name}" if name else "the tensor data", e.offset) from None

    return _FastReader


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse the GGUF file at ``path`` (memory-mapped; no tensor data is copied).

    Raises:
        ModelFileError: the file is missing, unreadable, not GGUF, truncated or corrupt.
        UnsupportedModelError: a GGUF version or tensor type id the ``gguf`` package cannot read.
    """
    from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise ModelFileError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise ModelFileError(f"model path is a directory, not a GGUF file: {path}")
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or a device would block or never end
        raise ModelFileError(f"model path is not a regular file (a FIFO, socket or device?): {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ModelFileError(f"cannot read model file {path}: {e.strerror or e}") from None
    if head[:4] != GGUF_MAGIC:
        if not head:
            raise ModelFileError(f"model file is empty: {path}")
        raise ModelFileError(f"not a GGUF file (bad magic bytes {head[:4]!r}): {path}")
    size = os.path.getsize(path)
    if len(head) == 8:
        version = int.from_bytes(head[4:], "little")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            version = int.from_bytes(head[4:], "big")
        if version not in READER_SUPPORTED_VERSIONS:
            supported = ", ".join(map(str, READER_SUPPORTED_VERSIONS))
            raise UnsupportedModelError(f"unsupported GGUF version {version} in {path} (supported: {supported})")
    try:
        reader = _reader_class()(path, "r")
    except _Truncated as e:
        raise ModelFileError(
            f"truncated GGUF file {path} ({size:,} bytes): {e.what} runs past the end of the file"
        ) from None
    except _UnknownTensorType as e:
        raise UnsupportedModelError(
            f"unsupported tensor type id {e.type_id} for {e.name} in {path} (unknown to the gguf package)"
        ) from None
    except Exception:
        # Corrupt file, or a future ``gguf`` whose internals our subclass no longer fits: let the
        # stock reader decide (slow, but only on this path), and report its error if it fails too.
        from gguf import GGUFReader

        try:
            reader = GGUFReader(path, "r")
        except Exception as e:  # the reader fails with assorted errors on corrupt files
            raise ModelFileError(f"corrupt GGUF file {path}: {_short(e)}") from None

    tensors: dict[str, GGUFTensor] = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        tensors[t.name] = GGUFTensor(t.name, t.tensor_type.name, shape, t.data, t.tensor_type)

    metadata: dict[str, Any] = {}
    bulk = getattr(reader, "string_arrays", {})  # the stock reader (a fallback) has none
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            metadata[key] = bulk[key] if key in bulk else field.contents()
        except Exception as e:  # e.g. a string that is not valid UTF-8
            raise ModelFileError(f"corrupt GGUF metadata value {key!r} in {path}: {_short(e)}") from None
    return GGUFFile(path, size, metadata, tensors, getattr(reader, "data", None))


def _short(e: BaseException) -> str:
    """``TypeName: first line of the message`` for a one-line error."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
