#!/usr/bin/env python3
"""A bounded local load test of ``mqa-gen serve``: concurrent streaming clients against the same
requests sent one at a time, time to first token, and a client that leaves mid-stream.

Starts a server on 127.0.0.1 (a free port; ``--ignore-eos`` so every request generates exactly
``-n`` tokens), sends ``--clients`` streaming completions at once through the official ``openai``
client (one thread each; one of them closes its stream after 8 tokens), then the same requests one
at a time, and stops the server. Example::

    python benchmarks/bench_serve.py --clients 32 -n 64

Writes the ``serve-load`` section of BENCHMARKS.md (``--no-write`` to only print).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from report_section import loadavg, write_section

REPO = Path(__file__).resolve().parent.parent
SECTION = "serve-load"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream(client, prompt: str, n: int, leave_after: int | None = None) -> dict:
    """One streaming completion: its time to first token, tokens received and wall time."""
    t0 = time.perf_counter()
    first, tokens = None, 0
    response = client.completions.create(model="smollm2-135m-instruct", prompt=prompt, max_tokens=n, temperature=0,
                                         stream=True, logprobs=0)
    for chunk in response:
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.tokens:
            tokens += len(chunk.choices[0].logprobs.tokens)
            if first is None:
                first = time.perf_counter() - t0
        if leave_after is not None and tokens >= leave_after:
            response.close()
            break
    return {"ttft": first, "tokens": tokens, "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("-n", "--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    import openai

    port = free_port()
    env = {**os.environ, "NUMBA_NUM_THREADS": str(args.threads)}
    server = subprocess.Popen([sys.executable, "-c", "from mqa_gen.cli import main; main()", "serve", "--port",
                               str(port), "-b", str(args.clients), "-c", "512", "--ignore-eos", "-t",
                               str(args.threads), "-q"], env=env, stderr=subprocess.DEVNULL)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600)
        deadline = time.time() + 120
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.5)
        prompts = [f"Story {i}: once upon a time, in a village by the sea," for i in range(args.clients)]
        stream(client, prompts[0], 4)  # warm-up: kernels loaded, caches touched
        load = [loadavg()[0]]
        results: list[dict | None] = [None] * args.clients
        leaver = args.clients // 2

        def run(i: int) -> None:
            results[i] = stream(client, prompts[i], args.max_tokens, leave_after=8 if i == leaver else None)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        concurrent_wall = time.perf_counter() - t0
        load.append(loadavg()[0])
        stayed = [r for i, r in enumerate(results) if i != leaver]
        complete = sum(r is not None and r["tokens"] == args.max_tokens for r in stayed)
        ttfts = sorted(r["ttft"] for r in stayed if r and r["ttft"] is not None)
        concurrent_tokens = sum(r["tokens"] for r in results if r)
        t0 = time.perf_counter()
        one_at_a_time = [stream(client, q, args.max_tokens) for q in prompts]
        sequential_wall = time.perf_counter() - t0
        load.append(loadavg()[0])
        health = client.models.list().data[0].id
    finally:
        server.terminate()
        server.wait(30)
    seq_tokens = sum(r["tokens"] for r in one_at_a_time)
    seq_ttft = statistics.median(r["ttft"] for r in one_at_a_time)
    p95 = ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))]
    body = "\n".join([
        "## Serving: concurrent streaming clients (issue 16)", "",
        f"{_dt.datetime.now().isoformat(timespec='seconds')}, SmolLM2-135M Q4_1, `mqa-gen serve -b {args.clients} -c 512 "
        f"--ignore-eos -t {args.threads}` on 127.0.0.1, {args.clients} streaming completions × {args.max_tokens} tokens "
        f"through the `openai` client; load average 1 min {load[0]:.2f} at start, max {max(load):.2f}.", "",
        "| | wall | generated tokens | aggregate tok/s | time to first token |", "|---|---:|---:|---:|---:|",
        f"| {args.clients} clients at once | {concurrent_wall:.1f} s | {concurrent_tokens} | "
        f"{concurrent_tokens / concurrent_wall:.1f} | p50 {statistics.median(ttfts):.2f} s, p95 {p95:.2f} s |",
        f"| the same {args.clients} one at a time | {sequential_wall:.1f} s | {seq_tokens} | "
        f"{seq_tokens / sequential_wall:.1f} | median {seq_ttft:.2f} s |", "",
        f"{complete} of the {args.clients - 1} clients that stayed received all {args.max_tokens} tokens; client "
        f"{leaver} closed its stream after 8 tokens (it got {results[leaver]['tokens'] if results[leaver] else 0}) and "
        f"the server went on (it answered `/v1/models` with `{health}` afterwards). Concurrency gives "
        f"**{(concurrent_tokens / concurrent_wall) / (seq_tokens / sequential_wall):.1f}×** the aggregate tokens/s; "
        "time to first token grows with the queue of prefills ahead of a request. The one-at-a-time run comes "
        "second, so its prompts are still in the slots' caches (cache_prompt) and it skips their prefills: a "
        "baseline in its own favour.", "",
        f"Command: `python benchmarks/bench_serve.py --clients {args.clients} -n {args.max_tokens}`",
    ])
    print(body)
    if not args.no_write:
        write_section(Path(args.output), SECTION, body)


if __name__ == "__main__":
    main()
