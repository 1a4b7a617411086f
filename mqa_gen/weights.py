"""Read named GGUF tensors as float32 arrays (dequantised by the ``gguf`` package), and check a
tensor's type and shape (:func:`mqa_gen.models.check_tensors` checks a whole file up front with
them, against the shapes its architecture module lists)."""

from __future__ import annotations

import numpy as np

from .errors import ModelFileError, UnsupportedModelError
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
        ModelFileError: NaN or infinite values (:func:`check_finite`).
    """
    from gguf import dequantize

    tensor = require_tensor(gguf, name)
    check_tensor_type(gguf, tensor)
    if shape is not None:
        check_tensor_shape(gguf, tensor, shape)
    if tensor.type_name == "F32":  # may stay a view of the mapped file: keep its pages
        return check_finite(gguf, name, np.ascontiguousarray(np.asarray(tensor.data).reshape(tensor.shape),
                                                             dtype=np.float32))
    array = np.ascontiguousarray(dequantize(np.asarray(tensor.data), tensor.ggml_type).reshape(tensor.shape),
                                 dtype=np.float32)
    gguf.release(tensor)
    return check_finite(gguf, name, array)


def check_finite(gguf: GGUFFile, name: str, *arrays: np.ndarray) -> np.ndarray:
    """The first of ``arrays`` (any shape: a tensor's float values, or a quantised tensor's block
    scales and minima, float32 or float16 bit patterns in uint16 as the repacked layouts keep
    them), once every value of every one is checked finite; returns it unchanged.

    A NaN or infinite weight or block scale can only come from a damaged file, and would reach
    every kernel (a ``SystemError`` from Numba, NaN logits); refusing at load names the tensor.
    One pass over float data the loader has just made (for quantised tensors the scales only:
    1/32 of the weights), a few ms for SmolLM2.

    Raises:
        ModelFileError: a NaN or infinite value, naming the tensor and the file.
    """
    for array in arrays:
        if array is None or not array.size:
            continue
        if array.dtype == np.uint16:  # float16 bits: exponent all ones is inf or NaN
            finite = ((array & np.uint16(0x7C00)) != np.uint16(0x7C00)).all()
        else:
            finite = np.isfinite(array).all()
        if not finite:
            raise ModelFileError(f"tensor {name} in {gguf.path} holds NaN or infinite values "
                                 "(a damaged model file)")
    return arrays[0]


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
