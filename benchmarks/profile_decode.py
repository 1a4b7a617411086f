#!/usr/bin/env python3
"""Where decode time goes: per-token milliseconds by kernel, for SmolLM2 at a few cache depths.

Runs ``--steps`` greedy decode steps after prefilling ``depth`` tokens, under ``cProfile``, and
prints the time per token in each Numba kernel and in everything else (Python glue, NumPy
temporaries, launching parallel regions), and the function calls per token the profiler counted.
Profiling adds a little overhead per call, so the total is a bit above the benchmark's tokens/s.
With ``PYTHONPATH`` set to a ``git archive REV mqa_gen`` snapshot it profiles that commit. Example::

    python benchmarks/profile_decode.py --depths 0,2048 --threads 2 [--int8-dot]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default="smollm2-135m-instruct")
    p.add_argument("--depths", default="0,2048")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dtype", default="float32")
    p.add_argument("--int8-dot", action="store_true", help="int8 dot products (the CLI's --int8-dot)")
    args = p.parse_args()
    os.environ.setdefault("NUMBA_NUM_THREADS", str(args.threads))
    os.environ.setdefault("MQA_GEN_FIXED_THREADS", "1")  # the count asked for, every step (thread_governor.py)
    import mqa_gen  # noqa: F401  (configures OpenBLAS threads before NumPy loads)
    import numpy as np

    from mqa_gen.loading import load

    loaded = load(args.model)
    model = loaded.model
    if args.int8_dot:
        model.set_int8_dot(True)
    text_ids = loaded.tokenizer.encode(open("mqa_gen/data/ppl_english.txt", encoding="utf-8").read())
    print(f"{loaded.config.name}, {args.threads} threads, {args.cache_dtype} cache, {args.steps} steps per depth"
          f"{', int8 dot products' if args.int8_dot else ''}")
    for depth in (int(d) for d in args.depths.split(",")):
        cache = model.new_cache(depth + args.steps + 16, args.cache_dtype)
        logits = model.forward(np.resize(text_ids, max(depth, 1)), cache)
        for _ in range(4):  # warm up
            logits = model.forward([int(np.argmax(logits))], cache)
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        for _ in range(args.steps):
            logits = model.forward([int(np.argmax(logits))], cache)
        profiler.disable()
        per_token = (time.perf_counter() - start) / args.steps * 1e3
        stats = pstats.Stats(profiler).stats
        kernels = {}
        for (filename, _, name), (_, _, tottime, _, _) in stats.items():
            if "/kernels/" in filename:
                kernels[name] = kernels.get(name, 0.0) + tottime / args.steps * 1e3
        # Calls counted by the profiler (Python functions and C built-ins): a noise-free measure of
        # the glue between kernels, comparable across commits when timings are not.
        calls = sum(n_calls for _, n_calls, _, _, _ in stats.values()) / args.steps
        print(f"\ndepth {depth}: {per_token:.1f} ms/token ({1e3 / per_token:.1f} tok/s), {calls:,.0f} calls/token")
        for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1]):
            print(f"  {name:32s} {ms:6.2f} ms  {ms / per_token:5.1%}")
        other = per_token - sum(kernels.values())
        print(f"  {'everything else (Python, NumPy)':32s} {other:6.2f} ms  {other / per_token:5.1%}")


if __name__ == "__main__":
    main()
