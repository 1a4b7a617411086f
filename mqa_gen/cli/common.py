"""Options and helpers that several commands share, and the setup ``generate``, ``batch`` and
``chat`` share. Options accept llama.cpp's spellings beside ours (``-c``, ``-t``, ``-s``,
``--temperature``, ``--n-predict``, ``-r/--reverse-prompt``, ``-sys/--system-prompt``)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import click
from rich.console import Console

from ..errors import MqaGenError, SamplingError
from ..registry import DEFAULT_MODEL

if TYPE_CHECKING:
    from ..loading import LoadedModel
    from ..sampling import SamplingParams


def _stream_is_terminal(stream) -> bool:
    """Whether ``stream`` is a terminal (False for None, a pipe, a file, a closed stream)."""
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):
        return False


#: Messages, stats and progress. Not a terminal (a log file, a pipe): no wrapping at rich's default
#: 80 columns, so every message stays one line for the scripts that read it.
stderr = Console(stderr=True, highlight=False, soft_wrap=not _stream_is_terminal(sys.stderr))


#: The most bytes a prompt (``--prompt-file``, ``--prompt -``) may hold. The longest context we
#: accept is far below this in tokens (a token covers at least one byte), and an endless input
#: (``-f /dev/zero``, ``yes |``) must be refused, not read until memory runs out.
MAX_PROMPT_BYTES = 64 * 2**20
#: The most bytes ``mqa-gen batch`` reads from its input (millions of prompts).
MAX_BATCH_INPUT_BYTES = 1024 * 2**20


def read_limited(stream, limit: int, what: str) -> bytes:
    """All of a binary ``stream``, refusing one longer than ``limit`` bytes before reading it all.

    Raises:
        MqaGenError: more than ``limit`` bytes.
    """
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise MqaGenError(f"{what} is longer than {limit // 2**20:,} MiB: refusing to read it all")
    return data


class StdoutConsole(Console):
    """A rich Console for tables on stdout whose reader may leave (`| head`): rich's own handler
    exits with status 1; this one raises BrokenPipeError, which the app turns into exit 141.
    Piped (not a terminal), lines are never cut or wrapped, so scripts get whole paths."""

    def __init__(self, **kwargs):
        import sys

        if not sys.stdout.isatty():
            kwargs.setdefault("width", 100_000)
            kwargs.setdefault("soft_wrap", True)
        super().__init__(**kwargs)

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError


def model_option(f):
    """``-m/--model``: a GGUF path or a known model name."""
    return click.option(
        "-m", "--model", default=DEFAULT_MODEL, show_default=True, metavar="NAME|PATH",
        help="GGUF file, or a known model name.",
    )(f)


def threads_option(f):
    """``-t/--threads``: Numba threads (default: the cores that are idle)."""
    return click.option(
        "-t", "--threads", type=click.IntRange(min=1), default=None,
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

    from ..thread_governor import count_set_from_outside

    cores = numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(min(threads, cores) if threads else idle_cores(cores))
    count_set_from_outside()  # the ceiling even when it equals the count the governor had picked


def ensure_kernels(quiet: bool) -> None:
    """Compile the Numba kernels on the first run, with a progress bar on stderr: kernel modules
    done of all, and the compiled specialisations (one per kernel and argument types) so far,
    counted from Numba's compile events."""
    from ..kernels import compile_kernels, kernels_are_compiled

    if kernels_are_compiled():
        return
    if quiet:
        compile_kernels()
        return
    from numba.core import event
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    stderr.print("[dim]Compiling the Numba kernels (first run only; later runs load them from the cache)[/dim]")
    with Progress(TextColumn("kernel modules"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[compiled]} specialisations compiled"), TimeElapsedColumn(),
                  console=stderr) as bar:
        task = bar.add_task("compile", total=None, compiled=0)
        counter = compile_counter(lambda n: bar.update(task, compiled=n))
        with event.install_listener("numba:compile", counter):
            compile_kernels(progress=lambda done, total: bar.update(task, completed=done, total=total))


def compile_counter(report):
    """A Numba event listener for ``numba:compile`` that counts the compilations that finished
    (one per kernel and argument types; nested helpers count too) and calls ``report(count)``
    after each. Built on first use, so importing this module does not import Numba."""
    from numba.core import event

    class CompileCounter(event.Listener):
        count = 0

        def on_start(self, ev) -> None:
            pass

        def on_end(self, ev) -> None:
            self.count += 1
            report(self.count)

    return CompileCounter()


def load_model(name: str, quiet: bool):
    """Load a model, with a status line on stderr while it loads."""
    from ..loading import load

    if quiet or not stderr.is_terminal:
        return load(name)
    with stderr.status(f"Loading {os.path.basename(name)}…"):
        return load(name)


