"""Model architectures, one module each (as mlx-lm keeps ``models/``)."""

from __future__ import annotations

from ..config import ModelConfig
from ..errors import UnsupportedModelError
from ..gguf_file import GGUFFile
from .gemma3 import Gemma3Model
from .llama import LlamaModel

ARCHITECTURES = {"llama": LlamaModel, "gemma3": Gemma3Model}


def build_model(gguf: GGUFFile, config: ModelConfig):
    """Instantiate the model class for ``config.architecture`` with the file's weights.

    Raises:
        UnsupportedModelError: an architecture with no implementation here.
    """
    cls = ARCHITECTURES.get(config.architecture)
    if cls is None:
        raise UnsupportedModelError(f"unsupported model architecture {config.architecture!r}")
    return cls.from_gguf(gguf, config)
