#!/usr/bin/env python3
"""A prompt set through one ``mqa-gen batch`` process against one ``mqa-gen generate`` process per
prompt, as a shell script would run it: wall time of each way, and whether the ids agree.

The prompt set: ``--prompts`` runs of eight words of mqa_gen/data/ppl_english.txt (one every ten
words), greedy, ``-n`` tokens each, no chat template. Rounds alternate the two ways;
figures are medians. Example::

    python benchmarks/bench_batch_cli.py --prompts 64 -n 32 --rounds 1

Writes the ``batch-cli`` section of BENCHMARKS.md (``--no-write`` to only print).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report_section import loadavg, write_section

REPO = Path(__file__).resolve().parent.parent
SECTION = "batch-cli"


def prompt_set(n: int) -> list[str]:
    """``n`` prompts of eight words: the held-out text's words from every 10th word on."""
    words = (REPO / "mqa_gen" / "data" / "ppl_english.txt").read_text(encoding="utf-8").split()
    if len(words) < 10 * n:
        raise SystemExit(f"the text has only {len(words)} words, {10 * n} needed")
    return [" ".join(words[10 * i: 10 * i + 8]) for i in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("-n", "--max-tokens", type=int, default=32)
    p.add_argument("-m", "--model", default="smollm2-135m-instruct")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    exe = shutil.which("mqa-gen") or str(Path(sys.executable).with_name("mqa-gen"))
    prompts = prompt_set(args.prompts)
    common = ["-m", args.model, "-n", str(args.max_tokens), "--no-chat", "-q", "--threads", str(args.threads)]
    env = {**os.environ, "NUMBA_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
    loads = [loadavg()[0]]
    batch_walls, generate_walls = [], []
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "prompts.jsonl"
        source.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in prompts), encoding="utf-8")
        for round_ in range(args.rounds):
            out = Path(tmp) / f"out{round_}.jsonl"
            print(f"[bench] round {round_ + 1}: one mqa-gen batch", file=sys.stderr)
            t0 = time.perf_counter()
            subprocess.run([exe, "batch", str(source), "-o", str(out), "--batch-size", str(args.batch_size), *common],
                           check=True, env=env)
            batch_walls.append(time.perf_counter() - t0)
            batch_ids = [json.loads(line)["token_ids"] for line in out.read_text().splitlines()]
            loads.append(loadavg()[0])
            print(f"[bench] round {round_ + 1}: {len(prompts)} mqa-gen generate processes", file=sys.stderr)
            alone_ids = []
            t0 = time.perf_counter()
            for q in prompts:
                proc = subprocess.run([exe, "generate", "--prompt", q, "--json", *common], check=True, env=env,
                                      capture_output=True, text=True)
                alone_ids.append(json.loads(proc.stdout)["token_ids"])
            generate_walls.append(time.perf_counter() - t0)
            loads.append(loadavg()[0])
    same = sum(a == b for a, b in zip(batch_ids, alone_ids))
    b, g = statistics.median(batch_walls), statistics.median(generate_walls)
    body = "\n".join([
        "## A prompt set: one `mqa-gen batch` against a process per prompt (issue 13)", "",
        f"{_dt.datetime.now().isoformat(timespec='seconds')}, {args.model}, {len(prompts)} prompts (8-word runs of "
        f"the held-out text), greedy, {args.max_tokens} tokens each, {args.threads} threads, median of {args.rounds} "
        f"round(s); load average 1 min {loads[0]:.2f} at start, max {max(loads):.2f}.", "",
        "| way | wall time | prompts/s |", "|---|---:|---:|",
        f"| one `mqa-gen batch --batch-size {args.batch_size}` | {b:.1f} s | {len(prompts) / b:.2f} |",
        f"| {len(prompts)} × `mqa-gen generate` | {g:.1f} s | {len(prompts) / g:.2f} |", "",
        f"**{g / b:.1f}×** less wall time for the batch; token ids identical for {same} of {len(prompts)} prompts.", "",
        f"Command: `python benchmarks/bench_batch_cli.py --prompts {args.prompts} -n {args.max_tokens} "
        f"--batch-size {args.batch_size} --rounds {args.rounds}`",
    ])
    print(body)
    if not args.no_write:
        write_section(Path(args.output), SECTION, body)


if __name__ == "__main__":
    main()
