"""Read named GGUF tensors as float32 arrays (dequantised by the ``gguf`` package), and check up
front that a file holds every tensor its architecture needs, in a type we can load."""

from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .errors import UnsupportedModelError
from .gguf_file import GGUFFile, GGUFTensor

#: ggml tensor types we load. The ``gguf`` package dequantises all of these to float32.
SUPPORTED_TENSOR_TYPES = frozenset(
    {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"}
)


def expected_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a llama or gemma3 GGUF must hold, name → shape in PyTorch order (rows first).

    GGUF names: ``token_embd``, ``blk.N.attn_q`` …, ``output_norm``; ``output`` only when the
    output head is not tied to the embeddings (``config.tie_embeddings`` is False). gemma3 adds
    per layer ``attn_q_norm``/``attn_k_norm`` [head_dim] and ``post_attention_norm``/``post_ffw_norm``.
    """
    c = config
    d, hd = c.d_model, c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (c.vocab_size, d)}
    for i in range(c.n_layers):
        p = f"blk.{i}."
        shapes.update({
            p + "attn_norm.weight": (d,),
            p + "attn_q.weight": (c.n_heads * hd, d),
            p + "attn_k.weight": (c.n_kv_heads * hd, d),
            p + "attn_v.weight": (c.n_kv_heads * hd, d),
            p + "attn_output.weight": (d, c.n_heads * hd),
            p + "ffn_norm.weight": (d,),
            p + "ffn_gate.weight": (c.d_ff, d),
            p + "ffn_up.weight": (c.d_ff, d),
            p + "ffn_down.weight": (d, c.d_ff),
        })
        if c.architecture == "gemma3":
            shapes.update({
                p + "attn_q_norm.weight": (hd,),
                p + "attn_k_norm.weight": (hd,),
                p + "post_attention_norm.weight": (d,),
                p + "post_ffw_norm.weight": (d,),
            })
    shapes["output_norm.weight"] = (d,)
    if not c.tie_embeddings:
        shapes["output.weight"] = (c.vocab_size, d)
    return shapes


def check_tensors(gguf: GGUFFile, config: ModelConfig) -> None:
    """Check, before any weight is read, that the file can be loaded as ``config`` says.

    Raises:
        UnsupportedModelError: naming the first tensor whose type we cannot load, else the first
            required tensor that is missing or has the wrong shape (with the file's path).
    """
    for t in gguf.tensors.values():
        _check_type(gguf, t)
    for name, shape in expected_tensor_shapes(config).items():
        _check_shape(gguf, require_tensor(gguf, name), shape)


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
    _check_type(gguf, tensor)
    if shape is not None:
        _check_shape(gguf, tensor, shape)
    if tensor.type_name == "F32":  # may stay a view of the mapped file: keep its pages
        return np.ascontiguousarray(np.asarray(tensor.data).reshape(tensor.shape), dtype=np.float32)
    array = np.ascontiguousarray(dequantize(np.asarray(tensor.data), tensor.ggml_type).reshape(tensor.shape),
                                 dtype=np.float32)
    gguf.release(tensor)
    return array


def _check_type(gguf: GGUFFile, tensor: GGUFTensor) -> None:
    if tensor.type_name not in SUPPORTED_TENSOR_TYPES:
        raise UnsupportedModelError(
            f"unsupported tensor type {tensor.type_name} for {tensor.name} in {gguf.path} "
            f"(supported: {', '.join(sorted(SUPPORTED_TENSOR_TYPES))})"
        )


def _check_shape(gguf: GGUFFile, tensor: GGUFTensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise UnsupportedModelError(
            f"tensor {tensor.name} in {gguf.path} has shape {tensor.shape}, expected {tuple(shape)}"
        )
