#!/usr/bin/env python3
"""Benchmark text generation: mqa-gen against Hugging Face transformers on the same GGUF.

What it measures (GUIDE.md §5), for the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) with the
same token ids for every engine and the same thread count (default 2):

* prefill tokens/s for prompts of 128 and 512 tokens (``--prefill``); the ids are the tokens of
  ``sample_prompts/long_document.txt`` followed by ``mqa_gen/data/ppl_english.txt``, truncated;
* decode tokens/s for 128 greedy steps (``--decode-tokens``) at depth 0 (after the short prompt
  ``sample_prompts/capital_france.txt``) and at depth 2048 (``--depths``; the text ids repeated);
  the prompt is prefilled once and one untimed step decoded, then each repeat cuts the cache back to
  the depth and decodes again;
* time to first token (TTFT): cold — a fresh process with an empty Numba cache, so it compiles the
  kernels as a first install does — and warm — the median of ``--repeats`` later fresh processes
  that find the kernels cached;
  for mqa-gen this is the wall time of ``mqa-gen generate --prompt-file … --no-chat -n 1 --json``,
  for transformers of a small script that imports torch, loads the model and computes one token.
  "TTFT in-process" is the same thing inside an already loaded process (one prefill + argmax);
* peak RSS of each engine's process (``resource.getrusage`` in the child), and load time.

Each engine runs in its own subprocess (so memory and threads never mix) that prints one JSON line;
this parent collects them, prints a table with ratios ours / llama.cpp and ours / transformers, and writes
``BENCHMARKS.md`` (date, machine, load average, versions, the exact command, the table).
Speeds are the median of ``--repeats`` runs (default 3). Nothing here asserts a speed.

Two versions of mqa-gen in one run: an engine named ``mqa-gen@REV`` is mqa-gen as of the git
revision REV (a commit, tag or branch of this repository), shown as ``mqa-gen@<short hash>``. The
parent extracts ``git archive REV mqa_gen`` into its temporary directory (removed at the end; the
repository itself is not touched) and runs that engine's children, and its CLI for TTFT, with
``PYTHONPATH`` pointing there, so they import that tree instead of the installed one; each child
records the ``mqa_gen`` directory it imported (the parent stops if it is not the snapshot). A
fresh tree compiles its Numba kernels (a minute or more), so each snapshot first runs one untimed
child. The children use only the single-sequence API (``model.forward(tokens, cache)``,
``model.new_cache(n, dtype)``, ``bench_cache.rewind_for_timing``, ``stream_generate``,
``loading.load``, ``kernels.compile_kernels``), so REV must have these. "ours" in the ratio
columns is the first mqa-gen engine listed, every later mqa-gen engine is a peer; so
``--engines mqa-gen@HEAD,mqa-gen@v1`` gives HEAD / v1 (a snapshot of HEAD, unlike plain
``mqa-gen``, ignores uncommitted edits in the checkout).

An engine name ending in ``+int8`` (``mqa-gen+int8``, ``mqa-gen@REV+int8``) runs that mqa-gen with
int8 dot products on (``--int8-dot``; the library's ``model.set_int8_dot(True)``), so the default
float32 path and the fast path are measured side by side in one run.

``--rounds R`` runs every engine's child R times, round-robin in an order rotated each round
(A B, then B A, ...), so slow drift of a shared machine falls on every engine alike; each speed is
then the median of all R × ``--repeats`` runs, and the notes give each engine's spread (min–max of
the runs) and, for mqa-gen peers, the spread of the per-round ratios (each round's two medians
measured minutes apart).

The transformers engine runs in the interpreter given by ``--transformers-python`` (default: this
one) and is skipped, with a note, when ``torch`` and ``transformers`` do not import there. To
install it into a virtual environment (use exactly this torch version on these machines)::

    pip install torch==2.13.0 transformers gguf accelerate

It must also find the GGUF file: the parent passes the path of the file mqa-gen resolved, so the
other interpreter needs nothing else. ``AutoModelForCausalLM.from_pretrained(folder,
gguf_file=..., dtype=torch.float32)`` dequantises every weight to float32; it runs on CPU with the
default (sdpa) attention, under ``torch.inference_mode()``, decoding with a manual greedy loop over
a ``DynamicCache``.

The llama.cpp engine runs llama-cpp-python's low-level API (``llama_decode`` on one sequence,
logits read with ``llama_get_logits_ith``) in the interpreter given by ``--llamacpp-python``, with
the same GGUF, token ids and thread count. llama-cpp-python builds llama.cpp from source (several
minutes on 2 cores); on these machines a native build (``GGML_NATIVE=ON``) died with an illegal
instruction, so build it for AVX2::

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF" \
        pip install llama-cpp-python

The llama-bench engine runs llama.cpp's own benchmark tool (``--llama-bench PATH``, built from the
same sdist; see benchmarks/README.md) as a fresh process per round: ``llama-bench -p N -n
DECODE_TOKENS -d DEPTH -r REPEATS -t THREADS -ctk/-ctv f16 -o json``. Its figures are llama.cpp's
mean tokens/s over its repetitions on its own prompt tokens (the same lengths and depths, not the
same ids), with no Python in the loop; it has no time to first token.

Examples::

    python benchmarks/bench_generate.py                       # defaults, writes BENCHMARKS.md
    python benchmarks/bench_generate.py --transformers-python /path/to/venv/bin/python
    python benchmarks/bench_generate.py --engines mqa-gen --no-cold --no-write
    python benchmarks/bench_generate.py --thread-check        # also: NUMBA_NUM_THREADS=1 vs 2
    python benchmarks/bench_generate.py --engines mqa-gen@HEAD,mqa-gen@49eed5a --rounds 3 \
        --prefill 512 --no-cold --no-write                    # this commit vs an older one

The child side of this file imports neither mqa_gen nor rich at module level, so it runs under an
interpreter that has only torch and transformers.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHORT_PROMPT_FILE = REPO / "sample_prompts" / "capital_france.txt"
TEXT_FILES = [REPO / "sample_prompts" / "long_document.txt", REPO / "mqa_gen" / "data" / "ppl_english.txt"]
ENGINES = ("mqa-gen", "llama.cpp", "llama-bench", "transformers")
SPEED_KEYS = ("prefill_tokens_per_s", "decode_tokens_per_s")
LATER_ENGINES: dict[str, str] = {}
THREAD_VARS = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# ───────────────────────────── shared helpers ─────────────────────────────


def peak_rss_bytes() -> int:
    """Peak resident set size of this process, in bytes (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def median(values):
    return statistics.median(values) if values else None


#: Engine-name suffix for mqa-gen with ``--int8-dot`` (``mqa-gen+int8``, ``mqa-gen@REV+int8``).
INT8_SUFFIX = "+int8"


def is_mqa_gen(engine: str) -> bool:
    """True for the installed mqa-gen and for a snapshot of it, ``mqa-gen@REV``, either with
    :data:`INT8_SUFFIX`."""
    engine = engine.removesuffix(INT8_SUFFIX)
    return engine == "mqa-gen" or engine.startswith("mqa-gen@")


def thread_env(threads: int, numba_threads: int | None = None) -> dict:
    """The environment for a child: every thread pool set to ``threads``."""
    env = dict(os.environ)
    for var in THREAD_VARS:
        env[var] = str(threads)
    if numba_threads is not None:
        env["NUMBA_NUM_THREADS"] = str(numba_threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# ───────────────────────────── child: mqa-gen ─────────────────────────────


def measure_speeds(spec: dict, *, prefill_fresh, start, rewind, step) -> dict:
    """Prefill and decode speeds of one engine, the same way for every engine.

    prefill_fresh(ids): run ids on an empty cache. start(prompt) -> first greedy token after
    prefilling prompt on an empty cache. rewind(n): cut the cache back to n tokens.
    step(token) -> next greedy token (one decode step). Speeds are medians of spec["repeats"];
    prefill runs once more first as a warm-up, decode one untimed step after each prompt (so the
    first repeat does not pay for loading the decode kernels).
    """
    repeats, n = spec["repeats"], spec["decode_tokens"]
    out: dict = {}
    if spec.get("prefill"):
        prefill = {}
        for length, ids in spec["prefill"].items():
            speeds = []
            for r in range(repeats + 1):
                t0 = time.perf_counter()
                prefill_fresh(ids)
                if r:
                    speeds.append(len(ids) / (time.perf_counter() - t0))
            prefill[length] = {"median": median(speeds), "runs": speeds}
        out["prefill_tokens_per_s"] = prefill
    decode, tokens_at_depth0 = {}, None
    for depth, prompt in spec["depth_prompts"].items():
        first = start(prompt)
        step(first)  # warm-up; the rewind below drops it
        speeds = []
        for _ in range(repeats):
            rewind(len(prompt))
            token, tokens = first, [first]
            t0 = time.perf_counter()
            for _ in range(n):
                token = step(token)
                tokens.append(token)
            speeds.append(n / (time.perf_counter() - t0))
        decode[depth] = {"median": median(speeds), "runs": speeds, "prompt_tokens": len(prompt)}
        if depth == "0":
            tokens_at_depth0 = tokens
    out["decode_tokens_per_s"] = decode
    out["greedy_ids_depth0"] = tokens_at_depth0
    return out


def child_mqa_gen(spec: dict) -> dict:
    t_start = time.perf_counter()
    import mqa_gen  # first: it configures OpenBLAS's threads before NumPy loads it

    import numba
    import numpy as np

    from mqa_gen.bench_cache import rewind_for_timing
    from mqa_gen.generate import stream_generate
    from mqa_gen.kernels import compile_kernels, kernels_are_compiled
    from mqa_gen.loading import load

    if not kernels_are_compiled():
        compile_kernels()
    loaded = load(spec["model_path"])
    model, tok = loaded.model, loaded.tokenizer
    int8_dot = os.environ.get("MQA_GEN_BENCH_INT8_DOT") == "1"  # set by engine_env for a +int8 engine
    if int8_dot:  # (an older snapshot has no such switch: it is only called when asked for)
        model.set_int8_dot(True)
    result = {
        "engine": "mqa-gen",
        "int8_dot": int8_dot,
        "source": str(Path(mqa_gen.__file__).resolve().parent),  # the installed tree or a snapshot's
        "versions": {"python": platform.python_version(), "numba": numba.__version__, "numpy": np.__version__},
        "threads": {"numba": numba.get_num_threads(), **{v: os.environ.get(v) for v in THREAD_VARS},
                    "OPENBLAS_THREAD_TIMEOUT": os.environ.get("OPENBLAS_THREAD_TIMEOUT")},
        "load_seconds": loaded.load_seconds,
        "startup_seconds": time.perf_counter() - t_start,
    }
    repeats, short = spec["repeats"], spec["short_ids"]

    if spec.get("prefill"):
        # TTFT in-process: a fresh cache, prefill the short prompt, first token out of the library's loop.
        ttft = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            gen = stream_generate(model, tok, short, max_tokens=1, eos_ids=(), ctx_size=len(short) + 8)
            next(iter(gen))
            ttft.append(time.perf_counter() - t0)
        result["ttft_inprocess_s"] = median(ttft[1:])

    state = {}

    def start(prompt):
        state["cache"] = model.new_cache(len(prompt) + spec["decode_tokens"] + 1, spec["cache_dtype"])
        return int(np.argmax(model.forward(prompt, state["cache"])))

    result.update(measure_speeds(
        spec,
        prefill_fresh=lambda ids: model.forward(ids, model.new_cache(len(ids) + 1, spec["cache_dtype"])),
        start=start,
        # A wrapped sliding-window ring (Gemma 3) cannot truncate exactly; for timing it need not.
        rewind=lambda n: rewind_for_timing(state["cache"], n),
        step=lambda token: int(np.argmax(model.forward([token], state["cache"]))),
    ))
    try:
        result["versions"]["numba_threading_layer"] = numba.threading_layer()
    except ValueError:  # no parallel region ran
        pass
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


# ───────────────────────────── child: transformers ─────────────────────────────


def _load_transformers(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    path = Path(spec["model_path"])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="sdpa"
    )
    model.eval()
    return torch, model, time.perf_counter() - t0


def _crop(cache, length: int) -> None:
    """Cut a DynamicCache back to ``length`` tokens. A negative argument removes that many tokens in
    transformers 5 (``crop(tokens_to_remove)``, which refuses positive values) and in 4.x
    (``crop(max_length)``, where negative counts from the end)."""
    remove = cache.get_seq_length() - length
    if remove > 0:
        cache.crop(-remove)


def child_transformers(spec: dict) -> dict:
    t_start = time.perf_counter()
    torch, model, load_seconds = _load_transformers(spec)
    import numpy as np
    import transformers
    from transformers import DynamicCache

    def forward(ids, cache):
        x = torch.tensor([ids], dtype=torch.long)
        return model(input_ids=x, past_key_values=cache, use_cache=True).logits[0, -1]

    result = {
        "engine": "transformers",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__},
        "threads": {"torch": torch.get_num_threads(), **{v: os.environ.get(v) for v in THREAD_VARS}},
        "load_seconds": load_seconds,
    }
    repeats, short = spec["repeats"], spec["short_ids"]
    with torch.inference_mode():
        if spec.get("mode") == "ttft":  # fresh process: import + load + one token, then exit
            int(torch.argmax(forward(short, DynamicCache())))
            return {"engine": "transformers", "load_seconds": load_seconds,
                    "startup_seconds": time.perf_counter() - t_start, "peak_rss_bytes": peak_rss_bytes()}
        result["startup_seconds"] = time.perf_counter() - t_start

        ttft = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            int(torch.argmax(forward(short, DynamicCache())))
            ttft.append(time.perf_counter() - t0)
        result["ttft_inprocess_s"] = median(ttft[1:])

        state = {}

        def start(prompt):
            state["cache"] = DynamicCache()
            return int(torch.argmax(forward(prompt, state["cache"])))

        result.update(measure_speeds(
            spec,
            prefill_fresh=lambda ids: forward(ids, DynamicCache()),
            start=start,
            rewind=lambda n: _crop(state["cache"], n),
            step=lambda token: int(torch.argmax(forward([token], state["cache"]))),
        ))
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


# ───────────────────────────── child: llama-bench ─────────────────────────────


def child_llama_bench(spec: dict) -> dict:
    """llama.cpp's llama-bench on the same GGUF: prefill lengths, decode at each depth. Its JSON
    rows carry n_prompt, n_gen, n_depth and avg_ts (mean tokens/s over its repetitions)."""
    kv = {"float16": "f16", "float32": "f32"}[spec["cache_dtype"]]
    cmd = [spec["llama_bench"], "-m", spec["model_path"], "-t", str(spec["threads"]), "-r", str(spec["repeats"]),
           "-ctk", kv, "-ctv", kv, "-o", "json"]
    prefill_lengths = ",".join(str(n) for n in spec.get("prefill", {}))
    runs = []
    if prefill_lengths:
        runs.append(cmd + ["-p", prefill_lengths, "-n", "0"])
    runs.append(cmd + ["-p", "0", "-n", str(spec["decode_tokens"]), "-d", ",".join(spec["depth_prompts"])])
    prefill, decode = {}, {}
    for run in runs:
        proc = subprocess.run(run, capture_output=True, text=True, check=True)
        for row in json.loads(proc.stdout):
            speeds = [float(v) for v in row.get("samples_ts", [row["avg_ts"]])]
            entry = {"median": median(speeds), "runs": speeds}
            if row["n_gen"]:
                decode[str(row["n_depth"])] = {**entry, "prompt_tokens": row["n_depth"]}
            else:
                prefill[str(row["n_prompt"])] = entry
    version = subprocess.run([spec["llama_bench"], "--version"], capture_output=True, text=True)
    return {"engine": "llama-bench", "prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode,
            "versions": {"llama-bench": (version.stdout + version.stderr).strip().splitlines()[:1]},
            "threads": {"llama-bench": spec["threads"]},
            # llama-bench runs as this child's child: its peak RSS is the children's maximum
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}


# ───────────────────────────── child: llama.cpp ─────────────────────────────


def child_llamacpp(spec: dict) -> dict:
    """llama.cpp through llama-cpp-python's low-level API (llama_decode on one sequence), so the
    figures are llama.cpp's own and not the Python wrapper's bookkeeping."""
    t_start = time.perf_counter()
    import llama_cpp
    import numpy as np

    t0 = time.perf_counter()
    threads = spec["threads"]
    ctx_len = max(len(p) for p in spec["depth_prompts"].values()) + spec["decode_tokens"] + 8
    ctx_len = max(ctx_len, max((len(ids) for ids in spec.get("prefill", {}).values()), default=0) + 8)
    kv_type = {"float16": llama_cpp.GGML_TYPE_F16, "f16": llama_cpp.GGML_TYPE_F16, "float32": llama_cpp.GGML_TYPE_F32,
               "f32": llama_cpp.GGML_TYPE_F32, "q8_0": llama_cpp.GGML_TYPE_Q8_0,
               "q4_0": llama_cpp.GGML_TYPE_Q4_0}[spec["cache_dtype"]]
    llm = llama_cpp.Llama(model_path=spec["model_path"], n_threads=threads, n_threads_batch=threads,
                          n_ctx=ctx_len, n_batch=512, n_ubatch=512, type_k=kv_type, type_v=kv_type,
                          verbose=False)
    load_seconds = time.perf_counter() - t0
    ctx, n_vocab = llm._ctx.ctx, llm.n_vocab()
    memory = llama_cpp.llama_get_memory(ctx)

    def forward(ids):
        for start in range(0, len(ids), 512):  # n_batch
            chunk = ids[start:start + 512]
            arr = (llama_cpp.llama_token * len(chunk))(*chunk)
            if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(chunk))) != 0:
                raise RuntimeError("llama_decode failed")
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))

    def keep(n_tokens):  # drop cached positions ≥ n_tokens
        llama_cpp.llama_memory_seq_rm(memory, 0, n_tokens, -1)

    result = {
        "engine": "llama.cpp",
        "versions": {"python": platform.python_version(), "llama_cpp_python": llama_cpp.__version__},
        "threads": {"llama.cpp": threads, **{v: os.environ.get(v) for v in THREAD_VARS}},
        "load_seconds": load_seconds,
    }
    repeats, short = spec["repeats"], spec["short_ids"]
    if spec.get("mode") == "ttft":
        keep(0)
        int(np.argmax(forward(short)))
        return {"engine": "llama.cpp", "load_seconds": load_seconds,
                "startup_seconds": time.perf_counter() - t_start, "peak_rss_bytes": peak_rss_bytes()}
    result["startup_seconds"] = time.perf_counter() - t_start

    ttft = []
    for _ in range(repeats + 1):
        keep(0)
        t0 = time.perf_counter()
        int(np.argmax(forward(short)))
        ttft.append(time.perf_counter() - t0)
    result["ttft_inprocess_s"] = median(ttft[1:])

    def start(prompt):
        keep(0)
        return int(np.argmax(forward(prompt)))

    def prefill_fresh(ids):
        keep(0)
        forward(ids)

    result.update(measure_speeds(spec, prefill_fresh=prefill_fresh, start=start, rewind=keep,
                                 step=lambda token: int(np.argmax(forward([token])))))
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def child_main(engine: str, spec_path: str) -> None:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    if engine == "probe-transformers":
        import torch
        import transformers

        result = {"torch": torch.__version__, "transformers": transformers.__version__}
    elif engine == "mqa-gen":
        result = child_mqa_gen(spec)
    elif engine == "transformers":
        result = child_transformers(spec)
    elif engine == "llama.cpp":
        result = child_llamacpp(spec)
    elif engine == "llama-bench":
        result = child_llama_bench(spec)
    else:
        raise SystemExit(f"unknown child engine {engine!r}")
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


