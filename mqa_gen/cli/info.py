"""``mqa-gen info``: what a GGUF model is — config, parameters, tensor types, KV bytes per token."""

from __future__ import annotations

import json
import math
import sys
from collections import Counter

import click
from rich.table import Table

from .common import StdoutConsole, model_option

#: Config fields shown as they are, in this order (table rows and JSON keys).
CONFIG_FIELDS = ("architecture", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                 "vocab_size", "context_length", "rope_theta", "norm_eps", "tie_embeddings")


def _bytes_or_none(per_token, cache_dtype: str) -> int | None:
    """``per_token(cache_dtype)``, or None where the type cannot store this head_dim."""
    try:
        return per_token(cache_dtype)
    except ValueError:
        return None


def model_info(model: str) -> dict:
    """What ``info --json`` prints: the model's name and file, its config (:data:`CONFIG_FIELDS`),
    attention kind, sliding windows, parameter count, tensor types (type → count) and KV-cache
    bytes per token as MQA, as shipped and as MHA, for each cache type (``f32``, ``f16``, ``q8_0``,
    ``q4_0``; None for a block type when head_dim is not a multiple of 32), and the f32 bytes at the
    model's context.

    Raises:
        ModelFileError, UnsupportedModelError: the file cannot be read or run
            (:func:`~mqa_gen.gguf_file.read_gguf`, :func:`~mqa_gen.models.check_tensors`).
    """
    from ..gguf_file import read_gguf
    from ..kv_storage import STORAGE_TYPES
    from ..models import check_tensors, config_from_gguf
    from ..registry import resolve_model

    gguf = read_gguf(resolve_model(model))
    config = config_from_gguf(gguf)
    check_tensors(gguf, config)
    kv = {}
    for label, n_kv in (("mqa", 1), ("native", config.n_kv_heads), ("mha", config.n_heads)):
        grouped = config.with_kv_heads(n_kv)
        kv[label] = {"n_kv_heads": n_kv, **{name: _bytes_or_none(grouped.kv_bytes_per_token, name)
                                             for name in STORAGE_TYPES},
                     "f32_bytes_at_context": grouped.kv_bytes(config.context_length, "f32")}
    n_sliding = sum(1 for w in config.layer_windows if w)
    return {
        "model": config.name or model,
        "path": gguf.path,
        "size_bytes": gguf.size_bytes,
        **{field: getattr(config, field) for field in CONFIG_FIELDS},
        "attention": config.attention_kind,
        "group_size": config.group_size,
        "sliding_window": config.sliding_window or None,
        "sliding_window_layers": n_sliding,
        "rope_local_theta": config.rope_local_theta or None,
        "parameters": sum(math.prod(t.shape) for t in gguf.tensors.values()),
        "tensor_types": dict(Counter(t.type_name for t in gguf.tensors.values()).most_common()),
        "kv_bytes_per_token": kv,
    }


@click.command()
@model_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def info(model: str, as_json: bool) -> None:
    """Print a model's configuration, parameter count, tensor types and KV-cache cost."""
    facts = model_info(model)
    if as_json:
        json.dump(facts, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
        return
    f = facts
    # On a terminal the table fits its width; piped, nothing is cut or wrapped (rich would use 80
    # columns and fold the file path).
    console = StdoutConsole()
    table = Table(title=f["model"], show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("file", f"{f['path']} ({f['size_bytes'] / 2**20:,.1f} MiB)")
    for field in CONFIG_FIELDS:
        table.add_row(field, str(f[field]))
    table.add_row("attention", f"{f['attention']} ({f['group_size']} query heads per KV head)")
    if f["sliding_window"]:
        table.add_row("sliding window", f"{f['sliding_window_layers']} of {f['n_layers']} layers attend to the last "
                                        f"{f['sliding_window']:,} tokens (RoPE base {f['rope_local_theta']:g}); "
                                        "their KV cache holds at most that many")
    table.add_row("parameters", f"{f['parameters']:,}")
    table.add_row("tensor types", ", ".join(f"{k} ×{v}" for k, v in f["tensor_types"].items()))
    ctx = f["context_length"]
    for key, label in (("mqa", "MQA"), ("native", f"native ({f['attention']})"), ("mha", "MHA")):
        kv = f["kv_bytes_per_token"][key]
        sizes = ", ".join(f"{n:,} ({name})" for name, n in kv.items()
                          if name not in ("n_kv_heads", "f32_bytes_at_context") and n is not None)
        table.add_row(f"KV bytes/token {label}", f"{sizes}; {kv['f32_bytes_at_context'] / 2**20:,.0f} MiB at "
                      f"{ctx} tokens (f32)")
    console.print(table)
