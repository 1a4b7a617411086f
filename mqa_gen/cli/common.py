"""Options and helpers that several commands share, and the setup ``generate`` and ``chat`` share."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import click
from rich.console import Console

from ..errors import MqaGenError, SamplingError
from ..registry import DEFAULT_MODEL

if TYPE_CHECKING:
    from ..loading import LoadedModel
    from ..sampling import SamplingParams

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


# ───────────────────────────── generate and chat ─────────────────────────────


def generation_options(f):
    """The options ``generate`` and ``chat`` share, in --help order: -n, the sampling flags
    (--temp … --seed), --stop, --ctx-size, --kv-heads, --cache-dtype. They arrive as the keyword
    arguments :func:`setup_generation` takes."""
    for option in reversed(_GENERATION_OPTIONS):
        f = option(f)
    return f


_GENERATION_OPTIONS = [
    click.option("-n", "--max-tokens", type=int, default=256, show_default=True, help="Most tokens to generate."),
    click.option("--temp", "temperature", type=float, default=0.0, show_default=True, help="Temperature; 0 = greedy."),
    click.option("--top-k", type=int, default=0, show_default=True,
                 help="Keep the k most likely tokens; 0 (or less, as in llama.cpp) = off."),
    click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass; 1 = off."),
    click.option("--min-p", type=float, default=0.0, show_default=True, help="Drop tokens below min-p × p(best); 0 = off."),
    click.option("--repeat-penalty", type=float, default=1.0, show_default=True, help="Repetition penalty; 1 = off."),
    click.option("--repeat-last-n", type=int, default=64, show_default=True, help="Tokens the penalty looks back over; -1 = all."),
    click.option("--seed", type=int, default=None, help="Random seed (same seed and options → same text)."),
    click.option("--stop", multiple=True, help="Stop when this string appears (repeatable); it is not printed."),
    click.option("--ctx-size", type=int, default=None, help="Context in tokens (default: the model's)."),
    click.option("--kv-heads", type=int, default=None, help="Regroup KV heads: 1 = MQA, n_heads = MHA."),
    click.option("--cache-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
                 help="KV-cache element type: float32 keeps transformers' logits; float16 (llama.cpp's "
                      "default) halves the cache and is faster at long contexts."),
]

#: The library's name of a setting (:attr:`~mqa_gen.errors.SamplingError.field`) → the option
#: that sets it, so an error names what the user typed.
OPTION_NAMES = {"temperature": "--temp", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
                "repetition_penalty": "--repeat-penalty", "repeat_last_n": "--repeat-last-n", "seed": "--seed",
                "max_tokens": "--max-tokens", "ctx_size": "--ctx-size"}


class OptionError(MqaGenError):
    """An option value the library refused, in the option's own name (``--top-p must be …``)."""


@dataclass(frozen=True)
class GenerationSetup:
    """What ``generate`` and ``chat`` need once their options are checked and the model is loaded.

    Attributes:
        loaded: the :class:`~mqa_gen.loading.LoadedModel`.
        net: the model to run: ``loaded.model``, or a copy regrouped to ``--kv-heads``.
        params: the checked :class:`~mqa_gen.sampling.SamplingParams`.
        max_tokens: ``-n`` (> 0).
        stop: the ``--stop`` strings.
        ctx: the context in tokens: ``--ctx-size``, or the model's.
        cache_dtype: ``--cache-dtype``.
    """

    loaded: LoadedModel
    net: object
    params: SamplingParams
    max_tokens: int
    stop: tuple[str, ...]
    ctx: int
    cache_dtype: str


def setup_generation(model: str, quiet: bool, threads: int | None, *, max_tokens: int, temperature: float,
                     top_k: int, top_p: float, min_p: float, repeat_penalty: float, repeat_last_n: int,
                     seed: int | None, stop: tuple[str, ...], ctx_size: int | None, kv_heads: int | None,
                     cache_dtype: str) -> GenerationSetup:
    """Check the :func:`generation_options` values, set the threads, load the model (status line on
    stderr), compile the kernels on the first run (saying so) and regroup the KV heads.

    The values are checked first, by the library (:func:`~mqa_gen.generate.validate_generation`),
    so a bad one fails before the model loads; the error names the option.

    Raises:
        OptionError: a sampling value out of range, ``-n`` ≤ 0 or ``--ctx-size`` ≤ 0.
        MqaGenError: a model that cannot be loaded (:func:`~mqa_gen.loading.load`);
            ``ConfigError``, a ``--kv-heads`` that does not divide the query heads.
    """
    from ..generate import validate_generation
    from ..regroup import regroup_model
    from ..sampling import SamplingParams

    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed)
    try:
        validate_generation(params, max_tokens, ctx_size)
    except SamplingError as e:
        raise OptionError(f"{OPTION_NAMES.get(e.field, e.field)} {e.reason}") from None
    set_threads(threads)
    loaded = load_model(model, quiet)  # before compiling, so a bad model file fails at once
    ensure_kernels(quiet)
    net = loaded.model if kv_heads is None else regroup_model(loaded.model, kv_heads)
    return GenerationSetup(loaded, net, params, max_tokens, tuple(stop), ctx_size or net.config.context_length,
                           cache_dtype)
