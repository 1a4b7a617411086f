"""The Multi-Query Attention layer as a library: forward, cached forward, backward, parameters.

:class:`MultiQueryAttention` is the self-attention of Shazeer 2019 ("Fast Transformer Decoding: One
Write-Head is All You Need") with grouped KV heads (Ainslie et al. 2023, "GQA"): ``num_kv_heads = 1``
is MQA, ``num_kv_heads = num_heads`` is MHA, anything dividing ``num_heads`` in between is GQA.
For x [batch, seq, d_model] (row-vector convention, y = x W):

    q = x W_q → [B, T, num_heads,    head_dim]     RoPE(q), RoPE(k) when config.rope_theta is set
    k = x W_k → [B, T, num_kv_heads, head_dim]
    v = x W_v → [B, T, num_kv_heads, head_dim]
    o_h = softmax(q_h k_{h//G}ᵀ / √head_dim) v_{h//G}       G = num_heads / num_kv_heads, causal or not
    y = concat_h(o_h) W_o → [B, T, d_model]

Which code runs (no second attention: the models' block is reused wherever it fits):

* ``forward_with_cache`` and the plain float32 causal ``forward`` run the models' own attention
  block (:class:`mqa_gen.attention.Attention`, which holds this layer's weights) over the models'
  :class:`~mqa_gen.cache.KVCache` (one per sequence, see :class:`LayerKVCache`), as one batch of
  sequences: its ``attention_prefill`` / ``attention_decode`` kernels compute in float32 (the cache
  is float32 or float16), so a float64 layer's cached forward is float32-accurate.
* ``forward(keep=True)``, training with dropout, non-causal layers and float64 layers run
  :func:`~mqa_gen.kernels.attention_grad.attention_forward`, which keeps the softmax
  probabilities for :meth:`MultiQueryAttention.backward` and computes in the arrays' dtype.

Gradients (``backward``) come from :func:`~mqa_gen.kernels.attention_grad.attention_backward`
for the attention and BLAS products for the projections; backward through RoPE is the inverse
rotation. Weights are initialised Xavier-uniform (Glorot & Bengio 2010). Optimisers:
:mod:`mqa_gen.optim`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .attention import Attention, DecodeScratch
from .batch import Batch, rope_cos_sin
from .cache import KVCache
from .errors import ConfigError
from .kv_heads import attention_kind
from .linear import DenseLinear

WEIGHT_NAMES = ("w_q", "w_k", "w_v", "w_o")
_BLOCK_WEIGHTS = {"w_q": "wq", "w_k": "wk", "w_v": "wv", "w_o": "wo"}  # the attention block's names
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class LayerError(ConfigError, ValueError):
    """An invalid layer config, weight, input or cache. Both a :class:`ValueError` (what NumPy code
    expects) and a :class:`~mqa_gen.errors.ConfigError` (the CLI prints it as one line, exit 2)."""


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise LayerError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class MultiQueryAttentionConfig:
    """Hyper-parameters of a :class:`MultiQueryAttention` layer (frozen; validated on creation).

    Attributes:
        num_heads: query heads (int > 0).
        head_dim: width of each head (int > 0; even when RoPE is on).
        num_kv_heads: K/V heads (int > 0 dividing num_heads): 1 = MQA (default), num_heads = MHA.
        dropout_prob: attention-weight dropout probability in [0, 1), applied only by
            ``forward(x, training=True, rng=...)``.
        causal: position t attends to positions ≤ t only (True) or to all positions (False).
        rope_theta: base θ of rotary position embeddings (Su et al. 2021) applied to q and k, or
            None for no RoPE. ``rope_interleaved``: rotate adjacent pairs (x[2i], x[2i+1]), as GGUF
            llama files expect (True), or halves (x[i], x[i + head_dim/2]) (False).

    Use :func:`dataclasses.replace` or the ``with_*`` helpers to derive a changed config.

    Raises:
        LayerError: a count that is not a positive integer, num_heads not divisible by
            num_kv_heads, dropout_prob outside [0, 1), rope_theta ≤ 0, or odd head_dim with RoPE.
    """

    num_heads: int
    head_dim: int
    num_kv_heads: int = 1
    dropout_prob: float = 0.0
    causal: bool = True
    rope_theta: float | None = None
    rope_interleaved: bool = True

    def __post_init__(self) -> None:
        for name in ("num_heads", "head_dim", "num_kv_heads"):
            object.__setattr__(self, name, _positive_int(name, getattr(self, name)))
        if self.num_heads % self.num_kv_heads:
            raise LayerError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if not 0.0 <= self.dropout_prob < 1.0:
            raise LayerError(f"dropout_prob must be in [0, 1), got {self.dropout_prob!r}")
        if self.rope_theta is not None:
            if not self.rope_theta > 0:
                raise LayerError(f"rope_theta must be > 0 or None, got {self.rope_theta!r}")
            if self.head_dim % 2:
                raise LayerError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def d_model(self) -> int:
        """Model width the layer needs: num_heads × head_dim."""
        return self.num_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads sharing one KV head, G = num_heads / num_kv_heads."""
        return self.num_heads // self.num_kv_heads

    @property
    def kind(self) -> str:
        """``"MQA"`` (one KV head), ``"MHA"`` (one per query head) or ``"GQA"``
        (:func:`mqa_gen.kv_heads.attention_kind`)."""
        return attention_kind(self.num_heads, self.num_kv_heads)

    def with_kv_heads(self, num_kv_heads: int) -> "MultiQueryAttentionConfig":
        """The same config with ``num_kv_heads`` K/V heads."""
        return dataclasses.replace(self, num_kv_heads=num_kv_heads)

    def with_dropout(self, dropout_prob: float) -> "MultiQueryAttentionConfig":
        """The same config with attention-weight dropout ``dropout_prob``."""
        return dataclasses.replace(self, dropout_prob=dropout_prob)

    def with_causal(self, causal: bool) -> "MultiQueryAttentionConfig":
        """The same config, causal or not."""
        return dataclasses.replace(self, causal=causal)

    def with_rope(self, theta: float | None, interleaved: bool = True) -> "MultiQueryAttentionConfig":
        """The same config with RoPE base ``theta`` (None: no RoPE)."""
        return dataclasses.replace(self, rope_theta=theta, rope_interleaved=interleaved)


