"""``mqa-gen bench-cache``: what MQA buys — KV bytes, decode speed and perplexity per KV grouping.

A thin layer over :mod:`mqa_gen.bench_cache` (README documents the contract; the module docstring
says what is measured and how).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from fractions import Fraction

import click

from .common import (
    cache_dtype_option,
    ensure_kernels,
    load_model,
    model_option,
    output_path_problem,
    set_threads,
    stderr,
    threads_option,
)

CSV_COLUMNS = ["model", "variant", "label", "n_kv_heads", "native", "cache_dtype", "context", "kv_bytes_per_token",
               "kv_bytes", "kv_mib", "ratio_to_mha", "measured_kv_bytes", "measured_equals_formula",
               "decode_tokens_per_s", "decode_speed_ratio_to_mha", "perplexity", "kv_budget_bytes", "fit_sequences",
               "kl_vs_native_f32", "top1_agreement_vs_native_f32"]


def csv_columns(result) -> list[str]:
    """:data:`CSV_COLUMNS`, then one ``decode_tokens_per_s_b<B>`` column per batch size measured."""
    from ..bench_cache import batch_column

    return CSV_COLUMNS + [batch_column(b) for b in result.batch_sizes]


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.0f} MiB"


def _num(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def print_table(result) -> None:
    """The rich table on stdout: one row per variant × context, ratios in their own columns."""
    from .common import StdoutConsole
    from rich.table import Table

    from ..bench_cache import batch_column

    console = StdoutConsole()
    if not console.is_terminal:
        console = StdoutConsole(width=190 + 14 * len(result.batch_sizes))
    fits = result.kv_budget_bytes is not None
    study = len(result.cache_types) > 1  # KV heads x cache types: KL columns (the run always has them)
    cfg = result.config
    table = Table(title=f"KV cache of {cfg.name or result.model} ({cfg.n_layers} layers, {cfg.n_heads} query "
                        f"heads, head_dim {cfg.head_dim}), {', '.join(result.cache_types)} cache")
    table.add_column("variant")
    table.add_column("KV heads", justify="right")
    table.add_column("bytes/token", justify="right")
    table.add_column("context", justify="right")
    table.add_column("KV cache", justify="right")
    table.add_column("÷ MHA", justify="right")
    if fits:
        table.add_column("seqs in budget", justify="right")
    if result.measured:
        table.add_column("measured bytes", justify="right")
        table.add_column("= formula", justify="center")
        table.add_column("decode tok/s", justify="right")
        table.add_column("tok/s ÷ MHA", justify="right")
        for b in result.batch_sizes:
            table.add_column(f"decode tok/s B={b}", justify="right")
        table.add_column("perplexity", justify="right")
        if study:
            table.add_column("KL vs f32 native", justify="right")
            table.add_column("top-1 = f32 native", justify="right")
    previous = None
    for row in result.rows():
        first = row["variant"] != previous
        if first and previous is not None:
            table.add_section()
        previous = row["variant"]
        ratio = Fraction(row["n_kv_heads"], cfg.n_heads)
        cells = [row["variant"] if first else "", str(row["n_kv_heads"]) if first else "",
                 f"{row['kv_bytes_per_token']:,}" if first else "", f"{row['context']:,}",
                 f"{row['kv_mib']:,.1f} MiB",
                 f"{row['ratio_to_mha']:.3f}" if study else f"{row['ratio_to_mha']:.3f} ({ratio})"]
        if fits:
            cells.append(f"{row['fit_sequences']:,}")
        if result.measured:
            same = row["measured_equals_formula"]
            cells += [_num(row["measured_kv_bytes"], ","), "[green]yes[/green]" if same else "[red]NO[/red]",
                      _num(row["decode_tokens_per_s"], ",.1f"), _num(row["decode_speed_ratio_to_mha"], ".2f")]
            cells += [_num(row[batch_column(b)], ",.1f") for b in result.batch_sizes]
            cells.append(_num(row["perplexity"], ",.3f") if first else "")
            if study:
                cells.append(_num(row["kl_vs_native_f32"], ".5f") if first else "")
                top1 = row["top1_agreement_vs_native_f32"]
                cells.append(("—" if top1 is None else f"{100 * top1:.1f} %") if first else "")
        table.add_row(*cells)
    if result.measured:
        m = result.method
        ppl = (f"perplexity: first {m['perplexity_tokens']} tokens of {m['perplexity_text']}"
               if m["perplexity_tokens"] else "perplexity: not measured")
        table.caption = (f"decode tok/s: median of {m['repeats']} runs × {m['decode_tokens']} decode steps "
                         f"(after 1 warm-up run; variants interleaved), {m['threads']} thread(s); {m['fill_description']}. ")
        if result.batch_sizes:
            table.caption += ("decode tok/s B=N: aggregate tokens/s of N sequences decoding together, each with its "
                              "own cache filled to the context, one batched step per token (same runs and median)")
            skipped = m.get("batch_skipped") or {}
            if skipped:
                table.caption += ("; — = skipped, the caches of every variant together would exceed the KV budget ("
                                  + ", ".join(f"B={','.join(map(str, bs))} at {int(c):,}" for c, bs in skipped.items())
                                  + ")")
            table.caption += ". "
        table.caption += f"{ppl}. Measured in {m['seconds']:.0f} s"
    else:
        table.caption = ("formulas only (--no-measure): bytes/token = 2 × n_layers × n_kv_heads × head_dim × bytes per "
                         "element (4 f32, 2 f16, 34/32 q8_0, 18/32 q4_0)")
    if study:
        table.caption += (". ÷ MHA: bytes over MHA's with an f32 cache; tok/s ÷ MHA: over MHA with the same cache "
                          "type")
        if result.measured and result.method["perplexity_tokens"]:
            table.caption += ("; KL vs f32 native: mean KL(native KV heads, f32 cache ‖ variant) over the perplexity "
                              "window, nats, whole vocabulary; top-1: positions whose most likely token is the same")
    sliding = [w for w in cfg.layer_windows if w]
    if sliding:
        table.caption += (f". Sliding-window layers: {len(sliding)} of {cfg.n_layers} keep at most {max(sliding):,} "
                          "tokens (a ring buffer), so the KV cache grows by bytes/token only until the window "
                          "is full, then by the global layers' share.")
    console.print(table)
    if fits:  # the budget on a line of its own, so that it is easy to find (and to grep)
        console.print(f"KV budget {_mib(result.kv_budget_bytes)} ({result.kv_budget_source}); seqs in budget = "
                      "budget // KV cache of one sequence of that context", soft_wrap=True)


def write_csv(result, out) -> None:
    """One CSV row per variant × context, header :func:`csv_columns`; empty cells when not measured
    (or, in a batch column, when that batch size was skipped)."""
    writer = csv.DictWriter(out, fieldnames=csv_columns(result), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in result.rows():
        writer.writerow({k: ("" if v is None else v) for k, v in {"model": result.model, **row}.items()})


def read_config(model: str):
    """The model's config from GGUF metadata only (no weights are read)."""
    from ..models import config_from_gguf
    from ..gguf_file import read_gguf
    from ..registry import resolve_model

    return config_from_gguf(read_gguf(resolve_model(model)))


