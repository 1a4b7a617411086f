"""Open a GGUF file with the ``gguf`` package and expose its metadata as plain Python values.

Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md. Parsing and dequantisation are
done by the ``gguf`` package (llama.cpp's reference Python reader); this module only turns its
failures into one-line :class:`~mqa_gen.errors.ModelFileError` messages and checks that every
tensor's bytes lie inside the file, so a truncated download is refused before any weight is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ModelFileError

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

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse the GGUF file at ``path`` (memory-mapped; no tensor data is copied).

    Raises:
        ModelFileError: the file is missing, unreadable, not GGUF, truncated or corrupt.
    """
    from gguf import GGUFReader  # imported lazily: it pulls in a few modules we rarely need

    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise ModelFileError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise ModelFileError(f"model path is a directory, not a GGUF file: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFileError(f"cannot read model file {path}: {e.strerror or e}") from None
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"not a GGUF file (bad magic bytes {magic!r}): {path}")
    size = os.path.getsize(path)
    try:
        reader = GGUFReader(path, "r")
    except Exception as e:  # the reader fails with assorted errors on truncated or corrupt files
        raise ModelFileError(f"corrupt or truncated GGUF file {path}: {_short(e)}") from None

    tensors: dict[str, GGUFTensor] = {}
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ModelFileError(
                f"truncated GGUF file {path}: tensor {t.name} ends at byte {end} but the file has {size}"
            )
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        tensors[t.name] = GGUFTensor(t.name, t.tensor_type.name, shape, t.data, t.tensor_type)

    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            metadata[key] = field.contents()
        except Exception as e:
            raise ModelFileError(f"corrupt GGUF metadata value {key!r} in {path}: {_short(e)}") from None
    return GGUFFile(path, size, metadata, tensors)


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