def mib(n_bytes: float) -> str:
    """Bytes as MiB with one decimal; a size under 0.1 MiB in KiB or bytes, where "0.0 MiB" would
    hide it (``--kv-budget 0.001`` is 1 KiB)."""
    if n_bytes < 1024:
        return f"{n_bytes:,.0f} B"
    if n_bytes < 2**20 / 10:
        return f"{n_bytes / 2**10:,.1f} KiB"
    return f"{n_bytes / 2**20:,.1f} MiB"


# ───────────────────────────── generate and chat ─────────────────────────────


def _canonical_cache_dtype(ctx, param, value):
    """--cache-dtype's callback: an accepted name or alias → the canonical name (``float16`` → ``f16``)."""
    from ..kv_storage import canonical_name

    return canonical_name(value)


def check_cache_dtype(cache_dtype: str, head_dim: int) -> None:
    """Refuse a ``--cache-dtype`` whose rows cannot hold ``head_dim`` elements (q8_0 and q4_0 store
    blocks of 32) before any cache is made.

    Raises:
        OptionError: one line naming the option, the type and the model's head_dim.
    """
    from ..kv_storage import storage_type

    try:
        storage_type(cache_dtype).check_head_dim(head_dim)
    except ValueError as e:
        raise OptionError(f"--cache-dtype {cache_dtype}: {e}") from None


def cache_dtype_option():
    """``--cache-dtype f32|f16|q8_0|q4_0`` (llama.cpp's names for ``-ctk``/``-ctv``; ``float32`` and
    ``float16`` accepted as aliases), delivered as the canonical name. The one definition every
    command with a KV cache uses."""
    from ..kv_storage import STORAGE_NAMES

    return click.option(
        "--cache-dtype", type=click.Choice(list(STORAGE_NAMES)), default="f32", show_default=True,
        callback=_canonical_cache_dtype,
        help="KV-cache element type (llama.cpp's -ctk/-ctv names): f32 keeps transformers' logits; f16 "
             "(llama.cpp's default) halves the cache; q8_0 and q4_0 store blocks of 32 with one float16 scale "
             "(34 and 18 bytes per 32 values; head_dim a multiple of 32). float32/float16 are aliases.")


def generation_options(f):
    """The options ``generate``, ``batch`` and ``chat`` share, in --help order: -n, the sampling
    flags (--temp … --seed), --stop, --ignore-eos, --ctx-size, --kv-heads, --cache-dtype, --int8-dot, each
    with llama.cpp's spelling beside ours. They arrive as the keyword arguments
    :func:`setup_generation` takes."""
    for option in reversed(_GENERATION_OPTIONS):
        f = option(f)
    return f


_GENERATION_OPTIONS = [
    click.option("-n", "--max-tokens", "--n-predict", "max_tokens", type=int, default=256, show_default=True,
                 help="Most tokens to generate; -1 = until end of text or a full context."),
    click.option("--temp", "--temperature", "temperature", type=float, default=0.0, show_default=True,
                 help="Temperature; 0 = greedy."),
    click.option("--top-k", type=int, default=0, show_default=True,
                 help="Keep the k most likely tokens; 0 (or less, as in llama.cpp) = off."),
    click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass; 1 = off."),
    click.option("--min-p", type=float, default=0.0, show_default=True, help="Drop tokens below min-p × p(best); 0 = off."),
    click.option("--repeat-penalty", type=float, default=1.0, show_default=True, help="Repetition penalty; 1 = off."),
    click.option("--repeat-last-n", type=int, default=64, show_default=True, help="Tokens the penalty looks back over; -1 = all."),
    click.option("-s", "--seed", type=int, default=None,
                 help="Random seed: same seed and options → same text. -1 or none: a random seed, reported "
                      "(stats on stderr, --json) so the run can be repeated."),
    click.option("-r", "--stop", "--reverse-prompt", "stop", multiple=True,
                 help="Stop when this string appears (repeatable); it is not printed."),
    click.option("--ignore-eos", is_flag=True,
                 help="Never end at end-of-text or end-of-turn tokens (they are not sampled); -n or the context ends."),
    click.option("-c", "--ctx-size", type=int, default=None, help="Context in tokens (default: the model's)."),
    click.option("--kv-heads", type=int, default=None, help="Regroup KV heads: 1 = MQA, n_heads = MHA."),
    cache_dtype_option(),
    click.option("--int8-dot", is_flag=True,
                 help="Round activations to 8 bits per block of 32 and multiply integer codes, as llama.cpp does: "
                      "faster decode and prefill, slightly different logits (perplexity cost: BENCHMARKS.md). Off: float32 "
                      "products, logits as transformers'. Needs AVX2."),
]

