"""Rewrite a model's K/V projections to a different number of KV heads.

* Expansion (target a multiple of the native count, up to n_heads = MHA): every KV head is
  replicated for the query heads that read it. Exact: the logits do not change.
* Reduction (target divides the native count, down to 1 = MQA): the K and V projection heads of
  each group are mean-pooled, the checkpoint conversion of Ainslie et al. 2023, "GQA: Training
  Generalized Multi-Query Transformer Models from Multi-Head Checkpoints", §2.1. Without the
  paper's uptraining this loses quality; ``mqa-gen bench-cache`` measures how much.

KV head j of the native model serves query heads j·G … (j+1)·G−1 (G = n_heads / n_kv_heads), so
merging or splitting *consecutive* heads keeps every query head reading the right K/V.
"""

from __future__ import annotations

import copy

import numpy as np

from .kv_heads import check_kv_heads
from .linear import DenseLinear


def regroup_kv_projection(w: np.ndarray, native: int, target: int, head_dim: int) -> np.ndarray:
    """Regroup a K or V projection from ``native`` to ``target`` heads.

    w: float32 [native·head_dim, d_model] (rows grouped by head). Returns a new float32
    [target·head_dim, d_model] array.

    Raises:
        ValueError: target is neither a multiple nor a divisor of native.
    """
    heads = w.reshape(native, head_dim, -1)  # (KV, D, d_model)
    if target % native == 0:
        heads = np.repeat(heads, target // native, axis=0)  # each head copied for its readers
    elif native % target == 0:
        heads = heads.reshape(target, native // target, head_dim, -1).mean(axis=1)  # Ainslie §2.1
    else:
        raise ValueError(f"cannot regroup {native} KV heads into {target}")
    return np.ascontiguousarray(heads.reshape(target * head_dim, -1), dtype=np.float32)


def _regroup_linear(w, native: int, target: int, head_dim: int):
    """Expansion of a quantised projection replicates its quantised heads (exact, same bytes per
    weight); mean-pooling needs new values, so it yields a float32 matrix."""
    if target % native == 0 and hasattr(w, "repeat_row_groups"):
        return w.repeat_row_groups(head_dim, target // native)
    return DenseLinear(regroup_kv_projection(w.dequantize(), native, target, head_dim))


def regroup_model(model, n_kv_heads: int):
    """A copy of ``model`` whose attention blocks use ``n_kv_heads`` KV heads (other weights shared).

    Raises:
        ConfigError: n_kv_heads is not a valid regrouping (the message lists the valid counts).
    """
    config = model.config
    native = config.n_kv_heads
    if n_kv_heads == native:
        return model
    check_kv_heads(config.n_heads, native, n_kv_heads)
    blocks = []
    for block in model.blocks:
        block = copy.copy(block)  # norms and MLP shared; only the attention's K/V projections change
        attn = block.attention
        block.attention = attn.with_kv_projections(_regroup_linear(attn.wk, native, n_kv_heads, attn.head_dim),
                                                   _regroup_linear(attn.wv, native, n_kv_heads, attn.head_dim),
                                                   n_kv_heads)
        blocks.append(block)
    return model.replace(config=config.with_kv_heads(n_kv_heads), blocks=blocks)


def with_attention_weights(model, layers) -> "object":
    """A copy of ``model`` whose attention blocks hold new projections (other weights shared).

    layers: layer index → :class:`~mqa_gen.head_transforms.AttentionWeights` (float64, GGUF layout),
    one per layer, all with the same KV-head count; they are stored as float32 dense matrices.

    Raises:
        ConfigError: a missing layer, or layers that disagree on the KV-head count.
    """
    from .errors import ConfigError

    config = model.config
    counts = {w.n_kv_heads for w in layers.values()}
    if set(layers) != set(range(config.n_layers)) or len(counts) != 1:
        raise ConfigError(f"need weights for all {config.n_layers} layers with one KV-head count")
    n_kv_heads = counts.pop()
    blocks = []
    for i, block in enumerate(model.blocks):
        w = layers[i]
        block = copy.copy(block)  # norms and MLP shared; only the attention's projections change
        attn = copy.copy(block.attention)
        attn.wq, attn.wo = DenseLinear(w.wq.astype(np.float32)), DenseLinear(w.wo.astype(np.float32))
        block.attention = attn.with_kv_projections(DenseLinear(w.wk.astype(np.float32)),
                                                   DenseLinear(w.wv.astype(np.float32)), n_kv_heads)
        blocks.append(block)
    return model.replace(config=config.with_kv_heads(n_kv_heads), blocks=blocks)
