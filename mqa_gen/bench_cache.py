"""What sharing K/V heads buys at inference time, computed and measured on a real model.

For each variant of a model — MQA (n_kv_heads = 1, Shazeer 2019, "Fast Transformer Decoding: One
Write-Head is All You Need"), its native grouping and MHA (n_kv_heads = n_heads), or any count
:func:`mqa_gen.kv_heads.valid_kv_heads` allows — and each context length, this module gives:

* **formula** columns, from the config alone:
  bytes per token = 2 (K and V) × n_layers × n_kv_heads × bytes per row of head_dim elements (×4
  for f32, ×2 for f16, /32 × 34 for q8_0, /32 × 18 for q4_0), bytes at a context
  = context × bytes per token, and the ratio to MHA (n_kv_heads / n_heads);
* **measured** columns, from the model:
  the bytes the cache's arrays actually hold once it is filled to the context (summed from the
  NumPy arrays themselves, and checked to equal the formula), and decode speed in tokens/s with the
  cache that full (median of ``repeats`` timed runs of ``decode_tokens`` real decode steps each,
  after one untimed warm-up run; the variants' runs are interleaved round-robin so that load from
  other processes falls on all of them alike);
* **batched decode** (``batch_sizes``): aggregate tokens/s of B sequences decoding together, each
  with ``context`` tokens of its own (:func:`measure_batched_decode_interleaved`, variants
  interleaved the same way);
* **sequences that fit** a KV memory budget (``kv_budget_bytes``; the CLI's default is 90 % of
  ``MemAvailable``): budget // the bytes one sequence of ``context`` tokens holds, sliding-window
  layers counted at their window (:func:`mqa_gen.cache.kv_bytes`) — a formula column;
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

Units: bytes (int), tokens, sequences, seconds, tokens/s (batched: summed over the B sequences).
The CLI (``mqa-gen bench-cache``) is a thin layer over :func:`formula_result` and :func:`run_bench`.
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
from .kv_storage import storage_type
from .regroup import regroup_model
from .thread_governor import fixed_threads

#: Defaults of ``mqa-gen bench-cache``. Models with sliding-window layers (Gemma 3)
#: get longer contexts by default, so the points reach well past the window.
DEFAULT_CONTEXTS = (512, 2048, 8192)
DEFAULT_CONTEXTS_SLIDING = (512, 4096, 16384)


def default_contexts(config: ModelConfig) -> tuple[int, ...]:
    """:data:`DEFAULT_CONTEXTS`, or :data:`DEFAULT_CONTEXTS_SLIDING` for a model with sliding windows."""
    return DEFAULT_CONTEXTS_SLIDING if config.sliding_window else DEFAULT_CONTEXTS
DEFAULT_DECODE_TOKENS = 8
DEFAULT_REPEATS = 3
FILL_METHODS = ("direct", "prefill")
#: Share of ``MemAvailable`` taken as the KV budget when none is given (as ``mqa-gen batch`` does).
DEFAULT_KV_BUDGET_FRACTION = 0.9

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

    context: tokens. kv_bytes: formula, bytes (context × bytes per token; a sliding-window layer
    counts at most its window) — also the bytes one sequence of ``context`` tokens holds.
    measured_kv_bytes: bytes held by the cache's arrays once filled to ``context`` (None when not
    measured). decode_tokens_per_s: median decode speed of one sequence at that fill (None when
    not measured). decode_runs_tokens_per_s: every timed run (tokens/s), for the curious.
    fit_sequences: sequences of ``context`` tokens whose KV caches fit in the result's budget,
    ``kv_budget_bytes // kv_bytes`` (None when no budget is known).
    batch_decode_tokens_per_s: batch size B → median aggregate decode speed (tokens/s summed over
    the B sequences, each with its cache filled to ``context``); None for a B that was skipped
    because its caches would not fit the budget. Empty when batches were not measured.
    batch_decode_runs_tokens_per_s: B → every timed run (aggregate tokens/s; empty when skipped).
    """

    context: int
    kv_bytes: int
    measured_kv_bytes: int | None = None
    decode_tokens_per_s: float | None = None
    decode_runs_tokens_per_s: list[float] = field(default_factory=list)
    fit_sequences: int | None = None
    batch_decode_tokens_per_s: dict[int, float | None] = field(default_factory=dict)
    batch_decode_runs_tokens_per_s: dict[int, list[float]] = field(default_factory=dict)


