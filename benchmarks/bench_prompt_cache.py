#!/usr/bin/env python3
"""Benchmark the prompt cache: time to first token of a ~1,500-token prompt, first run vs second run.

Each run is a fresh process of the installed entry point, as a user would run it::

    mqa-gen generate --prompt-file DOC --no-chat -n 1 --temp 0 --ctx-size 2048 --prompt-cache FILE --json -q

1. **first run** — FILE does not exist: the whole prompt is prefilled, then FILE is written;
2. **second run, same prompt** — FILE is reused: all but the last prompt token come from it
   (one token must be prefilled to get logits);
3. **second run, same document + a new question** — the document comes from FILE, only the
   question is prefilled (the use case: a long document, then questions about it).

*Time to first token* (TTFT) here is the time from the loaded model to the first sampled token:
``stats.prompt_cache_seconds`` (the model-identity digest, and reading FILE when it exists) +
``stats.first_token_seconds`` (cache prefix matching, prefill, first sample). Loading the model is
the same in every run and is reported separately, as is the whole process's wall time (Python start,
imports, model load, TTFT, and writing FILE). The headline is TTFT(first) / TTFT(second, same
prompt); the issue asks for at least 5×. Figures are medians of ``--repeats`` rounds.

A warm-up run first makes sure the Numba kernels are compiled and cached on disk, so no run
measures compilation. Nothing here asserts a time.

The prompt is ``sample_prompts/long_document.txt`` and ``mqa_gen/data/ppl_english.txt``, repeated
and cut to ``--tokens`` tokens (default 1500).

Results go to stdout and to the "Prompt cache" section of ``BENCHMARKS.md``: only the text between
``<!-- prompt-cache -->`` and ``<!-- /prompt-cache -->`` is replaced (the section is appended when
absent; the file is created when missing), so the rest of the file is left as it is.

Examples::

    python benchmarks/bench_prompt_cache.py                  # 1,500 tokens, 2 threads, 1 round
    python benchmarks/bench_prompt_cache.py --repeats 3 --threads 2
    python benchmarks/bench_prompt_cache.py --no-write
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report_section import loadavg, write_section

REPO = Path(__file__).resolve().parent.parent
TEXT_FILES = [REPO / "sample_prompts" / "long_document.txt", REPO / "mqa_gen" / "data" / "ppl_english.txt"]
QUESTION = "\n\nQuestion: in one sentence, what is the main point of the text above?\nAnswer:"
SECTION = "prompt-cache"  # BENCHMARKS.md section, between <!-- prompt-cache --> markers
THREAD_VARS = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def build_prompt(n_tokens: int, model: str) -> tuple[str, int]:
    """A document of about ``n_tokens`` tokens (text, exact token count)."""
    from mqa_gen.loading import load

    tok = load(model).tokenizer
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in TEXT_FILES)
    while len(tok.encode(text)) < n_tokens:
        text += "\n\n" + text
    doc = tok.decode(tok.encode(text)[:n_tokens])
    return doc, len(tok.encode(doc))


def run_once(args, prompt_file: Path, cache_file: Path | None, n_tokens: int = 1) -> dict:
    """One ``mqa-gen generate`` process; its JSON plus ``wall_seconds``."""
    exe = shutil.which("mqa-gen") or "mqa-gen"
    cmd = [exe, "generate", "--prompt-file", str(prompt_file), "--no-chat", "-n", str(n_tokens), "--temp", "0",
           "--ctx-size", str(args.ctx_size), "-m", args.model, "--json", "-q"]
    if cache_file is not None:
        cmd += ["--prompt-cache", str(cache_file)]
    env = dict(os.environ, **{v: str(args.threads) for v in THREAD_VARS})
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"mqa-gen failed ({proc.returncode}): {proc.stderr.strip()}")
    out = json.loads(proc.stdout)
    out["wall_seconds"] = wall
    s = out["stats"]
    out["ttft"] = s.get("prompt_cache_seconds", 0.0) + s["first_token_seconds"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1500, help="prompt length in tokens (default 1500)")
    p.add_argument("--repeats", type=int, default=1, help="rounds; figures are medians (default 1)")
    p.add_argument("--threads", type=int, default=2, help="NUMBA/OMP/BLAS threads (default 2)")
    p.add_argument("--ctx-size", type=int, default=2048, help="context of every run (default 2048)")
    p.add_argument("-m", "--model", default="smollm2-135m-instruct")
    p.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true", help="print only; do not touch BENCHMARKS.md")
    args = p.parse_args()

    started = time.perf_counter()
    load_start = loadavg()
    doc, doc_tokens = build_prompt(args.tokens, args.model)
    rows: dict[str, list[dict]] = {"first": [], "same": [], "question": []}
    with tempfile.TemporaryDirectory(prefix="bench-prompt-cache-") as tmp:
        tmp = Path(tmp)
        doc_file, question_file = tmp / "doc.txt", tmp / "question.txt"
        doc_file.write_text(doc, encoding="utf-8")
        question_file.write_text(doc + QUESTION, encoding="utf-8")
        warm = tmp / "warm.txt"
        warm.write_text("The capital of France is", encoding="utf-8")
        run_once(args, warm, None)  # compiles and caches the kernels if needed
        loads = [loadavg()[0]]
        for r in range(args.repeats):
            cache = tmp / f"doc{r}.cache"
            rows["first"].append(run_once(args, doc_file, cache))
            rows["same"].append(run_once(args, doc_file, cache))
            third = tmp / f"doc{r}-q.cache"
            shutil.copyfile(cache, third)
            rows["question"].append(run_once(args, question_file, third))
            loads.append(loadavg()[0])
            cache_bytes = cache.stat().st_size

    def med(key: str, f) -> float:
        return statistics.median(f(o) for o in rows[key])

    labels = {"first": "first run (no cache file)", "same": "second run, same prompt",
              "question": "second run, same document + new question"}
    table = ["| run | prompt tokens | reused | prefilled | time to first token (s) | of which cache file (s) "
             "| model load (s) | process wall (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, label in labels.items():
        o = rows[key][0]
        table.append(
            f"| {label} | {o['prompt_tokens']:,} | {med(key, lambda o: o['stats']['reused_tokens']):,.0f} "
            f"| {med(key, lambda o: o['stats']['prefill_tokens']):,.0f} | {med(key, lambda o: o['ttft']):.3f} "
            f"| {med(key, lambda o: o['stats']['prompt_cache_seconds']):.3f} "
            f"| {med(key, lambda o: o['stats']['load_seconds']):.2f} | {med(key, lambda o: o['wall_seconds']):.2f} |"
        )
    ratio = med("first", lambda o: o["ttft"]) / med("same", lambda o: o["ttft"])
    ratio_q = med("first", lambda o: o["ttft"]) / med("question", lambda o: o["ttft"])
    wall_ratio = med("first", lambda o: o["wall_seconds"]) / med("same", lambda o: o["wall_seconds"])
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]))] + sys.argv[1:])

    body = "\n".join([
        "## Prompt cache",
        "",
        "Generated by `benchmarks/bench_prompt_cache.py` (its docstring defines every figure); re-run it to "
        "refresh this section. Each run is a fresh `mqa-gen generate --prompt-cache FILE -n 1 --json` process.",
        "",
        f"- date: {_dt.datetime.now().isoformat(timespec='seconds')}; machine: {os.cpu_count()} CPUs, "
        f"{platform.system()} {platform.machine()}; load average at start {load_start[0]:.2f}, during the run "
        f"{min(loads):.2f}–{max(loads):.2f}",
        f"- model: `{args.model}`, threads {args.threads}, --ctx-size {args.ctx_size}, float32 cache; "
        f"prompt {doc_tokens:,} tokens; cache file {cache_bytes / 2**20:,.1f} MiB; median of {args.repeats} round(s); "
        f"total {time.perf_counter() - started:.0f} s",
        f"- command: `{command}`",
        "",
        *table,
        "",
        f"**Time to first token, first run / second run (same prompt): {ratio:,.1f}×** (the issue asks for ≥ 5×); "
        f"with a new question after the cached document: {ratio_q:,.1f}×; whole-process wall time: {wall_ratio:,.1f}×.",
        "",
        "Time to first token = model-identity digest + reading the cache file + prefill of the tokens not reused "
        "+ the first sample (the model load, the same in every run, is a separate column).",
    ])
    print(body)
    if not args.no_write:
        write_section(Path(args.output), SECTION, body)
        print(f"\nwrote the prompt-cache section of {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