def check_plot_path(path: str) -> None:
    """Refuse a ``--plot`` file that could not be written — a missing folder, a format matplotlib
    does not write — before minutes of measuring.

    Raises:
        BenchError: the folder does not exist, or the extension is not an image format.
    """
    from matplotlib.figure import Figure

    from .. import bench_cache as bench

    problem = output_path_problem(path)
    if problem is not None:
        raise bench.BenchError(f"--plot {path}: {problem}")
    formats = Figure().canvas.get_supported_filetypes()
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    if extension not in formats:
        raise bench.BenchError(f"--plot {path}: not an image format matplotlib writes "
                               f"({', '.join(sorted(formats))})")


@click.command("bench-cache")
@model_option
@click.option("--contexts", default=None, metavar="N,N,…",
              help="Context lengths to measure at, in tokens (comma-separated, each ≤ the model's context). "
                   "Default 512,2048,8192; 512,4096,16384 for a model with sliding-window layers (Gemma 3).")
@click.option("--kv-heads", default=None, metavar="N,N,…",
              help="KV-head counts to compare (default: 1 = MQA, the native count, n_heads = MHA).")
@cache_dtype_option()
@click.option("--cache-types", default=None, metavar="T,T,…",
              help="Compare KV-cache element types too: variants = KV heads × these types (f32, f16, q8_0, "
                   "q4_0), each with its KL divergence and top-1 agreement against the native model with an "
                   "f32 cache; --plot then draws KV bytes/token against perplexity. Default: --cache-dtype alone.")
@click.option("--decode-tokens", type=click.IntRange(min=1), default=8, show_default=True,
              help="Decode steps per timed run.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed runs per point (the median is reported; one extra warm-up run is not timed).")
@click.option("--fill", type=click.Choice(["direct", "prefill"]), default="direct", show_default=True,
              help="How the cache is filled before the timed steps: direct row writes, or a real prefill (slow).")
@click.option("--ppl-text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Text for perplexity (default: the English text shipped with the package).")
@click.option("--ppl-tokens", type=click.IntRange(min=0), default=512, show_default=True,
              help="Perplexity window in tokens (0 = skip perplexity).")
@click.option("--batch-sizes", default=None, metavar="B,B,…",
              help="Also measure batched decode: aggregate tokens/s of B sequences decoding together, each "
                   "with its own cache filled to the context, for each B (comma-separated, each ≥ 1), all "
                   "variants interleaved. Default: none. A B whose caches (all variants together) exceed "
                   "--kv-budget is skipped.")
@click.option("--kv-budget", default=None, metavar="MIB",
              help="KV-cache memory budget in MiB for the 'seqs in budget' column (sequences of each context "
                   "that fit) and for --batch-sizes (default: 90% of the memory available, MemAvailable).")