class AttentionGradients(NamedTuple):
    """What :meth:`MultiQueryAttention.backward` returns; unpacks as ``dx, dwq, dwk, dwv, dwo``.

    ``d_input`` [batch, seq, d_model]; ``d_w_q`` … ``d_w_o`` shaped like the weights. An entry that
    was not asked for is None.
    """

    d_input: np.ndarray | None
    d_w_q: np.ndarray | None
    d_w_k: np.ndarray | None
    d_w_v: np.ndarray | None
    d_w_o: np.ndarray | None

    def as_dict(self) -> dict[str, np.ndarray | None]:
        """Weight name → gradient, as :mod:`mqa_gen.optim` optimisers take them."""
        return {"w_q": self.d_w_q, "w_k": self.d_w_k, "w_v": self.d_w_v, "w_o": self.d_w_o}


class LayerKVCache:
    """The KV cache of one attention layer for a batch: one :class:`~mqa_gen.cache.KVCache`
    (``n_layers=1``) per sequence, each preallocated [num_kv_heads, max_seq_len, head_dim] and written
    in place — the cache type the model uses, unchanged.

    Args:
        batch, n_kv_heads, head_dim, max_seq_len: ints > 0. dtype: a cache type name (``"f32"``,
            ``"f16"``, ``"q8_0"``, ``"q4_0"``, or the aliases ``"float32"``, ``"float16"``).
        growable: whether :meth:`make_room` may enlarge the caches (a cache the layer made for its
            caller grows as mlx-lm's does; one the caller sized stays as sized).

    Attributes:
        items: the per-sequence :class:`KVCache` objects (they advance together).

    Raises:
        LayerError: batch ≤ 0. ValueError (from KVCache): another dimension ≤ 0 or a bad dtype.
    """

    #: Tokens a growable cache gains at a time, at least (as mlx-lm's KVCache grows by 256).
    GROWTH_STEP = 256

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, max_seq_len: int, dtype: str = "f32",
                 *, growable: bool = False):
        batch = _positive_int("batch", batch)
        self.items = [KVCache(1, n_kv_heads, head_dim, max_seq_len, dtype) for _ in range(batch)]
        self.growable = growable

    @classmethod
    def wrap(cls, caches: list[KVCache]) -> "LayerKVCache":
        """A LayerKVCache over existing one-layer KVCaches of equal dimensions and length.

        Raises:
            LayerError: an empty list, a cache with n_layers ≠ 1, or caches that differ.
        """
        caches = list(caches)
        if not caches:
            raise LayerError("LayerKVCache.wrap needs at least one KVCache")
        first = caches[0]
        for c in caches:
            if c.n_layers != 1:
                raise LayerError(f"a layer's KVCache must have n_layers=1, got {c.n_layers}")
            if (c.n_kv_heads, c.head_dim, c.max_seq_len, c.dtype, c.length) != (
                    first.n_kv_heads, first.head_dim, first.max_seq_len, first.dtype, first.length):
                raise LayerError("the KVCaches of one batch must have equal dimensions, dtype and length")
        self = cls.__new__(cls)
        self.items = caches
        self.growable = False
        return self

    batch = property(lambda self: len(self.items), doc="Sequences in the batch.")
    n_kv_heads = property(lambda self: self.items[0].n_kv_heads, doc="KV heads per sequence.")
    head_dim = property(lambda self: self.items[0].head_dim, doc="Width of each KV head.")
    max_seq_len = property(lambda self: self.items[0].max_seq_len, doc="Capacity in tokens per sequence.")
    dtype = property(lambda self: self.items[0].dtype, doc='The cache type\'s canonical name, e.g. "f16".')
    length = property(lambda self: self.items[0].length, doc="Tokens stored per sequence.")
    nbytes = property(lambda self: sum(c.nbytes for c in self.items), doc="Bytes allocated, all sequences.")

    @property
    def bytes_per_token(self) -> int:
        """K and V bytes one token of one sequence occupies (2 × n_kv_heads × bytes per row)."""
        return self.items[0].bytes_per_token

    def make_room(self, n_tokens: int) -> None:
        """Make sure ``n_tokens`` more tokens fit: a growable cache is enlarged (to at least double,
        by at least :attr:`GROWTH_STEP`); a fixed one is left as it is (the caller checks)."""
        needed = self.length + n_tokens
        if self.growable and needed > self.max_seq_len:
            size = max(needed, 2 * self.max_seq_len, self.max_seq_len + self.GROWTH_STEP)
            self.items = [c.resized(size) for c in self.items]

    def truncate(self, n_tokens: int) -> None:
        """Keep the first ``n_tokens`` positions of every sequence (nothing is copied)."""
        for c in self.items:
            c.truncate(n_tokens)

    def reset(self) -> None:
        """Forget every stored token."""
        for c in self.items:
            c.reset()