# ───────────────────────────── parent ─────────────────────────────


def loadavg() -> tuple[float, float, float]:
    with open("/proc/loadavg") as f:
        a, b, c = f.read().split()[:3]
    return float(a), float(b), float(c)


def git_state() -> str:
    """Commit of the checkout and how many files differ from it (others may be editing)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=REPO, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mqa_gen"], capture_output=True,
                               text=True, cwd=REPO, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head}" + (f" + uncommitted changes in {len(dirty)} file(s) under mqa_gen/" if dirty else " (clean mqa_gen/)")


def resolve_revision(rev: str) -> tuple[str, str]:
    """(full, short) commit hash of a git revision of this repository.

    Raises:
        ValueError: ``rev`` names no commit here.
    """
    out = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                         capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise ValueError(f"{rev!r} is not a commit of {REPO}")
    full = out.stdout.strip()
    short = subprocess.run(["git", "rev-parse", "--short", full], capture_output=True, text=True,
                           cwd=REPO, check=True).stdout.strip()
    return full, short


def extract_snapshot(commit: str, dest: Path) -> Path:
    """Write ``mqa_gen/`` as of ``commit`` (``git archive``, so neither the checkout nor its git
    state changes) into the new directory ``dest``; returns ``dest``, the entry for PYTHONPATH."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", commit, "mqa_gen"], capture_output=True,
                             cwd=REPO, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def engine_env(threads: int, source: Path | None, engine: str = "") -> dict:
    """An engine's environment: :func:`thread_env`, for a snapshot its tree first on PYTHONPATH
    (before the installed package, which an editable install finds only after sys.path), and for a
    ``+int8`` engine the variable that makes its child switch int8 dot products on."""
    env = thread_env(threads)
    if engine.endswith(INT8_SUFFIX):
        env["MQA_GEN_BENCH_INT8_DOT"] = "1"
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(source)] + [x for x in [env.get("PYTHONPATH")] if x])
    return env


