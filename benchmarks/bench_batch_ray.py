#!/usr/bin/env python3
"""``mqa-gen batch --ray`` on this machine against the local ``mqa-gen batch``: 1 actor × 2 threads,
2 actors × 1 thread, and one process with 2 threads, on the same prompt set — wall time, what Ray
adds per prompt, and the figures of README's estimate for N nodes (tokens/s of one busy actor, an
actor's model load, the runtime's start).

The prompt set: ``--prompts`` runs of eight words of mqa_gen/data/ppl_english.txt (as
bench_batch_cli.py), greedy, ``-n`` tokens each, no chat template, ``--batch-size`` slots per
process or actor. Each way runs as the real command, a fresh process (and, for Ray, a fresh local
runtime on 127.0.0.1) each time; rounds alternate the ways; figures are medians. Example::

    nice -n 19 python benchmarks/bench_batch_ray.py --prompts 64 -n 32 --rounds 2

Writes the ``batch-ray`` section of BENCHMARKS.md (``--no-write`` to only print).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_batch_cli import prompt_set
from report_section import loadavg, write_section

REPO = Path(__file__).resolve().parent.parent
SECTION = "batch-ray"

#: The figures of the stats line ``mqa-gen batch --ray`` prints on stderr.
RAY_STATS = re.compile(r"(?P<busy>[\d,.]+) tok/s per busy actor .*runtime ready in (?P<connect>[\d.]+) s, first "
                       r"results after (?P<first>[\d.]+) s, model loaded in (?P<load>[\d.]+) s per actor")
LOCAL_STATS = re.compile(r"(?P<busy>[\d,.]+) tok/s overall")


def number(text: str) -> float:
    return float(text.replace(",", ""))


def run_way(exe: str, source: Path, out: Path, extra: list[str], common: list[str], env: dict) -> dict:
    """One run of ``mqa-gen batch``: wall time (s), the token ids of each line, and its stats line."""
    t0 = time.perf_counter()
    proc = subprocess.run([exe, "batch", str(source), "-o", str(out), *common, *extra], env=env,
                          capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"mqa-gen batch {' '.join(extra)} failed ({proc.returncode}):\n{proc.stderr}")
    ids = [json.loads(line)["token_ids"] for line in out.read_text(encoding="utf-8").splitlines()]
    stats = RAY_STATS.search(proc.stderr) if "--ray" in extra else LOCAL_STATS.search(proc.stderr)
    if stats is None:
        raise SystemExit(f"no stats line in the stderr of mqa-gen batch {' '.join(extra)}:\n{proc.stderr}")
    out.unlink()
    return {"wall": wall, "ids": ids, **{k: number(v) for k, v in stats.groupdict().items()}}


class LoadSampler(threading.Thread):
    """The 1-minute load average every ``every`` seconds while the runs go on (its maximum is
    reported: one reading per run would miss a burst of other work in the middle of one)."""

    def __init__(self, every: float = 5.0):
        super().__init__(daemon=True)
        self.every, self.samples, self.stop = every, [loadavg()[0]], threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.samples.append(loadavg()[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("-n", "--max-tokens", type=int, default=32)
    p.add_argument("-m", "--model", default="smollm2-135m-instruct")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    exe = shutil.which("mqa-gen") or str(Path(sys.executable).with_name("mqa-gen"))
    common = ["-m", args.model, "-n", str(args.max_tokens), "--no-chat", "--seed", "0",
              "--batch-size", str(args.batch_size)]
    ways = {
        "local, 1 process × 2 threads": ["-t", "2"],
        "Ray, 1 actor × 2 threads": ["--ray", "--actors", "1", "--threads-per-actor", "2"],
        "Ray, 2 actors × 1 thread": ["--ray", "--actors", "2", "--threads-per-actor", "1"],
    }
    env = {**os.environ, "NUMBA_NUM_THREADS": "2", "RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "400"}
    loads = LoadSampler()
    loads.start()
    runs: dict[str, list[dict]] = {name: [] for name in ways}
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "prompts.jsonl"
        source.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in prompt_set(args.prompts)),
                          encoding="utf-8")
        for round_ in range(args.rounds):
            for name, extra in ways.items():
                print(f"[bench] round {round_ + 1}: {name}", file=sys.stderr)
                runs[name].append(run_way(exe, source, Path(tmp) / "out.jsonl", extra, common, env))
    loads.stop.set()

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    local, one, two = ways
    reference = runs[local][0]["ids"]
    same = all(r["ids"] == reference for rs in runs.values() for r in rs)
    rows = ["| way | wall time (each round) | prompts/s | tok/s while generating, per process or actor | "
            "runtime ready | first results | model load per actor |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ways:
        wall = med(name, "wall")
        each = " / ".join(f"{r['wall']:.0f}" for r in runs[name])
        start = (f"{med(name, 'connect'):.1f} s | {med(name, 'first'):.1f} s | {med(name, 'load'):.1f} s"
                 if name != local else "– | – | –")
        rows.append(f"| {name} | {wall:.1f} s ({each}) | {args.prompts / wall:.2f} | {med(name, 'busy'):,.1f} | "
                    f"{start} |")
    overhead = {name: med(name, "wall") - med(local, "wall") for name in (one, two)}
    per_prompt = {name: 1000 * o / args.prompts for name, o in overhead.items()}
    body = "\n".join([
        "## Ray batch (issue 19)", "",
        f"{_dt.datetime.now().isoformat(timespec='seconds')}, {args.model}, {args.prompts} prompts (8-word runs of "
        f"the held-out text), greedy, {args.max_tokens} tokens each, --batch-size {args.batch_size} per process or "
        f"actor, each way a fresh `mqa-gen batch` process (Ray: a fresh local runtime on 127.0.0.1), median of "
        f"{args.rounds} round(s); {os.cpu_count()} cores; load average 1 min {loads.samples[0]:.2f} at start, max "
        f"{max(loads.samples):.2f}, median {statistics.median(loads.samples):.2f} (every 5 s).", "",
        *rows, "",
        f"Wall time against the local process with the same 2 threads: {overhead[one]:+.1f} s for 1 actor × 2 "
        f"threads ({per_prompt[one]:+,.0f} ms per prompt), {overhead[two]:+.1f} s for 2 actors × 1 thread "
        f"({per_prompt[two]:+,.0f} ms per prompt). Of Ray's start-up, paid once per run whatever the number of "
        f"prompts: the runtime {med(one, 'connect'):.1f} s, then each actor's model load {med(one, 'load'):.1f} s "
        f"(1 actor) / {med(two, 'load'):.1f} s (2 actors loading at once). Token ids identical in every run: "
        f"{'yes' if same else 'NO'}.", "",
        f"Command: `nice -n 19 python benchmarks/bench_batch_ray.py --prompts {args.prompts} -n {args.max_tokens} "
        f"--batch-size {args.batch_size} --rounds {args.rounds}`",
    ])
    print(body)
    if not args.no_write:
        write_section(Path(args.output), SECTION, body)


if __name__ == "__main__":
    main()
