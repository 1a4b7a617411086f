#!/usr/bin/env python3
"""Decode tokens/s of a whole `mqa-gen generate` with another process busy on one core.

bench_busy_core.py times 48-step runs inside one process and restarts the thread governor for
each; this one is what a user sees: fresh `mqa-gen generate -n TOKENS --json` processes (one
long generation each, the governor started once), while ``--busy`` pure-Python spin loops hold
cores. Three settings, interleaved round by round:

* ``1 thread``: ``--threads 1``;
* ``N fixed``: ``--threads N`` with the governor off (``MQA_GEN_FIXED_THREADS=1``);
* ``N governed``: ``--threads N`` as a user runs it.

Decode tokens/s is the CLI's own ``stats.decode_tokens_per_s``; the prompt's prefill time
(``stats.prefill_seconds``, 23 tokens) is reported beside it, since a prefill chunk picks its
thread count too. Prints medians of ``--rounds``
and the load average; with ``--write`` updates the "busy-core-cli" section of BENCHMARKS.md::

    python benchmarks/bench_busy_cli.py --threads 2 --busy 1 --rounds 6 --write
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_busy_core import REPO, busy_cores  # noqa: E402
from report_section import loadavg, write_section  # noqa: E402

#: A prompt the model keeps continuing greedily (no early end of text), so every run decodes
#: the same ``--tokens`` tokens.
PROMPT = "Count from 1 to 1000: 1, 2, 3, 4,"


def rates(model: str, tokens: int, threads: int, governed: bool) -> tuple[float, float]:
    """One fresh `mqa-gen generate` process: its decode tokens/s and prefill milliseconds."""
    env = {**os.environ}
    env.pop("MQA_GEN_FIXED_THREADS", None)
    if not governed:
        env["MQA_GEN_FIXED_THREADS"] = "1"
    cmd = [sys.executable, "-c", "import sys; from mqa_gen.cli import main; sys.argv[0] = 'mqa-gen'; main()",
           "generate", "-m", model, "--prompt", PROMPT, "--no-chat",
           "--temp", "0", "-n", str(tokens), "--threads", str(threads), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600, check=True)
    stats = json.loads(out.stdout)["stats"]
    return stats["decode_tokens_per_s"], stats["prefill_seconds"] * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default="smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--busy", type=int, default=1, help="busy processes during the runs")
    p.add_argument("--tokens", type=int, default=256, help="tokens each generate decodes")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = p.parse_args()
    n = args.threads
    settings = [("1 thread", 1, False), (f"{n} fixed", n, False), (f"{n} governed", n, True)]
    rates(args.model, 4, 1, False)  # warm: kernels compiled and cached, pages in
    decode: dict[str, list[float]] = {name: [] for name, _, _ in settings}
    prefill: dict[str, list[float]] = {name: [] for name, _, _ in settings}
    with busy_cores(args.busy):
        load_start = loadavg()[0]
        for _ in range(args.rounds):
            for name, threads, governed in settings:
                tok_s, prefill_ms = rates(args.model, args.tokens, threads, governed)
                decode[name].append(tok_s)
                prefill[name].append(prefill_ms)
        load_end = loadavg()[0]
    one = statistics.median(decode["1 thread"])
    rows = [f"| {name} | {statistics.median(r):.1f} | {min(r):.1f}–{max(r):.1f} | {statistics.median(r) / one:.2f} | "
            f"{statistics.median(prefill[name]):.0f} | {min(prefill[name]):.0f}–{max(prefill[name]):.0f} |"
            for name, r in decode.items()]
    body = [
        "## A whole `mqa-gen generate` with a busy core (issue 15)",
        "",
        f"`python benchmarks/bench_busy_cli.py --threads {n} --busy {args.busy} --tokens {args.tokens}"
        f" --rounds {args.rounds}` — {os.cpu_count()} CPUs, {args.model}, fresh processes decoding "
        f"{args.tokens} tokens each while {args.busy} pure-Python spin loop(s) run; settings interleaved "
        f"round by round; decode tok/s and the prompt's prefill time (23 tokens) from the CLI's stats, "
        f"medians of {args.rounds}.",
        "",
        "| setting | decode tok/s (median) | range | ÷ 1 thread | prefill ms (median) | range |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Load average (1 min) at start → end: {load_start:.1f} → {load_end:.1f}",
    ]
    print("\n".join(body))
    if args.write:
        write_section(REPO / "BENCHMARKS.md", "busy-core-cli", "\n".join(body))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