def generation_option(name: str):
    """One of the :func:`generation_options` alone, by its parameter name (``"cache_dtype"``,
    ``"kv_heads"``), for a command that takes it without the rest (``perplexity``): the same
    spellings, choices, default and help as ``generate``, wherever those change.

    Raises:
        KeyError: no generation option has that name.
    """
    for option in _GENERATION_OPTIONS:
        probe = option(lambda: None)  # each application makes a fresh click.Option
        if probe.__click_params__[0].name == name:
            return option
    raise KeyError(name)


#: The library's name of a setting (:attr:`~mqa_gen.errors.SamplingError.field`) → the option
#: that sets it, so an error names what the user typed.
OPTION_NAMES = {"temperature": "--temp", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
                "repetition_penalty": "--repeat-penalty", "repeat_last_n": "--repeat-last-n", "seed": "--seed",
                "max_tokens": "--max-tokens", "ctx_size": "--ctx-size"}

#: ``--seed`` that asks for a random seed (llama.cpp's convention; no seed at all does the same).
RANDOM_SEED = -1


class OptionError(MqaGenError):
    """An option value the library refused, in the option's own name (``--top-p must be …``)."""


def same_file(a: str | None, b: str | None) -> bool:
    """Whether paths a and b name one existing file (links and relative spellings included); False
    when either is None or does not exist (yet)."""
    try:
        return a is not None and b is not None and os.path.samefile(a, b)
    except OSError:
        return False


def output_path_problem(path: str, magic: bytes = b"", kind: str = "") -> str | None:
    """Why a file should not be written at ``path`` — it is a directory, its folder does not exist
    or is not writable, or (with ``magic``) it holds something other than a ``kind`` file, which
    writing would destroy — or None. Checked before minutes of work whose result would be lost."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return "is a folder: give a file name"
    if not os.path.isdir(folder):
        return f"folder {folder} does not exist"
    if not os.access(folder, os.W_OK):
        return f"folder {folder} is not writable"
    if magic and os.path.lexists(path):
        try:
            with open(path, "rb") as f:
                head = f.read(len(magic)) if os.path.isfile(path) else None
        except OSError as e:
            return f"cannot read the existing file: {e.strerror or e}"
        if head is None or (head and head != magic):
            return f"exists and is not a {kind} file: delete it or choose another path"
    return None


@dataclass(frozen=True)
class GenerationSetup:
    """What ``generate`` and ``chat`` need once their options are checked and the model is loaded.

    Attributes:
        loaded: the :class:`~mqa_gen.loading.LoadedModel`.
        net: the model to run: ``loaded.model``, or a copy regrouped to ``--kv-heads``.
        params: the checked :class:`~mqa_gen.sampling.SamplingParams`.
        max_tokens: ``-n`` (> 0, or -1: until end of text or a full context).
        stop: the ``--stop`` strings.
        ctx: the context in tokens: ``--ctx-size``, or the model's.
        cache_dtype: ``--cache-dtype``'s canonical name (``"f32"``, ``"f16"``, ``"q8_0"``, ``"q4_0"``).
        ignore_eos: ``--ignore-eos`` (``params.suppress_ids`` then holds the end-of-generation ids).

    ``params.seed`` is the seed the run uses: ``--seed``, or one drawn at random (reported, so
    the run can be repeated); None only where the caller draws one per request (``batch``).
    """

    loaded: LoadedModel
    net: object
    params: SamplingParams
    max_tokens: int
    stop: tuple[str, ...]
    ctx: int
    cache_dtype: str
    ignore_eos: bool = False

    def settings(self) -> dict:
        """The run's settings as ``--json`` echoes them (``"settings"``), so a run can be repeated."""
        p = self.params
        return {"temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p, "min_p": p.min_p,
                "repeat_penalty": p.repetition_penalty, "repeat_last_n": p.repeat_last_n, "seed": p.seed,
                "max_tokens": self.max_tokens, "stop": list(self.stop), "ignore_eos": self.ignore_eos,
                "ctx_size": self.ctx, "kv_heads": self.net.config.n_kv_heads, "cache_dtype": self.cache_dtype,
                "int8_dot": self.net.int8_dot}


def system_prompt_option(*names: str):
    """``-sys/--system-prompt`` (llama.cpp's spelling), plus ``names`` (chat keeps ``--system``)."""
    return click.option(*names, "-sys", "--system-prompt", "system", default=None, metavar="TEXT",
                        help="System prompt for the chat template (default: the template's own).")


def chat_template_option(f):
    """``--chat-template-file PATH``: a Jinja chat template to use instead of the model's."""
    return click.option("--chat-template-file", type=click.Path(dir_okay=False), default=None, metavar="PATH",
                        help="Jinja chat template to use instead of the model's (for a GGUF without a usable one).")(f)


def read_chat_template(path: str | None) -> str | None:
    """The text of ``--chat-template-file`` (None when not given).

    Raises:
        ChatTemplateError: the file cannot be read, is not UTF-8 text, or is empty.
    """
    from ..errors import ChatTemplateError

    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ChatTemplateError(f"cannot read chat template file {path}: {getattr(e, 'strerror', None) or e}") from None
    if not text.strip():
        raise ChatTemplateError(f"chat template file {path} is empty")
    return text


