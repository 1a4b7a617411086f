"""Options and helpers that several commands share."""

from __future__ import annotations

import os

import click
from rich.console import Console

from ..registry import DEFAULT_MODEL

stderr = Console(stderr=True, highlight=False)


def model_option(f):
    """``-m/--model``: a GGUF path or a known model name."""
    return click.option(
        "-m", "--model", default=DEFAULT_MODEL, show_default=True, metavar="NAME|PATH",
        help="GGUF file, or a known model name.",
    )(f)


def threads_option(f):
    """``--threads``: Numba threads (default: the cores that are idle)."""
    return click.option(
        "--threads", type=click.IntRange(min=1), default=None,
        help="Threads for the kernels (default: all cores, less those the 1-minute load average "
             "says are busy).",
    )(f)


def idle_cores(cores: int) -> int:
    """Cores not busy with other work: ``cores`` minus the rounded 1-minute load average, ≥ 1.

    Every parallel region waits for its slowest thread; a thread that shares its core with another
    process waits for a time slice (milliseconds) in each of the hundreds of regions a token needs,
    so on a busy machine fewer threads decode much faster (measured here: 38 tok/s on 1 thread,
    under 1 tok/s on 2 while another process used one core).
    """
    try:
        busy = round(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, min(cores, cores - busy))


def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` to Numba (capped at the cores Numba was started with); without it, use
    the idle cores (:func:`idle_cores`)."""
    import numba

    cores = numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(min(threads, cores) if threads else idle_cores(cores))


def ensure_kernels(quiet: bool) -> None:
    """Compile the Numba kernels on the first run, saying so on stderr."""
    from ..kernels import compile_kernels, kernels_are_compiled

    if kernels_are_compiled():
        return
    if not quiet:
        stderr.print("[dim]Compiling Numba kernels (first run only, about a minute)…[/dim]")
    compile_kernels()


def load_model(name: str, quiet: bool):
    """Load a model, with a status line on stderr while it loads."""
    from ..loading import load

    if quiet or not stderr.is_terminal:
        return load(name)
    with stderr.status(f"Loading {os.path.basename(name)}…"):
        return load(name)


def mib(n_bytes: float) -> str:
    """Bytes as MiB with one decimal."""
    return f"{n_bytes / 2**20:,.1f} MiB"