@dataclass
class Variant:
    """One KV-head grouping of the model.

    label: ``"MQA"``, ``"GQA"`` or ``"MHA"``. n_kv_heads: KV heads. native: the model's own count.
    kv_bytes_per_token: bytes. ratio_to_mha: kv bytes / MHA's kv bytes (= n_kv_heads / n_heads).
    perplexity: on the perplexity text (None when not measured). points: one per context.
    cache_dtype: the KV-cache element type of this variant (canonical name: f32, f16, q8_0, q4_0).
    kl_vs_native_f32: mean KL(native model with an f32 cache ‖ this variant) over the perplexity
    window's positions, nats, full vocabulary (:mod:`mqa_gen.window_compare`); None when not measured.
    top1_agreement_vs_native_f32: fraction of those positions whose most likely next token is the
    native f32 model's (None when not measured).
    """

    label: str
    n_kv_heads: int
    native: bool
    kv_bytes_per_token: int
    ratio_to_mha: float
    perplexity: float | None = None
    points: list[Point] = field(default_factory=list)
    cache_dtype: str = "f32"
    kl_vs_native_f32: float | None = None
    top1_agreement_vs_native_f32: float | None = None

    @property
    def display_label(self) -> str:
        """``"MQA"``, ``"GQA-3 (native)"``, ``"MHA"`` …: the label, the count when it is ambiguous."""
        name = self.label if self.label != "GQA" else f"GQA-{self.n_kv_heads}"
        return f"{name} (native)" if self.native else name


@dataclass
class BenchResult:
    """Everything bench-cache reports. ``method`` says how it was measured (cache dtype, fill,
    decode tokens, repeats, threads, perplexity text and window, batch sizes and the ones skipped,
    wall seconds); it is empty of measurement keys when only the formulas were computed.

    batch_sizes: the batch sizes B asked for (sequences; empty = no batched decode).
    kv_budget_bytes: the KV memory budget the ``fit_sequences`` column divides (bytes; None when
    unknown). kv_budget_source: where it came from (``"--kv-budget"`` or ``"90% of MemAvailable"``).
    """

    model: str
    config: ModelConfig
    cache_dtype: str
    contexts: list[int]
    variants: list[Variant]
    measured: bool = False
    method: dict = field(default_factory=dict)
    batch_sizes: list[int] = field(default_factory=list)
    kv_budget_bytes: int | None = None
    kv_budget_source: str | None = None
    cache_types: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.cache_types:
            self.cache_types = [self.cache_dtype]

    def variant_name(self, v: Variant) -> str:
        """The variant's row label: :attr:`Variant.display_label`, with its cache type when several
        cache types are compared (``"MQA, q8_0"``)."""
        return v.display_label if len(self.cache_types) == 1 else f"{v.display_label}, {v.cache_dtype}"

    def as_dict(self) -> dict:
        """The JSON object of ``bench-cache --json`` (plus ``cache_dtype``, ``measured``, ``method``, the
        budget, the batch sizes and, per variant, ``native`` and ``ratio_to_mha``; per point
        ``fit_sequences`` and ``batch_decode_tokens_per_s`` keyed by B as a string, as JSON keys are)."""
        variants = []
        for v in self.variants:
            variants.append({
                "label": v.label,
                "n_kv_heads": v.n_kv_heads,
                "native": v.native,
                "kv_bytes_per_token": v.kv_bytes_per_token,
                "ratio_to_mha": v.ratio_to_mha,
                "perplexity": v.perplexity,
                "cache_dtype": v.cache_dtype,
                "kl_vs_native_f32": v.kl_vs_native_f32,
                "top1_agreement_vs_native_f32": v.top1_agreement_vs_native_f32,
                "points": [{
                    "context": p.context,
                    "kv_bytes": p.kv_bytes,
                    "measured_kv_bytes": p.measured_kv_bytes,
                    "decode_tokens_per_s": p.decode_tokens_per_s,
                    "decode_runs_tokens_per_s": p.decode_runs_tokens_per_s,
                    "fit_sequences": p.fit_sequences,
                    "batch_decode_tokens_per_s": {str(b): s for b, s in p.batch_decode_tokens_per_s.items()},
                    "batch_decode_runs_tokens_per_s": {str(b): r for b, r in p.batch_decode_runs_tokens_per_s.items()},
                } for p in v.points],
            })
        return {"model": self.model, "config": dataclasses.asdict(self.config), "cache_dtype": self.cache_dtype,
                "cache_types": self.cache_types,
                "measured": self.measured, "method": self.method, "batch_sizes": self.batch_sizes,
                "kv_budget_bytes": self.kv_budget_bytes, "kv_budget_source": self.kv_budget_source,
                "variants": variants}

    def rows(self) -> list[dict]:
        """One flat dict per variant × context (the table's and the CSV's rows): the keys of
        :data:`ROW_KEYS`, then :func:`batch_column` (B) for every B of ``batch_sizes``."""
        # the speed ratio compares with MHA of the same cache type
        mha = {(p.context, v.cache_dtype): p.decode_tokens_per_s
               for v in self.variants if v.label == "MHA" for p in v.points}
        out = []
        for v in self.variants:
            for p in v.points:
                base = mha.get((p.context, v.cache_dtype))
                speed_ratio = p.decode_tokens_per_s / base if p.decode_tokens_per_s and base else None
                out.append({
                    "variant": self.variant_name(v), "label": v.label, "n_kv_heads": v.n_kv_heads,
                    "native": v.native, "cache_dtype": v.cache_dtype, "context": p.context,
                    "kv_bytes_per_token": v.kv_bytes_per_token, "kv_bytes": p.kv_bytes,
                    "kv_mib": p.kv_bytes / 2**20, "ratio_to_mha": v.ratio_to_mha,
                    "measured_kv_bytes": p.measured_kv_bytes,
                    "measured_equals_formula": (None if p.measured_kv_bytes is None
                                                else p.measured_kv_bytes == p.kv_bytes),
                    "decode_tokens_per_s": p.decode_tokens_per_s, "decode_speed_ratio_to_mha": speed_ratio,
                    "perplexity": v.perplexity, "kv_budget_bytes": self.kv_budget_bytes,
                    "fit_sequences": p.fit_sequences, "kl_vs_native_f32": v.kl_vs_native_f32,
                    "top1_agreement_vs_native_f32": v.top1_agreement_vs_native_f32,
                    **{batch_column(b): p.batch_decode_tokens_per_s.get(b) for b in self.batch_sizes},
                })
        return out


