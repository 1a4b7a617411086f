"""Model hyper-parameters, read from GGUF metadata into a frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .cache import kv_bytes, kv_bytes_per_token
from .errors import ConfigError, UnsupportedModelError
from .gguf_file import GGUFFile
from .kv_heads import attention_kind


#: The longest context a config may claim: llama.cpp numbers positions with an int32
#: (``llama_pos``), so no GGUF model addresses more. Whether a context fits this machine is the KV
#: cache's question (:func:`mqa_gen.cache.check_cache_fits`).
MAX_CONTEXT_LENGTH = 2**31 - 1


_FLOAT32_TINY = float(np.finfo(np.float32).smallest_subnormal)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_positive_float(field: str, value) -> None:
    """ConfigError unless ``value`` is a finite real number > 0 that stays > 0 as float32 (the
    kernels' type: an epsilon of 1e-50 would be 0 there and a zero row would divide by zero)."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and _FLOAT32_TINY <= value <= _FLOAT32_MAX)
    if not ok:
        raise ConfigError(f"{field} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Dimensions of a decoder-only transformer with grouped KV heads.

    n_kv_heads = 1 is Multi-Query Attention (Shazeer 2019), 1 < n_kv_heads < n_heads is GQA
    (Ainslie et al. 2023), n_kv_heads = n_heads is MHA. ``rope_interleaved`` says which RoPE pairing
    the stored Q/K rows expect (see :func:`mqa_gen.kernels.rope`). ``context_length`` is in tokens.
    ``layer_windows`` gives each layer's sliding attention window in tokens (0 = full attention;
    empty = every layer full), ``rope_local_theta`` the RoPE base of the sliding-window layers
    (Gemma 3: 10,000 locally, ``rope_theta`` globally; 0 = ``rope_theta``).

    Raises:
        ConfigError: a count ≤ 0, n_heads not divisible by n_kv_heads, a windows list of another
            length than n_layers, a context beyond :data:`MAX_CONTEXT_LENGTH`, or a RoPE base or
            norm epsilon that is not a finite number > 0 (NaN there would reach every kernel).
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
    layer_windows: tuple[int, ...] = ()
    rope_local_theta: float = 0.0

    def __post_init__(self) -> None:
        for field in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "vocab_size", "context_length"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{field} must be a positive integer, got {value!r}")
        if self.context_length > MAX_CONTEXT_LENGTH:
            raise ConfigError(f"context_length {self.context_length:,} is beyond the {MAX_CONTEXT_LENGTH:,} "
                              "positions GGUF models address")
        _check_positive_float("rope_theta", self.rope_theta)
        _check_positive_float("norm_eps", self.norm_eps)
        if self.rope_local_theta:  # 0 = use rope_theta
            _check_positive_float("rope_local_theta", self.rope_local_theta)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        windows = tuple(self.layer_windows) or (0,) * self.n_layers
        if len(windows) != self.n_layers or min(windows) < 0:
            raise ConfigError(f"layer_windows must give one window >= 0 per layer, got {self.layer_windows!r}")
        object.__setattr__(self, "layer_windows", windows)

    @property
    def sliding_window(self) -> int:
        """The largest sliding window of any layer (tokens), 0 when every layer is full attention."""
        return max(self.layer_windows)

    def layer_rope_theta(self, layer: int) -> float:
        """The RoPE base of ``layer``: ``rope_local_theta`` for a sliding-window layer if set."""
        return self.rope_local_theta if self.layer_windows[layer] and self.rope_local_theta else self.rope_theta

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head (n_heads / n_kv_heads)."""
        return self.n_heads // self.n_kv_heads

    @property
    def attention_kind(self) -> str:
        """``"MQA"``, ``"GQA"`` or ``"MHA"`` (:func:`mqa_gen.kv_heads.attention_kind`)."""
        return attention_kind(self.n_heads, self.n_kv_heads)

    def kv_bytes_per_token(self, cache_dtype="f32") -> int:
        """KV-cache bytes per token while no sliding window is full: 2 × n_layers × n_kv_heads ×
        the bytes of one row of head_dim elements in ``cache_dtype`` (a name such as ``"q8_0"`` or
        a :class:`~mqa_gen.kv_storage.CacheStorage`; see :func:`mqa_gen.cache.kv_bytes_per_token`).

        Raises:
            ValueError: an unknown type, or a head_dim a block type cannot store.
        """
        return kv_bytes_per_token(self.n_layers, self.n_kv_heads, self.head_dim, cache_dtype)

    def kv_bytes(self, n_tokens: int, cache_dtype="f32") -> int:
        """KV-cache bytes for ``n_tokens`` tokens; a sliding-window layer holds at most its window.

        Raises:
            ValueError: as :meth:`kv_bytes_per_token`.
        """
        return kv_bytes(n_tokens, self.layer_windows, self.n_kv_heads, self.head_dim, cache_dtype)

    def with_kv_heads(self, n_kv_heads: int) -> "ModelConfig":
        """The same model with ``n_kv_heads`` KV heads (validated)."""
        return dataclasses.replace(self, n_kv_heads=n_kv_heads)


def read_config(gguf: GGUFFile, arch: str, extras) -> ModelConfig:
    """Build a :class:`ModelConfig` from GGUF metadata (keys ``{arch}.block_count`` etc., as in the
    GGUF spec's "LLM" section). The architecture's own fields come from
    ``extras(gguf, n_layers, key)`` → dict (its module's ``config_extras``; ``key(name, kind,
    default)`` reads ``{arch}.{name}`` with the checks below); :func:`mqa_gen.models.config_from_gguf`
    passes it.

    Raises:
        UnsupportedModelError: per-layer head counts, or RoPE scaling we do not implement.
        ConfigError: a missing, mistyped or inconsistent dimension; the message names the file.
    """
    path = gguf.path

    def key(name: str, kind: type, default=None):
        # One place that turns absent or oddly typed metadata into a one-line error naming the key.
        full = f"{arch}.{name}"
        value = gguf.get(full, default)
        if value is None:
            raise ConfigError(f"GGUF metadata lacks {full} in {path}")
        if isinstance(value, list):
            raise UnsupportedModelError(f"per-layer values for {full} are not supported ({path})")
        ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
        if not ok or isinstance(value, bool):
            raise ConfigError(f"GGUF metadata {full} must be {'an integer' if kind is int else 'a number'}, "
                              f"got {value!r} in {path}")
        return kind(value)

    scaling = gguf.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise UnsupportedModelError(f"unsupported RoPE scaling {scaling!r} in {path}")

    n_heads = key("attention.head_count", int)
    d_model = key("embedding_length", int)
    if gguf.get(f"{arch}.attention.key_length") is not None:
        head_dim = key("attention.key_length", int)
    elif n_heads > 0 and d_model % n_heads == 0:
        head_dim = d_model // n_heads
    elif n_heads > 0:
        raise ConfigError(f"embedding_length ({d_model}) is not divisible by head_count ({n_heads}) in {path}")
    else:
        head_dim = 0  # ModelConfig reports the zero head count itself
    tokens = gguf.get("tokenizer.ggml.tokens")
    tokens = tokens if isinstance(tokens, list) else None  # another type: the tokenizer reports it
    n_layers = key("block_count", int)
    # Every layer has several tensors of its own, so a file with fewer tensors than layers is
    # damaged; refuse it before anything (architecture extras, tensor lists) is built per layer.
    if n_layers > len(gguf.tensors):
        raise ConfigError(f"GGUF metadata {arch}.block_count is {n_layers:,} but {path} holds only "
                          f"{len(gguf.tensors):,} tensors")
    extra = extras(gguf, n_layers, key)
    dims = dict(
        n_layers=n_layers,
        n_kv_heads=key("attention.head_count_kv", int, n_heads),
        d_ff=key("feed_forward_length", int),
        vocab_size=key("vocab_size", int, len(tokens) if tokens else None),
        context_length=key("context_length", int),
        rope_theta=key("rope.freq_base", float, 10000.0),
        norm_eps=key("attention.layer_norm_rms_epsilon", float),
    )
    try:
        return ModelConfig(
            architecture=arch,
            name=str(gguf.get("general.name", "")),
            d_model=d_model,
            n_heads=n_heads,
            head_dim=head_dim,
            tie_embeddings="output.weight" not in gguf.tensors,
            **{"rope_interleaved": True, **dims, **extra},
        )
    except ConfigError as e:  # ModelConfig's own checks do not know the file
        raise ConfigError(f"invalid model dimensions in {path}: {e}") from None
