"""Model architectures, one self-contained module each (as mlx-lm keeps ``models/<arch>.py``),
and the registry that finds them by GGUF ``general.architecture``.

An architecture module provides:

* ``ARCHITECTURE`` — its GGUF architecture name;
* ``config_extras(gguf, n_layers, key) → dict`` — config fields beyond the generic metadata;
* ``tensor_shapes(config) → {name: shape}`` — every tensor a file must hold;
* ``from_gguf(gguf, config) → Decoder`` — the loaded model (:mod:`mqa_gen.models.base`).

A new architecture is one new module plus one entry in :data:`ARCHITECTURES`; nothing else asks
which architecture a file is.
"""

from __future__ import annotations

from types import ModuleType

from ..config import ModelConfig, read_config
from ..errors import UnsupportedModelError
from ..gguf_file import GGUFFile
from ..weights import check_tensor_shape, check_tensor_type, require_tensor
from . import gemma3, llama
from .base import Decoder

#: GGUF architecture name → its module: the only list of architectures.
ARCHITECTURES: dict[str, ModuleType] = {m.ARCHITECTURE: m for m in (llama, gemma3)}


def architecture(gguf: GGUFFile) -> ModuleType:
    """The module of the file's architecture.

    Raises:
        UnsupportedModelError: the file names none, or one without a module here.
    """
    arch = gguf.get("general.architecture")
    if arch is None:
        raise UnsupportedModelError(f"GGUF file {gguf.path} does not say its architecture (no general.architecture)")
    if not isinstance(arch, str):
        raise UnsupportedModelError(f"general.architecture in {gguf.path} is not text: {arch!r:.80}")
    module = ARCHITECTURES.get(arch)
    if module is None:
        supported = ", ".join(ARCHITECTURES)
        raise UnsupportedModelError(f"unsupported model architecture {arch!r} in {gguf.path} (supported: {supported})")
    return module


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    """The file's :class:`~mqa_gen.config.ModelConfig`: generic metadata plus its architecture's extras.

    Raises:
        UnsupportedModelError: an unknown architecture, per-layer head counts or RoPE scaling.
        ConfigError: a missing, mistyped or inconsistent dimension; the message names the file.
    """
    module = architecture(gguf)
    return read_config(gguf, module.ARCHITECTURE, module.config_extras)


def check_tensors(gguf: GGUFFile, config: ModelConfig) -> None:
    """Check, before any weight is read, that the file can be loaded as ``config`` says.

    Raises:
        UnsupportedModelError: naming the first tensor whose type we cannot load, else the first
            required tensor that is missing or has the wrong shape (with the file's path).
    """
    for tensor in gguf.tensors.values():
        check_tensor_type(gguf, tensor)
    for name, shape in ARCHITECTURES[config.architecture].tensor_shapes(config).items():
        check_tensor_shape(gguf, require_tensor(gguf, name), shape)


def build_model(gguf: GGUFFile, config: ModelConfig) -> Decoder:
    """The model of ``config.architecture`` with the file's weights.

    Raises:
        UnsupportedModelError: an architecture with no module here, a missing tensor, unsupported
            type or unexpected shape.
    """
    module = ARCHITECTURES.get(config.architecture)
    if module is None:
        raise UnsupportedModelError(f"unsupported model architecture {config.architecture!r}")
    return module.from_gguf(gguf, config)
