"""Kernel warm-up: after ``compile_kernels`` the models compile nothing more, so a warm start only
loads Numba's cache; and the marker file records that the cache is warm."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# In a fresh process: warm up, note every compiled specialisation of every kernel, generate with
# each model and KV-cache type (a short prompt for the small-batch products, a long one for the
# dequantise-and-BLAS prefill, then decode), and print the specialisations the models added.
GENERATE_AFTER_WARM_UP = """
import functools, json, sys
from click.testing import CliRunner
from numba.core.registry import CPUDispatcher

import mqa_gen.cli.generate
from mqa_gen.cli import cli
from mqa_gen.kernels import compile_kernels
from mqa_gen.loading import load

mqa_gen.cli.generate.load_model = functools.lru_cache(lambda name, quiet: load(name))  # load each once


def specialisations():
    kernels = {}
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("mqa_gen.kernels."):
            for name, obj in vars(module).items():
                if isinstance(obj, CPUDispatcher) and obj.__module__ == module_name:
                    kernels[f"{module_name}.{name}"] = {str(s) for s in obj.signatures}
    return kernels


compile_kernels()
warm = specialisations()
long_prompt = "Count with me: " + ", ".join(str(i) for i in range(1, 16))
for model in sys.argv[1:]:
    for dtype in ("f32", "f16", "q8_0", "q4_0"):
        for prompt in ("Hi there", long_prompt):
            args = ["generate", "-m", model, "--prompt", prompt, "--no-chat", "-n", "2", "--temp", "0",
                    "--cache-dtype", dtype, "--quiet"]
            result = CliRunner().invoke(cli, args, catch_exceptions=False)
            assert result.exit_code == 0, result.output
added = {name: sorted(sigs - warm.get(name, set())) for name, sigs in specialisations().items()}
print(json.dumps({name: sigs for name, sigs in added.items() if sigs}))
"""


def test_models_compile_nothing_after_warm_up(smollm2_path, gemma3_path):
    """SmolLM2 (Q4_1 blocks, Q8_0 embeddings and head) and Gemma 3 (Q4_K, Q6_K, Q5_0, Q8_0 and
    sliding-window layers), with f32, f16, q8_0 and q4_0 caches, run only warmed specialisations."""
    proc = subprocess.run([sys.executable, "-c", GENERATE_AFTER_WARM_UP, smollm2_path, gemma3_path],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {}


def test_marker_file_follows_compile(tmp_path, monkeypatch):
    from mqa_gen.kernels import compile_kernels, kernels_are_compiled, warmup

    monkeypatch.setattr(warmup, "_forget_cached_kernels", lambda: None)  # keep this session's cache

    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))  # the marker sits beside it
    assert not kernels_are_compiled()
    compile_kernels()
    assert kernels_are_compiled()


def test_a_new_kernel_source_forgets_every_cached_kernel(tmp_path):
    """Numba would reload a caller compiled against an older callee: when the sources' digest
    changes, compile_kernels first deletes this package's cached kernels (and nothing else)."""
    from mqa_gen.kernels.warmup import _forget_cached_kernels

    ours = ["decode_layer.before_attention-160.py311.nbi", "decode_layer.before_attention-160.py311.1.nbc",
            "quant.q4_1_matvec-191.py311.nbi", "rowwise.rmsnorm-19.py311.2.nbc"]
    others = ["somebody_else.kernel-3.py311.nbi", "decode_layer.txt", "README"]
    for name in ours + others:
        (tmp_path / name).write_bytes(b"x")
    _forget_cached_kernels(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)
