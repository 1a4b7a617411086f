#!/usr/bin/env python3
"""One product alone: the float32 path against the integer one (mqa_gen.kernels.int8_dot,
``--int8-dot``; the activation's rounding included), for one row (a decode step) and for many (a
prefill chunk). One row: the float32 matrix × vector kernels (mqa_gen.kernels.quant) on the
shapes that dominate a decode step — SmolLM2's 1536 × 576 Q4_1 MLP matrix and 49152 × 576 Q8_0
output head, Gemma 3's 262,144 × 640 Q8_0 output head. Many rows: dequantise + BLAS, as a prefill
runs it (Numba on one thread beside BLAS, mqa_gen.thread_governor.one_numba_thread), on a 4-bit,
an int8 and a K-quant matrix of the two models (the heads left out: a prefill needs one row of
them). Random weights quantised by the ``gguf`` package; the kernels' threads as Numba has them
(``NUMBA_NUM_THREADS``). Kernels alternate in rounds and each time is the median of the rounds.
Prints a table; asserts nothing.

    python benchmarks/bench_int8_dot.py                                  # this CPU's instructions
    python benchmarks/bench_int8_dot.py --rows 1,64,512
    MQA_GEN_INT8_DOT_ISA=avx2 NUMBA_CACHE_DIR=/tmp/nc python benchmarks/bench_int8_dot.py   # AVX2 code
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import mqa_gen  # noqa: F401  (configures OpenBLAS's threads before NumPy loads it)
import numpy as np
from gguf import GGMLQuantizationType, quantize

from mqa_gen.kernels import int8_dot
from mqa_gen.linear import SMALL_BATCH, QuantizedLinear
from mqa_gen.thread_governor import one_numba_thread

#: (label, type, rows, cols, also timed with many rows of x)
SHAPES = [("SmolLM2 MLP", "Q4_1", 1536, 576, True), ("SmolLM2 head", "Q8_0", 49152, 576, False),
          ("Gemma 3 head", "Q8_0", 262144, 640, False), ("Gemma 3 W_q", "Q5_0", 1024, 640, True),
          ("Gemma 3 W_o", "Q4_K", 640, 1024, True), ("Gemma 3 W_down", "Q6_K", 640, 2048, True)]


#: K-quant super-block bytes and the offsets of its float16 scales (ggml-common.h's block_q4_K,
#: block_q6_K); gguf's quantize() has no K-quant encoder, so those matrices get random codes.
K_BLOCKS = {"Q4_K": (144, (0, 2)), "Q6_K": (210, (208,))}


def random_matrix(type_name: str, rows: int, cols: int, rng) -> np.ndarray:
    """A [rows, bytes] GGUF tensor of ``type_name``: gguf's quantisation of random weights, or for
    a K-quant random code bytes with small float16 scales."""
    if type_name not in K_BLOCKS:
        w = rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(0.05)
        return quantize(w, GGMLQuantizationType[type_name])
    size, scale_offsets = K_BLOCKS[type_name]
    blocks = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    for offset in scale_offsets:
        blocks[:, :, offset:offset + 2] = np.full((rows, cols // 256, 1), 0.01, np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def timed(fn, calls: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def float32_product(lin: QuantizedLinear, x: np.ndarray, y: np.ndarray):
    """The default path's product as the model runs it: the matrix × vector kernel for one row,
    the few-rows kernel up to SMALL_BATCH rows, dequantise + BLAS (Numba kept to one thread) for a
    prefill chunk."""
    if x.shape[0] == 1:
        return lambda: lin.matvec(x[0], y[0])
    if x.shape[0] <= SMALL_BATCH:
        return lambda: lin(x)

    def blas():
        with one_numba_thread():
            lin(x)

    return blas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", default="1,512", help="rows of x per product, comma-separated")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"instructions: {int8_dot.ISA}; Numba threads: {os.environ.get('NUMBA_NUM_THREADS', 'default')}; "
          f"load {os.getloadavg()[0]:.2f}")
    print("| matrix | type | rows of x | float32 (µs) | int8 dot (µs) | of which rounding x | speed-up | int8 GOP/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for n in (int(v) for v in args.rows.split(",")):
        for label, type_name, rows, cols, many in SHAPES:
            if n > 1 and not many:
                continue
            lin = QuantizedLinear(random_matrix(type_name, rows, cols, rng), type_name, rows, cols)
            fast = QuantizedLinear(None, type_name, rows, cols, packed=lin.packed)
            fast.set_int8_dot(True)
            x = rng.standard_normal((n, cols)).astype(np.float32)
            y = np.empty((n, rows), np.float32)
            calls = max(3, int(2e5 // (rows * n)))
            times: dict[str, list[float]] = {"float": [], "int8": [], "round": []}
            for _ in range(args.rounds):
                times["float"].append(timed(float32_product(lin, x, y), calls))
                times["int8"].append(timed(lambda: fast._int8_product(x, y), calls))
                times["round"].append(timed(lambda: int8_dot.quantized(x), calls))
            f, i, r = (statistics.median(times[k]) for k in ("float", "int8", "round"))
            gops = 2 * n * rows * cols / (i * 1e3)
            print(f"| {label} | {type_name} {rows}×{cols} | {n} | {f:,.1f} | {i:,.1f} | {r:,.1f} | {f / i:.2f}× "
                  f"| {gops:,.0f} |")


if __name__ == "__main__":
    main()
