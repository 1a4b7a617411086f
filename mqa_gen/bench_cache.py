"""What sharing K/V heads buys at inference time, computed and measured on a real model.

For each variant of a model — MQA (n_kv_heads = 1, Shazeer 2019, "Fast Transformer Decoding: One
Write-Head is All You Need"), its native grouping and MHA (n_kv_heads = n_heads), or any count
:func:`mqa_gen.kv_heads.valid_kv_heads` allows — and each context length, this module gives:

* **formula** columns, from the config alone:
  bytes per token = 2 (K and V) × n_layers × n_kv_heads × head_dim × itemsize, bytes at a context
  = context × bytes per token, and the ratio to MHA (n_kv_heads / n_heads);
* **measured** columns, from the model:
  the bytes the cache's arrays actually hold once it is filled to the context (summed from the
  NumPy arrays themselves, and checked to equal the formula), and decode speed in tokens/s with the
  cache that full (median of ``repeats`` timed runs of ``decode_tokens`` real decode steps each,
  after one untimed warm-up run; the variants' runs are interleaved round-robin so that load from
  other processes falls on all of them alike);
* **perplexity** of each variant on a fixed text (:mod:`mqa_gen.perplexity`), which shows what the
  mean-pooling of K/V heads (Ainslie et al. 2023, "GQA: Training Generalized Multi-Query
  Transformer Models from Multi-Head Checkpoints", §2.1, without their uptraining) costs.

How the cache is filled before the timed steps (``fill``):

* ``"direct"`` (default): rows ``0 … context − decode_tokens − 1`` are written straight into the
  cache with :meth:`KVCache.write` / :meth:`KVCache.advance` (seeded random K/V values; the speed
  of a decode step depends on how many rows it reads, not on their values). The last
  ``decode_tokens`` rows are then written by real decode steps — the ones that are timed.
* ``"prefill"``: the first ``context − decode_tokens`` rows come from a real prefill of the
  perplexity text's tokens (repeated to length). Exact but slow: prefill is quadratic in context.

Units: bytes (int), tokens, seconds, tokens/s. The CLI (``mqa-gen bench-cache``) is a thin layer
over :func:`formula_result` and :func:`run_bench`.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .cache import KVCache
from .config import ModelConfig
from .errors import MqaGenError
from .kv_heads import check_kv_heads as _check_kv_heads
from .kv_storage import STORAGE_TYPES
from .regroup import regroup_model

#: Defaults of ``mqa-gen bench-cache`` (GUIDE.md §3). Models with sliding-window layers (Gemma 3)
#: get longer contexts by default, so the points reach well past the window.
DEFAULT_CONTEXTS = (512, 2048, 8192)
DEFAULT_CONTEXTS_SLIDING = (512, 4096, 16384)


def default_contexts(config: ModelConfig) -> tuple[int, ...]:
    """:data:`DEFAULT_CONTEXTS`, or :data:`DEFAULT_CONTEXTS_SLIDING` for a model with sliding windows."""
    return DEFAULT_CONTEXTS_SLIDING if config.sliding_window else DEFAULT_CONTEXTS
DEFAULT_DECODE_TOKENS = 8
DEFAULT_REPEATS = 3
FILL_METHODS = ("direct", "prefill")

#: Rows written per :meth:`KVCache.write` call when filling directly.
_FILL_CHUNK = 256


class BenchError(MqaGenError):
    """A bad bench-cache setting (a list that is not integers, a context, a cache dtype, the output
    options, a missing plotting library); exit code 2. A bad KV-head count is a
    :class:`~mqa_gen.errors.ConfigError`, as in every command that takes ``--kv-heads``."""


# --- results -------------------------------------------------------------------------------------


@dataclass
class Point:
    """One variant at one context length.

    context: tokens. kv_bytes: formula, bytes (context × bytes per token). measured_kv_bytes: bytes
    held by the cache's arrays once filled to ``context`` (None when not measured).
    decode_tokens_per_s: median decode speed at that fill (None when not measured).
    decode_runs_tokens_per_s: every timed run (tokens/s), for the curious.
    """

    context: int
    kv_bytes: int
    measured_kv_bytes: int | None = None
    decode_tokens_per_s: float | None = None
    decode_runs_tokens_per_s: list[float] = field(default_factory=list)


@dataclass
class Variant:
    """One KV-head grouping of the model.

    label: ``"MQA"``, ``"GQA"`` or ``"MHA"``. n_kv_heads: KV heads. native: the model's own count.
    kv_bytes_per_token: bytes. ratio_to_mha: kv bytes / MHA's kv bytes (= n_kv_heads / n_heads).
    perplexity: on the perplexity text (None when not measured). points: one per context.
    """

    label: str
    n_kv_heads: int
    native: bool
    kv_bytes_per_token: int
    ratio_to_mha: float
    perplexity: float | None = None
    points: list[Point] = field(default_factory=list)

    @property
    def display_label(self) -> str:
        """``"MQA"``, ``"GQA-3 (native)"``, ``"MHA"`` …: the label, the count when it is ambiguous."""
        name = self.label if self.label != "GQA" else f"GQA-{self.n_kv_heads}"
        return f"{name} (native)" if self.native else name


@dataclass
class BenchResult:
    """Everything bench-cache reports. ``method`` says how it was measured (cache dtype, fill,
    decode tokens, repeats, threads, perplexity text and window, wall seconds); it is empty of
    measurement keys when only the formulas were computed."""

    model: str
    config: ModelConfig
    cache_dtype: str
    contexts: list[int]
    variants: list[Variant]
    measured: bool = False
    method: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The JSON object of GUIDE.md §3 (plus ``cache_dtype``, ``measured``, ``method`` and, per
        variant, ``native`` and ``ratio_to_mha``)."""
        variants = []
        for v in self.variants:
            variants.append({
                "label": v.label,
                "n_kv_heads": v.n_kv_heads,
                "native": v.native,
                "kv_bytes_per_token": v.kv_bytes_per_token,
                "ratio_to_mha": v.ratio_to_mha,
                "perplexity": v.perplexity,
                "points": [{
                    "context": p.context,
                    "kv_bytes": p.kv_bytes,
                    "measured_kv_bytes": p.measured_kv_bytes,
                    "decode_tokens_per_s": p.decode_tokens_per_s,
                    "decode_runs_tokens_per_s": p.decode_runs_tokens_per_s,
                } for p in v.points],
            })
        return {"model": self.model, "config": dataclasses.asdict(self.config), "cache_dtype": self.cache_dtype,
                "measured": self.measured, "method": self.method, "variants": variants}

    def rows(self) -> list[dict]:
        """One flat dict per variant × context (the table's and the CSV's rows)."""
        mha = {p.context: p.decode_tokens_per_s for v in self.variants if v.label == "MHA" for p in v.points}
        out = []
        for v in self.variants:
            for p in v.points:
                speed_ratio = (p.decode_tokens_per_s / mha[p.context]
                               if p.decode_tokens_per_s and mha.get(p.context) else None)
                out.append({
                    "variant": v.display_label, "label": v.label, "n_kv_heads": v.n_kv_heads, "native": v.native,
                    "cache_dtype": self.cache_dtype, "context": p.context,
                    "kv_bytes_per_token": v.kv_bytes_per_token, "kv_bytes": p.kv_bytes,
                    "kv_mib": p.kv_bytes / 2**20, "ratio_to_mha": v.ratio_to_mha,
                    "measured_kv_bytes": p.measured_kv_bytes,
                    "measured_equals_formula": (None if p.measured_kv_bytes is None
                                                else p.measured_kv_bytes == p.kv_bytes),
                    "decode_tokens_per_s": p.decode_tokens_per_s, "decode_speed_ratio_to_mha": speed_ratio,
                    "perplexity": v.perplexity,
                })
        return out


