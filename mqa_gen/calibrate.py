"""Calibrate a regrouped model's K/V projections with the MQA layer's gradients.

Reducing a model's KV heads by mean-pooling each group's K and V projections (Ainslie et al. 2023,
§2.1; :mod:`mqa_gen.regroup`) costs quality: the paper recovers it by uptraining the whole model.
This is a cheap, local stand-in. Layer by layer:

1. run the *original* model on the calibration text and record, at every layer ℓ, the normed
   hidden states x_ℓ = RMSNorm(h_ℓ) that enter its attention block ([chunks, tokens, d_model]);
2. compute the original attention's output y_ℓ on them (the native layer, RoPE included);
3. start a :class:`~mqa_gen.layer.MultiQueryAttention` from the mean-pooled W_k, W_v (W_q, W_o the
   original's, fixed) and fit W_k, W_v by Adam (Kingma & Ba 2015) on MSE(layer(x_ℓ), y_ℓ) for a fixed
   number of steps, keeping the step with the lowest loss (so calibration never ends worse than
   mean-pooling on the calibration data).

Each layer is fitted on the original model's states, independently of the others. Weights are
read from the GGUF file (dequantised to float32), not from the model object, so this does not
depend on how the model keeps its weights in memory; GGUF's [out, in] matrices go into the layer
as they are (:meth:`~mqa_gen.layer.MultiQueryAttention.from_projections`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .config import ModelConfig
from .errors import ConfigError
from .gguf_file import GGUFFile
from .kv_heads import check_kv_heads
from .layer import MultiQueryAttention, MultiQueryAttentionConfig
from .models.llama import tensor_name
from .optim import Adam

#: Defaults of ``mqa-gen convert --calibrate`` (chosen by timing SmolLM2-135M on 2 cores; README).
DEFAULT_STEPS = 40
DEFAULT_LR = 5e-3
DEFAULT_CHUNK_TOKENS = 256
DEFAULT_MAX_TOKENS = 512


def attention_layer(gguf: GGUFFile, config: ModelConfig, layer: int, n_kv_heads: int | None = None,
                    dtype=np.float32) -> MultiQueryAttention:
    """Layer ``layer``'s attention of a llama GGUF as a :class:`MultiQueryAttention` with RoPE.

    n_kv_heads: None keeps the file's KV heads; another valid count regroups W_k and W_v
    (mean-pooled when reducing, replicated when expanding; :func:`~mqa_gen.regroup.regroup_kv_projection`).

    Raises:
        UnsupportedModelError: a missing tensor or one of an unexpected shape.
        ValueError: n_kv_heads neither divides nor is a multiple of the file's KV heads.
    """
    from .regroup import regroup_kv_projection
    from .weights import tensor_f32

    c = config
    d, hd = c.d_model, c.head_dim
    wq = tensor_f32(gguf, tensor_name(layer, "attn_q"), (c.n_heads * hd, d))
    wk = tensor_f32(gguf, tensor_name(layer, "attn_k"), (c.n_kv_heads * hd, d))
    wv = tensor_f32(gguf, tensor_name(layer, "attn_v"), (c.n_kv_heads * hd, d))
    wo = tensor_f32(gguf, tensor_name(layer, "attn_output"), (d, c.n_heads * hd))
    kv = c.n_kv_heads if n_kv_heads is None else n_kv_heads
    if kv != c.n_kv_heads:
        wk = regroup_kv_projection(wk, c.n_kv_heads, kv, hd)
        wv = regroup_kv_projection(wv, c.n_kv_heads, kv, hd)
    cfg = MultiQueryAttentionConfig(num_heads=c.n_heads, head_dim=hd, num_kv_heads=kv, causal=True,
                                    rope_theta=c.rope_theta, rope_interleaved=c.rope_interleaved)
    return MultiQueryAttention.from_projections(cfg, wq, wk, wv, wo, dtype=dtype)


class _RecordingBlock:
    """Calls a decoder block unchanged and keeps a copy of its input hidden states."""

    def __init__(self, block):
        self.block = block
        self.inputs: list[np.ndarray] = []

    def __call__(self, x, *args, **kwargs):
        self.inputs.append(np.array(x, dtype=np.float32))
        return self.block(x, *args, **kwargs)


def collect_attention_inputs(model, gguf: GGUFFile, config: ModelConfig, chunks: np.ndarray) -> list[np.ndarray]:
    """The normed hidden states entering each layer's attention when ``model`` runs on ``chunks``.

    chunks: int [n_chunks, T] token ids; each row is run as its own sequence (positions 0..T-1).
    Returns one float32 [n_chunks, T, d_model] array per layer: RMSNorm(h_ℓ) with the layer's
    ``attn_norm`` gain, as the block computes it.
    """
    from .models.base import rms_norm
    from .weights import tensor_f32

    recorders = [_RecordingBlock(b) for b in model.blocks]
    probe = model.replace(blocks=recorders)
    for ids in chunks:
        probe.forward(ids, probe.new_cache(len(ids)))
    out = []
    for layer, rec in enumerate(recorders):
        gain = tensor_f32(gguf, tensor_name(layer, "attn_norm"), (config.d_model,))
        h = np.stack(rec.inputs)  # (n_chunks, T, d_model)
        n, T, d = h.shape
        out.append(rms_norm(h.reshape(n * T, d), gain, config.norm_eps).reshape(n, T, d))
    return out


def relative_mse(y: np.ndarray, target: np.ndarray) -> float:
    """‖y − target‖² / ‖target‖² (float64)."""
    diff = (y - target).astype(np.float64)
    return float(np.sum(diff * diff) / max(np.sum(target.astype(np.float64) ** 2), 1e-300))


def fit_kv(layer: MultiQueryAttention, x: np.ndarray, target: np.ndarray, steps: int, lr: float) -> tuple[float, float]:
    """Fit ``layer``'s W_k and W_v (in place) so that layer(x) ≈ target, by Adam on the MSE.

    x, target: [batch, seq, d_model]. Keeps the weights of the best step seen (the start counts),
    so the returned loss is never above the starting one. W_q and W_o are not changed.

    Returns:
        (relative MSE before, relative MSE after) — see :func:`relative_mse`.
    """
    opt = Adam(lr=lr)
    y = layer.forward(x, keep=True)
    start = best = relative_mse(y, target)
    best_w = (layer.w_k.copy(), layer.w_v.copy())
    scale = 2.0 / target.size
    for step in range(steps):
        grads = layer.backward(x, (y - target) * scale, input_grad=False, weights=("w_k", "w_v"))
        layer.apply_gradients(grads, opt)
        y = layer.forward(x, keep=True)
        loss = relative_mse(y, target)
        if loss < best:
            best, best_w = loss, (layer.w_k.copy(), layer.w_v.copy())
    layer.w_k[...], layer.w_v[...] = best_w
    layer.weights_changed()
    return start, best


@dataclass
class LayerFit:
    """Relative MSE of one layer's attention output against the original's, on the calibration
    data: with mean-pooled K/V (``before``) and after the fit (``after``)."""

    layer: int
    before: float
    after: float


@dataclass
class Calibration:
    """Result of :func:`calibrate_kv`: ``kv_weights`` maps layer → (W_k, W_v) in GGUF/PyTorch
    layout, float32 [n_kv_heads·head_dim, d_model]; ``fits`` one :class:`LayerFit` per layer;
    ``tokens`` the calibration tokens used ([chunks, chunk_tokens]); ``seconds`` the wall time."""

    n_kv_heads: int
    kv_weights: dict[int, tuple[np.ndarray, np.ndarray]]
    fits: list[LayerFit] = field(default_factory=list)
    tokens: tuple[int, int] = (0, 0)
    seconds: float = 0.0


def calibration_chunks(ids: Sequence[int], chunk_tokens: int, max_tokens: int) -> np.ndarray:
    """Cut token ids into equal chunks: int [n, chunk_tokens], n = min(len, max_tokens) // chunk_tokens
    (a shorter text gives one chunk of all its tokens).

    Raises:
        ConfigError: fewer than 2 tokens, or a chunk size / token budget < 2.
    """
    if chunk_tokens < 2 or max_tokens < 2:
        raise ConfigError("calibration chunks and token budget must be at least 2 tokens")
    ids = list(ids)[:max_tokens]
    if len(ids) < 2:
        raise ConfigError(f"the calibration text has {len(ids)} token(s); need at least 2")
    if len(ids) < chunk_tokens:
        return np.asarray([ids], dtype=np.int64)
    n = len(ids) // chunk_tokens
    return np.asarray(ids[: n * chunk_tokens], dtype=np.int64).reshape(n, chunk_tokens)


def calibrate_kv(model, gguf: GGUFFile, config: ModelConfig, n_kv_heads: int, ids: Sequence[int], *,
                 steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 max_tokens: int = DEFAULT_MAX_TOKENS,
                 progress: Callable[[LayerFit, float], None] | None = None) -> Calibration:
    """Calibrate W_k, W_v of every layer for ``n_kv_heads`` KV heads on the token ids ``ids``.

    Args:
        model: the original model (its forward runs the calibration text).
        gguf, config: the model's parsed file and config (weights are read from the file).
        n_kv_heads: target KV heads (a valid regrouping of the native count; 1 = MQA).
        ids: calibration token ids; the first ``max_tokens`` are cut into chunks of ``chunk_tokens``.
        steps, lr: Adam steps and step size per layer (steps = 0: mean-pooled weights unchanged).
        progress: called after each layer with its :class:`LayerFit` and the seconds so far.

    Raises:
        ConfigError: an invalid n_kv_heads (the message lists the valid ones) or too little text.
    """
    check_kv_heads(config.n_heads, config.n_kv_heads, n_kv_heads)
    if steps < 0 or not lr > 0:
        raise ConfigError(f"calibration needs steps ≥ 0 and lr > 0, got steps={steps}, lr={lr}")
    start = time.perf_counter()
    chunks = calibration_chunks(ids, chunk_tokens, max_tokens)
    inputs = collect_attention_inputs(model, gguf, config, chunks)
    result = Calibration(n_kv_heads, {}, tokens=tuple(chunks.shape))
    for layer in range(config.n_layers):
        x = inputs[layer]
        target = attention_layer(gguf, config, layer).forward(x)  # the original attention
        mqa = attention_layer(gguf, config, layer, n_kv_heads)  # mean-pooled start
        before, after = fit_kv(mqa, x, target, steps, lr)
        result.kv_weights[layer] = (mqa.projection("w_k").copy(), mqa.projection("w_v").copy())
        fit = LayerFit(layer, before, after)
        result.fits.append(fit)
        inputs[layer] = None  # free as we go
        if progress is not None:
            progress(fit, time.perf_counter() - start)
    result.seconds = time.perf_counter() - start
    return result
