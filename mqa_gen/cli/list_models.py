"""``mqa-gen list``: the models mqa-gen knows by name, installed or not (:mod:`mqa_gen.registry`)."""

from __future__ import annotations

import json
import sys

import click


def known_models() -> list[dict]:
    """One object per known model: name, description, installed, ready (its file exists: a
    chunked model is assembled on first use), path, size_bytes, n_heads, n_kv_heads, attention,
    install (the pip command). Finds files without assembling or hashing anything."""
    from ..kv_heads import attention_kind
    from ..registry import DEFAULT_MODEL, KNOWN_MODELS, locate_model

    rows = []
    for known in KNOWN_MODELS.values():
        where = locate_model(known)
        rows.append({
            "name": known.name, "default": known.name == DEFAULT_MODEL, "description": known.description,
            "installed": where.installed, "ready": where.ready, "path": where.path, "size_bytes": where.size_bytes,
            "n_heads": known.n_heads, "n_kv_heads": known.n_kv_heads,
            "attention": attention_kind(known.n_heads, known.n_kv_heads) if known.n_heads and known.n_kv_heads else None,
            "install": known.install,
        })
    return rows


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array on stdout.")
def list_models(as_json: bool) -> None:
    """List the models known by name (for -m), installed or not: file, size, KV heads."""
    from .common import StdoutConsole
    from rich.markup import escape
    from rich.table import Table

    rows = known_models()
    if as_json:
        json.dump(rows, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
        return
    console = StdoutConsole()
    table = Table(box=None, pad_edge=False)
    for column in ("name", "installed", "KV heads", "size", "file"):
        table.add_column(column, overflow="fold", justify="right" if column in ("KV heads", "size") else "left")
    for r in rows:
        status = ("yes" if r["ready"] else "yes (assembled on first use)") if r["installed"] else "no"
        heads = f"{r['n_kv_heads']} of {r['n_heads']} ({r['attention']})" if r["attention"] else "?"
        size = f"{r['size_bytes'] / 2**20:,.1f} MiB" if r["size_bytes"] is not None else "-"
        name = r["name"] + (" (default)" if r["default"] else "")
        where = r["path"] if r["installed"] else f"install: {r['install']}"
        table.add_row(escape(name), status, heads, size, escape(where))
    console.print(table)