@dataclass
class _Saved:
    """What a ``keep=True`` forward computed, for backward: the input object it saw, the rotated
    q [B,T,H,D] and k [B,T,KV,D], v [B,T,KV,D], probabilities P [B,H,T,T], dropout multipliers
    [B,H,T,T] or None, the pre-projection output o [B,T,H,D], RoPE cos/sin [T, D/2] or None, and the
    version of each weight it was computed with."""

    x_in: object
    x: np.ndarray
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    probs: np.ndarray
    mask: np.ndarray | None
    o: np.ndarray
    cos: np.ndarray | None
    sin: np.ndarray | None
    versions: dict[str, int]
    y: np.ndarray | None = None


class MultiQueryAttention:
    """Multi-Query / Grouped-Query / Multi-Head self-attention with optional RoPE (see module doc).

    Construct from a width, a config and a random generator (Xavier-uniform weights, Glorot &
    Bengio 2010: U(±√(6 / (fan_in + fan_out))) per matrix), or with :meth:`from_weights`.

    Args:
        d_model: input and output width; must equal num_heads × head_dim.
        config: a :class:`MultiQueryAttentionConfig`.
        rng: a :class:`numpy.random.Generator` (None: a fresh, unseeded one).
        dtype: ``numpy.float32`` (default) or ``numpy.float64``; weights, outputs and gradients
            take it.

    Attributes:
        w_q: [d_model, num_heads·head_dim]; w_k, w_v: [d_model, num_kv_heads·head_dim];
        w_o: [num_heads·head_dim, d_model] — the live arrays (optimisers update them in place).

    Raises:
        LayerError: d_model not a positive integer or ≠ num_heads·head_dim, a config that is not a
            MultiQueryAttentionConfig, an rng that is not a Generator, or an unsupported dtype.
    """

    def __init__(self, d_model: int, config: MultiQueryAttentionConfig, rng: np.random.Generator | None = None,
                 *, dtype=np.float32):
        dtype = self._check_setup(d_model, config, dtype)
        if rng is None:
            rng = np.random.default_rng()
        if not isinstance(rng, np.random.Generator):
            raise LayerError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        c = config
        shapes = self.weight_shapes(d_model, c)

        def xavier(shape):
            limit = np.sqrt(6.0 / (shape[0] + shape[1]))
            return rng.uniform(-limit, limit, size=shape).astype(dtype)

        self._setup(c, dtype, {name: xavier(shape) for name, shape in shapes.items()})

    @classmethod
    def from_weights(cls, config: MultiQueryAttentionConfig, w_q, w_k, w_v, w_o, *,
                     dtype=None) -> "MultiQueryAttention":
        """A layer holding copies of the given weights (d_model is w_q's row count).

        Args:
            w_q: [d_model, num_heads·head_dim]; w_k, w_v: [d_model, num_kv_heads·head_dim];
                w_o: [num_heads·head_dim, d_model]. Any real dtype.
            dtype: float32 or float64; None: float64 if any weight is float64, else float32.

        Raises:
            LayerError: a weight that is not 2-D or whose shape does not fit the config, or
                d_model ≠ num_heads·head_dim.
        """
        arrays = {"w_q": w_q, "w_k": w_k, "w_v": w_v, "w_o": w_o}
        arrays = {n: np.asarray(a) for n, a in arrays.items()}
        for name, a in arrays.items():
            if a.ndim != 2:
                raise LayerError(f"{name} must be a 2-D array, got shape {a.shape}")
        if dtype is None:
            dtype = np.float64 if any(a.dtype == np.float64 for a in arrays.values()) else np.float32
        d_model = arrays["w_q"].shape[0]
        self = cls.__new__(cls)
        dtype = self._check_setup(d_model, config, dtype)
        for name, shape in self.weight_shapes(d_model, config).items():
            if arrays[name].shape != shape:
                raise LayerError(f"{name} has shape {arrays[name].shape}, expected {shape} for d_model={d_model}, "
                                 f"{config.num_heads} heads, {config.num_kv_heads} KV heads of {config.head_dim}")
        self._setup(config, dtype, {n: np.array(a, dtype=dtype, order="C") for n, a in arrays.items()})
        return self

    @classmethod
    def from_projections(cls, config: MultiQueryAttentionConfig, w_q, w_k, w_v, w_o, *,
                         dtype=None) -> "MultiQueryAttention":
        """A layer holding copies of weights given in the models' layout [out_features,
        in_features] (y = x Wᵀ, as GGUF files and :class:`mqa_gen.attention.Attention` hold them):
        w_q [num_heads·head_dim, d_model], w_k, w_v [num_kv_heads·head_dim, d_model], w_o
        [d_model, num_heads·head_dim]. Otherwise as :meth:`from_weights` (its errors name the
        transposed shapes)."""
        return cls.from_weights(config, *(np.asarray(w).T for w in (w_q, w_k, w_v, w_o)), dtype=dtype)

    @staticmethod
    def weight_shapes(d_model: int, config: MultiQueryAttentionConfig) -> dict[str, tuple[int, int]]:
        """Name → shape of the four weight matrices for ``d_model`` and ``config``."""
        hd, kvd = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        return {"w_q": (d_model, hd), "w_k": (d_model, kvd), "w_v": (d_model, kvd), "w_o": (hd, d_model)}

    @staticmethod
    def _check_setup(d_model, config, dtype) -> np.dtype:
        if not isinstance(config, MultiQueryAttentionConfig):
            raise LayerError(f"config must be a MultiQueryAttentionConfig, got {type(config).__name__}")
        d_model = _positive_int("d_model", d_model)
        if d_model != config.d_model:
            raise LayerError(f"num_heads × head_dim ({config.num_heads} × {config.head_dim} = {config.d_model}) "
                             f"must equal d_model ({d_model})")
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            dtype = None
        if dtype not in _DTYPES:
            raise LayerError(f"dtype must be float32 or float64, got {dtype}")
        return dtype

    def _setup(self, config: MultiQueryAttentionConfig, dtype: np.dtype, weights: dict[str, np.ndarray]) -> None:
        """weights: name → [in, out] array (the public layout)."""
        self._setup_projections(config, dtype, {n: w.T for n, w in weights.items()})

    def _setup_projections(self, config: MultiQueryAttentionConfig, dtype: np.dtype,
                           projections: dict[str, np.ndarray]) -> None:
        """projections: name → [out, in] array (y = x Wᵀ), the layout the block holds."""
        self.config = config
        self.dtype = dtype
        self.d_model = config.d_model
        c = config
        # The weights live in the models' attention block (one layout, [out, in]); w_q … are views.
        self._block = Attention(*(DenseLinear(projections[n], dtype) for n in WEIGHT_NAMES), c.num_heads,
                                c.num_kv_heads, c.head_dim, rope_theta=c.rope_theta,
                                rope_interleaved=c.rope_interleaved)
        self.scale = dtype.type(1.0 / np.sqrt(config.head_dim))
        self._saved: _Saved | None = None
        self._versions = dict.fromkeys(WEIGHT_NAMES, 0)  # bumped when a weight changes
        self._decode_scratch: DecodeScratch | None = None

    def projection(self, name: str) -> np.ndarray:
        """Weight ``name`` (``"w_q"`` …) in the models' layout [out_features, in_features] (y = x Wᵀ):
        the live array, of which ``w_q`` … are transposed views."""
        return getattr(self._block, _BLOCK_WEIGHTS[name]).weight

    w_q = property(lambda self: self.projection("w_q").T, doc="W_q [d_model, num_heads·head_dim], live (a view).")
    w_k = property(lambda self: self.projection("w_k").T, doc="W_k [d_model, num_kv_heads·head_dim], live (a view).")
    w_v = property(lambda self: self.projection("w_v").T, doc="W_v [d_model, num_kv_heads·head_dim], live (a view).")
    w_o = property(lambda self: self.projection("w_o").T, doc="W_o [num_heads·head_dim, d_model], live (a view).")

    def __repr__(self) -> str:
        c = self.config
        return (f"MultiQueryAttention({c.kind}, d_model={self.d_model}, num_heads={c.num_heads}, "
                f"num_kv_heads={c.num_kv_heads}, head_dim={c.head_dim}, causal={c.causal}, "
                f"rope_theta={c.rope_theta}, dtype={self.dtype.name})")

    # ---------------------------------------------------------------------------------------------
    # parameters

    def parameters(self) -> dict[str, np.ndarray]:
        """The four weight matrices by name (``w_q``, ``w_k``, ``w_v``, ``w_o``): the live arrays."""
        return {n: getattr(self, n) for n in WEIGHT_NAMES}

    def parameter_count(self) -> int:
        """Number of trainable values: 2·d_model·num_heads·head_dim + 2·d_model·num_kv_heads·head_dim."""
        return sum(w.size for w in self.parameters().values())

    def apply_gradients(self, grads: AttentionGradients, optimizer) -> None:
        """One optimiser step (``optimizer.step(params, grads)``, see :mod:`mqa_gen.optim`) on the
        weights that have a gradient. What a ``keep=True`` forward saved is then stale for
        backward, but its rotated q is reused by the next ``keep=True`` forward on the same x
        object while W_q has not changed (as when only W_k, W_v are trained)."""
        named = grads.as_dict()
        optimizer.step(self.parameters(), named)
        for name, g in named.items():
            if g is not None:
                self._versions[name] += 1

    def weights_changed(self) -> None:
        """Call after changing the weight arrays yourself: drops the state a ``keep=True`` forward saved."""
        for name in WEIGHT_NAMES:
            self._versions[name] += 1
        self._saved = None

    # ---------------------------------------------------------------------------------------------
    # forward

    def forward(self, x, *, training: bool = False, rng: np.random.Generator | None = None,
                keep: bool = False) -> np.ndarray:
        """Self-attention over whole sequences (positions 0 .. seq-1).

        Args:
            x: [batch, seq, d_model], any real dtype (converted to the layer's dtype).
            training: apply attention-weight dropout (config.dropout_prob) with ``rng`` (a
                :class:`numpy.random.Generator`; None: a fresh unseeded one).
            keep: save what was computed (rotated q, k, v, the probabilities, the dropout mask, the
                pre-projection output) so that ``backward`` on the same ``x`` object does not
                recompute it. A later ``keep=True`` forward on the same ``x`` object reuses the
                rotated q while W_q is unchanged. Changing x in place in between is not detected.

        Returns:
            [batch, seq, d_model] in the layer's dtype.

        Raises:
            LayerError: x not 3-D, an empty batch or sequence, or a last dimension ≠ d_model.
        """
        x_in = x
        x = self._check_input(x)
        c = self.config
        mask = None
        if training and c.dropout_prob > 0:
            if rng is None:
                rng = np.random.default_rng()
            B, T = x.shape[:2]
            keep_prob = 1.0 - c.dropout_prob
            mask = (rng.random((B, c.num_heads, T, T)) < keep_prob).astype(self.dtype) / self.dtype.type(keep_prob)
        if c.causal and self.dtype == np.float32 and mask is None and not keep:
            B, T = x.shape[:2]
            y, _ = self._forward_cached(x, self.new_cache(B, T))  # the model's prefill kernel
            return y
        state = self._forward_full(x, mask, store=keep, x_in=x_in if keep else None)
        if keep:
            self._saved = state
        return state.y

    def forward_with_cache(self, x, cache: "LayerKVCache | KVCache | None" = None, *,
                           max_seq_len: int | None = None, cache_dtype: str = "f32"):
        """Causal attention of new tokens over a KV cache: token t of ``x`` sits at position
        ``cache.length + t`` and attends to every cached position and to its own prefix.

        K/V rows are written into the preallocated cache in place (nothing is concatenated) and
        the cache advances by seq. Runs the model's kernels (prefill for seq > 1, decode for 1),
        which compute in float32.

        Args:
            x: [batch, seq, d_model].
            cache: a :class:`LayerKVCache` (see :meth:`new_cache`), or one
                :class:`~mqa_gen.cache.KVCache` with n_layers=1 when batch = 1; None: a new cache
                of capacity ``max_seq_len`` (default: seq) and dtype ``cache_dtype``.

        Returns:
            (output [batch, seq, d_model] in the layer's dtype, the cache).

        Raises:
            LayerError: a bad ``x`` (see :meth:`forward`); a non-causal layer; a cache whose batch,
                num_kv_heads or head_dim do not fit, whose sequences differ in length, or that has
                no room for seq more tokens.
        """
        x = self._check_input(x)
        if not self.config.causal:
            raise LayerError("forward_with_cache needs a causal layer (config.causal=True)")
        B, T = x.shape[:2]
        if cache is None:  # made for the caller, so it grows as later calls append tokens
            cache = self.new_cache(B, max(T, max_seq_len or T), cache_dtype, growable=True)
        return self._forward_cached(x, cache)

    def new_cache(self, batch: int, max_seq_len: int, dtype: str = "f32", *,
                  growable: bool = False) -> LayerKVCache:
        """An empty :class:`LayerKVCache` for ``batch`` sequences of up to ``max_seq_len`` tokens
        (``growable``: enlarged as needed beyond that)."""
        c = self.config
        return LayerKVCache(batch, c.num_kv_heads, c.head_dim, max_seq_len, dtype, growable=growable)

    def _check_input(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 3:
            raise LayerError(f"input must be 3-D [batch, seq, d_model], got shape {x.shape}")
        if x.shape[2] != self.d_model:
            raise LayerError(f"input's last dimension is {x.shape[2]}, expected d_model={self.d_model}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise LayerError(f"input has an empty batch or sequence: shape {x.shape}")
        if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
            raise LayerError(f"input must hold real numbers, got dtype {x.dtype}")
        return np.ascontiguousarray(x, dtype=self.dtype)

    def _rope_tables(self, start: int, T: int):
        c = self.config
        cos, sin = rope_cos_sin(np.arange(start, start + T), c.head_dim, c.rope_theta)  # (T, D/2)
        return cos.astype(self.dtype), sin.astype(self.dtype)

    def _project(self, x: np.ndarray, start: int, q: np.ndarray | None = None):
        """q [B,T,H,D], k and v [B,T,KV,D] for x at positions start.., RoPE applied to q and k
        (a given, already rotated ``q`` is used as it is)."""
        from .kernels import rope

        c = self.config
        B, T, _ = x.shape
        xf = x.reshape(B * T, self.d_model)
        new_q = q is None
        if new_q:
            q = (xf @ self.w_q).reshape(B, T, c.num_heads, c.head_dim)  # (B, T, H, D)
        k = (xf @ self.w_k).reshape(B, T, c.num_kv_heads, c.head_dim)  # (B, T, KV, D)
        v = (xf @ self.w_v).reshape(B, T, c.num_kv_heads, c.head_dim)  # (B, T, KV, D)
        cos = sin = None
        if c.rope_theta is not None:
            cos, sin = self._rope_tables(start, T)
            for b in range(B):
                if new_q:
                    rope(q[b], cos, sin, c.rope_interleaved)
                rope(k[b], cos, sin, c.rope_interleaved)
        return q, k, v, cos, sin

    def _forward_full(self, x: np.ndarray, mask: np.ndarray | None, store: bool, x_in=None) -> _Saved:
        from .kernels.attention_grad import attention_forward

        c = self.config
        B, T, _ = x.shape
        old = self._saved
        reuse_q = (x_in is not None and old is not None and old.x_in is x_in
                   and old.versions["w_q"] == self._versions["w_q"])
        q, k, v, cos, sin = self._project(x, 0, old.q if reuse_q else None)
        empty = np.zeros((0, 0, 0, 0), dtype=self.dtype)
        probs = np.empty((B, c.num_heads, T, T), dtype=self.dtype) if store else empty
        o = np.empty_like(q)  # (B, T, H, D)
        attention_forward(q, k, v, self.scale, c.causal, empty if mask is None else mask, mask is not None,
                          probs, store, o)
        state = _Saved(x_in, x, q, k, v, probs, mask, o, cos, sin, dict(self._versions))
        state.y = (o.reshape(B * T, -1) @ self.w_o).reshape(B, T, self.d_model)
        return state

    def _cache_items(self, cache, B: int, T: int) -> list[KVCache]:
        c = self.config
        if isinstance(cache, LayerKVCache):
            cache.make_room(T)
            items = cache.items
        elif isinstance(cache, KVCache):
            if cache.n_layers != 1:
                raise LayerError(f"a single KVCache must have n_layers=1 to serve one layer, got {cache.n_layers}")
            items = [cache]
        else:
            raise LayerError(f"cache must be a LayerKVCache or a KVCache, got {type(cache).__name__}")
        if len(items) != B:
            raise LayerError(f"the cache holds {len(items)} sequence(s) but the input's batch is {B}")
        first = items[0]
        if first.n_kv_heads != c.num_kv_heads:
            raise LayerError(f"the cache has {first.n_kv_heads} KV heads, the layer {c.num_kv_heads}")
        if first.head_dim != c.head_dim:
            raise LayerError(f"the cache's head_dim is {first.head_dim}, the layer's {c.head_dim}")
        if any((it.n_kv_heads, it.head_dim, it.length, it.max_seq_len) !=
               (first.n_kv_heads, first.head_dim, first.length, first.max_seq_len) for it in items):
            raise LayerError("the batch's KV caches differ in dimensions or length")
        if first.length + T > first.max_seq_len:
            raise LayerError(f"the cache holds {first.length} of {first.max_seq_len} tokens: no room for {T} more")
        return items

    def _forward_cached(self, x: np.ndarray, cache):
        """The models' attention block over B sequences of T new tokens each, one cache apiece."""
        c = self.config
        B, T, _ = x.shape
        items = self._cache_items(cache, B, T)
        batch = Batch(items, [T] * B, c.head_dim)
        if batch.decode:
            s = self._decode_scratch
            if s is None or not s.fits(c.num_heads, c.head_dim, items[0].max_seq_len, B):
                s = self._decode_scratch = DecodeScratch(c.num_heads, c.head_dim, items[0].max_seq_len, B)
            batch.scratch = s
        y = self._block(x.reshape(B * T, self.d_model), batch)  # (B·T, d_model)
        batch.advance()
        return y.reshape(B, T, self.d_model).astype(self.dtype, copy=False), cache

    # ---------------------------------------------------------------------------------------------
    # backward

    def backward(self, x, grad_output, *, input_grad: bool = True,
                 weights: tuple[str, ...] = WEIGHT_NAMES) -> AttentionGradients:
        """Gradients of a loss L with respect to the input and the weights, given dL/dy.

        If the last ``forward(..., keep=True)`` saw this same ``x`` object and the weights have not
        changed since, its saved state (including its dropout mask) is used; otherwise forward is
        recomputed without dropout.

        Args:
            x: [batch, seq, d_model], the input of the forward pass.
            grad_output: dL/dy, [batch, seq, d_model].
            input_grad: compute dL/dx (False skips it).
            weights: which of ``"w_q"``, ``"w_k"``, ``"w_v"``, ``"w_o"`` to return gradients for.

        Returns:
            :class:`AttentionGradients` (d_input, d_w_q, d_w_k, d_w_v, d_w_o), in the layer's
            dtype; entries not asked for are None. dW_k and dW_v sum over the query heads that
            share each KV head.

        Raises:
            LayerError: a bad x (see :meth:`forward`), grad_output of another shape, or an unknown
                weight name.
        """
        from .kernels import rope
        from .kernels.attention_grad import attention_backward

        unknown = set(weights) - set(WEIGHT_NAMES)
        if unknown:
            raise LayerError(f"unknown weight name(s) {sorted(unknown)}; choose from {', '.join(WEIGHT_NAMES)}")
        if np.shape(grad_output) != np.shape(x):
            raise LayerError(f"grad_output has shape {np.shape(grad_output)}, expected the input's {np.shape(x)}")
        saved = self._saved
        if saved is not None and saved.x_in is x and saved.versions == self._versions:
            state = saved
        else:
            state = self._forward_full(self._check_input(x), None, store=True)
        x = state.x
        dy = np.ascontiguousarray(grad_output, dtype=self.dtype)

        c = self.config
        B, T, _ = x.shape
        H, KV, D = c.num_heads, c.num_kv_heads, c.head_dim
        xf, dyf = x.reshape(B * T, -1), dy.reshape(B * T, -1)
        d_w_o = state.o.reshape(B * T, -1).T @ dyf if "w_o" in weights else None
        do = (dyf @ self.w_o.T).reshape(B, T, H, D)  # (B, T, H, D)
        need_dq = input_grad or "w_q" in weights
        dq = np.empty_like(state.q) if need_dq else np.zeros((0, 0, 0, 0), self.dtype)
        dk, dv = np.empty_like(state.k), np.empty_like(state.v)  # (B, T, KV, D)
        ds = np.empty((B, H, T, T), dtype=self.dtype)
        mask = state.mask
        attention_backward(state.q, state.k, state.v, state.probs,
                           np.zeros((0, 0, 0, 0), self.dtype) if mask is None else mask, mask is not None,
                           do, self.scale, c.causal, need_dq, ds, dq, dk, dv)
        if state.cos is not None:  # RoPE is a rotation: its backward rotates by the opposite angle
            neg_sin = -state.sin
            for b in range(B):
                if need_dq:
                    rope(dq[b], state.cos, neg_sin, c.rope_interleaved)
                rope(dk[b], state.cos, neg_sin, c.rope_interleaved)
        dqf = dq.reshape(B * T, H * D) if need_dq else None
        dkf, dvf = dk.reshape(B * T, KV * D), dv.reshape(B * T, KV * D)
        d_w_q = xf.T @ dqf if "w_q" in weights else None
        d_w_k = xf.T @ dkf if "w_k" in weights else None
        d_w_v = xf.T @ dvf if "w_v" in weights else None
        d_input = None
        if input_grad:
            d_input = (dqf @ self.w_q.T + dkf @ self.w_k.T + dvf @ self.w_v.T).reshape(B, T, self.d_model)
        return AttentionGradients(d_input, d_w_q, d_w_k, d_w_v, d_w_o)
