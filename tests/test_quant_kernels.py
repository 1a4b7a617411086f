"""Quantised matrix × vector kernels against dequantise-then-NumPy (the ``gguf`` package's
reference dequantisation), on odd shapes as well as the real model's."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, dequantize, quantize

from mqa_gen.kernels.quant import TILE, int8_matmul, repack_q5_0, repack_q6_k, repack_q8_0
from mqa_gen.linear import QuantizedLinear, linear_from_gguf

RNG = np.random.default_rng(3)


# Byte offsets of the fp16 scale fields in one block of the K-quants (ggml-common.h), which the
# gguf package cannot quantise to: their test blocks are random bytes with sane fp16 scales.
K_QUANT_BLOCK = {"Q4_K": (144, (0, 2)), "Q6_K": (210, (208,))}


def random_raw(rows: int, cols: int, type_name: str) -> np.ndarray:
    qtype = GGMLQuantizationType[type_name]
    if type_name not in K_QUANT_BLOCK:
        return quantize(RNG.standard_normal((rows, cols)).astype(np.float32), qtype)  # uint8 [rows, bytes]
    size, fp16_offsets = K_QUANT_BLOCK[type_name]
    blocks = RNG.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    for offset in fp16_offsets:
        scale = (RNG.uniform(0.001, 0.05, (rows, cols // 256)) * RNG.choice([-1, 1], (rows, cols // 256)))
        blocks[:, :, offset:offset + 2] = scale.astype(np.float16)[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def quantized(rows: int, cols: int, type_name: str):
    raw = random_raw(rows, cols, type_name)
    reference = dequantize(raw, GGMLQuantizationType[type_name]).reshape(rows, cols).astype(np.float32)
    return QuantizedLinear(raw, type_name, rows, cols), reference


ALL_TYPES = ["Q4_1", "Q8_0", "Q5_0", "Q4_K", "Q6_K"]
SHAPES = [(1, 32), (TILE - 1, 64), (TILE + 3, 96), (100, 576), (192, 576)]
K_SHAPES = [(1, 256), (TILE - 1, 512), (TILE + 3, 256), (100, 768)]  # whole 256-weight super-blocks


@pytest.mark.parametrize("type_name,rows,cols", [(t, r, c) for t in ALL_TYPES
                                                 for r, c in (K_SHAPES if t.endswith("_K") else SHAPES)])
def test_matvec_equals_dequantised_matmul(type_name, rows, cols):
    lin, w = quantized(rows, cols, type_name)
    x = RNG.standard_normal(cols).astype(np.float32)
    expected = w.astype(np.float64) @ x
    magnitude = np.abs(w).astype(np.float64) @ np.abs(x)  # Σ|w x| per row: float32 rounding scales with it
    assert np.all(np.abs(lin.matvec(x) - expected) <= 1e-5 * magnitude)
    np.testing.assert_allclose(lin(x[None])[0], lin.matvec(x), rtol=0, atol=0)


@pytest.mark.parametrize("type_name", ALL_TYPES)
@pytest.mark.parametrize("n_rows", [2, 3, 16, 17, 40])  # small-batch kernel and dequantise + BLAS
def test_rows_and_prefill_path(type_name, n_rows):
    cols = 256 if type_name.endswith("_K") else 64
    lin, w = quantized(TILE + 5, cols, type_name)
    ids = np.array([0, TILE + 4, 7, 7])
    # The K-quants' scale products (d·sc) are formed once at repack, as gguf forms them: exact.
    np.testing.assert_array_equal(lin.rows(ids), w[ids])
    np.testing.assert_array_equal(lin.dequantize(), w)
    np.testing.assert_array_equal(lin.dequantize_transposed()[:, : TILE + 5], w.T)
    x = RNG.standard_normal((n_rows, cols)).astype(np.float32)
    expected = x.astype(np.float64) @ w.T
    magnitude = np.abs(x).astype(np.float64) @ np.abs(w).T
    assert np.all(np.abs(lin(x) - expected) <= 1e-5 * magnitude)


def test_real_model_tensors_stay_quantised(smollm2):
    gguf = smollm2.gguf
    q = linear_from_gguf(gguf, "blk.0.attn_q.weight", (576, 576))
    emb = linear_from_gguf(gguf, "token_embd.weight", (49152, 576))
    assert isinstance(q, QuantizedLinear) and q.type_name == "Q4_1"
    assert isinstance(emb, QuantizedLinear) and emb.type_name == "Q8_0"
    # Held bytes are the file's: 4-bit codes plus two float16 per 32 weights (Q4_1), 8-bit codes
    # plus one (Q8_0) — the tensors' byte sizes in the GGUF (576 rows fill whole tiles).
    assert q.nbytes == 576 * 576 // 2 + 2 * 2 * 576 * 576 // 32 == gguf.tensors["blk.0.attn_q.weight"].data.nbytes
    assert emb.nbytes == 49152 * 576 + 2 * 49152 * 576 // 32 == gguf.tensors["token_embd.weight"].data.nbytes
    x = RNG.standard_normal(576).astype(np.float32)
    w = dequantize(np.asarray(gguf.tensors["blk.0.attn_q.weight"].data), GGMLQuantizationType.Q4_1)
    np.testing.assert_allclose(q.matvec(x), w @ x, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shapes,types", [
    ([(64, 96), (TILE + 1, 96), (3, 96)], ["Q4_1"] * 3),  # one fused kernel launch
    ([(40, 64), (70, 64)], ["Q4_1"] * 2),
    ([(64, 96), (TILE + 1, 96), (3, 96)], ["Q5_0", "Q5_0", "Q8_0"]),  # Gemma 3's W_q, W_k, W_v types
    ([(40, 256), (70, 256)], ["Q5_0", "Q6_K"]),  # int8 layout, float16 and float32 scales
    ([(40, 64), (70, 64)], ["Q4_1", "Q8_0"]),  # mixed layouts: one product each
])
def test_fused_projections_equal_separate_products(shapes, types):
    from mqa_gen.kernels.quant import int8_matvec3, q4_1_matvec3
    from mqa_gen.linear import FusedProjections

    pairs = [quantized(rows, cols, t) for (rows, cols), t in zip(shapes, types)]
    fused = FusedProjections([lin for lin, _ in pairs])
    layouts = {"int8" if lin.mins is None else "4-bit" for lin, _ in pairs}
    one_launch = {"int8": int8_matvec3, "4-bit": q4_1_matvec3}[layouts.pop()] if len(layouts) == 1 else None
    assert fused._fused_kernel is one_launch
    for _ in range(2):  # the output buffers are reused: a second call gives the new products
        x = RNG.standard_normal(shapes[0][1]).astype(np.float32)
        for (lin, _), y in zip(pairs, fused(x[None])):
            assert y.shape == (1, lin.out_features)
            np.testing.assert_array_equal(y[0], lin.matvec(x))
    rows = RNG.standard_normal((3, shapes[0][1])).astype(np.float32)  # several rows: each matrix's product
    for (lin, _), y in zip(pairs, fused(rows)):
        np.testing.assert_array_equal(y, lin(rows))


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_repeating_heads_keeps_the_quantised_values(type_name):
    cols = 256 if type_name.endswith("_K") else 64
    lin, w = quantized(3 * 16, cols, type_name)  # 3 heads of 16 rows
    wide = lin.repeat_row_groups(16, 3)
    assert wide.type_name == type_name and wide.out_features == 9 * 16
    expected = np.repeat(w.reshape(3, 16, cols), 3, axis=0).reshape(9 * 16, cols)
    np.testing.assert_array_equal(wide.dequantize(), expected)


INT8_REPACKERS = {"Q8_0": (repack_q8_0, SHAPES[2]), "Q5_0": (repack_q5_0, (100, 576)),
                  "Q6_K": (repack_q6_k, (TILE + 3, 512))}  # rows not a multiple of TILE


def int8_layout(type_name: str):
    """(codes, scales, W) for a random matrix of ``type_name``, W dequantised by the gguf package."""
    repack, (rows, cols) = INT8_REPACKERS[type_name]
    raw = random_raw(rows, cols, type_name)
    reference = dequantize(raw, GGMLQuantizationType[type_name]).reshape(rows, cols)
    return (*repack(raw, rows, cols), reference.astype(np.float64))


@pytest.mark.parametrize("type_name", list(INT8_REPACKERS))
@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_int8_matmul_equals_dequantised_matmul(type_name, n):
    codes, scales, w = int8_layout(type_name)
    rows, cols = w.shape
    x = RNG.standard_normal((n, cols)).astype(np.float32)
    expected = x.astype(np.float64) @ w.T
    magnitude = np.abs(x).astype(np.float64) @ np.abs(w).T  # float32 rounding scales with Σ|x w|
    # Scales as the repacking keeps them (float16 bits for Q8_0 and Q5_0, float32 for Q6_K) and
    # as float32 values: both scale types compile and give the product.
    f32_scales = scales.view(np.float16).astype(np.float32) if scales.dtype == np.uint16 else scales
    for s in (scales, f32_scales):
        y = np.full((n, rows), np.nan, np.float32)
        int8_matmul(codes, s, x, y)
        assert np.all(np.abs(y - expected) <= 1e-5 * magnitude)


@pytest.mark.parametrize("type_name", list(INT8_REPACKERS))
def test_int8_matmul_row_does_not_depend_on_its_batch(type_name):
    """A sequence decoded in a batch gets the same product, bit for bit, as decoded alone."""
    codes, scales, w = int8_layout(type_name)
    x = RNG.standard_normal((5, w.shape[1])).astype(np.float32)
    batch = np.empty((5, w.shape[0]), np.float32)
    int8_matmul(codes, scales, x, batch)
    for k in range(5):
        alone = np.empty((1, w.shape[0]), np.float32)
        int8_matmul(codes, scales, x[k:k + 1], alone)
        np.testing.assert_array_equal(batch[k], alone[0])