def merge_rounds(runs: list[dict]) -> dict:
    """One engine's result from its children of several rounds (each with a ``round`` index): each
    speed pools the runs of every round (median of all), in-process times are the median over the
    rounds, peak RSS the largest; ``per_round`` keeps each round's own speed medians."""
    out = dict(runs[0])
    for key in SPEED_KEYS:
        if key in out:
            out[key] = {}
            for name, first in runs[0][key].items():
                pooled = [x for r in runs for x in r[key][name]["runs"]]
                out[key][name] = {**first, "runs": pooled, "median": median(pooled)}
    for key in ("load_seconds", "startup_seconds", "ttft_inprocess_s", "process_wall_seconds"):
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = median(values) if values else None
    out["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in runs)
    out["per_round"] = [{"round": r["round"], **{key: {name: v["median"] for name, v in r.get(key, {}).items()}
                                                  for key in SPEED_KEYS}} for r in runs]
    return out


def speed_labels(res: dict):
    """(label, key, name) of each speed an engine reported: prefill lengths, then decode depths."""
    for key, what in zip(SPEED_KEYS, ("prefill {} tok", "decode @ depth {}")):
        for name in res.get(key, {}):
            yield what.format(name), key, name


def spread_note(engine: str, res: dict) -> str:
    """The min–max of each speed's runs, for reading a difference against the noise."""
    cells = []
    for label, key, name in speed_labels(res):
        runs = res[key][name]["runs"]
        cells.append(f"{label} {min(runs):,.1f}–{max(runs):,.1f} ({len(runs)} runs)")
    return f"{engine} speed spread (min–max tok/s): " + "; ".join(cells)


def round_ratio_note(ours: str, ours_res: dict, peer: str, peer_res: dict) -> str | None:
    """Each round's ratio of medians ours / peer (their children ran back to back), min–max per speed."""
    theirs = {r["round"]: r for r in peer_res.get("per_round", [])}
    paired = [(r, theirs[r["round"]]) for r in ours_res.get("per_round", []) if r["round"] in theirs]
    if len(paired) < 2:
        return None
    cells = []
    for label, key, name in speed_labels(ours_res):
        ratios = [a[key][name] / b[key][name] for a, b in paired if a[key].get(name) and b[key].get(name)]
        if ratios:
            cells.append(f"{label} {min(ratios):.2f}–{max(ratios):.2f}× (median {median(ratios):.2f}×)")
    return f"{ours} / {peer} per round ({len(paired)} rounds): " + "; ".join(cells)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def nproc() -> str:
    try:
        return subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return str(os.cpu_count())


class Runner:
    """Runs children, keeps their logs, samples the load average between them."""

    def __init__(self, spec_path: str, verbose: bool):
        self.spec_path, self.verbose = spec_path, verbose
        self.load_samples: list[float] = []

    def log(self, message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    def child(self, python: str, engine: str, env: dict, timeout: float = 3600) -> dict | None:
        self.load_samples.append(loadavg()[0])
        cmd = [python, str(Path(__file__).resolve()), "--child", engine, "--spec", self.spec_path]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        except subprocess.TimeoutExpired:
            self.log(f"{engine} child ran past {timeout:.0f} s; killed")
            return None
        wall = time.perf_counter() - t0
        self.load_samples.append(loadavg()[0])
        if self.verbose and proc.stderr.strip():
            print(proc.stderr, file=sys.stderr)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            self.log(f"{engine} child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            return None
        result = json.loads(lines[-1])
        result["process_wall_seconds"] = wall
        return result

    def timed(self, cmd: list[str], env: dict, timeout: float = 3600) -> tuple[float | None, dict | None, str]:
        """Wall time of a whole command (spawn → exit) and its JSON stdout, if any."""
        self.load_samples.append(loadavg()[0])
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        except subprocess.TimeoutExpired:
            self.log(f"command ran past {timeout:.0f} s; killed: {shlex.join(cmd)}")
            return None, None, ""
        wall = time.perf_counter() - t0
        self.load_samples.append(loadavg()[0])
        payload = None
        if proc.returncode == 0:
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            payload = json.loads(lines[-1]) if lines else None
        else:
            self.log(f"command failed (exit {proc.returncode}): {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
            wall = None  # a failed start has no time to first token
        return wall, payload, proc.stderr


def build_spec(args) -> dict:
    """Resolve the model and build the token ids every engine gets."""
    from mqa_gen.loading import load

    loaded = load(args.model)
    tok = loaded.tokenizer
    text_ids: list[int] = []
    for path in TEXT_FILES:
        text_ids += tok.encode(path.read_text(encoding="utf-8"), add_bos=False)
    # Prompts start with BOS when the model's file asks for it (Gemma does; without BOS its output
    # degenerates and tiny numeric differences between engines decide the tokens).
    bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    short_ids = tok.encode(SHORT_PROMPT_FILE.read_text(encoding="utf-8").strip())

    def take(n: int) -> list[int]:
        reps = -(-n // len(text_ids))
        return (bos + text_ids * reps)[:n]

    depth_prompts = {str(d): (short_ids if d == 0 else take(d)) for d in args.depths}
    return {
        "model_path": loaded.path,
        "model_name": args.model,
        "threads": args.threads,
        "repeats": args.repeats,
        "decode_tokens": args.decode_tokens,
        "cache_dtype": args.cache_dtype,
        "short_ids": short_ids,
        "prefill": {str(n): take(n) for n in args.prefill},
        "depth_prompts": depth_prompts,
        "text_tokens": len(text_ids),
        "llama_bench": args.llama_bench,
    }


def wait_for_quiet(max_load: float, minutes: float, log) -> None:
    deadline = time.monotonic() + minutes * 60
    while True:
        one = loadavg()[0]
        if one <= max_load:
            return
        if time.monotonic() >= deadline:
            log(f"load average still {one:.2f} > {max_load} after {minutes:g} min; running anyway")
            return
        log(f"load average {one:.2f} > {max_load}; waiting (up to {minutes:g} min in all)")
        time.sleep(30)


def mqa_gen_cli() -> list[str]:
    exe = Path(sys.executable).parent / "mqa-gen"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("mqa-gen")
    return [found] if found else [sys.executable, "-m", "mqa_gen.cli"]


def timed_runs(runner: Runner, cmd: list[str], env: dict, n: int):
    """Run ``cmd`` n times: (median wall time or None if any run failed, the last payload, stderr)."""
    walls, payload, stderr = [], None, ""
    for _ in range(n):
        wall, payload, stderr = runner.timed(cmd, env)
        walls.append(wall)
    return (None if None in walls else median(walls)), payload, stderr


def measure_ttft_cli(runner: Runner, args, spec: dict, engine: str, cold: bool, env: dict) -> dict:
    """Cold (one run) and warm (median of ``--repeats`` runs) TTFT of fresh processes: wall time
    spawn → exit, one token. ``env``: the engine's environment (threads; PYTHONPATH of a snapshot)."""
    out: dict = {}
    env = dict(env)
    if is_mqa_gen(engine):
        cmd = mqa_gen_cli() + ["generate", "-m", spec["model_path"], "--prompt-file", str(SHORT_PROMPT_FILE),
                               "--no-chat", "-n", "1", "--json", "--threads", str(args.threads),
                               "--cache-dtype", args.cache_dtype] + (["--int8-dot"] if engine.endswith(INT8_SUFFIX) else [])
        with tempfile.TemporaryDirectory(prefix="bench-numba-") as tmp:
            # An empty Numba cache makes the first run compile every kernel, as on a fresh install.
            env["NUMBA_CACHE_DIR"] = os.path.join(tmp, "numba")
            runs = (["cold"] if cold else []) + ["warm"]
            if not cold:  # fill the private cache first so "warm" really finds the kernels cached
                runner.timed(cmd, env)
            for label in runs:
                wall, payload, stderr = timed_runs(runner, cmd, env, 1 if label == "cold" else args.repeats)
                out[f"ttft_{label}_s"] = wall
                if payload:
                    out[f"load_{label}_s"] = payload["stats"].get("load_seconds")
                    out[f"rss_{label}_bytes"] = payload["stats"].get("peak_rss_bytes")
                if label == "cold":
                    out["cold_said_compiling"] = "ompil" in stderr
        out["ttft_command"] = shlex.join(cmd)
    elif engine == "llama-bench":
        pass  # llama-bench has no time to first token
    else:
        python = args.llamacpp_python if engine == "llama.cpp" else args.transformers_python
        for label in (["cold"] if cold else []) + ["warm"]:
            wall, payload, _ = timed_runs(
                runner, [python, str(Path(__file__).resolve()), "--child", engine, "--spec", runner.spec_path + ".ttft"],
                env, 1 if label == "cold" else args.repeats)
            out[f"ttft_{label}_s"] = wall
            if payload:
                out[f"load_{label}_s"] = payload.get("load_seconds")
    return out


# ───────────────────────────── report ─────────────────────────────


def fmt(value, kind: str) -> str:
    if value is None:
        return "—"
    if kind == "tps":
        return f"{value:,.1f}"
    if kind == "s":
        return f"{value:.2f} s" if value >= 0.1 else f"{value * 1000:.0f} ms"
    if kind == "mib":
        return f"{value / 2**20:,.0f} MiB"
    return str(value)


def build_rows(results: dict, spec: dict, args) -> list[tuple[str, str, str, dict]]:
    """(metric, kind, better, {engine: value}) rows."""
    rows = []

    def get(engine, *keys):
        v = results.get(engine)
        for k in keys:
            if not isinstance(v, dict):
                return None
            v = v.get(k)
        return v

    for n in args.prefill:
        rows.append((f"prefill {n} tok (tok/s)", "tps", "↑",
                     {e: get(e, "prefill_tokens_per_s", str(n), "median") for e in results}))
    for d in args.depths:
        plen = len(spec["depth_prompts"][str(d)])
        label = f"decode @ depth {d} (tok/s)" if d else f"decode @ depth 0, {plen}-tok prompt (tok/s)"
        rows.append((label, "tps", "↑", {e: get(e, "decode_tokens_per_s", str(d), "median") for e in results}))
    rows.append(("TTFT in-process, after load", "s", "↓", {e: get(e, "ttft_inprocess_s") for e in results}))
    rows.append(("TTFT cold (fresh process, empty kernel cache)", "s", "↓", {e: get(e, "ttft_cold_s") for e in results}))
    rows.append(("TTFT warm (fresh process, kernels cached)", "s", "↓", {e: get(e, "ttft_warm_s") for e in results}))
    rows.append(("load time in process", "s", "↓", {e: get(e, "load_seconds") for e in results}))
    rows.append(("peak RSS of the bench process", "mib", "↓", {e: get(e, "peak_rss_bytes") for e in results}))
    return rows


PEERS = ("llama.cpp", "llama-bench", "transformers")


def ours_and_peers(engines: list[str]) -> tuple[str | None, list[str]]:
    """"ours" is the first mqa-gen engine listed; its peers are llama.cpp, transformers and every
    later mqa-gen engine (another tree's snapshot)."""
    ours = next((e for e in engines if is_mqa_gen(e)), None)
    return ours, [p for p in PEERS if p in engines] + [e for e in engines if is_mqa_gen(e) and e != ours]


def ratio(row_values: dict, ours: str | None, peer: str) -> str:
    mine, theirs = row_values.get(ours), row_values.get(peer)
    if not mine or not theirs:
        return "—"
    return f"{mine / theirs:.2f}×"


def table_cells(rows, engines: list[str]) -> tuple[list[str], list[list[str]]]:
    """Headers and body: one column per engine, then ours / peer for each peer that ran."""
    ours, peers = ours_and_peers(engines)
    headers = ["metric", "better"] + engines + [f"ours / {p}" for p in peers]
    body = [[name, better] + [fmt(values.get(e), kind) for e in engines] + [ratio(values, ours, p) for p in peers]
            for name, kind, better, values in rows]
    return headers, body


def ratio_legend(engines: list[str]) -> str:
    ours, _ = ours_and_peers(engines)
    return (f"Ratios are {ours or 'mqa-gen'} / the other engine: above 1× is better for speeds (↑), below 1× "
            "is better for times and memory (↓).")


def print_table(rows, engines: list[str], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    headers, body = table_cells(rows, engines)
    if Console is not None:
        table = Table(title=title)
        for i, h in enumerate(headers):
            table.add_column(h, justify="left" if i == 0 else "right")
        for cells in body:
            table.add_row(*cells)
        Console(width=None if sys.stdout.isatty() else 140).print(table)
    else:
        print(title)
        widths = [max(len(r[i]) for r in [headers] + body) for i in range(len(headers))]
        for cells in [headers] + body:
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))))


def markdown_table(rows, engines: list[str]) -> str:
    headers, body = table_cells(rows, engines)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def write_markdown(path: Path, *, args, spec, results, rows, engines, notes, meta) -> None:
    keys = ("python", "numba", "numba_threading_layer", "numpy", "torch", "transformers")
    parts = []
    for engine, r in results.items():
        v = r.get("versions", {})
        parts.append(f"{engine}: " + ", ".join(f"{k.replace('_', ' ')} {v[k]}" for k in keys if k in v))
    ver = "; ".join(parts)
    lines = [
        "# Benchmarks",
        "",
        "Generated by `benchmarks/bench_generate.py` (see its docstring for what each figure means). "
        "Re-run it to refresh this file; numbers from a shared machine are noisy, compare ratios from the same run.",
        "",
        f"- date: {meta['date']} (start of the run)",
        f"- machine: {meta['nproc']} CPUs (`nproc`), {meta['cpu']}; {platform.system()} {platform.machine()}",
        f"- load average at start: {meta['load_start'][0]:.2f} / {meta['load_start'][1]:.2f} / {meta['load_start'][2]:.2f}"
        f" (1 / 5 / 15 min); during the run (1-min, sampled between steps): min {meta['load_min']:.2f},"
        f" max {meta['load_max']:.2f}; at the end {meta['load_end'][0]:.2f}",
        f"- versions: {ver}",
        f"- mqa-gen code: commit {meta['git_start']} at the start; {meta['git_end']} at the end",
        *[f"- {label}: `git archive {full} mqa_gen`, first on PYTHONPATH"
          for label, full in meta["snapshots"].items()],
        f"- model: `{spec['model_name']}` ({Path(spec['model_path']).name}), threads: {args.threads} "
        f"(NUMBA/OMP/OPENBLAS/MKL_NUM_THREADS={args.threads}, torch.set_num_threads({args.threads}); "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
        f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset')})",
        f"- KV cache: {args.cache_dtype} for mqa-gen and llama.cpp; transformers keeps float32",
        f"- speeds: median of {args.repeats} repeats (prefill after one warm-up run, decode after one untimed step)"
        + (f" in each of {args.rounds} rounds, pooled ({args.rounds * args.repeats} runs)" if args.rounds > 1 else "")
        + f"; decode = {args.decode_tokens} greedy single-token forward steps, tokens/s = steps / time",
        f"- total wall time of the benchmark: {meta['total_seconds']:.0f} s",
        "- command:",
        "",
        "```",
        meta["command"],
        "```",
        "",
        markdown_table(rows, engines),
        "",
        ratio_legend(engines),
        "",
    ]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    path.write_text("\n".join(lines) + kept_sections(path), encoding="utf-8")


#: Everything from this marker on in BENCHMARKS.md is written by hand or by other scripts
#: (prompt cache, bench-cache, profiles) and survives a rewrite of the generated part above it.
KEEP_MARKER = "<!-- kept: sections below are not rewritten by bench_generate.py -->"


def kept_sections(path: Path) -> str:
    """The tail of the existing report from :data:`KEEP_MARKER` on ("" when there is none)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return ""
    at = text.find(KEEP_MARKER)
    return "\n" + text[at:] if at >= 0 else ""


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def parse_engines(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    for name in names:
        if name.removesuffix(INT8_SUFFIX) != name and is_mqa_gen(name):
            continue  # mqa-gen with --int8-dot
        if name in LATER_ENGINES:
            raise argparse.ArgumentTypeError(LATER_ENGINES[name])
        if name.startswith("mqa-gen@") and len(name) > len("mqa-gen@"):
            continue  # a git revision, resolved in main()
        if name not in ENGINES:
            raise argparse.ArgumentTypeError(f"unknown engine {name!r} (known: {', '.join(ENGINES)})")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", type=parse_engines, default=list(ENGINES),
                   help="comma-separated: mqa-gen,llama.cpp,transformers, mqa-gen@REV for mqa-gen "
                        "as of git revision REV, and +int8 after either for it with --int8-dot")
    p.add_argument("-m", "--model", default="smollm2-135m-instruct", help="model name or GGUF path")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="repeats per speed figure; the median is shown")
    p.add_argument("--rounds", type=int, default=1,
                   help="run each engine's speed child this many times, round-robin (default 1)")
    p.add_argument("--prefill", type=parse_ints, default=[128, 512], help="prefill prompt lengths (default 128,512)")
    p.add_argument("--depths", type=parse_ints, default=[0, 2048], help="decode depths (default 0,2048)")
    p.add_argument("--decode-tokens", type=int, default=128, help="greedy decode steps per run (default 128)")
    p.add_argument("--cache-dtype", choices=("float16", "float32", "f16", "f32", "q8_0", "q4_0"), default="float16",
                   help="KV cache element type for mqa-gen and llama.cpp (default float16, llama.cpp's "
                        "default; q8_0/q4_0 need an mqa-gen with quantised caches, not an older @REV; "
                        "transformers keeps the model's float32)")
    p.add_argument("--transformers-python", default=sys.executable,
                   help="interpreter with torch + transformers (default: this one)")
    p.add_argument("--llamacpp-python", default=sys.executable,
                   help="interpreter with llama-cpp-python installed (default: this one)")
    p.add_argument("--llama-bench", default=os.environ.get("LLAMA_BENCH") or shutil.which("llama-bench"),
                   help="llama.cpp's llama-bench binary for the llama-bench engine (default: $LLAMA_BENCH, "
                        "or llama-bench on PATH)")
    p.add_argument("--no-cold", dest="cold", action="store_false",
                   help="skip the cold-start TTFT (it compiles every Numba kernel)")
    p.add_argument("--thread-check", action="store_true",
                   help="also measure mqa-gen decode with NUMBA_NUM_THREADS=1 (BLAS still --threads), "
                        "all threads 1, and OMP_WAIT_POLICY=passive")
    p.add_argument("--max-load", type=float, default=1.5, help="wait while the 1-min load average is above this")
    p.add_argument("--wait-minutes", type=float, default=0.0,
                   help="wait up to this long for --max-load before starting (default 0: start at once)")
    p.add_argument("--output", default=str(REPO / "BENCHMARKS.md"), help="markdown report (default BENCHMARKS.md)")
    p.add_argument("--no-write", dest="write", action="store_false", help="do not write the markdown report")
    p.add_argument("--json", dest="json_out", default=None, help="also write every raw result to this JSON file")
    p.add_argument("-v", "--verbose", action="store_true", help="show the children's stderr")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        child_main(args.child, args.spec)
        return 0
    if args.repeats < 1 or args.decode_tokens < 1 or args.threads < 1 or args.rounds < 1:
        p.error("--repeats, --rounds, --decode-tokens and --threads must be ≥ 1")
    commits: dict[str, str] = {}  # snapshot engine label → full commit hash
    engines = []
    for name in args.engines:
        if name.startswith("mqa-gen@"):
            suffix = INT8_SUFFIX if name.endswith(INT8_SUFFIX) else ""
            try:
                full, short = resolve_revision(name.removesuffix(suffix).split("@", 1)[1])
            except ValueError as e:
                p.error(f"--engines {name}: {e}")
            name = f"mqa-gen@{short}{suffix}"
            commits[name] = full
        if name in engines:
            p.error(f"--engines lists {name} twice")
        engines.append(name)

    runner_log = lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True)  # noqa: E731
    if args.wait_minutes > 0:
        wait_for_quiet(args.max_load, args.wait_minutes, runner_log)
    load_start = loadavg()
    date_start = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    git_start = git_state()
    t_total = time.perf_counter()
    command = shlex.join([sys.executable, os.path.relpath(Path(__file__).resolve(), Path.cwd())] + sys.argv[1:])
    notes = []

    spec = build_spec(args)
    shown_order = list(engines)
    results: dict[str, dict] = {}
    extra_versions: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-spec-") as tmp:
        spec_path = os.path.join(tmp, "spec.json")
        Path(spec_path).write_text(json.dumps(spec))
        Path(spec_path + ".ttft").write_text(json.dumps({**spec, "mode": "ttft"}))
        runner = Runner(spec_path, args.verbose)
        # Snapshots live in tmp, so they (and the Numba caches their first child writes) go with it.
        sources = {label: extract_snapshot(full, Path(tmp) / label) for label, full in commits.items()}
        if sources:
            # A fresh tree compiles its kernels in its first child; one untimed child each, so no
            # compilation (nor the load it causes) falls into a timed round.
            Path(spec_path + ".warmup").write_text(json.dumps({**spec, "repeats": 1, "decode_tokens": 2}))
            warmup_runner = Runner(spec_path + ".warmup", args.verbose)
            for engine, source in sources.items():
                runner.log(f"{engine}: compiling its kernels in an untimed child")
                if warmup_runner.child(sys.executable, "mqa-gen", engine_env(args.threads, source)) is None:
                    notes.append(f"{engine}: the warm-up child failed; see stderr of the run.")

        if "llama.cpp" in engines:
            probe = subprocess.run([args.llamacpp_python, "-c", "import llama_cpp"], capture_output=True, text=True)
            if probe.returncode != 0:
                notes.append(f"llama.cpp skipped: llama_cpp does not import in `{args.llamacpp_python}`. "
                             "Install: `pip install llama-cpp-python` (builds llama.cpp; see the docstring).")
                runner.log(notes[-1])
                engines.remove("llama.cpp")
        if "llama-bench" in engines and not (args.llama_bench and os.access(args.llama_bench, os.X_OK)):
            notes.append("llama-bench skipped: no llama-bench binary (give --llama-bench PATH; "
                         "benchmarks/README.md says how to build it).")
            runner.log(notes[-1])
            engines.remove("llama-bench")
        if "transformers" in engines:
            probe = subprocess.run([args.transformers_python, str(Path(__file__).resolve()), "--child",
                                    "probe-transformers", "--spec", spec_path],
                                   capture_output=True, text=True, env=thread_env(args.threads))
            if probe.returncode != 0:
                why = (probe.stderr.strip().splitlines() or ["no output"])[-1]
                notes.append(f"transformers skipped: torch + transformers do not import in "
                             f"`{args.transformers_python}` ({why}). Install: `pip install torch==2.13.0 transformers gguf accelerate`.")
                runner.log(notes[-1])
                engines.remove("transformers")
            else:
                extra_versions = json.loads(probe.stdout.strip().splitlines()[-1])

        python = {"llama.cpp": args.llamacpp_python, "transformers": args.transformers_python}
        runs: dict[str, list[dict]] = {engine: [] for engine in engines}
        for r in range(args.rounds):
            # Round-robin in an order rotated each round, so no engine always runs first.
            k = r % len(engines) if engines else 0
            for engine in engines[k:] + engines[:k]:
                runner.log(f"{engine}: speeds (round {r + 1} of {args.rounds}, repeats={args.repeats})")
                res = runner.child(python.get(engine, sys.executable), "mqa-gen" if is_mqa_gen(engine) else engine,
                                   engine_env(args.threads, sources.get(engine), engine))
                if res is None:
                    notes.append(f"{engine}: the benchmark child of round {r + 1} failed; see stderr of the run.")
                    continue
                if engine in sources and Path(res["source"]) != (sources[engine] / "mqa_gen").resolve():
                    raise SystemExit(f"{engine}: the child imported mqa_gen from {res['source']}, "
                                     f"not from the snapshot {sources[engine]}")
                runs[engine].append({**res, "engine": engine, "round": r})
        for engine in engines:
            if not runs[engine]:
                continue
            res = merge_rounds(runs[engine])
            runner.log(f"{engine}: time to first token in fresh processes")
            res.update(measure_ttft_cli(runner, args, spec, engine, args.cold,
                                        engine_env(args.threads, sources.get(engine), engine)))
            results[engine] = res

        thread_check = {}
        if args.thread_check and "mqa-gen" in engines:
            check_spec = {**spec, "prefill": {}}
            Path(spec_path + ".decode").write_text(json.dumps(check_spec))
            decode_runner = Runner(spec_path + ".decode", args.verbose)
            for label, env in ((f"NUMBA_NUM_THREADS={args.threads}, BLAS {args.threads}",
                                thread_env(args.threads)),
                               (f"NUMBA_NUM_THREADS=1, BLAS {args.threads}", thread_env(args.threads, 1)),
                               ("all threads 1", thread_env(1)),
                               (f"NUMBA_NUM_THREADS={args.threads}, BLAS {args.threads}, OMP_WAIT_POLICY=passive",
                                {**thread_env(args.threads), "OMP_WAIT_POLICY": "passive"})):
                runner.log(f"thread check: mqa-gen decode with {label}")
                r = decode_runner.child(sys.executable, "mqa-gen", env)
                if r:
                    thread_check[label] = {d: v["median"] for d, v in r["decode_tokens_per_s"].items()}
            runner.load_samples += decode_runner.load_samples

    total = time.perf_counter() - t_total
    load_end = loadavg()
    samples = runner.load_samples or [load_start[0]]

    shown = [e for e in shown_order if e in results]
    ours, peers = ours_and_peers(shown)
    for peer in [p for p in peers if ours and (p == "transformers" or is_mqa_gen(p))]:
        a, b = results[ours].get("greedy_ids_depth0"), results[peer].get("greedy_ids_depth0")
        if a and b:
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            vs = "" if (ours, peer) == ("mqa-gen", "transformers") else f", {ours} vs {peer}"
            notes.append(
                f"greedy tokens at depth 0{vs}: identical for all {len(a)} tokens" if same is None and len(a) == len(b)
                else f"greedy tokens at depth 0{vs}: first difference at token {same}")
    for engine, res in results.items():
        if engine == "llama-bench":
            notes.append("llama-bench: llama.cpp's own tool; prefill and decode on its own prompt tokens (same "
                         "lengths and depths), mean of its repetitions per run; no time to first token.")
            continue
        for label in (["cold"] if args.cold else []) + ["warm"]:
            if res.get(f"ttft_{label}_s") is None:
                notes.append(f"{engine}: the {label} fresh-process run failed (its error is on the run's stderr).")
        if is_mqa_gen(engine) and res.get("cold_said_compiling") is not None:
            notes.append(f"{engine} cold start said on stderr that it compiles kernels: "
                         f"{'yes' if res['cold_said_compiling'] else 'NO'}.")
    if args.rounds > 1:
        notes.append(f"each engine's speed child ran {args.rounds} times, round-robin in an order rotated each round; "
                     f"speeds are medians of all {args.rounds} × {args.repeats} runs.")
        for peer in [p for p in peers if is_mqa_gen(p)]:
            note = round_ratio_note(ours, results[ours], peer, results[peer])
            if note:
                notes.append(note)
    notes.append(f"depth 0 decodes after the {len(spec['short_ids'])}-token prompt "
                 f"`{SHORT_PROMPT_FILE.relative_to(REPO)}`; depth-N prompts and prefill prompts are the "
                 f"{spec['text_tokens']} token ids of {' + '.join(str(f.relative_to(REPO)) for f in TEXT_FILES)}, "
                 "repeated and truncated; every engine gets the same ids.")
    notes.append("TTFT cold/warm = wall time of a whole fresh process (interpreter start, imports, load, one "
                 f"token, exit); cold is one run, warm the median of {args.repeats}; mqa-gen runs its CLI with a private empty NUMBA_CACHE_DIR for the cold run. "
                 "The OS file cache is not dropped, so 'cold' still reads the GGUF from page cache.")
    notes.append("peak RSS is the benchmark child's own peak (model + the largest prompt's activations + "
                 "a cache for the deepest prompt); CLI TTFT runs report theirs in the raw JSON.")
    notes += [spread_note(engine, results[engine]) for engine in shown]
    if thread_check:
        depths = list(next(iter(thread_check.values())).keys())
        cells = "; ".join(f"{label}: " + ", ".join(f"depth {d} {v[d]:.1f} tok/s" for d in depths if d in v)
                          for label, v in thread_check.items())
        notes.append(f"mqa-gen decode thread check (median of {args.repeats}): {cells}")

    rows = build_rows(results, spec, args)
    title = (f"{spec['model_name']}, {args.threads} threads, median of {args.repeats} repeats "
             f"(load avg start {load_start[0]:.2f}, max {max(samples):.2f})")
    print_table(rows, shown, title)
    print(ratio_legend(shown))
    for n in notes:
        print(f"- {n}")
    meta = {"date": date_start, "nproc": nproc(),
            "cpu": cpu_model(), "load_start": load_start, "load_end": load_end, "load_min": min(samples),
            "load_max": max(samples), "command": command, "total_seconds": total,
            "extra_versions": extra_versions, "git_start": git_start, "git_end": git_state(), "snapshots": commits}
    if args.write:
        write_markdown(Path(args.output), args=args, spec=spec, results=results, rows=rows,
                       engines=shown, notes=notes, meta=meta)
        print(f"wrote {args.output}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"meta": meta, "results": results, "thread_check": thread_check,
                                                   "notes": notes}, indent=1))
    print(f"total {total:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
