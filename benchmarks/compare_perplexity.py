#!/usr/bin/env python3
"""Perplexity of mqa-gen against llama.cpp's ``llama-perplexity``: same GGUF, same text, same chunks.

For each model and each KV-cache type, in one run:

* ``llama-perplexity -m MODEL -f TEXT -c CTX -b CTX --chunks N -t T -ctk TYPE -ctv TYPE -fa on``
  (a quantised V cache needs flash attention in llama.cpp — without ``-fa on`` it refuses with
  "quantized V cache requires flash_attn to be enabled" — so every type runs with ``-fa on``, and
  f16 once more with ``-fa off``, llama.cpp's non-flash path, as a second reference);
* ``mqa-gen perplexity TEXT -m MODEL --ctx CTX --chunks N --cache-dtype TYPE -t T --json`` from
  this checkout (``python -c 'from mqa_gen.cli import main; main()'`` with the checkout first on
  ``PYTHONPATH``, so the installed mqa-gen does not matter).

Both implement the same method (mqa_gen/perplexity_chunks.py: chunks of CTX tokens from an empty
cache, scored on their second half), so the values should agree to the rounding of the two
implementations (kernels, float16 rounding of Q in llama.cpp's flash attention, quantised K/V). The
report gives each value with llama-perplexity's standard error, and the relative difference
(mqa-gen − llama.cpp) / llama.cpp, plus the wall time of each run (not a speed benchmark: one
thread, on a shared machine). A cache type our CLI does not accept (``--cache-dtype q8_0`` before
the quantised caches land) is skipped and the report says so. A third table sets each tool's
quantised cache against its own f16 cache ((type − f16) / f16, :func:`cache_deltas`): what the
quantisation costs within one implementation, which is the figure to compare across the tools.

A second table checks all three against the transformers oracle where the windows match: the
oracle fixture ``tests/fixtures/<model>/perplexity.json`` holds every token's nll over one window
of ``mqa_gen/data/ppl_english.txt`` from its start (Gemma: from BOS), which is the first chunk of
both tools for any ctx up to that window (424 tokens for SmolLM2, which the 849-token text
allows twice; 256 for Gemma 3). Both run ``--chunks 1`` with an f32 cache there, and the
oracle's value is exp(mean nll over positions ctx/2 … ctx−2).

Results go to stdout and to the "Perplexity against llama-perplexity (issue 17)" section of
``BENCHMARKS.md`` (only the text between ``<!-- perplexity-vs-llama -->`` and its end marker is
replaced).

Example (several minutes: nice it on a shared machine)::

    nice -n 19 python benchmarks/compare_perplexity.py --cache-types f16,q8_0
    python benchmarks/compare_perplexity.py --models smollm2-135m-instruct --chunks 2 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from report_section import loadavg, write_section

REPO = Path(__file__).resolve().parent.parent
SECTION = "perplexity-vs-llama"
TITLE = "Perplexity against llama-perplexity (issue 17)"
DEFAULT_LLAMA = ("/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-perplexity")
#: llama.cpp's cache type → the names our --cache-dtype may know it by, newest first.
OUR_NAMES = {"f32": ["f32", "float32"], "f16": ["f16", "float16"], "q8_0": ["q8_0"], "q4_0": ["q4_0"]}
FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
CHUNKS = re.compile(r"calculating perplexity over (\d+) chunks")
#: model name → (fixture folder, the ctx whose first chunk is the oracle's window cut short).
ORACLE_WINDOWS = {"smollm2-135m-instruct": ("smollm2", 424), "gemma3-270m": ("gemma3", 256)}
MQA_GEN = "import sys; from mqa_gen.cli import main; sys.argv[0] = 'mqa-gen'; main()"


def model_path(name: str) -> str:
    sys.path.insert(0, str(REPO))
    from mqa_gen.registry import resolve_model

    return resolve_model(name)


def run_llama(exe: str, model: str, text: str, ctx: int, chunks: int, threads: int, cache: str, fa: str,
              timeout: int) -> dict:
    cmd = [exe, "-m", model, "-f", text, "-c", str(ctx), "-b", str(ctx), "--chunks", str(chunks), "-t", str(threads),
           "-ctk", cache, "-ctv", cache, "-fa", fa]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    seconds = time.perf_counter() - t
    out = proc.stdout + proc.stderr
    final, n = FINAL.search(out), CHUNKS.search(out)
    if proc.returncode != 0 or final is None:
        errors = [line for line in out.splitlines() if " E " in line or "error" in line.lower()]
        return {"error": (errors[-1] if errors else f"exit {proc.returncode}").strip(), "command": shlex.join(cmd)}
    return {"ppl": float(final.group(1)), "stderr": float(final.group(2)), "chunks": int(n.group(1)) if n else None,
            "seconds": seconds, "command": shlex.join(cmd)}


def run_ours(model: str, text: str, ctx: int, chunks: int, threads: int, cache: str, timeout: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rejected = []
    for name in OUR_NAMES.get(cache, [cache]):
        args = ["perplexity", text, "-m", model, "--ctx", str(ctx), "--chunks", str(chunks), "--cache-dtype", name,
                "-t", str(threads), "--json", "-q"]
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", MQA_GEN, *args], capture_output=True, text=True, env=env,
                              timeout=timeout, cwd=REPO)
        seconds = time.perf_counter() - t
        if proc.returncode == 2 and "--cache-dtype" in proc.stderr:
            rejected.append(name)
            continue
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}",
                    "command": "mqa-gen " + shlex.join(args)}
        out = json.loads(proc.stdout)
        return {"ppl": out["perplexity"], "stderr": out["perplexity_stderr"], "chunks": out["chunks"],
                "seconds": seconds, "command": "mqa-gen " + shlex.join(args), "cache_dtype": out["cache_dtype"]}
    return {"skipped": f"mqa-gen's --cache-dtype accepts none of {', '.join(rejected)} yet"}


def oracle_ppl(folder: str, ctx: int) -> tuple[str, float]:
    """(text file, transformers' PPL over the first chunk's scored positions) from the fixture."""
    import math

    fx = json.loads((REPO / "tests" / "fixtures" / folder / "perplexity.json").read_text(encoding="utf-8"))
    nll = fx["token_nll"][ctx // 2 : ctx - 1]
    return fx["text_file"], math.exp(sum(nll) / len(nll))


def oracle_rows(models: list[str], llama_exe: str, threads: int, timeout: int) -> list[dict]:
    """The oracle-window comparison (module docstring) for the models that have a fixture."""
    rows = []
    for name in models:
        if name not in ORACLE_WINDOWS:
            continue
        folder, ctx = ORACLE_WINDOWS[name]
        text, oracle = oracle_ppl(folder, ctx)
        print(f"{name}: oracle window, ctx {ctx} …", file=sys.stderr, flush=True)
        path = model_path(name)
        row = {"model": name, "ctx": ctx, "text": text, "transformers": oracle,
               "ours": run_ours(name, text, ctx, 1, threads, "f32", timeout)}
        for fa in ("on", "off"):
            row[f"llama_fa_{fa}"] = run_llama(llama_exe, path, text, ctx, 1, threads, "f32", fa, timeout)
        rows.append(row)
    return rows


def rel(value: dict, reference: float) -> str:
    return f"{100 * (value['ppl'] - reference) / reference:+.4f} %" if "ppl" in value else "—"


def cache_deltas(results: list[dict], reference: str = "f16") -> list[dict]:
    """Each tool's own change in PPL from its ``reference`` cache to every other type (the -fa on runs).

    ``results``: the rows main() gathers ({"model", "cache", "fa", "llama", "ours"}, each run a dict with
    "ppl" when it succeeded). Returns one dict per (model, other cache) in input order with "model",
    "cache", "llama" and "ours": the relative difference (other − reference) / reference in %, or None
    where either run is missing. The issue's bar (q8_0 within 0.5 % of f16) is read off these.
    """
    def pct(runs: dict, key: str) -> float | None:
        ref, other = runs.get(reference), runs.get(key)
        if not ref or not other or "ppl" not in ref or "ppl" not in other:
            return None
        return 100 * (other["ppl"] - ref["ppl"]) / ref["ppl"]

    by_model: dict[str, dict[str, dict[str, dict]]] = {}
    for r in results:
        if r["fa"] != "on":
            continue
        tools = by_model.setdefault(r["model"], {"llama": {}, "ours": {}})
        tools["llama"][r["cache"]] = r["llama"]
        tools["ours"][r["cache"]] = r["ours"] or {}
    out = []
    for model, tools in by_model.items():
        if reference not in tools["llama"]:
            continue
        for cache in tools["llama"]:
            if cache != reference:
                out.append({"model": model, "cache": cache, "llama": pct(tools["llama"], cache),
                            "ours": pct(tools["ours"], cache)})
    return out


def fmt(r: dict) -> str:
    if "ppl" in r:
        return f"{r['ppl']:.4f} ± {r['stderr']:.4f}"
    return "—"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m-instruct,gemma3-270m")
    ap.add_argument("--text", default=str(REPO / "mqa_gen" / "data" / "eval_english.txt"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=-1, help="chunks per run (-1 = all the text holds)")
    ap.add_argument("--cache-types", default="f16,q8_0", help="llama.cpp's names: f32, f16, q8_0, q4_0")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--llama-perplexity", default=os.environ.get("LLAMA_PERPLEXITY", DEFAULT_LLAMA))
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    ap.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the raw results here")
    args = ap.parse_args()

    caches = [c.strip() for c in args.cache_types.split(",") if c.strip()]
    text = os.path.relpath(Path(args.text).resolve(), REPO)  # both tools run in REPO: short commands
    load_before = loadavg()
    results, notes = [], []
    t0 = time.perf_counter()
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        path = model_path(name)
        runs = [(c, "on") for c in caches] + ([("f16", "off")] if "f16" in caches else [])
        for cache, fa in runs:
            print(f"{name}: llama-perplexity -ctk/-ctv {cache} -fa {fa} …", file=sys.stderr, flush=True)
            llama = run_llama(args.llama_perplexity, path, text, args.ctx, args.chunks, args.threads, cache, fa,
                              args.timeout)
            ours = None
            if fa == "on":
                print(f"{name}: mqa-gen perplexity --cache-dtype {cache} …", file=sys.stderr, flush=True)
                ours = run_ours(name, text, args.ctx, args.chunks, args.threads, cache, args.timeout)
                if "skipped" in ours:
                    notes.append(f"{name}, {cache}: skipped for mqa-gen ({ours['skipped']}).")
            results.append({"model": name, "cache": cache, "fa": fa, "llama": llama, "ours": ours})
            print(f"  llama {fmt(llama)}  mqa-gen {fmt(ours or {})}", file=sys.stderr, flush=True)
    oracle = oracle_rows([m.strip() for m in args.models.split(",") if m.strip()], args.llama_perplexity,
                         args.threads, args.timeout)
    total = time.perf_counter() - t0
    load_after = loadavg()

    rows = ["| model | KV cache | llama-perplexity | mqa-gen perplexity | (mqa-gen − llama) / llama | chunks | "
            "wall s llama / mqa-gen |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        llama, ours = r["llama"], r["ours"]
        label = f"{r['cache']} (-fa {r['fa']})"
        if "error" in llama:
            notes.append(f"{r['model']}, {label}: llama-perplexity failed: {llama['error']}")
        if ours is None:
            ours_cell, diff, ours_s = "(llama.cpp only)", "", ""
        elif "ppl" in ours:
            ours_cell = fmt(ours)
            diff = f"{100 * (ours['ppl'] - llama['ppl']) / llama['ppl']:+.3f} %" if "ppl" in llama else ""
            ours_s = f"{ours['seconds']:.0f}"
            if "ppl" in llama and ours["chunks"] != llama["chunks"]:
                notes.append(f"{r['model']}, {label}: chunk counts differ ({ours['chunks']} vs {llama['chunks']}): "
                             "the tokenisations differ")
        else:
            ours_cell, diff, ours_s = "skipped" if "skipped" in ours else "failed", "", ""
            if "error" in ours:
                notes.append(f"{r['model']}, {label}: mqa-gen failed: {ours['error']}")
        chunks = llama.get("chunks") or (ours or {}).get("chunks") or ""
        llama_s = f"{llama['seconds']:.0f}" if "seconds" in llama else ""
        rows.append(f"| {r['model']} | {label} | {fmt(llama)} | {ours_cell} | {diff} | {chunks} | "
                    f"{llama_s} / {ours_s} |")

    deltas = cache_deltas(results)
    delta_table = ["| model | KV cache | llama-perplexity: (type − f16) / f16 | mqa-gen: (type − f16) / f16 |",
                   "|---|---|---:|---:|"]
    for d in deltas:
        cells = [f"{d[k]:+.3f} %" if d[k] is not None else "—" for k in ("llama", "ours")]
        delta_table.append(f"| {d['model']} | {d['cache']} | " + " | ".join(cells) + " |")

    oracle_table = ["| model | window (first chunk) | transformers (oracle) | mqa-gen (f32) | llama.cpp f32 -fa on | "
                    "llama.cpp f32 -fa off |", "|---|---|---:|---:|---:|---:|"]
    for o in oracle:
        cells = [f"{o['transformers']:.4f}"]
        for key in ("ours", "llama_fa_on", "llama_fa_off"):
            r = o[key]
            cells.append(f"{r['ppl']:.4f} ({rel(r, o['transformers'])})" if "ppl" in r else "failed")
        oracle_table.append(f"| {o['model']} | {o['text']}, --ctx {o['ctx']}, 1 chunk | " + " | ".join(cells) + " |")
    oracle_runs = [r for o in oracle for r in (o["ours"], o["llama_fa_on"], o["llama_fa_off"])]
    commands = sorted({r["command"] for r in oracle_runs if "command" in r}
                      | {r["llama"]["command"] for r in results if "command" in r["llama"]}
                      | {r["ours"]["command"] for r in results if r["ours"] and "command" in r["ours"]})
    body = "\n".join([
        f"## {TITLE}",
        "",
        f"Measured by `python benchmarks/compare_perplexity.py --cache-types {args.cache_types} --ctx {args.ctx}"
        f"{'' if args.chunks == -1 else f' --chunks {args.chunks}'} --threads {args.threads}` on "
        f"`{text}`: both tools cut the text into chunks of {args.ctx} tokens, run "
        "each from an empty KV cache and score its second half (llama-perplexity's method); values are "
        "PPL ± llama-perplexity's standard error. mqa-gen runs with the same KV-cache type; llama.cpp needs "
        "`-fa on` for a quantised V cache, so every type runs with it, and f16 once more with `-fa off`. "
        f"{total / 60:.1f} min in all; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
        "(times are wall seconds on a shared 2-core machine, not a speed comparison).",
        "",
        *rows,
        "",
        *(f"- {n}" for n in notes),
        *([""] if notes else []),
        *(["What each tool's own quantised cache costs against its own f16 cache (both -fa on for llama.cpp; "
           "the same chunks):", "", *delta_table, ""] if deltas else []),
        *([f"Against the transformers oracle where the windows match (the fixture's window of "
           f"`{oracle[0]['text']}` from its start is both tools' first chunk; PPL over that chunk's second "
           "half; relative difference to the oracle in brackets):", "", *oracle_table, ""] if oracle else []),
        "<details><summary>commands</summary>",
        "",
        *(f"    {c}" for c in commands),
        "",
        "</details>",
    ])
    print(body)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1), encoding="utf-8")
    if not args.no_write:
        write_section(Path(args.output), SECTION, body)
        print(f"\nwrote the {SECTION} section of {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
