"""Warm start to first token of a fresh ``mqa-gen generate -n 1`` process, with and without the
repacked-weight cache (issue 15), and where a fresh process spends its time.

    python benchmarks/bench_startup.py --runs 7                 # interleaved A/B, both models
    python benchmarks/bench_startup.py --breakdown -m gemma3-270m

A/B: "repack" sets ``MQA_GEN_NO_REPACK_CACHE=1`` (every start repacks, as before issue 15), "cache"
uses the cache (filled by one untimed run first). Runs alternate A B A B …; the medians of the wall
time spawn → exit are printed with the 1-minute load average before and after. Run it with the
Numba kernels already compiled (any earlier run does it).

--llama-completion PATH adds llama.cpp's ``llama-completion -m MODEL -p PROMPT -n 1 -t THREADS
--temp 0 -no-cnv`` (same GGUF, same prompt, its default warm-up run included, as a user runs it)
as a third variant in the same interleaved rounds, and the ratio of our cached start to it.

--breakdown: one fresh child process timing each phase in turn (imports, GGUF parse, tokenizer,
weights, first prefill with its kernel loads), as the CLI runs them but without the tokenizer
thread, so the phases add up; the interpreter start is the rest of the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PROMPT = "The capital of France is"


def child_breakdown(model: str) -> None:
    t0 = time.perf_counter()
    import numba  # noqa: F401 - the CLI imports these before loading
    from mqa_gen import kernels  # noqa: F401
    from mqa_gen.cli import cli  # noqa: F401
    from mqa_gen.gguf_file import read_gguf
    from mqa_gen.loading import load  # noqa: F401
    from mqa_gen.models import build_model, config_from_gguf
    from mqa_gen.registry import resolve_model
    from mqa_gen.repack_cache import RepackCache
    from mqa_gen.tokenizer import Tokenizer
    from dataclasses import replace

    t = {"imports": time.perf_counter() - t0}
    numba.set_num_threads(1)  # one thread: the phases measured, not the neighbours on a busy machine
    s = time.perf_counter()
    gguf = read_gguf(resolve_model(model))
    config = config_from_gguf(gguf)
    t["gguf parse"] = time.perf_counter() - s
    gguf = replace(gguf, repacked=RepackCache.open(gguf))  # holds Gemma's derived merges too
    s = time.perf_counter()
    tok = Tokenizer.from_gguf(gguf)
    t["tokenizer"] = time.perf_counter() - s
    s = time.perf_counter()
    net = build_model(gguf, config)
    if gguf.repacked is not None:
        gguf.repacked.save()
    t["weights (repack or cache)"] = time.perf_counter() - s
    import numpy as np

    ids = np.array(tok.encode(PROMPT), dtype=np.int64)
    s = time.perf_counter()
    net.forward(ids, net.new_cache(64))
    t["first prefill (kernel loads)"] = time.perf_counter() - s
    s = time.perf_counter()
    net.forward(ids, net.new_cache(64))
    t["second prefill (kernels loaded)"] = time.perf_counter() - s
    print(json.dumps(t))


def run(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", action="append", help="model name or path (repeatable; default both)")
    ap.add_argument("--runs", type=int, default=7, help="timed runs per variant")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument("--llama-completion", help="llama.cpp's llama-completion binary: a peer in the same rounds")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_breakdown(args.child)
        return
    models = args.model or ["smollm2-135m-instruct", "gemma3-270m"]
    exe = os.path.join(os.path.dirname(sys.executable), "mqa-gen")
    base = dict(os.environ)
    if args.breakdown:
        for model in models:
            for label, extra in (("repack", {"MQA_GEN_NO_REPACK_CACHE": "1"}), ("cache", {})):
                env = dict(base, **extra)
                start = time.perf_counter()
                out = subprocess.run([sys.executable, __file__, "--child", model], env=env, check=True,
                                     capture_output=True, text=True).stdout
                wall = time.perf_counter() - start
                phases = json.loads(out)
                phases["interpreter start + exit"] = wall - sum(phases.values())
                print(f"{model} [{label}] wall {wall:.2f} s: " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()))
        return
    for model in models:
        cmd = [exe, "generate", "-m", model, "--no-chat", "--prompt", PROMPT, "-n", "1", "--json",
               "--threads", str(args.threads)]
        variants = {"repack": (cmd, dict(base, MQA_GEN_NO_REPACK_CACHE="1")), "cache": (cmd, base)}
        if args.llama_completion:
            from mqa_gen.registry import resolve_model

            peer = [args.llama_completion, "-m", resolve_model(model), "-p", PROMPT, "-n", "1",
                    "-t", str(args.threads), "--temp", "0", "-no-cnv"]
            variants["llama-completion"] = (peer, base)
        run(cmd, base)  # fill the cache (and load the kernels once)
        times: dict[str, list[float]] = {k: [] for k in variants}
        load_before = os.getloadavg()[0]
        for _ in range(args.runs):
            for label, (command, env) in variants.items():
                times[label].append(run(command, env))
        load_after = os.getloadavg()[0]
        summary = {k: statistics.median(v) for k, v in times.items()}
        versus = (f", cache / llama-completion {summary['cache'] / summary['llama-completion']:.2f}×"
                  if "llama-completion" in summary else "")
        print(f"{model}: median " + ", ".join(f"{k} {v:.2f} s" for k, v in summary.items()) + versus +
              f" ({args.runs} runs each, interleaved; load average {load_before:.2f} → {load_after:.2f}); "
              f"all: " + json.dumps({k: [round(x, 2) for x in v] for k, v in times.items()}))


if __name__ == "__main__":
    main()
