"""Shared by the benchmark scripts: rewrite one marked section of BENCHMARKS.md, read the load."""

from __future__ import annotations

import os
from pathlib import Path


def loadavg() -> tuple[float, float, float]:
    """The 1-, 5- and 15-minute load averages (NaN where the OS does not say)."""
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def write_section(path: Path, name: str, body: str) -> None:
    """Replace the section between ``<!-- name -->`` and ``<!-- /name -->`` of ``path`` with
    ``body`` (append it when absent), leaving the rest untouched; the file is replaced atomically."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    section = f"{start}\n{body.rstrip()}\n{end}\n"
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if start in old and end in old[old.index(start):]:
        i = old.index(start)
        j = old.index(end, i) + len(end)
        new = old[:i] + section.rstrip("\n") + old[j:]
    else:
        new = old.rstrip("\n") + "\n\n" + section
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)