#: The keys of every :meth:`BenchResult.rows` row, in order (batch columns follow them).
ROW_KEYS = ("variant", "label", "n_kv_heads", "native", "cache_dtype", "context", "kv_bytes_per_token", "kv_bytes",
            "kv_mib", "ratio_to_mha", "measured_kv_bytes", "measured_equals_formula", "decode_tokens_per_s",
            "decode_speed_ratio_to_mha", "perplexity", "kv_budget_bytes", "fit_sequences", "kl_vs_native_f32",
            "top1_agreement_vs_native_f32")


def batch_column(batch_size: int) -> str:
    """The row / CSV key of the aggregate decode speed at batch size B: ``decode_tokens_per_s_b4``."""
    return f"decode_tokens_per_s_b{batch_size}"


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


def check_batch_sizes(batch_sizes: Sequence[int]) -> list[int]:
    """The batch sizes (sequences decoding together), sorted and without repeats, after checking
    each is ≥ 1.

    Raises:
        BenchError: a batch size < 1.
    """
    for b in batch_sizes:
        if b < 1:
            raise BenchError(f"--batch-sizes {b} is not a batch size: each is a number of sequences ≥ 1")
    return sorted(set(batch_sizes))


def parse_kv_budget(text: str) -> int:
    """``--kv-budget`` in MiB (``"512"``, ``"1.5"``) → bytes (int).

    Raises:
        BenchError: not a number, or not > 0.
    """
    try:
        mib = float(text.replace("_", ""))
    except ValueError:
        raise BenchError(f"--kv-budget takes a size in MiB, e.g. --kv-budget 2048, got {text!r}") from None
    if not mib > 0 or mib == float("inf"):
        raise BenchError(f"--kv-budget must be a size in MiB > 0, got {text!r}")
    return max(1, int(mib * 2**20))


def default_kv_budget() -> tuple[int | None, str | None]:
    """(bytes, source): :data:`DEFAULT_KV_BUDGET_FRACTION` of the memory available now
    (:func:`mqa_gen.cache.available_memory_bytes`), or (None, None) where that is unknown."""
    from .cache import available_memory_bytes

    available = available_memory_bytes()
    if available is None:
        return None, None
    return int(DEFAULT_KV_BUDGET_FRACTION * available), f"{DEFAULT_KV_BUDGET_FRACTION:.0%} of MemAvailable"


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


def check_cache_dtype(cache_dtype: str, config: ModelConfig) -> str:
    """The canonical name of a cache type name or alias (``"float16"`` → ``"f16"``) whose rows can
    hold the model's head_dim.

    Raises:
        BenchError: an unknown type, or a block type (q8_0, q4_0) for a head_dim that is not a
            multiple of 32.
    """
    try:
        storage = storage_type(cache_dtype)
        storage.check_head_dim(config.head_dim)
    except ValueError as e:
        raise BenchError(f"--cache-dtype: {e}") from None
    return storage.name


