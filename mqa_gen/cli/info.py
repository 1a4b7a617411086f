"""``mqa-gen info``: what a GGUF model is — config, parameters, tensor types, KV bytes per token."""

from __future__ import annotations

import math
from collections import Counter

import click
from rich.console import Console
from rich.table import Table

from .common import model_option


@click.command()
@model_option
def info(model: str) -> None:
    """Print a model's configuration, parameter count, tensor types and KV-cache cost."""
    from ..models import check_tensors, config_from_gguf
    from ..gguf_file import read_gguf
    from ..registry import resolve_model

    gguf = read_gguf(resolve_model(model))
    config = config_from_gguf(gguf)
    check_tensors(gguf, config)
    n_params = sum(math.prod(t.shape) for t in gguf.tensors.values())
    types = Counter(t.type_name for t in gguf.tensors.values())

    console = Console()
    table = Table(title=f"{config.name or model}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("file", f"{gguf.path} ({gguf.size_bytes / 2**20:,.1f} MiB)")
    for field in ("architecture", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                  "vocab_size", "context_length", "rope_theta", "norm_eps", "tie_embeddings"):
        table.add_row(field, str(getattr(config, field)))
    table.add_row("attention", f"{config.attention_kind} ({config.group_size} query heads per KV head)")
    if config.sliding_window:
        n_sliding = sum(1 for w in config.layer_windows if w)
        table.add_row("sliding window", f"{n_sliding} of {config.n_layers} layers attend to the last "
                                        f"{config.sliding_window:,} tokens (RoPE base {config.rope_local_theta:g}); "
                                        "their KV cache holds at most that many")
    table.add_row("parameters", f"{n_params:,}")
    table.add_row("tensor types", ", ".join(f"{k} ×{v}" for k, v in types.most_common()))
    for label, n_kv in (("MQA", 1), (f"native ({config.attention_kind})", config.n_kv_heads), ("MHA", config.n_heads)):
        grouped = config.with_kv_heads(n_kv)
        per_token = grouped.kv_bytes_per_token(4)
        table.add_row(f"KV bytes/token {label}", f"{per_token:,} (float32), {per_token // 2:,} (float16); "
                      f"{grouped.kv_bytes(config.context_length) / 2**20:,.0f} MiB at {config.context_length} tokens")
    console.print(table)
