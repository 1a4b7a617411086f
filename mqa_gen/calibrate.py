"""Convert a model to fewer KV heads: merge each layer's heads, then fit the layer to the original.

Reducing a model's KV heads costs quality: the GQA paper (Ainslie et al. 2023) mean-pools each
group's K and V heads and recovers by uptraining the whole model. This is a cheap, local stand-in,
layer by layer on a calibration text cut into equal chunks:

1. run the text through the model one layer at a time, keeping the hidden states h_ℓ of every
   chunk ([chunks, tokens, d_model]); the attention input is x_ℓ = RMSNorm(h_ℓ);
2. merge the layer's KV heads (:func:`mqa_gen.head_merge.merge_heads`: ``mean``, ``aligned``,
   ``svd`` or ``pca``; the data-driven ones use C = E[x_ℓ x_ℓᵀ] on the text);
3. from there, fit the chosen projections (W_q, W_k, W_v, W_o by default) of a
   :class:`~mqa_gen.layer.MultiQueryAttention` by Adam (Kingma & Ba 2015) on
   MSE(layer(x_ℓ), y_ℓ), y_ℓ the original attention's output on the same x_ℓ, for a fixed number of
   steps, keeping the step with the lowest loss (so the fit never ends worse than the merge on the
   calibration data).

``inputs="native"`` fits every layer on the original model's hidden states, to the original
attention's output (each layer independently of the others). ``"converted"`` (the default) runs the
text through the *converted* layers as they are made, so layer ℓ sees the states h'_ℓ the
converted layers below it produce — what it will see in use — and is asked for the output that
brings the residual stream back to the original's: target = h_ℓ + y_ℓ − h'_ℓ. Each layer then
also corrects what the layers below it left (SmolLM2, 3 → 1 KV heads: held-out perplexity 64
against 79 with ``"native"``, same merge and steps). Weights are read from the GGUF file
(dequantised), not from the model object, so this does not depend on how the model keeps its
weights in memory.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import ConfigError
from .gguf_file import GGUFFile
from .kv_heads import check_kv_heads
from .layer import MultiQueryAttention, MultiQueryAttentionConfig
from .models.llama import tensor_name
from .optim import Adam

#: The calibration text shipped with the package (original prose written for this project,
#: Apache-2.0 like the code; disjoint from the perplexity texts), and short conversations (also
#: original) that :func:`calibration_ids` renders with the model's chat template, so that the fit
#: also sees the states a chat prompt produces.
DEFAULT_TEXT = Path(__file__).parent / "data" / "calibration_english.txt"
DEFAULT_CHAT = Path(__file__).parent / "data" / "calibration_chat.jsonl"

#: Defaults of ``mqa-gen convert`` (chosen on SmolLM2-135M, 3 → 1 KV heads, on 2 cores; README).
DEFAULT_METHOD = "pca"
DEFAULT_STEPS = 80
DEFAULT_LR = 1e-3
DEFAULT_CHUNK_TOKENS = 256
DEFAULT_MAX_TOKENS = 16384
DEFAULT_FIT_WEIGHTS = ("w_q", "w_k", "w_v", "w_o")
DEFAULT_INPUTS = "converted"
DEFAULT_MINIBATCH = 8
INPUTS = ("native", "converted")


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


def attention_weights(gguf: GGUFFile, config: ModelConfig, layer: int):
    """Layer ``layer``'s W_q, W_k, W_v, W_o from a llama GGUF (dequantised) as
    :class:`~mqa_gen.head_transforms.AttentionWeights` (float64, the file's layout and RoPE pairing).

    Raises:
        UnsupportedModelError: a missing tensor or one of an unexpected shape.
    """
    from .head_transforms import AttentionWeights
    from .weights import tensor_f32

    c = config
    d, hd = c.d_model, c.head_dim
    return AttentionWeights(tensor_f32(gguf, tensor_name(layer, "attn_q"), (c.n_heads * hd, d)),
                            tensor_f32(gguf, tensor_name(layer, "attn_k"), (c.n_kv_heads * hd, d)),
                            tensor_f32(gguf, tensor_name(layer, "attn_v"), (c.n_kv_heads * hd, d)),
                            tensor_f32(gguf, tensor_name(layer, "attn_output"), (d, c.n_heads * hd)),
                            n_heads=c.n_heads, head_dim=hd, rope_interleaved=c.rope_interleaved)


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


def fit_layer(layer: MultiQueryAttention, x: np.ndarray, target: np.ndarray, steps: int, lr: float,
              weights: Sequence[str] = ("w_k", "w_v"),
              on_step: Callable[[int, float], None] | None = None, minibatch: int = 0,
              seed: int = 0) -> tuple[float, float]:
    """Fit some of ``layer``'s projections (in place) so that layer(x) ≈ target, by Adam on the MSE.

    x, target: [batch, seq, d_model]. weights: which of ``w_q``, ``w_k``, ``w_v``, ``w_o`` change (the
    others stay fixed). minibatch: 0 — every step uses all of x and the weights of the best step
    seen are kept (the start counts); n > 0 — each step uses n sequences of x drawn at random
    (``seed``), so a step costs n / batch of a full one, and the end is kept only if its loss on all
    of x is below the start's. Either way the returned loss is never above the starting one.
    on_step(step, loss) is called after each step (1-based) with the relative MSE of the sequences
    that step saw, before its update when it used a minibatch.

    Returns:
        (relative MSE before, relative MSE after) — see :func:`relative_mse`.

    Raises:
        LayerError: an unknown weight name.
    """
    weights = tuple(weights)
    if not weights:
        y = layer.forward(x)
        loss = relative_mse(y, target)
        return loss, loss
    params = layer.parameters()
    unknown = set(weights) - set(params)
    if unknown:
        from .layer import LayerError

        raise LayerError(f"unknown weight name(s) {sorted(unknown)}; choose from {', '.join(params)}")
    opt = Adam(lr=lr)
    if 0 < minibatch < x.shape[0]:
        return _fit_minibatch(layer, x, target, steps, opt, weights, on_step, minibatch, seed)
    y = layer.forward(x, keep=True)
    start = best = relative_mse(y, target)
    best_w = {n: params[n].copy() for n in weights}
    scale = 2.0 / target.size
    for step in range(steps):
        grads = layer.backward(x, (y - target) * scale, input_grad=False, weights=weights)
        layer.apply_gradients(grads, opt)
        y = layer.forward(x, keep=True)
        loss = relative_mse(y, target)
        if loss < best:
            best, best_w = loss, {n: params[n].copy() for n in weights}
        if on_step is not None:
            on_step(step + 1, loss)
    for n in weights:
        params[n][...] = best_w[n]
    layer.weights_changed()
    return start, best


def _fit_minibatch(layer, x, target, steps, opt, weights, on_step, minibatch, seed) -> tuple[float, float]:
    """:func:`fit_layer`'s minibatch path."""
    params = layer.parameters()
    start = relative_mse(layer.forward(x), target)
    start_w = {n: params[n].copy() for n in weights}
    rng = np.random.default_rng(seed)
    for step in range(steps):
        rows = np.sort(rng.choice(x.shape[0], minibatch, replace=False))
        xb, tb = x[rows], target[rows]
        y = layer.forward(xb, keep=True)
        grads = layer.backward(xb, (y - tb) * (2.0 / tb.size), input_grad=False, weights=weights)
        layer.apply_gradients(grads, opt)
        if on_step is not None:
            on_step(step + 1, relative_mse(y, tb))
    end = relative_mse(layer.forward(x), target)
    if end >= start:
        for n in weights:
            params[n][...] = start_w[n]
        end = start
    layer.weights_changed()
    return start, end


def fit_kv(layer: MultiQueryAttention, x: np.ndarray, target: np.ndarray, steps: int, lr: float) -> tuple[float, float]:
    """:func:`fit_layer` of W_k and W_v only (W_q, W_o fixed)."""
    return fit_layer(layer, x, target, steps, lr, ("w_k", "w_v"))


@dataclass
class LayerFit:
    """Relative MSE of one layer's attention output against the original's on the calibration data
    (:func:`relative_mse`): after the merge (``before``, where the fit starts) and after the fit
    (``after``; equal to ``before`` without a fit)."""

    layer: int
    before: float
    after: float


@dataclass
class Calibration:
    """Result of :func:`calibrate_attention`: ``layers`` maps layer → its new
    :class:`~mqa_gen.head_transforms.AttentionWeights` (float64, GGUF layout, ``n_kv_heads`` KV
    heads); ``fits`` one :class:`LayerFit` per layer; ``tokens`` the calibration tokens used
    ([chunks, chunk_tokens]); ``seconds`` the wall time; ``method`` the merge; ``merged`` (when
    asked for) each layer's weights after the merge, before the fit."""

    n_kv_heads: int
    layers: dict = field(default_factory=dict)
    merged: dict = field(default_factory=dict)
    fits: list[LayerFit] = field(default_factory=list)
    tokens: tuple[int, int] = (0, 0)
    seconds: float = 0.0
    method: str = DEFAULT_METHOD

    @property
    def kv_weights(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Layer → (W_k, W_v), float32 [n_kv_heads·head_dim, d_model]."""
        return {i: (w.wk.astype(np.float32), w.wv.astype(np.float32)) for i, w in self.layers.items()}


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


def calibration_ids(tokenizer, path: str | Path | None = None) -> list[int]:
    """Token ids to calibrate on: the text at ``path`` (UTF-8), or by default the shipped
    conversations rendered with the tokenizer's chat template (skipped when it has none) followed
    by the shipped prose.

    Raises:
        PromptError: the file cannot be read or is not UTF-8.
    """
    import json

    from .chat import render_prompt
    from .errors import ChatTemplateError, PromptError
    from .tokenizer import decode_utf8

    text_path = DEFAULT_TEXT if path is None else Path(path)
    try:
        data = text_path.read_bytes()
    except OSError as e:
        raise PromptError(f"cannot read calibration text {text_path}: {e.strerror or e}") from None
    ids = tokenizer.encode(decode_utf8(data, f"calibration text {text_path}"))  # not UTF-8: one line, exit 2
    if path is not None or tokenizer.chat_template is None:
        return ids
    chat: list[int] = []
    for line in DEFAULT_CHAT.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                chat += tokenizer.encode(render_prompt(tokenizer, json.loads(line)["messages"],
                                                       add_generation_prompt=False))
            except ChatTemplateError:  # a template this conversation does not fit: prose only
                return ids
    return chat + ids


def check_convertible(model) -> None:
    """Refuse a model whose blocks the layer-wise conversion cannot reproduce: it needs pre-norm
    blocks with an ``attn_norm`` gain and attention without QK-norm (llama; not Gemma 3, whose
    per-head RMSNorm on q and k does not commute with the key transforms).

    Raises:
        ConfigError: the model's architecture, in one line.
    """
    for block in model.blocks:
        attn = getattr(block, "attention", None)
        if (not hasattr(block, "attn_norm") or attn is None or getattr(attn, "q_norm", None) is not None
                or getattr(attn, "window", 0)):
            raise ConfigError(f"merging with calibration supports llama-architecture models; "
                              f"{model.config.architecture} is not supported (try --method mean --no-fit)")


def _one_layer_block(block, n_kv_heads: int, weights=None):
    """A copy of ``block`` whose attention uses layer slot 0 of its caches (one-layer caches), with
    new projections when ``weights`` (AttentionWeights) is given."""
    from .linear import DenseLinear

    block = copy.copy(block)
    attn = copy.copy(block.attention)
    attn.layer = 0
    if weights is not None:
        attn.wq, attn.wo = DenseLinear(weights.wq), DenseLinear(weights.wo)
        attn = attn.with_kv_projections(DenseLinear(weights.wk), DenseLinear(weights.wv), n_kv_heads)
    block.attention = attn
    return block


def _run_block(block, h: np.ndarray, n_kv_heads: int, head_dim: int) -> np.ndarray:
    """One decoder block over every chunk at once: h float32 [chunks, T, d_model] → the same shape
    (each chunk its own sequence at positions 0 … T−1, in a fresh one-layer cache)."""
    from .batch import Batch
    from .cache import KVCache

    n, T, d = h.shape
    caches = [KVCache(1, n_kv_heads, head_dim, T) for _ in range(n)]
    out = block(np.ascontiguousarray(h.reshape(n * T, d)), Batch(caches, [T] * n, head_dim))
    return out.reshape(n, T, d)


def _attention_input(block, h: np.ndarray, eps: float) -> np.ndarray:
    """x = RMSNorm(h) with the block's attention gain: float32 [chunks, T, d_model]."""
    from .models.base import rms_norm

    n, T, d = h.shape
    return rms_norm(np.ascontiguousarray(h.reshape(n * T, d)), block.attn_norm, eps).reshape(n, T, d)


def _mqa(config: ModelConfig, layer: int, w) -> MultiQueryAttention:
    """A float32 :class:`MultiQueryAttention` holding ``w`` (AttentionWeights) with the layer's RoPE."""
    cfg = MultiQueryAttentionConfig(num_heads=config.n_heads, head_dim=config.head_dim, num_kv_heads=w.n_kv_heads,
                                    causal=True, rope_theta=config.layer_rope_theta(layer),
                                    rope_interleaved=config.rope_interleaved)
    return MultiQueryAttention.from_projections(cfg, w.wq, w.wk, w.wv, w.wo, dtype=np.float32)


def merged_weights(gguf: GGUFFile, config: ModelConfig, n_kv_heads: int, method: str) -> dict:
    """Layer → :class:`~mqa_gen.head_transforms.AttentionWeights` merged to ``n_kv_heads`` by a
    method that needs no calibration text (``mean`` or ``svd``; :func:`mqa_gen.head_merge.merge_heads`).

    Raises:
        ConfigError: an invalid n_kv_heads, or a method that needs calibration data.
    """
    from .head_merge import merge_heads

    check_kv_heads(config.n_heads, config.n_kv_heads, n_kv_heads)
    if method not in ("mean", "svd"):
        raise ConfigError(f"method {method!r} needs a calibration text")
    return {i: merge_heads(attention_weights(gguf, config, i), n_kv_heads, method,
                           rope_theta=config.layer_rope_theta(i)) for i in range(config.n_layers)}


def calibrate_attention(model, gguf: GGUFFile, config: ModelConfig, n_kv_heads: int, ids: Sequence[int], *,
                        method: str = DEFAULT_METHOD, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
                        chunk_tokens: int = DEFAULT_CHUNK_TOKENS, max_tokens: int = DEFAULT_MAX_TOKENS,
                        fit_weights: Sequence[str] = DEFAULT_FIT_WEIGHTS, inputs: str = DEFAULT_INPUTS,
                        merge: str = "ls", rope_span: int | None = None, keep_merged: bool = False,
                        minibatch: int = DEFAULT_MINIBATCH,
                        progress: Callable[[LayerFit, float], None] | None = None,
                        on_step: Callable[[int, int, float], None] | None = None) -> Calibration:
    """Merge every layer's KV heads to ``n_kv_heads`` and fit the layer on the token ids ``ids``.

    Args:
        model: the original model (a llama decoder; :func:`check_convertible`).
        gguf, config: the model's parsed file and config (weights are read from the file).
        n_kv_heads: target KV heads (a valid regrouping of the native count; 1 = MQA).
        ids: calibration token ids; the first ``max_tokens`` are cut into chunks of ``chunk_tokens``.
        method, merge, rope_span: the merge (:func:`mqa_gen.head_merge.merge_heads`; rope_span None
            = the model's context length).
        steps, lr: Adam steps and step size per layer (steps = 0: the merge alone).
        fit_weights: the projections the fit changes (``w_q``, ``w_k``, ``w_v``, ``w_o``).
        inputs: ``"native"`` or ``"converted"`` (see the module doc).
        keep_merged: also return each layer's merged weights before the fit (``merged``).
        minibatch: chunks per Adam step (0: all; :func:`fit_layer`).
        progress: called after each layer with its :class:`LayerFit` and the seconds so far.
        on_step: called after each Adam step with (layer, step, relative MSE).

    Raises:
        ConfigError: an invalid n_kv_heads (the message lists the valid ones), too little text, an
            unknown method, input mode or weight name, or a model this cannot convert.
    """
    from .head_merge import METHODS, input_moment, merge_heads
    from .head_transforms import AttentionWeights

    check_kv_heads(config.n_heads, config.n_kv_heads, n_kv_heads)
    if steps < 0 or not lr > 0:
        raise ConfigError(f"calibration needs steps ≥ 0 and lr > 0, got steps={steps}, lr={lr}")
    if method not in METHODS:
        raise ConfigError(f"unknown merge method {method!r}; choose from {', '.join(METHODS)}")
    if inputs not in INPUTS:
        raise ConfigError(f"inputs must be one of {', '.join(INPUTS)}, got {inputs!r}")
    names = ("w_q", "w_k", "w_v", "w_o")
    if set(fit_weights) - set(names):
        raise ConfigError(f"unknown weight(s) {sorted(set(fit_weights) - set(names))}; choose from {', '.join(names)}")
    check_convertible(model)
    span = config.context_length if rope_span is None else rope_span
    start = time.perf_counter()
    chunks = calibration_chunks(ids, chunk_tokens, max_tokens)
    c = config
    h = model.embeddings.rows(chunks.reshape(-1)).reshape(*chunks.shape, c.d_model).astype(np.float32)
    if model.embed_scale != 1.0:
        h *= np.float32(model.embed_scale)
    h_new = h if inputs == "converted" else None  # the converted model's stream, when it is used
    result = Calibration(n_kv_heads, tokens=tuple(chunks.shape), method=method)
    for layer, block in enumerate(model.blocks):
        native = attention_weights(gguf, c, layer)
        x = _attention_input(block, h, c.norm_eps)  # (chunks, T, d_model)
        target = _mqa(c, layer, native).forward(x)  # the original attention's output
        if h_new is not None:  # fit on the converted stream; close the gap in the residual stream
            x = _attention_input(block, h_new, c.norm_eps)
            target = (h + target - h_new).astype(np.float32)
        merged = merge_heads(native, n_kv_heads, method, input_moment(x) if method in ("aligned", "pca") else None,
                             merge=merge, rope_theta=c.layer_rope_theta(layer), rope_span=span)
        mqa = _mqa(c, layer, merged)
        if keep_merged:
            result.merged[layer] = merged
        before, after = fit_layer(mqa, x, target, steps if fit_weights else 0, lr, fit_weights,
                                  None if on_step is None else (lambda step, loss: on_step(layer, step, loss)),
                                  minibatch=minibatch, seed=layer)
        fitted = AttentionWeights(*(mqa.projection(n).astype(np.float64) for n in names),
                                  n_heads=c.n_heads, head_dim=c.head_dim, rope_interleaved=c.rope_interleaved)
        result.layers[layer] = fitted
        fit = LayerFit(layer, before, after)
        result.fits.append(fit)
        if layer + 1 < c.n_layers:  # carry the stream(s) to the next layer's input
            if h_new is not None:
                h_new = _run_block(_one_layer_block(block, n_kv_heads, fitted), h_new, n_kv_heads, c.head_dim)
            h = _run_block(_one_layer_block(block, c.n_kv_heads), h, c.n_kv_heads, c.head_dim)
        if progress is not None:
            progress(fit, time.perf_counter() - start)
    result.seconds = time.perf_counter() - start
    return result


def calibrate_kv(model, gguf: GGUFFile, config: ModelConfig, n_kv_heads: int, ids: Sequence[int], *,
                 steps: int = 40, lr: float = 5e-3, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, max_tokens: int = 512,
                 progress: Callable[[LayerFit, float], None] | None = None) -> Calibration:
    """The first calibration: mean-pooled K/V heads, then W_k and W_v fitted (W_q, W_o fixed), on
    the native model's states — :func:`calibrate_attention` with those settings."""
    return calibrate_attention(model, gguf, config, n_kv_heads, ids, method="mean", steps=steps, lr=lr,
                               chunk_tokens=chunk_tokens, max_tokens=max_tokens, fit_weights=("w_k", "w_v"),
                               inputs="native", progress=progress)
