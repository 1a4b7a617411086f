#!/usr/bin/env python3
"""Decode tokens/s with another process busy on one core: fixed thread counts against the governor.

Issue 15 asks that with ``--threads 2`` and another process busy on one core, decode stays at
least at the 1-thread speed. For each condition — quiet, and with ``--busy`` processes spinning
(pure-Python busy loops, started for the condition and killed after) — it times ``--steps``
decode steps of one sequence in three settings, interleaved round by round:

* ``1 fixed``: 1 thread, governor off (``MQA_GEN_FIXED_THREADS=1``);
* ``N fixed``: ``--threads`` threads, governor off;
* ``N governed``: ceiling ``--threads``, the governor (mqa_gen/thread_governor.py) picks per step.

Prints medians of ``--rounds`` and the load average, and with ``--write`` updates the
"busy-core" section of BENCHMARKS.md. Example::

    python benchmarks/bench_busy_core.py --threads 2 --busy 1 --rounds 5 --write
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_section import loadavg, write_section  # noqa: E402

SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


@contextmanager
def busy_cores(n: int, seconds: int = 3600):
    """``n`` pure-Python spin loops (each bounded by ``seconds``) for the duration of the block,
    given a second to be scheduled before it starts; killed at its end."""
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=seconds)]) for _ in range(n)]
    try:
        time.sleep(1.0 if n else 0.0)
        yield
    finally:
        for s in spinners:
            s.kill()
            s.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default="smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--busy", type=int, default=1, help="busy processes in the loaded condition")
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--depth", type=int, default=256, help="prompt tokens before decoding")
    p.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = p.parse_args()
    os.environ.setdefault("NUMBA_NUM_THREADS", str(args.threads))
    import mqa_gen  # noqa: F401  (configures OpenBLAS threads before NumPy loads)
    import numba
    import numpy as np

    from mqa_gen.loading import load
    from mqa_gen.thread_governor import governor

    loaded = load(args.model)
    model = loaded.model
    ids = np.resize(loaded.tokenizer.encode(open(REPO / "mqa_gen/data/ppl_english.txt", encoding="utf-8").read()),
                    args.depth)
    settings = [("1 fixed", 1, True), (f"{args.threads} fixed", args.threads, True),
                (f"{args.threads} governed", args.threads, False)]

    def decode_rate(threads: int, fixed: bool) -> tuple[float, int]:
        if fixed:
            os.environ["MQA_GEN_FIXED_THREADS"] = "1"
        else:
            os.environ.pop("MQA_GEN_FIXED_THREADS", None)
        numba.set_num_threads(threads)
        cache = model.new_cache(args.depth + args.steps + 8, "float16")
        logits = model.forward(ids, cache)
        start = time.perf_counter()
        for _ in range(args.steps):
            logits = model.forward([int(np.argmax(logits))], cache)
        rate = args.steps / (time.perf_counter() - start)
        gov = governor()
        return rate, (gov.threads if gov is not None and not fixed else threads)

    decode_rate(args.threads, True)  # warm up (kernels loaded, pages in)
    rows, loads = [], {}
    for condition, n_busy in (("quiet", 0), (f"{args.busy} busy", args.busy)):
        with busy_cores(n_busy, seconds=1800):
            load_start = loadavg()[0]
            rates: dict[str, list[float]] = {name: [] for name, _, _ in settings}
            final: dict[str, int] = {}
            for _ in range(args.rounds):
                for name, threads, fixed in settings:
                    rate, final[name] = decode_rate(threads, fixed)
                    rates[name].append(rate)
            loads[condition] = (load_start, loadavg()[0])
        one = statistics.median(rates["1 fixed"])
        for name, _, _ in settings:
            med = statistics.median(rates[name])
            rows.append(f"| {condition} | {name} | {med:.1f} | {min(rates[name]):.1f}–{max(rates[name]):.1f} "
                        f"| {med / one:.2f} | {final[name]} |")
    machine = f"{os.cpu_count()} CPUs, {loaded.config.name}, depth {args.depth}, {args.steps} decode steps"
    body = [
        "## Decode with a busy core (issue 15)",
        "",
        f"`python benchmarks/bench_busy_core.py --threads {args.threads} --busy {args.busy} --rounds {args.rounds}"
        f" --steps {args.steps} --depth {args.depth}` — {machine}; settings interleaved round by round, "
        f"medians of {args.rounds}. Busy = pure-Python spin loops started for that condition.",
        "",
        "| condition | threads | decode tok/s (median) | range | ÷ 1 fixed | threads at the end |",
        "|---|---|---:|---:|---:|---:|",
        *rows,
        "",
        "Load average (1 min) at start → end: " + "; ".join(f"{c} {a:.1f} → {b:.1f}" for c, (a, b) in loads.items()),
    ]
    print("\n".join(body))
    if args.write:
        write_section(REPO / "BENCHMARKS.md", "busy-core", "\n".join(body))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
