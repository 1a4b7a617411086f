"""Model hyper-parameters, read from GGUF metadata into a frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .cache import kv_bytes_per_token
from .errors import ConfigError, UnsupportedModelError
from .gguf_file import GGUFFile


@dataclass(frozen=True)
class ModelConfig:
    """Dimensions of a decoder-only transformer with grouped KV heads.

    n_kv_heads = 1 is Multi-Query Attention (Shazeer 2019), 1 < n_kv_heads < n_heads is GQA
    (Ainslie et al. 2023), n_kv_heads = n_heads is MHA. ``rope_interleaved`` says which RoPE pairing
    the stored Q/K rows expect (see :func:`mqa_gen.kernels.rope`). ``context_length`` is in tokens.

    Raises:
        ConfigError: a count ≤ 0, or n_heads not divisible by n_kv_heads.
    """

    architecture: str
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    context_length: int
    rope_theta: float
    norm_eps: float
    tie_embeddings: bool
    rope_interleaved: bool = True

    def __post_init__(self) -> None:
        for field in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "vocab_size", "context_length"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{field} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head (n_heads / n_kv_heads)."""
        return self.n_heads // self.n_kv_heads

    @property
    def attention_kind(self) -> str:
        """``"MQA"``, ``"GQA"`` or ``"MHA"``."""
        if self.n_kv_heads == 1:
            return "MQA"
        return "MHA" if self.n_kv_heads == self.n_heads else "GQA"

    def kv_bytes_per_token(self, itemsize: int = 4) -> int:
        """KV-cache bytes per token: 2 × n_layers × n_kv_heads × head_dim × itemsize."""
        return kv_bytes_per_token(self.n_layers, self.n_kv_heads, self.head_dim, itemsize)

    def with_kv_heads(self, n_kv_heads: int) -> "ModelConfig":
        """The same model with ``n_kv_heads`` KV heads (validated)."""
        return dataclasses.replace(self, n_kv_heads=n_kv_heads)


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    """Build a :class:`ModelConfig` from GGUF metadata (keys ``{arch}.block_count`` etc., as in the
    GGUF spec's "LLM" section).

    Raises:
        UnsupportedModelError: an architecture other than llama, or RoPE scaling we do not implement.
        ConfigError: a missing or inconsistent dimension.
    """
    arch = gguf.get("general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(f"unsupported model architecture {arch!r} (supported: llama)")

    def key(name: str, default=None, required: bool = True):
        value = gguf.get(f"{arch}.{name}", default)
        if value is None and required:
            raise ConfigError(f"GGUF metadata lacks {arch}.{name}")
        return value

    scaling = gguf.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise UnsupportedModelError(f"unsupported RoPE scaling {scaling!r} in {gguf.path}")

    n_heads = int(key("attention.head_count"))
    d_model = int(key("embedding_length"))
    head_dim = int(key("attention.key_length", d_model // n_heads))
    tokens = gguf.get("tokenizer.ggml.tokens")
    vocab = int(key("vocab_size", len(tokens) if tokens else None))
    return ModelConfig(
        architecture=arch,
        name=str(gguf.get("general.name", "")),
        n_layers=int(key("block_count")),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=int(key("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        d_ff=int(key("feed_forward_length")),
        vocab_size=vocab,
        context_length=int(key("context_length")),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in gguf.tensors,
        rope_interleaved=True,
    )