@click.option("--no-measure", is_flag=True, help="Only the formula columns (instant; reads no weights).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout (the fields README documents).")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV on stdout, one row per variant × context.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, metavar="FILE.png",
              help="Also write a figure: KV MiB and decode tok/s against context, and with --batch-sizes "
                   "aggregate decode tok/s against batch size (needs matplotlib: pip install 'mqa-gen[plot]').")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@threads_option
def bench_cache(model, contexts, kv_heads, cache_dtype, cache_types, decode_tokens, repeats, fill, ppl_text, ppl_tokens,
                batch_sizes, kv_budget, no_measure, as_json, as_csv, plot_path, quiet, threads):
    """Compare MQA, GQA and MHA on a real model: KV bytes per token and per context (formula and
    measured), sequences that fit a KV budget, decode tokens/s as the cache fills (one sequence,
    and with --batch-sizes B sequences together), and perplexity of each grouping."""
    from .. import bench_cache as bench

    if as_json and as_csv:
        raise bench.BenchError("give at most one of --json and --csv")
    context_list = bench.parse_int_list(contexts, "--contexts") if contexts is not None else None
    kv_list = bench.parse_int_list(kv_heads, "--kv-heads") if kv_heads is not None else None
    batch_list = (bench.check_batch_sizes(bench.parse_int_list(batch_sizes, "--batch-sizes"))
                  if batch_sizes is not None else [])
    if batch_list and no_measure:
        raise bench.BenchError("--batch-sizes measures decode speed; it cannot be used with --no-measure")
    budget_bytes = bench.parse_kv_budget(kv_budget) if kv_budget is not None else None
    if plot_path is not None:
        bench.require_matplotlib()  # fail before minutes of measuring
        check_plot_path(plot_path)

    config = read_config(model)
    kv_list = bench.check_kv_heads(config, kv_list if kv_list is not None else bench.default_kv_heads(config))
    if context_list is None:
        context_list = list(bench.default_contexts(config))
    context_list = bench.check_contexts(config, context_list, None if no_measure else decode_tokens)
    cache_dtype = bench.check_cache_dtype(cache_dtype, config)  # before loading weights
    type_list = bench.check_cache_types(cache_types.split(","), config) if cache_types is not None else None

    if no_measure:
        result = bench.formula_result(model, config, kv_list, context_list, cache_dtype, *_budget(bench, budget_bytes),
                                      cache_types=type_list)
    else:
        result = _measure(bench, model, kv_list, context_list, cache_dtype, decode_tokens, repeats, fill,
                          ppl_text, ppl_tokens, quiet, threads, batch_list, budget_bytes, type_list)

    if as_json:
        json.dump(result.as_dict(), sys.stdout)
        sys.stdout.write("\n")
    elif as_csv:
        write_csv(result, sys.stdout)
    else:
        print_table(result)
    sys.stdout.flush()
    if plot_path is not None:
        bench.plot(result, plot_path)
        if not quiet:
            stderr.print(f"[dim]plot written to {plot_path}[/dim]")


def _budget(bench, budget_bytes: int | None) -> tuple[int | None, str | None]:
    """(bytes, source) of the KV budget: ``--kv-budget``, else 90 % of the memory available now."""
    return (budget_bytes, "--kv-budget") if budget_bytes is not None else bench.default_kv_budget()


def _measure(bench, model, kv_list, context_list, cache_dtype, decode_tokens, repeats, fill, ppl_text,
             ppl_tokens, quiet, threads, batch_list, budget_bytes, type_list=None):
    """Load the model and run every measurement, with a progress bar on stderr. The default KV
    budget is taken once the model is loaded (the memory still available for caches)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from ..perplexity import DEFAULT_TEXT, read_text, window_ids

    set_threads(threads)
    text = read_text(ppl_text)
    loaded = load_model(model, quiet)
    ensure_kernels(quiet)
    ppl_ids = window_ids(loaded.tokenizer, text, min(ppl_tokens, loaded.config.context_length)) if ppl_tokens else None
    decode_ids = loaded.tokenizer.encode(text)  # inputs of the decode steps and of --fill prefill
    text_name = os.path.relpath(ppl_text) if ppl_text else f"mqa_gen/data/{DEFAULT_TEXT.name}"

    budget, budget_source = _budget(bench, budget_bytes)

    total = bench.count_steps(len(kv_list) * len(type_list or [cache_dtype]), len(context_list), ppl_ids is not None, bool(batch_list))
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=stderr, disable=quiet, transient=stderr.is_terminal)
    with progress:
        task = progress.add_task("bench-cache", total=total)
        result = bench.run_bench(
            loaded.name, loaded.model, kv_list, context_list, cache_dtype=cache_dtype, decode_tokens=decode_tokens,
            repeats=repeats, fill=fill, ppl_ids=ppl_ids, ppl_text_name=text_name,
            on_step=lambda d: progress.update(task, description=d),
            on_done=lambda: progress.advance(task),
            decode_ids=decode_ids, batch_sizes=batch_list, kv_budget_bytes=budget, kv_budget_source=budget_source,
            cache_types=type_list,
        )
        progress.update(task, description=f"bench-cache: measured in {result.method['seconds']:.0f} s")
    return result