def check_cache_types(cache_types: Sequence[str], config: ModelConfig) -> list[str]:
    """``--cache-types``: canonical names (:func:`check_cache_dtype` each), in the order given
    without repeats.

    Raises:
        BenchError: an empty list, an unknown type or a block type the head_dim cannot hold.
    """
    names: list[str] = []
    for t in cache_types:
        if not t.strip():
            continue
        try:
            name = check_cache_dtype(t.strip(), config)
        except BenchError as e:
            raise BenchError(str(e).replace("--cache-dtype", "--cache-types", 1)) from None
        if name not in names:
            names.append(name)
    if not names:
        raise BenchError("--cache-types needs at least one type, e.g. --cache-types f32,f16,q8_0,q4_0")
    return names


def formula_result(model_name: str, config: ModelConfig, kv_heads: Sequence[int], contexts: Sequence[int],
                   cache_dtype: str = "f32", kv_budget_bytes: int | None = None,
                   kv_budget_source: str | None = None, cache_types: Sequence[str] | None = None) -> BenchResult:
    """The formula columns only (no weights needed): bytes per token, bytes per context, ratio to MHA
    and, given a budget (bytes), the sequences of each context that fit in it
    (:func:`mqa_gen.scheduler.kv_fit` of the context's bytes).

    cache_types: compare these KV-cache element types (variants = KV heads × types, KV heads
    outermost); None = just ``cache_dtype``. ``ratio_to_mha`` divides by MHA with an f32 cache when
    several types are compared (so it is the whole shrink factor), else by MHA of ``cache_dtype``.
    """
    from .scheduler import kv_fit

    cache_dtype = check_cache_dtype(cache_dtype, config)
    types = [cache_dtype] if cache_types is None else check_cache_types(cache_types, config)
    reference_type = cache_dtype if len(types) == 1 else "f32"
    mha_per_token = config.with_kv_heads(config.n_heads).kv_bytes_per_token(reference_type)
    variants = []
    for n in kv_heads:
        grouped = config.with_kv_heads(n)
        for dtype in types:
            per_token = grouped.kv_bytes_per_token(dtype)
            # sliding-window layers (Gemma 3) hold at most their window, whatever the context
            points = [Point(c, grouped.kv_bytes(c, dtype)) for c in contexts]
            for p in points:
                p.fit_sequences = None if kv_budget_bytes is None else kv_fit(p.kv_bytes, kv_budget_bytes)
            variants.append(Variant(
                label=grouped.attention_kind, n_kv_heads=n, native=n == config.n_kv_heads,
                kv_bytes_per_token=per_token, ratio_to_mha=per_token / mha_per_token, points=points,
                cache_dtype=dtype,
            ))
    return BenchResult(model_name, config, types[0] if len(types) > 1 else cache_dtype, list(contexts), variants,
                       kv_budget_bytes=kv_budget_bytes,
                       kv_budget_source=None if kv_budget_bytes is None else kv_budget_source, cache_types=types)


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
                               repeats: int = DEFAULT_REPEATS, cache_dtype: str | Sequence[str] = "f32",
                               fill: str = "direct",
                               token_ids: Sequence[int] = (1,)) -> list[tuple[int, float, list[float]]]:
    """Fill one fresh cache of capacity ``context`` per model and time decode steps at their ends.
    ``cache_dtype``: every model's KV cache type, or a sequence giving each model's (one model may
    appear several times, with different cache types).

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
        ValueError: context < decode_tokens, repeats < 1, an unknown fill method, or not one cache
            type per model.
    """
    dtypes = [cache_dtype] * len(models) if isinstance(cache_dtype, str) else list(cache_dtype)
    if len(dtypes) != len(models):
        raise ValueError(f"{len(dtypes)} cache types for {len(models)} models")
    if decode_tokens < 1 or repeats < 1 or context < decode_tokens:
        raise ValueError("need decode_tokens ≥ 1, repeats ≥ 1 and context ≥ decode_tokens")
    if fill not in FILL_METHODS:
        raise ValueError(f"fill must be one of {', '.join(FILL_METHODS)}, got {fill!r}")
    start = context - decode_tokens
    caches = []
    for model, dtype in zip(models, dtypes):
        cache = model.new_cache(context, dtype)
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
                   repeats: int = DEFAULT_REPEATS, cache_dtype: str = "f32", fill: str = "direct",
                   token_ids: Sequence[int] = (1,)) -> tuple[int, float, list[float]]:
    """:func:`measure_decode_interleaved` for one model: (measured_kv_bytes, median tokens/s, runs)."""
    return measure_decode_interleaved([model], context, decode_tokens, repeats, cache_dtype, fill, token_ids)[0]


