"""Read named GGUF tensors as float32 arrays (dequantised by the ``gguf`` package), and check a
tensor's type and shape (:func:`mqa_gen.models.check_tensors` checks a whole file up front with
them, against the shapes its architecture module lists)."""

from __future__ import annotations

import numpy as np

from .errors import UnsupportedModelError
from .gguf_file import GGUFFile, GGUFTensor

#: ggml tensor types we load. The ``gguf`` package dequantises all of these to float32.
SUPPORTED_TENSOR_TYPES = frozenset(
    {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"}
)


def require_tensor(gguf: GGUFFile, name: str) -> GGUFTensor:
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
    check_tensor_type(gguf, tensor)
    if shape is not None:
        check_tensor_shape(gguf, tensor, shape)
    if tensor.type_name == "F32":  # may stay a view of the mapped file: keep its pages
        return np.ascontiguousarray(np.asarray(tensor.data).reshape(tensor.shape), dtype=np.float32)
    array = np.ascontiguousarray(dequantize(np.asarray(tensor.data), tensor.ggml_type).reshape(tensor.shape),
                                 dtype=np.float32)
    gguf.release(tensor)
    return array


def check_tensor_type(gguf: GGUFFile, tensor: GGUFTensor) -> None:
    """Raises UnsupportedModelError (naming the tensor and the file) for a type we cannot load."""
    if tensor.type_name not in SUPPORTED_TENSOR_TYPES:
        raise UnsupportedModelError(
            f"unsupported tensor type {tensor.type_name} for {tensor.name} in {gguf.path} "
            f"(supported: {', '.join(sorted(SUPPORTED_TENSOR_TYPES))})"
        )


def check_tensor_shape(gguf: GGUFFile, tensor: GGUFTensor, shape: tuple[int, ...]) -> None:
    """Raises UnsupportedModelError (naming the tensor and the file) unless it has ``shape``."""
    if tuple(tensor.shape) != tuple(shape):
        raise UnsupportedModelError(
            f"tensor {tensor.name} in {gguf.path} has shape {tensor.shape}, expected {tuple(shape)}"
        )
