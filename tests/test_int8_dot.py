"""Int8 dot products (mqa_gen.kernels.int8_dot, ``--int8-dot``) against independent references:
the activation codes against the ``gguf`` package's Q8_0 quantiser (ggml's rounding), every
product against float64 NumPy on the ``gguf`` package's dequantised weights times the rounded
rows, both instruction sets (AVX-512 VNNI and AVX2), and the model paths (decode, prefill, fused
step, batches) against each other where they must agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quantize

from mqa_gen import decode_layer
from mqa_gen.kernels import int8_dot
from mqa_gen.linear import SMALL_BATCH

from test_quant_kernels import ALL_TYPES, TILE, quantized

RNG = np.random.default_rng(11)

pytestmark = pytest.mark.skipif(int8_dot.ISA is None, reason="the integer kernels need AVX2")


def _rounded_reference(x: np.ndarray) -> np.ndarray:
    """x̃ = codes × scales in float64 (the codes are ggml's Q8_0 codes: the first test)."""
    qx, dx, _ = int8_dot.quantized(x)
    return qx.astype(np.float64) * np.repeat(dx.astype(np.float64), int8_dot.X_BLOCK, axis=1)


def test_activation_codes_are_ggml_q8_0_codes():
    x = RNG.standard_normal((3, 256)).astype(np.float32) * np.float32(3.0)
    x[1, :32] = 0.0  # a zero block: scale 0, codes 0
    x[2, 40] = 1e-3  # a tiny value beside large ones rounds to 0
    qx, dx, qsum = int8_dot.quantized(x)
    blocks = quantize(x, GGMLQuantizationType.Q8_0).reshape(3, 8, 34)
    np.testing.assert_array_equal(qx.reshape(3, 8, 32), blocks[:, :, 2:].view(np.int8))
    np.testing.assert_array_equal(dx.astype(np.float16), blocks[:, :, :2].copy().view(np.float16)[..., 0])
    np.testing.assert_array_equal(qsum, qx.reshape(3, 16, 16).astype(np.int64).sum(axis=2))
    assert np.abs(qx).max() <= 127


def _check_products(lin, w, x):
    """lin(x) with integer products equals the float64 product of x̃ and the reference weights."""
    expected = _rounded_reference(x) @ w.astype(np.float64).T
    magnitude = np.abs(_rounded_reference(x)) @ np.abs(w).astype(np.float64).T
    got = lin(x)
    assert np.all(np.abs(got - expected) <= 1e-5 * magnitude + 1e-30)
    return got


SHAPES = {"Q4_1": (TILE + 3, 96), "Q8_0": (TILE - 1, 64), "Q5_0": (100, 576), "Q4_K": (TILE + 3, 512),
          "Q6_K": (TILE - 1, 256)}


@pytest.mark.parametrize("type_name", ALL_TYPES)
@pytest.mark.parametrize("n_rows", [1, 3, SMALL_BATCH + 6])  # decode, a batch, a prefill
def test_integer_products_equal_the_float64_product_of_the_rounded_rows(type_name, n_rows):
    lin, w = quantized(*SHAPES[type_name], type_name)
    x = RNG.standard_normal((n_rows, w.shape[1])).astype(np.float32)
    exact = lin(x)
    lin.set_int8_dot(True)
    fast = _check_products(lin, w, x)
    # Rounding the activations is the only change: the result moves, by about their rounding.
    assert not np.array_equal(fast, exact)
    lin.set_int8_dot(False)
    np.testing.assert_array_equal(lin(x), exact)  # off: the float32 kernels again, bit for bit


@pytest.mark.parametrize("type_name", ["Q4_1", "Q6_K"])
def test_a_row_does_not_depend_on_its_batch(type_name):
    """13 rows: the micro-kernel takes 8, then 4, then 1 (mqa_gen.kernels.int8_dot); a row alone
    gets the same bits."""
    lin, w = quantized(*SHAPES[type_name], type_name)
    lin.set_int8_dot(True)
    x = RNG.standard_normal((13, w.shape[1])).astype(np.float32)
    together = lin(x)
    for i in range(13):
        np.testing.assert_array_equal(lin(x[i:i + 1])[0], together[i])
        np.testing.assert_array_equal(lin.matvec(x[i]), together[i])


def test_the_avx2_kernels_in_a_fresh_process(tmp_path):
    """MQA_GEN_INT8_DOT_ISA=avx2 compiles the AVX2 instructions (vpmaddubsw/vpmaddwd/vpsignb) even
    on a VNNI CPU; a private Numba cache keeps this CPU's VNNI build out of it."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import numpy as np
        from mqa_gen.kernels import int8_dot
        from test_int8_dot import SHAPES, _check_products, quantized
        assert int8_dot.ISA == "avx2", int8_dot.ISA
        rng = np.random.default_rng(5)
        for type_name in ("Q4_1", "Q8_0", "Q6_K"):
            lin, w = quantized(*SHAPES[type_name], type_name)
            lin.set_int8_dot(True)
            for n in (1, 3, 13):
                _check_products(lin, w, rng.standard_normal((n, w.shape[1])).astype(np.float32))
        print("checked")
    """)
    env = {**os.environ, "MQA_GEN_INT8_DOT_ISA": "avx2", "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "checked"


def _greedy_logits(model, prompt, steps):
    cache = model.new_cache(64, "float16")
    logits = model.forward(prompt, cache)
    out, tokens = [], list(prompt)
    for _ in range(steps):
        tokens.append(int(np.argmax(logits)))
        logits = model.forward([tokens[-1]], cache)
        out.append(logits.copy())
    return np.stack(out), tokens


@pytest.mark.parametrize("model_name", ["smollm2", "gemma3"])
def test_the_model_with_int8_dot_products(request, monkeypatch, model_name):
    """Integer decode steps: the fused step gives the unfused path's logits bit for bit; a prefill
    of the same tokens picks the same greedy tokens, its logits as far from the decode's as the
    rounding moves either from float32 (rounding is discontinuous: the float32-order differences
    of the two paths flip some codes, BENCHMARKS.md); off again, the float32 logits bit for bit."""
    model = request.getfixturevalue(model_name).model
    prompt = [2, 651, 6037, 314, 5384]
    before, float_tokens = _greedy_logits(model, prompt, 6)
    model.set_int8_dot(True)
    try:
        assert model.int8_dot
        monkeypatch.setattr(decode_layer, "ENABLED", True)
        fused, tokens = _greedy_logits(model, prompt, 6)
        monkeypatch.setattr(decode_layer, "ENABLED", False)
        unfused, _ = _greedy_logits(model, prompt, 6)
        np.testing.assert_array_equal(fused, unfused)  # the fused step runs the same kernels
        prefill = model.forward(tokens, model.new_cache(64, "float16"), all_logits=True)[len(prompt) - 1:-1]
        np.testing.assert_array_equal(np.argmax(prefill[1:], axis=1), np.argmax(fused[:-1], axis=1))
        scale = np.abs(before).max()
        assert 1e-3 * scale < np.abs(fused - before).max() < 0.1 * scale  # moved, by the rounding's size
        assert np.abs(prefill[1:] - fused[:-1]).max() < 0.1 * scale
    finally:
        model.set_int8_dot(False)
    after, _ = _greedy_logits(model, prompt, 6)
    np.testing.assert_array_equal(after, before)


def test_a_batched_step_gives_each_sequence_its_own_logits(smollm2):
    from test_decode_layer import _decode_logits

    model = smollm2.model
    prompts = [[2, 651, 6037, 314, 5384], [2, 1276, 314], [2, 9, 10, 11, 12, 13, 14]]
    model.set_int8_dot(True)
    try:
        together = _decode_logits(model, prompts, 3)
        alone = [_decode_logits(model, [p], 3)[:, 0] for p in prompts]
    finally:
        model.set_int8_dot(False)
    for i in range(len(prompts)):
        np.testing.assert_array_equal(together[:, i], alone[i])


def test_generate_reports_the_switch_and_refuses_it_without_avx2(invoke, monkeypatch):
    result = invoke("generate", "--prompt", "The capital of France is", "--no-chat", "-n", "3", "--temp", "0",
                    "--int8-dot", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settings"]["int8_dot"] is True
    result = invoke("generate", "--prompt", "Hi", "--no-chat", "-n", "1", "--json")
    assert json.loads(result.stdout)["settings"]["int8_dot"] is False  # the process's model is switched off
    monkeypatch.setattr(int8_dot, "ISA", None)
    result = invoke("generate", "--prompt", "Hi", "--no-chat", "-n", "1", "--int8-dot")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == ["error: --int8-dot: the integer fast path needs an x86-64 CPU "
                                                  "with AVX2 or AVX-512 VNNI"]


def test_the_first_int8_run_compiles_once(monkeypatch, tmp_path):
    """The --int8-dot kernels have their own marker (a first run of the float32 path does not
    compile them); with it missing they are compiled (here: loaded from Numba's cache) and marked."""
    from mqa_gen.kernels import warmup

    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))  # the markers' folder; Numba keeps its own
    monkeypatch.setattr(warmup, "kernels_are_compiled", lambda: True)
    assert not warmup.int8_kernels_are_compiled()
    assert warmup.compile_int8_kernels() is True
    assert warmup.int8_kernels_are_compiled()
    assert warmup.compile_int8_kernels() is False
    assert int8_dot not in warmup.WARMED_MODULES


@pytest.mark.parametrize("types", [("Q4_1", "Q4_1", "Q4_1"), ("Q5_0", "Q5_0"), ("Q4_K", "Q6_K")])
@pytest.mark.parametrize("n_rows", [1, 3, SMALL_BATCH + 6])
def test_fused_projections_round_once_and_match_each_product(types, n_rows):
    """FusedProjections rounds x once for its matrices (one integer kernel for all of them); each
    result equals that matrix's own product bit for bit, mixed layouts included."""
    from mqa_gen.linear import FusedProjections

    cols = 256
    linears = [quantized(TILE + 3 * i, cols, t)[0] for i, t in enumerate(types)]
    for lin in linears:
        lin.set_int8_dot(True)
    x = RNG.standard_normal((n_rows, cols)).astype(np.float32)
    together = FusedProjections(linears)(x)
    for lin, y in zip(linears, together):
        np.testing.assert_array_equal(y, lin(x))
