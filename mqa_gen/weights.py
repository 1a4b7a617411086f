"""Read named GGUF tensors as float32 arrays (dequantised by the ``gguf`` package)."""

from __future__ import annotations

import numpy as np

from .errors import UnsupportedModelError
from .gguf_file import GGUFFile

#: ggml tensor types we load. The ``gguf`` package dequantises all of these to float32.
SUPPORTED_TENSOR_TYPES = frozenset(
    {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"}
)


def check_tensor_types(gguf: GGUFFile) -> None:
    """Raise :class:`UnsupportedModelError` naming the first tensor whose type we cannot load."""
    for t in gguf.tensors.values():
        if t.type_name not in SUPPORTED_TENSOR_TYPES:
            raise UnsupportedModelError(
                f"unsupported tensor type {t.type_name} for {t.name} in {gguf.path} "
                f"(supported: {', '.join(sorted(SUPPORTED_TENSOR_TYPES))})"
            )


def require_tensor(gguf: GGUFFile, name: str):
    """The :class:`~mqa_gen.gguf_file.GGUFTensor` called ``name``.

    Raises:
        UnsupportedModelError: the file has no such tensor.
    """
    tensor = gguf.tensors.get(name)
    if tensor is None:
        raise UnsupportedModelError(f"GGUF file {gguf.path} lacks required tensor {name}")
    return tensor


def tensor_f32(gguf: GGUFFile, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Tensor ``name`` as a C-contiguous float32 array in PyTorch order ([rows, cols] for matrices).

    If ``shape`` is given it must match exactly.

    Raises:
        UnsupportedModelError: missing tensor, unsupported type or unexpected shape.
    """
    from gguf import dequantize

    tensor = require_tensor(gguf, name)
    if tensor.type_name not in SUPPORTED_TENSOR_TYPES:
        raise UnsupportedModelError(f"unsupported tensor type {tensor.type_name} for {name}")
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise UnsupportedModelError(f"tensor {name} has shape {tensor.shape}, expected {shape}")
    array = dequantize(np.asarray(tensor.data), tensor.ggml_type)
    return np.ascontiguousarray(array.reshape(tensor.shape), dtype=np.float32)