def measure_batched_decode_interleaved(models: Sequence, context: int, batch_sizes: Sequence[int],
                                       decode_tokens: int = DEFAULT_DECODE_TOKENS, repeats: int = DEFAULT_REPEATS,
                                       cache_dtype: str | Sequence[str] = "f32",
                                       token_id: int = 1) -> list[dict[int, list[float]]]:
    """Aggregate decode speed of B sequences decoding together, each with ``context`` tokens of its
    own in its cache, for every B of ``batch_sizes`` and every model. ``cache_dtype``: the KV cache
    type of every model, or a sequence giving each model's (the same model twice with f16 and q8_0
    caches compares the cache types in one interleaved run).

    Per model, one :class:`~mqa_gen.cache.KVCachePool` of max(batch_sizes) slots, every slot
    filled directly (:func:`fill_direct`, distinct random rows per slot) to ``context −
    decode_tokens`` rows; then ``repeats + 1`` rounds (round 0 untimed), each running every B and
    every model in turn: rewind B slots and time ``decode_tokens`` batched decode steps
    (:meth:`~mqa_gen.models.base.Decoder.decode`), which bring each of them to ``context`` tokens.
    A step reads every weight once for the B rows and each sequence's own K/V rows, as
    llama-batched-bench's text-generation phase does (Shazeer 2019, §3: incremental batched
    decoding, where MQA's smaller cache pays).

    Returns:
        Per model, ``{B: [aggregate tokens/s (B · decode_tokens / seconds) of each timed run]}``.

    Raises:
        ValueError: context < decode_tokens, repeats < 1, a batch size < 1, or not one cache type
            per model.
    """
    from .cache import KVCachePool

    if decode_tokens < 1 or repeats < 1 or context < decode_tokens or min(batch_sizes) < 1:
        raise ValueError("need decode_tokens ≥ 1, repeats ≥ 1, batch sizes ≥ 1 and context ≥ decode_tokens")
    start = context - decode_tokens
    dtypes = [cache_dtype] * len(models) if isinstance(cache_dtype, str) else list(cache_dtype)
    if len(dtypes) != len(models):
        raise ValueError(f"{len(dtypes)} cache types for {len(models)} models")
    pools = []
    for model, dtype in zip(models, dtypes):
        c = model.config
        pool = KVCachePool(max(batch_sizes), c.n_layers, c.n_kv_heads, c.head_dim, context, dtype,
                           c.layer_windows)
        for slot, cache in enumerate(pool.caches):
            fill_direct(cache, start, seed=slot)
        pools.append(pool)
    runs: list[dict[int, list[float]]] = [{b: [] for b in batch_sizes} for _ in models]
    for round_ in range(repeats + 1):
        for b in batch_sizes:
            for model, pool, speeds in zip(models, pools, runs):
                caches = pool.caches[:b]
                for cache in caches:
                    rewind_for_timing(cache, start)
                tokens = [token_id] * b
                t0 = time.perf_counter()
                for _ in range(decode_tokens):
                    model.decode(tokens, caches)
                elapsed = time.perf_counter() - t0
                if round_ > 0:
                    speeds[b].append(b * decode_tokens / elapsed)
    return runs


def count_steps(n_variants: int, n_contexts: int, with_perplexity: bool, batched: bool = False) -> int:
    """Progress steps :func:`run_bench` reports: with perplexity, one for the native f32 reference
    and one per variant; one per context, and one more per context for batched decode."""
    return (n_variants + 1 if with_perplexity else 0) + n_contexts * (2 if batched else 1)


def batch_sizes_that_fit(batch_sizes: Sequence[int], bytes_per_sequence: Sequence[int],
                         budget_bytes: int | None) -> list[int]:
    """The batch sizes B whose caches fit the budget while every variant is measured at once:
    B × (sum of the variants' bytes per sequence) ≤ budget (all of them when the budget is None).
    :func:`measure_batched_decode_interleaved` holds B sequences' caches of every variant together."""
    if budget_bytes is None:
        return list(batch_sizes)
    together = sum(bytes_per_sequence)
    return [b for b in batch_sizes if b * together <= budget_bytes]


