"""Write a model with regrouped (and optionally calibrated) attention projections as a new GGUF file.

The output is the source file with exactly these changes, so every reader of the source —
``mqa-gen generate``, ``mqa-gen bench-cache``, llama.cpp — reads it as an ordinary model:

* each layer's ``blk.N.attn_k.weight`` and ``blk.N.attn_v.weight`` replaced by the new
  [n_kv_heads·head_dim, d_model] matrices, stored as F32 or F16 — and, when a merge folded maps
  into them (:mod:`mqa_gen.head_merge`) or a fit changed them, ``blk.N.attn_q.weight`` and
  ``blk.N.attn_output.weight`` too, in the same type;
* ``{arch}.attention.head_count_kv`` set to the new KV-head count.

Every other tensor is copied byte for byte (quantised ones stay quantised) and every other
metadata key keeps its value and GGUF type. Rows of K keep GGUF's order (the converter's
permutation for pairwise RoPE): mean-pooling or fitting whole heads of that layout keeps it valid,
since every head is permuted the same way. Written with the ``gguf`` package's ``GGUFWriter``
(format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), to a temporary file that
replaces ``out_path`` only once complete.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from .atomic_file import atomic_write
from .config import ModelConfig
from .errors import ConfigError, ModelFileError
from .gguf_file import GGUFFile
from .head_transforms import AttentionWeights
from .kv_heads import check_kv_heads
from .models.llama import tensor_name

KV_TYPES = {"F32": np.float32, "F16": np.float16}


def mean_pooled_kv(gguf: GGUFFile, config: ModelConfig, n_kv_heads: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Layer → (W_k, W_v) regrouped to ``n_kv_heads`` heads (mean-pooled when reducing, Ainslie et al.
    2023 §2.1; replicated when expanding), float32 [n_kv_heads·head_dim, d_model] (GGUF layout).

    Raises:
        ConfigError: n_kv_heads is not a valid regrouping (the message lists the valid counts).
    """
    from .regroup import regroup_kv_projection
    from .weights import tensor_f32

    c = config
    check_kv_heads(c.n_heads, c.n_kv_heads, n_kv_heads)
    shape = (c.n_kv_heads * c.head_dim, c.d_model)
    out = {}
    for i in range(c.n_layers):
        wk = tensor_f32(gguf, tensor_name(i, "attn_k"), shape)
        wv = tensor_f32(gguf, tensor_name(i, "attn_v"), shape)
        out[i] = (regroup_kv_projection(wk, c.n_kv_heads, n_kv_heads, c.head_dim),
                  regroup_kv_projection(wv, c.n_kv_heads, n_kv_heads, c.head_dim))
    return out


def write_regrouped_gguf(src_path: str | os.PathLike[str], out_path: str | os.PathLike[str], config: ModelConfig,
                         n_kv_heads: int,
                         kv_weights: Mapping[int, tuple[np.ndarray, np.ndarray] | AttentionWeights],
                         kv_type: str = "F32") -> int:
    """Copy the GGUF at ``src_path`` to ``out_path`` with new projections (see the module doc).

    Args:
        config: the source model's config (n_layers, n_heads, head_dim, d_model).
        n_kv_heads: the new KV-head count written to ``{arch}.attention.head_count_kv``.
        kv_weights: for every layer, either (W_k, W_v), each [n_kv_heads·head_dim, d_model]
            (GGUF/PyTorch layout; W_q and W_o stay as they are), or an
            :class:`~mqa_gen.head_transforms.AttentionWeights` (all four are written).
        kv_type: ``"F32"`` or ``"F16"``, the stored type of the new matrices.

    Returns:
        The size of the written file in bytes.

    Raises:
        ConfigError: a missing layer or a matrix of the wrong shape, or an unknown kv_type.
        ModelFileError: ``out_path`` is the source file, or it cannot be written.
    """
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    if kv_type not in KV_TYPES:
        raise ConfigError(f"kv_type must be one of {', '.join(KV_TYPES)}, got {kv_type!r}")
    src_path, out_path = os.fspath(src_path), os.fspath(out_path)
    if os.path.exists(out_path) and os.path.samefile(src_path, out_path):
        raise ModelFileError(f"the output {out_path} is the source model; choose another path")
    c = config
    kv_shape = (n_kv_heads * c.head_dim, c.d_model)
    shapes = {"attn_q": (c.n_heads * c.head_dim, c.d_model), "attn_k": kv_shape, "attn_v": kv_shape,
              "attn_output": (c.d_model, c.n_heads * c.head_dim)}
    replacements: dict[str, np.ndarray] = {}
    for i in range(c.n_layers):
        if i not in kv_weights:
            raise ConfigError(f"no new K/V weights for layer {i}")
        w = kv_weights[i]
        if isinstance(w, AttentionWeights):
            new = {"attn_q": w.wq, "attn_k": w.wk, "attn_v": w.wv, "attn_output": w.wo}
        else:
            new = dict(zip(("attn_k", "attn_v"), w))
        for name, array in new.items():
            if np.shape(array) != shapes[name]:
                raise ConfigError(f"{tensor_name(i, name)} has shape {np.shape(array)}, expected {shapes[name]}")
            replacements[tensor_name(i, name)] = np.ascontiguousarray(array, dtype=KV_TYPES[kv_type])

    reader = GGUFReader(src_path, "r")
    arch = reader.fields["general.architecture"].contents()
    kv_key = f"{arch}.attention.head_count_kv"
    try:
        with atomic_write(out_path) as tmp:
            writer = GGUFWriter(tmp, arch)  # writes general.architecture itself
            for key, f in reader.fields.items():
                if key.startswith("GGUF.") or key == "general.architecture":
                    continue
                vtype = f.types[0]
                if key == "general.alignment":
                    writer.data_alignment = int(f.contents())
                if vtype == GGUFValueType.ARRAY and len(f.types) > 2:
                    raise ConfigError(f"cannot copy nested-array metadata {key!r}")
                value = n_kv_heads if key == kv_key else f.contents()
                if vtype == GGUFValueType.ARRAY and len(value) == 0:
                    raise ConfigError(f"cannot copy empty-array metadata {key!r}")
                writer.add_key_value(key, value, vtype, f.types[-1] if vtype == GGUFValueType.ARRAY else None)
            if kv_key not in reader.fields:
                writer.add_key_value(kv_key, n_kv_heads, GGUFValueType.UINT32)
            for t in reader.tensors:
                if t.name in replacements:
                    writer.add_tensor(t.name, replacements.pop(t.name))
                else:
                    writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
            if replacements:
                raise ConfigError(f"the source file lacks {sorted(replacements)[0]}")
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
    except OSError as e:
        raise ModelFileError(f"cannot write {out_path}: {e.strerror or e}") from None
    return os.path.getsize(out_path)