# --- settings and formulas -----------------------------------------------------------------------


def default_kv_heads(config: ModelConfig) -> list[int]:
    """MQA, the native count and MHA, ascending and without repeats (SmolLM2-135M: 1, 3, 9)."""
    return sorted({1, config.n_kv_heads, config.n_heads})


def parse_int_list(text: str, option: str) -> list[int]:
    """``"512,2048, 8192"`` → [512, 2048, 8192] (ascending, repeats dropped).

    Raises:
        BenchError: an empty list or an item that is not an integer (the message names ``option``).
    """
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise BenchError(f"{option} needs at least one value, e.g. {option} 1,3,9")
    try:
        values = [int(s.replace("_", "")) for s in items]
    except ValueError:
        raise BenchError(f"{option} takes comma-separated integers, got {text!r}") from None
    return sorted(set(values))


def check_kv_heads(config: ModelConfig, kv_heads: Sequence[int]) -> list[int]:
    """The KV-head counts, sorted and without repeats, after checking each is reachable by regrouping.

    Raises:
        ConfigError: a count that is not in :func:`mqa_gen.kv_heads.valid_kv_heads` (the message
            lists the valid ones).
    """
    _check_kv_heads(config.n_heads, config.n_kv_heads, kv_heads)
    return sorted(set(kv_heads))