def run_bench(model_name: str, model, kv_heads: Sequence[int], contexts: Sequence[int], *,
              cache_dtype: str = "f32", decode_tokens: int = DEFAULT_DECODE_TOKENS,
              repeats: int = DEFAULT_REPEATS, fill: str = "direct", ppl_ids: Sequence[int] | None = None,
              ppl_text_name: str | None = None, decode_ids: Sequence[int] | None = None,
              batch_sizes: Sequence[int] = (), kv_budget_bytes: int | None = None,
              kv_budget_source: str | None = None, cache_types: Sequence[str] | None = None,
              on_step: Callable[[str], None] | None = None, on_done: Callable[[], None] | None = None) -> BenchResult:
    """Measure every variant at every context (see the module docstring).

    Perplexity runs variant by variant; decode speed runs context by context, all variants
    interleaved (:func:`measure_decode_interleaved`), so their speeds are compared under the same
    conditions; then, with ``batch_sizes``, batched decode the same way
    (:func:`measure_batched_decode_interleaved`). Peak memory is the model plus one cache per
    variant at the largest context, or with batches max(B) caches per variant; a B whose caches
    would exceed ``kv_budget_bytes`` (:func:`batch_sizes_that_fit`) is skipped (None in
    ``batch_decode_tokens_per_s``, listed in ``method["batch_skipped"]``).

    Args:
        model_name: shown in the result. model: the native model (``config``, ``new_cache``,
            ``forward``); each variant is :func:`~mqa_gen.regroup.regroup_model` of it.
        kv_heads, contexts: already checked (:func:`check_kv_heads`, :func:`check_contexts`).
        cache_types: KV-cache element types to compare (variants = KV heads × types); None = just
            ``cache_dtype``.
        ppl_ids: the perplexity window's token ids (None = no perplexity). With them, each variant
            also gets its KL divergence from, and top-1 agreement with, the native model with an f32
            cache on the same window (:mod:`mqa_gen.window_compare`).
        decode_ids: token ids fed to the decode steps (and to ``fill="prefill"``); default
            ``ppl_ids``, else token id 1. The speed does not depend on them.
        ppl_text_name: what to call the text in ``method``.
        batch_sizes: already checked (:func:`check_batch_sizes`); empty = no batched decode.
        kv_budget_bytes, kv_budget_source: the budget for ``fit_sequences`` (bytes) and where it
            came from (None = unknown: no fit column, and no batch size is skipped).
        on_step: called with a description before each step (:func:`count_steps` of them);
            on_done: after each.

    Returns:
        A :class:`BenchResult` with every column filled.

    Raises:
        RuntimeError: a measured byte count that differs from the formula (a broken cache).
    """
    from .window_compare import score_window, window_logits

    config = model.config
    result = formula_result(model_name, config, kv_heads, contexts, cache_dtype, kv_budget_bytes, kv_budget_source,
                            cache_types)
    result.batch_sizes = list(batch_sizes)
    batch_skipped: dict[str, list[int]] = {}
    token_ids = list(decode_ids or ppl_ids or [1])
    on_step = on_step or (lambda _: None)
    on_done = on_done or (lambda: None)
    t_start = time.perf_counter()
    by_heads = {n: regroup_model(model, n) for n in sorted({v.n_kv_heads for v in result.variants})}
    nets = [by_heads[v.n_kv_heads] for v in result.variants]  # one regrouped model per count, shared
    dtypes = [v.cache_dtype for v in result.variants]
    if ppl_ids:
        on_step(f"native f32 reference: logits on {len(ppl_ids)} tokens")
        reference = window_logits(model, ppl_ids, "f32")
        on_done()
        for variant, net in zip(result.variants, nets):
            on_step(f"{result.variant_name(variant)}: perplexity and KL on {len(ppl_ids)} tokens")
            score = score_window(window_logits(net, ppl_ids, variant.cache_dtype), ppl_ids, reference)
            variant.perplexity = score.perplexity
            variant.kl_vs_native_f32, variant.top1_agreement_vs_native_f32 = score.kl_mean, score.top1_agreement
            on_done()
        del reference
    for i, context in enumerate(result.contexts):
        on_step(f"decode at {context:,} tokens ({len(nets)} variant{'s' if len(nets) != 1 else ''} interleaved)")
        with fixed_threads():  # every variant at the same thread count
            measured = measure_decode_interleaved(nets, context, decode_tokens, repeats, dtypes, fill, token_ids)
        for variant, (held, speed, runs) in zip(result.variants, measured):
            point = variant.points[i]
            if held != point.kv_bytes:
                raise RuntimeError(f"{result.variant_name(variant)} at {context} tokens: cache holds {held} bytes, "
                                   f"formula says {point.kv_bytes}")
            point.measured_kv_bytes, point.decode_tokens_per_s, point.decode_runs_tokens_per_s = held, speed, runs
        del measured
        on_done()
        if batch_sizes:
            points = [v.points[i] for v in result.variants]
            fit = batch_sizes_that_fit(batch_sizes, [p.kv_bytes for p in points], kv_budget_bytes)
            skipped = [b for b in batch_sizes if b not in fit]
            on_step(f"batched decode at {context:,} tokens, B = {', '.join(map(str, fit)) or 'none that fit'}")
            with fixed_threads():
                runs = (measure_batched_decode_interleaved(nets, context, fit, decode_tokens, repeats, dtypes,
                                                           token_ids[0]) if fit else [{} for _ in nets])
            for point, by_size in zip(points, runs):
                for b in batch_sizes:
                    speeds = by_size.get(b, [])
                    point.batch_decode_runs_tokens_per_s[b] = speeds
                    point.batch_decode_tokens_per_s[b] = float(statistics.median(speeds)) if speeds else None
            if skipped:
                batch_skipped[str(context)] = skipped
            del runs
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
        "batch_sizes": list(batch_sizes),
        "batch_description": BATCH_DESCRIPTION if batch_sizes else None,
        "batch_skipped": batch_skipped,
        "seconds": time.perf_counter() - t_start,
    }
    return result


