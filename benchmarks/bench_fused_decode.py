#!/usr/bin/env python3
"""The fused decode step against the unfused path, A/B in one process: tokens/s by depth and batch.

A shared, noisy machine makes two separate runs minutes apart hard to compare. Here one process
loads the model once and alternates the two paths (``mqa_gen.decode_layer.ENABLED``) in short
blocks of decode steps on the same caches, so load drift falls on both alike; each figure is the
median over blocks of the block's tokens/s, and the ratio is fused / unfused. The greedy tokens
are not compared here: tests/test_decode_layer.py checks that the two paths give the same bits. Writes the section
"fused-decode" of BENCHMARKS.md unless ``--no-write``. Example::

    python benchmarks/bench_fused_decode.py --depths 0,2048 --batch-sizes 1,8 --blocks 12
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_section import loadavg, write_section  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default="smollm2-135m-instruct")
    p.add_argument("--depths", default="0,2048", help="cache depths (comma-separated)")
    p.add_argument("--batch-sizes", default="1,8", help="sequences decoding together (comma-separated)")
    p.add_argument("--blocks", type=int, default=12, help="timed blocks per path and setting")
    p.add_argument("--steps", type=int, default=8, help="decode steps per block")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dtype", default="float16")
    p.add_argument("--no-write", dest="write", action="store_false")
    args = p.parse_args()
    os.environ.setdefault("NUMBA_NUM_THREADS", str(args.threads))
    os.environ.setdefault("MQA_GEN_FIXED_THREADS", "1")  # the count asked for, every step (thread_governor.py)
    import mqa_gen  # noqa: F401  (sets BLAS threads before NumPy loads)
    import numpy as np

    from mqa_gen import decode_layer
    from mqa_gen.cache import KVCachePool
    from mqa_gen.loading import load

    loaded = load(args.model)
    model, c = loaded.model, loaded.config
    text = loaded.tokenizer.encode((REPO / "mqa_gen" / "data" / "ppl_english.txt").read_text(encoding="utf-8"))
    load_start = loadavg()
    rows = []
    for depth in (int(d) for d in args.depths.split(",")):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            capacity = depth + 2 * args.blocks * args.steps + 8
            pool = KVCachePool(batch, c.n_layers, c.n_kv_heads, c.head_dim, capacity, args.cache_dtype,
                               c.layer_windows)
            caches = pool.caches[:batch]
            prompts = [list(np.resize(np.roll(text, b), max(depth, 1))) for b in range(batch)]
            last = model.forward(prompts, caches)
            speeds = {True: [], False: []}
            tokens = [int(t) for t in np.argmax(last, axis=1)]
            for block in range(2 * args.blocks):
                fused = (block % 2 == 0) == ((block // 2) % 2 == 0)  # ABBA: F U U F F U …
                decode_layer.ENABLED = fused
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    tokens = [int(t) for t in np.argmax(model.decode(tokens, caches), axis=1)]
                speeds[fused].append(batch * args.steps / (time.perf_counter() - t0))
            f, u = statistics.median(speeds[True]), statistics.median(speeds[False])
            rows.append((depth, batch, f, u))
            print(f"depth {depth:5d}  batch {batch:3d}  fused {f:7.1f} tok/s  unfused {u:7.1f} tok/s  ratio {f / u:.2f}×",
                  flush=True)
    load_end = loadavg()
    decode_layer.ENABLED = True
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    command = "python benchmarks/bench_fused_decode.py " + " ".join(sys.argv[1:])
    body = ["## Fused decode step against the unfused path (issue 15)", "",
            f"`{command}` ({_dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, commit {rev}, {args.model}, "
            f"{args.threads} threads, {args.cache_dtype} cache; one process alternating the two paths in blocks of "
            f"{args.steps} decode steps, ABBA order, {args.blocks} blocks each; median of the blocks' tokens/s "
            f"(all B sequences together); 1-min load {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end).", "",
            "| depth | batch | fused (tok/s) | unfused (tok/s) | fused / unfused |", "|---:|---:|---:|---:|---:|"]
    body += [f"| {d} | {b} | {f:.1f} | {u:.1f} | {f / u:.2f}× |" for d, b, f, u in rows]
    if args.write:
        write_section(REPO / "BENCHMARKS.md", "fused-decode", "\n".join(body))
        print("wrote BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