def check_contexts(config: ModelConfig, contexts: Sequence[int], decode_tokens: int | None = None) -> list[int]:
    """The context lengths, sorted, after checking 0 < context ≤ the model's context length (and,
    when measuring, context ≥ decode_tokens: the timed steps are the context's last positions).

    Raises:
        BenchError: a context outside those bounds.
    """
    for c in contexts:
        if c <= 0 or c > config.context_length:
            raise BenchError(f"--contexts {c} is outside 1 … {config.context_length} "
                             f"(the model's context length, in tokens)")
        if decode_tokens is not None and c < decode_tokens:
            raise BenchError(f"--contexts {c} is shorter than --decode-tokens {decode_tokens} "
                             "(the timed decode steps are the context's last positions)")
    return sorted(set(contexts))


def itemsize(cache_dtype: str) -> int:
    """Bytes per cached element: 4 (float32) or 2 (float16).

    Raises:
        BenchError: an unknown dtype.
    """
    if cache_dtype not in STORAGE_TYPES:
        raise BenchError(f"--cache-dtype must be one of {', '.join(STORAGE_TYPES)}, got {cache_dtype!r}")
    return STORAGE_TYPES[cache_dtype].itemsize


def formula_result(model_name: str, config: ModelConfig, kv_heads: Sequence[int], contexts: Sequence[int],
                   cache_dtype: str = "float32") -> BenchResult:
    """The formula columns only (no weights needed): bytes per token, bytes per context, ratio to MHA."""
    size = itemsize(cache_dtype)
    mha_per_token = config.with_kv_heads(config.n_heads).kv_bytes_per_token(size)
    variants = []
    for n in kv_heads:
        grouped = config.with_kv_heads(n)
        per_token = grouped.kv_bytes_per_token(size)
        variants.append(Variant(
            label=grouped.attention_kind, n_kv_heads=n, native=n == config.n_kv_heads,
            kv_bytes_per_token=per_token, ratio_to_mha=per_token / mha_per_token,
            # sliding-window layers (Gemma 3) hold at most their window, whatever the context
            points=[Point(c, grouped.kv_bytes(c, size)) for c in contexts],
        ))
    return BenchResult(model_name, config, cache_dtype, list(contexts), variants)


# --- measurement ---------------------------------------------------------------------------------


def held_bytes(cache: KVCache) -> int:
    """Bytes the cache's K and V arrays hold, summed from the NumPy arrays themselves (not from the
    formula), so comparing it with the formula checks the cache's layout."""
    return int(sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers))


def fill_direct(cache: KVCache, n_tokens: int, seed: int = 0) -> None:
    """Append ``n_tokens`` rows to every layer through its layer cache (``update_and_fetch``) and
    :meth:`KVCache.advance`
    (seeded standard-normal K/V values), without running the model."""
    rng = np.random.default_rng(seed)
    block = rng.standard_normal((_FILL_CHUNK, cache.n_kv_heads, cache.head_dim), dtype=np.float32)
    done = 0
    while done < n_tokens:
        n = min(_FILL_CHUNK, n_tokens - done)
        for layer in range(cache.n_layers):
            cache.layers[layer].update_and_fetch(block[:n], block[:n], cache.length)
        cache.advance(n)
        done += n


def fill_prefill(model, cache: KVCache, n_tokens: int, source_ids: Sequence[int]) -> None:
    """Append ``n_tokens`` rows by a real prefill of ``source_ids`` repeated to length."""
    if n_tokens <= 0:
        return
    ids = np.resize(np.asarray(source_ids, dtype=np.int64), n_tokens)
    model.forward(ids, cache)


def rewind_for_timing(cache: KVCache, n_tokens: int) -> None:
    """Set the cache back to ``n_tokens`` tokens for another timed decode run. A wrapped
    sliding-window ring cannot truncate exactly (:meth:`KVCache.can_truncate`); for timing that does
    not matter — the ring keeps ``window`` rows either way and the kernels read the same bytes —
    so its length is simply reset, leaving rows of later positions in it."""
    if cache.can_truncate(n_tokens):
        cache.truncate(n_tokens)
    else:
        cache.length = n_tokens