BATCH_DESCRIPTION = ("B sequences decode together, one batched step per token (every weight read once for "
                     "the B rows), each sequence with its own cache filled to the context by direct writes; "
                     "aggregate tokens/s = B x decode_tokens / seconds; a B whose caches (all variants "
                     "together) exceed the KV budget is skipped")


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


def batch_plot_context(result: BenchResult) -> int | None:
    """The context the batch panel of :func:`plot` shows: the largest one with the most batch sizes
    measured (every one, unless some were skipped for the budget); None when none was measured."""
    best, best_count = None, 0
    for i, context in enumerate(result.contexts):
        count = sum(v.points[i].batch_decode_tokens_per_s.get(b) is not None
                    for v in result.variants for b in result.batch_sizes)
        if count and count >= best_count:
            best, best_count = context, count
    return best


def plot(result: BenchResult, path: str) -> None:
    """With several cache types (``--cache-types``), :func:`plot_pareto`. Otherwise a PNG with two panels: KV-cache MiB vs context and decode tokens/s vs context, one line
    per variant (the decode panel says so when nothing was measured); with batch sizes measured, a
    third panel: aggregate decode tokens/s vs batch size at the largest context measured at every
    batch size (:func:`batch_plot_context`), one line per variant.

    Raises:
        BenchError: matplotlib is missing.
    """
    require_matplotlib()
    if len(result.cache_types) > 1:
        plot_pareto(result, path)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch_context = batch_plot_context(result) if result.measured else None
    if batch_context is None:
        fig, (ax_mem, ax_speed) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
        ax_batch = None
    else:
        fig, (ax_mem, ax_speed, ax_batch) = plt.subplots(1, 3, figsize=(16, 4.2), constrained_layout=True)
    for v in result.variants:
        xs = [p.context for p in v.points]
        mib = [(p.measured_kv_bytes if p.measured_kv_bytes is not None else p.kv_bytes) / 2**20 for p in v.points]
        ax_mem.plot(xs, mib, marker="o", label=f"{result.variant_name(v)}, {v.kv_bytes_per_token:,} B/token")
        if result.measured:
            ax_speed.plot(xs, [p.decode_tokens_per_s for p in v.points], marker="o", label=result.variant_name(v))
        if ax_batch is not None:
            point = v.points[result.contexts.index(batch_context)]
            measured = [(b, s) for b, s in sorted(point.batch_decode_tokens_per_s.items()) if s is not None]
            if measured:
                ax_batch.plot(*zip(*measured), marker="o", label=result.variant_name(v))
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
    if ax_batch is not None:
        ax_batch.set_title(f"batched decode, each sequence at {batch_context:,} tokens")
        ax_batch.set_ylabel("aggregate tokens/s (all sequences)")
        ax_batch.set_xlabel("batch size (sequences decoding together)")
        ax_batch.set_xscale("log", base=2)
        ax_batch.set_xticks(result.batch_sizes, [str(b) for b in result.batch_sizes])
        ax_batch.minorticks_off()
        ax_batch.set_ylim(bottom=0)
    for ax in (ax_mem, ax_speed, ax_batch):
        if ax is None:
            continue
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