def set_int8_dot(net, on: bool, quiet: bool = False) -> None:
    """``--int8-dot`` on or off for ``net`` (a model a process may reuse: off is set too); on, the
    integer kernels are compiled first if no earlier run did (a notice on stderr unless ``quiet``).

    Raises:
        OptionError: on, on a CPU without AVX2.
    """
    from ..kernels.int8_dot import FastPathUnavailable

    try:
        net.set_int8_dot(on)
    except FastPathUnavailable as e:
        raise OptionError(f"--int8-dot: {e}") from None
    if on:
        from ..kernels.warmup import compile_int8_kernels, int8_kernels_are_compiled

        ensure_kernels(quiet)  # the float32 kernels first, with their progress bar on a first run
        if not int8_kernels_are_compiled() and not quiet:
            stderr.print("[dim]Compiling the --int8-dot kernels (first --int8-dot run only)[/dim]")
        compile_int8_kernels()


def setup_generation(model: str, quiet: bool, threads: int | None, *, max_tokens: int, temperature: float,
                     top_k: int, top_p: float, min_p: float, repeat_penalty: float, repeat_last_n: int,
                     seed: int | None, stop: tuple[str, ...], ignore_eos: bool, ctx_size: int | None,
                     kv_heads: int | None, cache_dtype: str, int8_dot: bool = False,
                     draw_seed: bool = True) -> GenerationSetup:
    """Check the :func:`generation_options` values, set the threads, load the model (status line on
    stderr), compile the kernels on the first run (with a progress bar) and regroup the KV heads.

    The values are checked first, by the library (:func:`~mqa_gen.generate.validate_generation`),
    so a bad one fails before the model loads; the error names the option. ``--seed -1`` or no
    seed draws one (:func:`~mqa_gen.sampling.draw_seed`) unless ``draw_seed`` is False (then the
    seed stays None: ``batch`` draws one per prompt). A ``--ctx-size`` above the context the model
    was trained on gets a one-line warning on stderr (even with ``quiet``: it changes the text).

    Raises:
        OptionError: a sampling value out of range, ``-n`` 0 or < -1, ``--ctx-size`` ≤ 0,
            ``--seed`` < -1, or a block ``--cache-dtype`` (q8_0, q4_0) for a head_dim that is not a
            multiple of 32.
        MqaGenError: a model that cannot be loaded (:func:`~mqa_gen.loading.load`);
            ``ConfigError``, a ``--kv-heads`` that does not divide the query heads.
    """
    from dataclasses import replace

    from ..chat import end_of_turn_ids
    from ..cache import check_cache_fits, kv_bytes
    from ..generate import validate_generation
    from ..regroup import regroup_model
    from ..sampling import SamplingParams, draw_seed as draw

    if seed is not None and seed < RANDOM_SEED:
        raise OptionError(f"--seed must be an integer >= 0 (-1 = random), got {seed}")
    if seed == RANDOM_SEED:
        seed = None
    from ..tokenizer import check_utf8

    for text in stop:  # a stop string that is not UTF-8 could never match: say so
        check_utf8(text, "--stop")
        if not text:
            raise OptionError("--stop needs a non-empty string")
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed)
    try:
        validate_generation(params, max_tokens, ctx_size)
    except SamplingError as e:
        raise OptionError(f"{OPTION_NAMES.get(e.field, e.field)} {e.reason}") from None
    if seed is None and draw_seed:
        params = replace(params, seed=draw())
    set_threads(threads)
    loaded = load_model(model, quiet)  # before compiling, so a bad model file fails at once
    if ignore_eos:
        params = replace(params, suppress_ids=frozenset(end_of_turn_ids(loaded.tokenizer)))
    net = loaded.model if kv_heads is None else regroup_model(loaded.model, kv_heads)
    set_int8_dot(net, int8_dot, quiet)
    check_cache_dtype(cache_dtype, net.config.head_dim)
    trained = loaded.config.context_length
    if ctx_size is not None and ctx_size > trained:
        c = net.config  # refuse a context that cannot fit this machine before warning about it
        check_cache_fits(kv_bytes(ctx_size, c.layer_windows, c.n_kv_heads, c.head_dim, cache_dtype), ctx_size)
        stderr.print(f"[yellow]warning: --ctx-size {ctx_size:,} is above the {trained:,}-token context the model was "
                     "trained on; text past it may degrade[/yellow]", soft_wrap=True)
    ensure_kernels(quiet)
    return GenerationSetup(loaded, net, params, max_tokens, tuple(stop), ctx_size or net.config.context_length,
                           cache_dtype, ignore_eos)