def measure_decode_interleaved(models: Sequence, context: int, decode_tokens: int = DEFAULT_DECODE_TOKENS,
                               repeats: int = DEFAULT_REPEATS, cache_dtype: str = "float32", fill: str = "direct",
                               token_ids: Sequence[int] = (1,)) -> list[tuple[int, float, list[float]]]:
    """Fill one fresh cache of capacity ``context`` per model and time decode steps at their ends.

    Each cache is filled to ``context − decode_tokens`` rows (``fill``: ``"direct"`` or
    ``"prefill"``, see the module docstring). Then ``repeats + 1`` rounds each run every model in
    turn (round-robin, so a burst of load from elsewhere hits all of them alike): truncate its cache
    back to ``context − decode_tokens`` and run ``decode_tokens`` single-token forward passes (ids
    from ``token_ids``, cycled), which brings it to exactly ``context`` tokens. Round 0 is a
    warm-up and is not timed.

    Returns:
        Per model, (measured_kv_bytes, median tokens/s, tokens/s of every timed run): the bytes
        held by its cache's arrays once it holds ``context`` tokens, and decode speeds.

    Raises:
        ValueError: context < decode_tokens, repeats < 1, or an unknown fill method.
    """
    if decode_tokens < 1 or repeats < 1 or context < decode_tokens:
        raise ValueError("need decode_tokens ≥ 1, repeats ≥ 1 and context ≥ decode_tokens")
    if fill not in FILL_METHODS:
        raise ValueError(f"fill must be one of {', '.join(FILL_METHODS)}, got {fill!r}")
    start = context - decode_tokens
    caches = []
    for model in models:
        cache = model.new_cache(context, cache_dtype)
        if fill == "direct":
            fill_direct(cache, start)
        else:
            fill_prefill(model, cache, start, token_ids)
        caches.append(cache)
    steps = [int(token_ids[i % len(token_ids)]) for i in range(decode_tokens)]
    runs: list[list[float]] = [[] for _ in models]
    for round_ in range(repeats + 1):
        for model, cache, speeds in zip(models, caches, runs):
            rewind_for_timing(cache, start)
            t0 = time.perf_counter()
            for token in steps:
                model.forward([token], cache)
            elapsed = time.perf_counter() - t0
            if round_ > 0:
                speeds.append(decode_tokens / elapsed)
    out = []
    for cache, speeds in zip(caches, runs):
        if cache.length != context:  # pragma: no cover - a broken cache, not a user error
            raise RuntimeError(f"cache holds {cache.length} tokens after filling, expected {context}")
        out.append((held_bytes(cache), float(statistics.median(speeds)), speeds))
    return out


def measure_decode(model, context: int, decode_tokens: int = DEFAULT_DECODE_TOKENS,
                   repeats: int = DEFAULT_REPEATS, cache_dtype: str = "float32", fill: str = "direct",
                   token_ids: Sequence[int] = (1,)) -> tuple[int, float, list[float]]:
    """:func:`measure_decode_interleaved` for one model: (measured_kv_bytes, median tokens/s, runs)."""
    return measure_decode_interleaved([model], context, decode_tokens, repeats, cache_dtype, fill, token_ids)[0]


def count_steps(n_variants: int, n_contexts: int, with_perplexity: bool) -> int:
    """Progress steps :func:`run_bench` reports: one per variant for perplexity, one per context."""
    return (n_variants if with_perplexity else 0) + n_contexts


