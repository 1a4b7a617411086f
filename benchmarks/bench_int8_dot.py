#!/usr/bin/env python3
"""One matrix × vector product alone: the float32 kernels (mqa_gen.kernels.quant) against the
integer ones (mqa_gen.kernels.int8_dot, ``--int8-dot``; the activation's rounding included), on
the shapes that dominate a decode step: SmolLM2's 1536 × 576 Q4_1 MLP matrix and 49152 × 576 Q8_0
output head, Gemma 3's 262,144 × 640 Q8_0 output head. Random weights quantised by the ``gguf``
package; the kernels' threads as Numba has them (``NUMBA_NUM_THREADS``). Kernels alternate in
rounds and each time is the median of the rounds, in µs. Prints a table; asserts nothing.

    python benchmarks/bench_int8_dot.py                                  # this CPU's instructions
    MQA_GEN_INT8_DOT_ISA=avx2 NUMBA_CACHE_DIR=/tmp/nc python benchmarks/bench_int8_dot.py   # AVX2 code
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from gguf import GGMLQuantizationType, quantize

from mqa_gen.kernels import int8_dot
from mqa_gen.linear import QuantizedLinear

SHAPES = [("SmolLM2 MLP", "Q4_1", 1536, 576), ("SmolLM2 head", "Q8_0", 49152, 576),
          ("Gemma 3 head", "Q8_0", 262144, 640)]


def timed(fn, calls: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"instructions: {int8_dot.ISA}; Numba threads: {os.environ.get('NUMBA_NUM_THREADS', 'default')}; "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"| matrix | type | float32 (µs) | int8 dot (µs) | of which rounding x | speed-up |")
    print("|---|---|---:|---:|---:|---:|")
    for label, type_name, rows, cols in SHAPES:
        w = rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(0.05)
        lin = QuantizedLinear(quantize(w, GGMLQuantizationType[type_name]), type_name, rows, cols)
        fast = QuantizedLinear(None, type_name, rows, cols, packed=lin.packed)
        fast.set_int8_dot(True)
        x = rng.standard_normal(cols).astype(np.float32)
        y = np.empty(rows, np.float32)
        calls = max(5, int(2e5 // rows))
        times: dict[str, list[float]] = {"float": [], "int8": [], "round": []}
        for _ in range(args.rounds):
            times["float"].append(timed(lambda: lin.matvec(x, y), calls))
            times["int8"].append(timed(lambda: fast.matvec(x, y), calls))
            times["round"].append(timed(lambda: int8_dot.quantized(x[None]), calls))
        f, i, r = (statistics.median(times[k]) for k in ("float", "int8", "round"))
        print(f"| {label} | {type_name} {rows}×{cols} | {f:,.1f} | {i:,.1f} | {r:,.1f} | {f / i:.2f}× |")


if __name__ == "__main__":
    main()
