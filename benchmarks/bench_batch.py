#!/usr/bin/env python3
"""Batched decode: aggregate tokens/s for B sequences decoding together, by KV heads, against
llama.cpp's ``llama-batched-bench`` on the same GGUF.

For each model, context C and batch size B, every sequence holds C − ``--decode-tokens`` tokens
of its own in its KV cache, then ``--decode-tokens`` decode steps run for all B together; the
figure is B × decode tokens / seconds (llama-batched-bench's ``S_TG``). mqa-gen runs its variants
(SmolLM2: 1, native 3 and 9 KV heads; Gemma 3: native 1 and 4) from one process, all interleaved
(:func:`mqa_gen.bench_cache.measure_batched_decode_interleaved`, caches filled directly with random
rows: a step's cost depends on how many rows it reads, not their values). llama.cpp runs the
native model as ``llama-batched-bench -pps`` (one prompt prefilled, then copied into each
sequence's own cache stream: the same bytes per step as B distinct prompts) with ``-npp C − T
-ntg T -npl 1,2,…``. Rounds alternate mqa-gen and llama.cpp; figures are medians over rounds.
Both use float16 caches and the same thread count. Example::

    python benchmarks/bench_batch.py --llama-batched-bench /path/to/build/bin/llama-batched-bench

Writes the ``batched-decode`` section of BENCHMARKS.md (``--no-write`` to only print).

``--cache-types f16,q8_0,q4_0`` compares KV-cache element types instead (issue 17): every variant
runs once per type, all interleaved in one process (a step's cost now depends on the bytes each
cached row takes: 128 for an f16 row of 64, 68 for q8_0, 36 for q4_0), and llama-batched-bench runs
once per type with ``-ctk T -ctv T``. ``--native-only`` keeps the model's own KV heads. This writes
the ``kv-quant`` section instead, a table per model and context with each type's tokens/s and its
ratio to f16, for mqa-gen and llama.cpp::

    python benchmarks/bench_batch.py --models smollm2-135m-instruct,gemma3-270m --contexts 4096 \
        --batch-sizes 1,4 --cache-types f16,q8_0,q4_0 --native-only --rounds 5 \
        --llama-batched-bench /path/to/build/bin/llama-batched-bench

``--int8-dot`` runs mqa-gen's variants with int8 dot products (the CLI's ``--int8-dot``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from report_section import loadavg, write_section

REPO = Path(__file__).resolve().parent.parent
SECTION = "batched-decode"
QUANT_SECTION = "kv-quant"
MODELS = {"smollm2-135m-instruct": "SmolLM2-135M Q4_1", "gemma3-270m": "Gemma 3 270M Q4_K_M"}


def variants(model, native_only: bool = False):
    """(label, model) for MQA, the native grouping and MHA, without repeats (Gemma 3 is MQA); only
    the native grouping with ``native_only``."""
    from mqa_gen.regroup import regroup_model

    c = model.config
    out = []
    for kv in sorted({c.n_kv_heads} if native_only else {1, c.n_kv_heads, c.n_heads}):
        label = f"{kv} KV" + (" (native)" if kv == c.n_kv_heads else "") + (" MQA" if kv == 1 else "") + \
            (" MHA" if kv == c.n_heads else "")
        out.append((label, model if kv == c.n_kv_heads else regroup_model(model, kv)))
    return out


def run_llama(exe: str, gguf: str, context: int, decode_tokens: int, batch_sizes: list[int], threads: int,
              cache_type: str = "f16", flash_attn: str | None = None, prefill_threads: int | None = None) -> dict:
    """llama-batched-bench's S_TG (aggregate generated tokens/s) per B, from its JSONL output, with
    K and V caches of ``cache_type`` (llama.cpp's names: f16, q8_0, q4_0, …) and ``-fa flash_attn``
    when given (llama.cpp quantises the V cache only with flash attention, so a comparison of cache
    types runs every type with ``-fa on``). Decode runs on ``threads`` (``-t``), the untimed prompt
    prefill on ``prefill_threads`` (``-tb``; default the same)."""
    n_ctx = max(batch_sizes) * (context + 1)  # non-unified: each sequence's stream gets n_ctx / max B
    cmd = [exe, "-m", gguf, "-c", str(n_ctx), "-b", "2048", "-ub", "512", "-npp", str(context - decode_tokens),
           "-ntg", str(decode_tokens), "-npl", ",".join(map(str, batch_sizes)), "-t", str(threads), "-tb",
           str(prefill_threads or threads), "-pps", "-ctk", cache_type, "-ctv", cache_type, "--output-format", "jsonl"]
    if flash_attn is not None:
        cmd[-2:-2] = ["-fa", flash_attn]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"llama-batched-bench failed ({proc.returncode}): {proc.stderr[-2000:]}")
    speeds = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{") and '"speed_tg"' in line:
            row = json.loads(line)
            speeds[int(row["pl"])] = float(row["speed_tg"])
    return {"speeds": speeds, "command": " ".join(cmd)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--contexts", default="512,2048")
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="alternating mqa-gen / llama.cpp rounds (medians)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llama-prefill-threads", type=int, default=None,
                   help="llama-batched-bench's -tb, the threads of its untimed prompt prefill (default --threads)")
    p.add_argument("--cache-types", default="f16",
                   help="KV-cache types to compare, llama.cpp's names (default f16; more than f16 writes the "
                        "kv-quant section)")
    p.add_argument("--native-only", action="store_true", help="only the model's own KV-head count")
    p.add_argument("--int8-dot", action="store_true", help="mqa-gen with int8 dot products (the CLI's --int8-dot)")
    p.add_argument("--llama-batched-bench", default=None, help="the llama-batched-bench binary (none: skip)")
    p.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args()
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import mqa_gen  # noqa: F401  (sets the BLAS threads before NumPy loads)
    from mqa_gen.bench_cache import measure_batched_decode_interleaved
    from mqa_gen.kv_storage import canonical_name
    from mqa_gen.loading import load

    contexts = [int(c) for c in args.contexts.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    cache_types = [canonical_name(t.strip()) for t in args.cache_types.split(",")]
    quant = cache_types != ["f16"]
    started, load_start = time.time(), loadavg()
    loads = [load_start[0]]
    report = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "cpu": platform.processor() or platform.machine(),
              "threads": args.threads, "decode_tokens": args.decode_tokens, "rounds": args.rounds,
              "cache_types": cache_types, "models": {}}
    for name in args.models.split(","):
        loaded = load(name)
        vs = variants(loaded.model, args.native_only)
        for _, model in vs:
            model.set_int8_dot(args.int8_dot)
        # Every (KV heads, cache type) pair is one variant; all of them interleave within a round.
        runs_of = [(label if not quant else f"{label} {t}", model, t) for label, model in vs for t in cache_types]
        per_model = report["models"][name] = {}
        for context in contexts:
            ours = {label: {b: [] for b in batch_sizes} for label, _, _ in runs_of}
            theirs = {t: {b: [] for b in batch_sizes} for t in cache_types}
            commands = {}
            for round_ in range(args.rounds):
                print(f"[bench] {name} context {context}: round {round_ + 1} of {args.rounds}", file=sys.stderr)
                runs = measure_batched_decode_interleaved([m for _, m, _ in runs_of], context, batch_sizes,
                                                          args.decode_tokens, repeats=1,
                                                          cache_dtype=[t for _, _, t in runs_of])
                for (label, _, _), r in zip(runs_of, runs):
                    for b in batch_sizes:
                        ours[label][b] += r[b]
                loads.append(loadavg()[0])
                if args.llama_batched_bench:
                    for t in cache_types:
                        llama = run_llama(args.llama_batched_bench, loaded.path, context, args.decode_tokens,
                                          batch_sizes, args.threads, t, "on" if quant else None,
                                          args.llama_prefill_threads)
                        commands[t] = llama["command"]
                        for b, v in llama["speeds"].items():
                            theirs[t][b].append(v)
                        loads.append(loadavg()[0])
            native = next(label for label, _, _ in runs_of if "native" in label)
            per_model[context] = {
                "mqa-gen": {label: {b: statistics.median(v) for b, v in d.items()} for label, d in ours.items()},
                "mqa-gen runs": ours,
                "llama.cpp": {b: statistics.median(v) for b, v in theirs[cache_types[0]].items() if v},
                "llama.cpp runs": theirs[cache_types[0]], "llama.cpp command": commands.get(cache_types[0]),
                "llama.cpp by type": {t: {b: statistics.median(v) for b, v in d.items() if v}
                                      for t, d in theirs.items()},
                "llama.cpp runs by type": theirs, "llama.cpp commands": commands,
                "native": native,
            }
            print(quant_table(name, context, per_model[context], batch_sizes, cache_types) if quant
                  else table(name, context, per_model[context], batch_sizes))
    report["load"] = {"start": load_start[0], "max": max(loads), "median": statistics.median(loads)}
    report["seconds"] = time.time() - started
    body = quant_markdown(report, batch_sizes, args) if quant else markdown(report, batch_sizes, args)
    print(body)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    if not args.no_write:
        write_section(Path(args.output), QUANT_SECTION if quant else SECTION, body)


def table(name: str, context: int, r: dict, batch_sizes: list[int]) -> str:
    """One markdown table: a row per B; tok/s per variant, llama.cpp, and the ratios."""
    labels = list(r["mqa-gen"])
    native, mqa, mha = r["native"], labels[0], labels[-1]
    head = ["B", *[f"mqa-gen {label}" for label in labels]]
    llama = r["llama.cpp"]
    if llama:
        head += ["llama.cpp (native)", "native / llama.cpp"]
    head += ["native: × B=1", f"{mqa.split()[0]} KV / {mha.split()[0]} KV"]
    lines = [f"**{MODELS.get(name, name)}, context {context}** (aggregate decode tokens/s)", "",
             "| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    base = r["mqa-gen"][native][batch_sizes[0]]
    for b in batch_sizes:
        row = [str(b), *[f"{r['mqa-gen'][label][b]:.1f}" for label in labels]]
        if llama:
            row += [f"{llama[b]:.1f}" if b in llama else "—",
                    f"{r['mqa-gen'][native][b] / llama[b]:.2f}×" if b in llama else "—"]
        row += [f"{r['mqa-gen'][native][b] / base:.2f}×", f"{r['mqa-gen'][mqa][b] / r['mqa-gen'][mha][b]:.2f}×"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown(report: dict, batch_sizes: list[int], args) -> str:
    load = report["load"]
    parts = ["## Batched decode: aggregate tokens/s by batch size and KV heads (issue 13)", "",
             f"{report['date']}, {report['cpu']}, {report['threads']} threads, float16 KV caches, "
             f"{report['decode_tokens']} decode steps per run, median of {report['rounds']} rounds alternating "
             f"mqa-gen and llama.cpp; load average 1 min: {load['start']:.2f} at start, median {load['median']:.2f}, "
             f"max {load['max']:.2f}; {report['seconds'] / 60:.0f} min in all.", "",
             "Command: `python benchmarks/bench_batch.py"
             + (" --llama-batched-bench PATH" if args.llama_batched_bench else "")
             + f" --models {args.models} --contexts {args.contexts} --batch-sizes {args.batch_sizes}"
             + (" --native-only" if args.native_only else "") + (" --int8-dot" if args.int8_dot else "")
             + f" --rounds {args.rounds}`", ""]
    for name, per_model in report["models"].items():
        for context, r in per_model.items():
            parts += [table(name, context, r, batch_sizes), ""]
            if r["llama.cpp command"]:
                parts += [f"llama.cpp: `{r['llama.cpp command'].replace(str(Path.home()), '~')}`", ""]
    return "\n".join(parts)


def quant_table(name: str, context: int, r: dict, batch_sizes: list[int], cache_types: list[str]) -> str:
    """One markdown table of a cache-type comparison: a row per (KV heads, B); per type mqa-gen's
    tokens/s and its ratio to f16, then llama.cpp's likewise (native model only)."""
    labels = list(r["mqa-gen"])
    groups = list(dict.fromkeys(label.rsplit(" ", 1)[0] for label in labels))
    base = "f16" if "f16" in cache_types else cache_types[0]
    others = [t for t in cache_types if t != base]
    head = ["KV heads", "B", *[f"mqa-gen {t}" for t in cache_types], *[f"{t} / {base}" for t in others]]
    llama = r["llama.cpp by type"]
    if any(llama.values()):
        head += [*[f"llama.cpp {t}" for t in cache_types], *[f"llama.cpp {t} / {base}" for t in others]]
    lines = [f"**{MODELS.get(name, name)}, context {context}** (aggregate decode tokens/s)", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for group in groups:
        for b in batch_sizes:
            ours = {t: r["mqa-gen"][f"{group} {t}"][b] for t in cache_types}
            row = [group, str(b), *[f"{ours[t]:.1f}" for t in cache_types],
                   *[f"{ours[t] / ours[base]:.2f}×" for t in others]]
            if any(llama.values()):
                native = "native" in group
                theirs = {t: llama[t].get(b) if native else None for t in cache_types}
                row += [f"{theirs[t]:.1f}" if theirs[t] else "—" for t in cache_types]
                row += [f"{theirs[t] / theirs[base]:.2f}×" if theirs[t] and theirs[base] else "—" for t in others]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def quant_markdown(report: dict, batch_sizes: list[int], args) -> str:
    load = report["load"]
    types = ", ".join(report["cache_types"])
    parts = ["## Quantised KV caches (issue 17)", "",
             f"{report['date']}, {report['cpu']}, {report['threads']} threads, KV caches {types} "
             f"(llama.cpp's block formats), {report['decode_tokens']} decode steps per run, each sequence's "
             f"cache filled to the context first; median of {report['rounds']} rounds, mqa-gen's cache types "
             f"interleaved within each round, then llama-batched-bench once per type (`-fa on`, which llama.cpp "
             f"needs for a quantised V cache); load average 1 min: {load['start']:.2f} at start, median "
             f"{load['median']:.2f}, max {load['max']:.2f}; {report['seconds'] / 60:.0f} min in all.", "",
             "Command: `python benchmarks/bench_batch.py"
             + (" --llama-batched-bench PATH" if args.llama_batched_bench else "")
             + f" --models {args.models} --contexts {args.contexts} --batch-sizes {args.batch_sizes}"
             + f" --cache-types {args.cache_types}" + (" --native-only" if args.native_only else "")
             + (" --int8-dot" if args.int8_dot else "")
             + f" --rounds {args.rounds} --decode-tokens {args.decode_tokens} --threads {args.threads}"
             + (f" --llama-prefill-threads {args.llama_prefill_threads}" if args.llama_prefill_threads else "") + "`",
             ""]
    for name, per_model in report["models"].items():
        for context, r in per_model.items():
            parts += [quant_table(name, context, r, batch_sizes, report["cache_types"]), ""]
            for t, command in r["llama.cpp commands"].items():
                parts += [f"llama.cpp {t}: `{command.replace(str(Path.home()), '~')}`", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