#: Marker per KV-head kind and fill per cache type in :func:`plot_pareto`.
_PARETO_MARKERS = {"MQA": "v", "GQA": "o", "MHA": "s"}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (x, y) no other point beats on both — smaller or equal x and y, one of
    them strictly smaller — in ascending x. Lower is better on both axes (bytes, perplexity)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def label_offsets(points: Sequence[tuple[float, float]], widths: Sequence[float],
                  height: float = 11.0) -> list[tuple[int, int]]:
    """Offsets in points (x, y) for the labels of :func:`plot_pareto`'s markers: each label, placed
    left to right, takes the first of above right, below right, higher, lower whose box overlaps no
    label already placed (Gemma 3's MQA f32 and MHA q8_0 lie 6 % apart in bytes with equal
    perplexity; SmolLM2's native GQA with four cache types lies in one row), else above right.

    points: the markers in display units (points or pixels, y up); widths: each label's width and
    ``height`` a label's height in the same units.
    """
    candidates = [(5, 4), (5, -11), (5, 15), (5, -22)]
    offsets: list[tuple[int, int]] = [candidates[0]] * len(points)
    boxes: list[tuple[float, float, float, float]] = []  # x0, x1, y0, y1 of the labels placed

    def box(i: int, offset: tuple[int, int]) -> tuple[float, float, float, float]:
        x, y = points[i][0] + offset[0], points[i][1] + offset[1]
        return x, x + widths[i], y, y + height

    def overlaps(a, b, margin: float = 0.5) -> bool:  # boxes that only touch (to rounding) do not overlap
        return a[0] < b[1] - margin and b[0] < a[1] - margin and a[2] < b[3] - margin and b[2] < a[3] - margin

    for i in sorted(range(len(points)), key=lambda i: points[i]):
        free = [o for o in candidates if not any(overlaps(box(i, o), b) for b in boxes)]
        offsets[i] = free[0] if free else candidates[0]
        boxes.append(box(i, offsets[i]))
    return offsets


def _plain_log_formatter(minor: bool):
    """matplotlib's log-axis formatter (it decides which ticks get a label) writing 26.5 or 1,000
    rather than 2.65×10¹ — a perplexity axis often spans less than a decade."""
    from matplotlib.ticker import LogFormatterSciNotation

    class Plain(LogFormatterSciNotation):
        def __call__(self, x, pos=None):
            return (f"{x:,.0f}" if x >= 100 else f"{x:g}") if super().__call__(x, pos) else ""

    return Plain(labelOnlyBase=not minor)


def plot_pareto(result: BenchResult, path: str) -> None:
    """Write a PNG of the KV-cache shrinking study: KV bytes per token (x, log) against perplexity
    (y, log), one marker per variant (shape: MQA / GQA / MHA; label: KV heads and cache type), the
    Pareto front (no variant both smaller and better) joined by a line. Without perplexity
    (``--no-measure``, ``--ppl-tokens 0``) the markers sit on the x axis' bytes alone, and the
    figure says so.

    Raises:
        BenchError: matplotlib is missing.
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5), constrained_layout=True)
    measured = [v for v in result.variants if v.perplexity is not None]
    if measured:
        xy = [(float(v.kv_bytes_per_token), float(v.perplexity)) for v in measured]
        for v, (x, y) in zip(measured, xy):
            ax.scatter([x], [y], marker=_PARETO_MARKERS.get(v.label, "o"), s=55, zorder=3)
        front = pareto_front(xy)
        ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], color="grey", alpha=0.6, zorder=2,
                label="Pareto front")
        ax.set_yscale("log")
        ax.set_ylabel(f"perplexity (first {result.method.get('perplexity_tokens', '?')} tokens)")
        ax.legend(loc="upper right")
    else:
        for v in result.variants:
            ax.axvline(v.kv_bytes_per_token, color="grey", alpha=0.4)
        ax.text(0.5, 0.5, "perplexity not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel("perplexity")
    ax.set_xscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        if axis.get_scale() == "log":
            axis.set_major_formatter(_plain_log_formatter(minor=False))
            axis.set_minor_formatter(_plain_log_formatter(minor=True))
    ax.set_xlabel("KV cache bytes per token (log)")
    ax.grid(True, which="both", alpha=0.3)
    name = result.config.name or result.model
    ax.set_title(f"{name}: KV heads (MQA / GQA / MHA) x cache type ({', '.join(result.cache_types)})", fontsize=9)
    if measured:
        # labels last: their places depend on where the markers land once the layout is done
        fig.canvas.draw()
        to_points = 72 / fig.dpi  # display units are pixels at the figure's dpi; labels are sized in points
        where = [tuple(p * to_points) for p in ax.transData.transform(xy)]
        names = [result.variant_name(v) for v in measured]
        for name, (x, y), offset in zip(names, xy, label_offsets(where, [len(n) * 4.2 for n in names])):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=offset, fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)