def run_bench(model_name: str, model, kv_heads: Sequence[int], contexts: Sequence[int], *,
              cache_dtype: str = "float32", decode_tokens: int = DEFAULT_DECODE_TOKENS,
              repeats: int = DEFAULT_REPEATS, fill: str = "direct", ppl_ids: Sequence[int] | None = None,
              ppl_text_name: str | None = None, decode_ids: Sequence[int] | None = None,
              on_step: Callable[[str], None] | None = None, on_done: Callable[[], None] | None = None) -> BenchResult:
    """Measure every variant at every context (see the module docstring).

    Perplexity runs variant by variant; decode speed runs context by context, all variants
    interleaved (:func:`measure_decode_interleaved`), so their speeds are compared under the same
    conditions. Peak memory is the model plus one cache per variant at the largest context.

    Args:
        model_name: shown in the result. model: the native model (``config``, ``new_cache``,
            ``forward``); each variant is :func:`~mqa_gen.regroup.regroup_model` of it.
        kv_heads, contexts: already checked (:func:`check_kv_heads`, :func:`check_contexts`).
        ppl_ids: the perplexity window's token ids (None = no perplexity).
        decode_ids: token ids fed to the decode steps (and to ``fill="prefill"``); default
            ``ppl_ids``, else token id 1. The speed does not depend on them.
        ppl_text_name: what to call the text in ``method``.
        on_step: called with a description before each step (:func:`count_steps` of them);
            on_done: after each.

    Returns:
        A :class:`BenchResult` with every column filled.

    Raises:
        RuntimeError: a measured byte count that differs from the formula (a broken cache).
    """
    from .perplexity import perplexity

    config = model.config
    result = formula_result(model_name, config, kv_heads, contexts, cache_dtype)
    token_ids = list(decode_ids or ppl_ids or [1])
    on_step = on_step or (lambda _: None)
    on_done = on_done or (lambda: None)
    t_start = time.perf_counter()
    nets = [regroup_model(model, v.n_kv_heads) for v in result.variants]
    if ppl_ids:
        for variant, net in zip(result.variants, nets):
            on_step(f"{variant.display_label}: perplexity on {len(ppl_ids)} tokens")
            variant.perplexity = perplexity(net, ppl_ids, cache_dtype).perplexity
            on_done()
    for i, context in enumerate(result.contexts):
        on_step(f"decode at {context:,} tokens ({len(nets)} variant{'s' if len(nets) != 1 else ''} interleaved)")
        measured = measure_decode_interleaved(nets, context, decode_tokens, repeats, cache_dtype, fill, token_ids)
        for variant, (held, speed, runs) in zip(result.variants, measured):
            point = variant.points[i]
            if held != point.kv_bytes:
                raise RuntimeError(f"{variant.display_label} at {context} tokens: cache holds {held} bytes, "
                                   f"formula says {point.kv_bytes}")
            point.measured_kv_bytes, point.decode_tokens_per_s, point.decode_runs_tokens_per_s = held, speed, runs
        del measured
        on_done()
    result.measured = True
    result.method = {
        "fill": fill,
        "fill_description": FILL_DESCRIPTIONS[fill],
        "decode_tokens": decode_tokens,
        "repeats": repeats,
        "warmup_runs": 1,
        "statistic": "median",
        "interleaved": True,
        "threads": _numba_threads(),
        "perplexity_text": ppl_text_name if ppl_ids else None,
        "perplexity_tokens": len(ppl_ids) if ppl_ids else 0,
        "seconds": time.perf_counter() - t_start,
    }
    return result


FILL_DESCRIPTIONS = {
    "direct": "cache filled to context - decode_tokens by direct writes (KVCache.write/advance, "
              "random K/V), then decode_tokens real decode steps to reach context",
    "prefill": "cache filled to context - decode_tokens by a real prefill of the perplexity text, "
               "then decode_tokens real decode steps to reach context",
}


def _numba_threads() -> int:
    import numba

    return int(numba.get_num_threads())


# --- plot ----------------------------------------------------------------------------------------


def require_matplotlib() -> None:
    """Check that matplotlib can be imported.

    Raises:
        BenchError: it cannot; the message gives the install command.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install 'mqa-gen[plot]' (or pip install matplotlib)") from None


def plot(result: BenchResult, path: str) -> None:
    """Write a PNG with two panels: KV-cache MiB vs context and decode tokens/s vs context, one line
    per variant (the decode panel says so when nothing was measured).

    Raises:
        BenchError: matplotlib is missing.
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_speed) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for v in result.variants:
        xs = [p.context for p in v.points]
        mib = [(p.measured_kv_bytes if p.measured_kv_bytes is not None else p.kv_bytes) / 2**20 for p in v.points]
        ax_mem.plot(xs, mib, marker="o", label=f"{v.display_label}, {v.kv_bytes_per_token:,} B/token")
        if result.measured:
            ax_speed.plot(xs, [p.decode_tokens_per_s for p in v.points], marker="o", label=v.display_label)
    ax_mem.set_title(f"KV cache ({result.cache_dtype}){' — measured = formula' if result.measured else ''}")
    ax_mem.set_ylabel("MiB")
    ax_speed.set_title("decode speed with the cache filled to the context")
    ax_speed.set_ylabel("tokens/s")
    if not result.measured:
        ax_speed.text(0.5, 0.5, "not measured (--no-measure)", ha="center", va="center", transform=ax_speed.transAxes)
    for ax in (ax_mem, ax_speed):
        ax.set_xscale("log", base=2)
        ax.set_xticks(result.contexts, [f"{c:,}" for c in result.contexts])
        ax.minorticks_off()
        ax.set_xlabel("context (tokens)")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend()
    ax_speed.set_ylim(bottom=0)
    name = result.config.name or result.model
    sub = ""
    if result.measured:
        m = result.method
        sub = (f" — median of {m['repeats']} × {m['decode_tokens']} decode steps, "
               f"{m['threads']} thread{'s' if m['threads'] != 1 else ''}, fill: {m['fill']}")
    fig.suptitle(f"{name}: MQA vs GQA vs MHA{sub}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
