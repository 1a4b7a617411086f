"""Quantised KV caches (q8_0, q4_0): llama.cpp's blocks, written on store and read by the attention
kernels directly.

Oracles: the ``gguf`` package's ``quantize`` / ``dequantize`` (gguf-py, NumPy ports of ggml-quants.c's
reference quantisers) for the stored bytes and the values they stand for; plain NumPy attention over
those dequantised rows for the kernels, ring layers and the slot pool; NumPy's float16 cast for the
block scales; the f16 cache for end-to-end sanity on the real models.
"""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from numba import njit

from conftest import load_fixture
from gguf_factory import write_tiny_llama
from mqa_gen.cache import KVCache, KVCachePool, kv_bytes_per_token
from mqa_gen.cli import cli
from mqa_gen.kernels import attention_decode, attention_prefill
from mqa_gen.kernels.attention import DECODE_BLOCK, decode_partial_shape
from mqa_gen.kernels.halfprec import f32_to_half_bits
from mqa_gen.kv_storage import STORAGE_TYPES, storage_type
from mqa_gen.prompt_cache import load_prompt_cache, read_prompt_cache_meta, save_prompt_cache
from test_kernels import decode_one, reference_attention

BLOCK_TYPES = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}
#: ggml-common.h: block_q8_0 = fp16 d + 32 int8 codes; block_q4_0 = fp16 d + 16 bytes of nibbles.
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18}
SLOT_0 = np.zeros(1, np.int64)


def ggml_blocks(x: np.ndarray, name: str) -> np.ndarray:
    """gguf-py's blocks for float32 rows x [..., D]: uint8 [..., D / 32 · block bytes]."""
    D = x.shape[-1]
    return quantize(x.reshape(-1, D), BLOCK_TYPES[name]).reshape(x.shape[:-1] + (-1,))


def ggml_values(x: np.ndarray, name: str) -> np.ndarray:
    """The float32 values gguf-py's blocks of x stand for (quantise, then dequantise): [..., D]."""
    D = x.shape[-1]
    return dequantize(ggml_blocks(x, name).reshape(-1, D // 32 * BLOCK_BYTES[name]),
                      BLOCK_TYPES[name]).reshape(x.shape).astype(np.float32)


def awkward_rows(rng: np.random.Generator, D: int = 64) -> np.ndarray:
    """Rows [n, D] whose blocks hit every branch of the reference quantisers: all zeros, ties at
    x·(1/d) = k + ½ (roundf rounds away from zero), a largest magnitude shared by +m and −m (q4_0
    takes the first), negative and positive maxima, scales that are float16 subnormals, and rows of
    very different magnitudes."""
    rows = [np.zeros(D), np.full(D, -3.0), np.arange(D) - D / 2 + 0.5]
    tie = np.zeros(D)
    tie[0] = 127.0
    tie[1:32] = np.arange(31) + 0.5  # d = 1 exactly: every code is a .5 tie
    rows.append(tie)
    both = rng.standard_normal(D)
    both[3], both[9] = 4.0, -4.0
    both[D - 10], both[D - 5] = -5.0, 5.0
    rows += [both, -both, rng.standard_normal(D) * 1e-6, rng.standard_normal(D) * 3e-9]
    rows += list(rng.standard_normal((24, D)) * np.exp(rng.uniform(-8, 8, (24, 1))))
    return np.array(rows, dtype=np.float32)


# ───────────────────────────── the stored bytes ─────────────────────────────


@pytest.mark.parametrize("name", list(BLOCK_TYPES))
@pytest.mark.parametrize("D", [32, 64, 256])
def test_encode_writes_ggmls_blocks_byte_for_byte(name, D):
    rng = np.random.default_rng(D)
    x = np.concatenate([awkward_rows(rng, D), rng.standard_normal((40, D)).astype(np.float32)])
    x = x.reshape(-1, 3, D)[: len(x) // 3]  # [tokens, KV heads, D], as the cache writes them
    stored = storage_type(name).encode(x)
    assert stored.dtype == storage_type(name).array_dtype
    assert stored.shape == x.shape[:-1] + (D // 32 * BLOCK_BYTES[name],)
    np.testing.assert_array_equal(stored.view(np.uint8), ggml_blocks(x, name))


@pytest.mark.parametrize("name", list(BLOCK_TYPES))
def test_decode_gives_ggmls_dequantised_values(name):
    x = awkward_rows(np.random.default_rng(1))
    np.testing.assert_array_equal(storage_type(name).decode(storage_type(name).encode(x)), ggml_values(x, name))


@njit
def _to_half_bits(x, out):
    for i in range(x.shape[0]):
        out[i] = f32_to_half_bits(x[i])


def test_block_scales_round_to_float16_as_numpy_does():
    """The scale d is stored as float16 with round-to-nearest-even: every float32 class (normal,
    subnormal in float16, overflow to inf, ties, NaN) against NumPy's cast."""
    rng = np.random.default_rng(0)
    edges = np.concatenate([np.arange(b - 4096, b + 4096, dtype=np.int64)
                            for b in (0x33000000, 0x33800000, 0x387FE000, 0x38800000, 0x477FE000, 0x477FF000,
                                      0x7F800000)])
    bits = np.concatenate([rng.integers(0, 2**32, 500_000), edges, np.arange(0x33000000, 0x38800000, 97)])
    x = bits.astype(np.uint32).view(np.float32)
    x = np.concatenate([x, -x])
    out = np.empty(x.shape, np.uint16)
    _to_half_bits(x, out)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = x.astype(np.float16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(out[~nan], expected.view(np.uint16)[~nan])
    assert np.isnan(out[nan].view(np.float16)).all()


def test_bytes_per_element_and_row():
    assert {n: s.bytes_per_element for n, s in STORAGE_TYPES.items()} == {"f32": 4, "f16": 2, "q8_0": 34 / 32,
                                                                          "q4_0": 18 / 32}
    # SmolLM2: 30 layers, 3 KV heads of 64 — f16 rows of 128 bytes against q8_0 rows of 2 blocks of 34.
    f16, q8, q4 = (kv_bytes_per_token(30, 3, 64, n) for n in ("f16", "q8_0", "q4_0"))
    assert (f16, q8, q4) == (2 * 30 * 3 * 128, 2 * 30 * 3 * 68, 2 * 30 * 3 * 36)
    assert f16 / q8 == 64 / 34 and f16 / q4 == 64 / 18
    assert storage_type("float16") is storage_type("f16") and storage_type("float32").name == "f32"


@pytest.mark.parametrize("name", list(BLOCK_TYPES))
def test_a_head_dim_that_is_not_a_multiple_of_32_is_refused(name):
    for make in (lambda: KVCache(2, 1, 48, 8, name), lambda: KVCachePool(2, 2, 1, 48, 8, name),
                 lambda: kv_bytes_per_token(2, 1, 48, name)):
        with pytest.raises(ValueError, match=f"{name} KV cache stores blocks of 32 .* head_dim is 48"):
            make()
    with pytest.raises(ValueError, match="cache dtype must be one of f32, f16, q8_0, q4_0"):
        storage_type("q5_0")


# ───────────────────────────── kernels ─────────────────────────────


def random_rows(rng, *shape):
    """float32 rows whose magnitudes vary by row, so every block has its own scale."""
    return (rng.standard_normal(shape) * np.exp(rng.uniform(-1, 1, shape[:-1] + (1,)))).astype(np.float32)


@pytest.mark.parametrize("name", list(BLOCK_TYPES))
@pytest.mark.parametrize("H,KV,D", [(9, 3, 64), (4, 1, 256), (6, 6, 96)])
@pytest.mark.parametrize("T,start,window", [(1, 0, 0), (7, 0, 0), (5, 130, 0), (1, 300, 0), (9, 20, 11)])
def test_kernels_attend_over_blocks_as_numpy_over_their_values(name, H, KV, D, T, start, window):
    """Prefill (any T, optional sliding window) and decode (the last row, over > DECODE_BLOCK rows
    for the longer cases) read q8_0 / q4_0 rows directly; NumPy attends over the dequantised rows."""
    rng = np.random.default_rng(T * 1000 + start)
    S = start + T + 3
    K, V, q = random_rows(rng, KV, S, D), random_rows(rng, KV, S, D), random_rows(rng, T, H, D)
    k_blocks, v_blocks = storage_type(name).encode(K), storage_type(name).encode(V)
    expected = reference_attention(q, ggml_values(K, name), ggml_values(V, name), start, window)
    scale = np.float32(1 / np.sqrt(D))
    out = np.empty_like(q)
    attention_prefill(q, k_blocks, v_blocks, start, scale, window, out)
    np.testing.assert_allclose(out, expected, atol=3e-5)
    if not window:
        np.testing.assert_allclose(decode_one(q[-1], k_blocks, v_blocks, start + T, scale), expected[-1], atol=3e-5)


@pytest.mark.parametrize("name", list(BLOCK_TYPES))
def test_kernels_read_strided_views_of_block_caches(name):
    """A view that is not C-contiguous (every other position of a larger cache) takes the element
    by element reader and gives NumPy's attention over the same rows."""
    rng = np.random.default_rng(2)
    H, KV, D, S = 4, 2, 64, 24
    K, V, q = random_rows(rng, KV, 2 * S, D), random_rows(rng, KV, 2 * S, D), random_rows(rng, 3, H, D)
    k_view, v_view = storage_type(name).encode(K)[:, ::2], storage_type(name).encode(V)[:, ::2]
    assert not k_view.flags.c_contiguous
    expected = reference_attention(q, ggml_values(K[:, ::2], name), ggml_values(V[:, ::2], name), S - 3)
    out = np.empty_like(q)
    attention_prefill(q, k_view, v_view, S - 3, np.float32(1 / np.sqrt(D)), 0, out)
    np.testing.assert_allclose(out, expected, atol=3e-5)


def test_kernels_refuse_rows_of_the_wrong_width():
    """The block readers have no bounds checks, so the kernels check the row width once per call."""
    q = np.ones((1, 2, 64), np.float32)
    narrow = np.zeros((1, 4, 34), np.int8)  # one q8_0 block: rows for head_dim 32, not 64
    with pytest.raises(ValueError, match="cache rows do not fit head_dim"):
        attention_prefill(q, narrow, narrow, 0, np.float32(1), 0, np.empty_like(q))
    with pytest.raises(ValueError, match="cache rows do not fit head_dim"):
        decode_one(q[0], narrow, narrow, 3, np.float32(1))


@pytest.mark.parametrize("name", list(BLOCK_TYPES))
def test_a_ring_layer_of_blocks_attends_as_numpy(name):
    """A sliding-window layer's ring (Gemma 3's local layers) stores blocks: prefill chunks that
    wrap the ring (read as [older rows | new rows]), chunks that fit, and decode steps, each checked
    against NumPy's windowed attention over the dequantised history."""
    rng = np.random.default_rng(5)
    H, KV, D, W = 4, 1, 64, 7
    cache = KVCache(1, KV, D, 64, name, windows=(W,))
    layer = cache.layers[0]
    history_k, history_v = np.empty((0, KV, D), np.float32), np.empty((0, KV, D), np.float32)
    scale = np.float32(1 / np.sqrt(D))
    partial = np.empty(decode_partial_shape(1, 64, H, D), np.float32)
    for T in (3, 9, 1, 1, 2, 1, 12, 1, 5):
        k, v, q = random_rows(rng, T, KV, D), random_rows(rng, T, KV, D), random_rows(rng, T, H, D)
        position = cache.length
        keys, values, start = layer.update_and_fetch(k, v, position)
        out = np.empty_like(q)
        if T == 1:  # as the attention block decodes: the ring is one sequence's slot 0
            attention_decode(q, keys[None], values[None], SLOT_0, np.full(1, start + 1, np.int64), scale, partial, out)
        else:
            attention_prefill(q, keys, values, start, scale, W, out)
        cache.advance(T)
        history_k, history_v = np.concatenate([history_k, k]), np.concatenate([history_v, v])
        K = ggml_values(history_k, name).transpose(1, 0, 2)  # (KV, positions, D)
        V = ggml_values(history_v, name).transpose(1, 0, 2)
        np.testing.assert_allclose(out, reference_attention(q, K, V, position, W), atol=3e-5)
    assert layer.keys.shape == (KV, W, D // 32 * BLOCK_BYTES[name])  # the ring holds W rows of blocks


@pytest.mark.parametrize("name", list(BLOCK_TYPES))
def test_batched_decode_over_a_pool_of_blocks(name):
    """Three sequences of different lengths (across decode blocks) in one KVCachePool of q8_0 / q4_0
    rows, a full layer and a ring layer: one decode call per layer gives each sequence NumPy's
    attention over its own dequantised history, and exactly what it gets alone."""
    rng = np.random.default_rng(9)
    H, KV, D, S, W = 6, 2, 64, 300, 16
    pool = KVCachePool(3, 2, KV, D, S, name, windows=(0, W))
    slots, lengths0 = np.array([2, 0, 1]), [0, DECODE_BLOCK + 3, 2 * DECODE_BLOCK + 1]
    history = {}
    for b, n in enumerate(lengths0):  # prefill each sequence to its own length
        cache = pool.caches[slots[b]]
        for layer in range(2):
            k, v = random_rows(rng, n, KV, D), random_rows(rng, n, KV, D)
            cache.layers[layer].update_and_fetch(k, v, 0)
            history[b, layer] = (k, v)
        cache.advance(n)
    scale = np.float32(1 / np.sqrt(D))
    partial = np.empty(decode_partial_shape(3, S, H, D), np.float32)
    for step in range(3):
        positions = np.array(lengths0) + step
        for layer, window in ((0, 0), (1, W)):
            k, v, q = random_rows(rng, 3, KV, D), random_rows(rng, 3, KV, D), random_rows(rng, 3, H, D)
            keys, values, lengths = pool.update_and_fetch_rows(layer, k, v, slots, positions)
            out = np.empty_like(q)
            attention_decode(q, keys, values, slots, lengths, scale, partial, out)
            for b in range(3):
                hk, hv = history[b, layer]
                hk, hv = np.concatenate([hk, k[b:b + 1]]), np.concatenate([hv, v[b:b + 1]])
                history[b, layer] = (hk, hv)
                K, V = ggml_values(hk, name).transpose(1, 0, 2), ggml_values(hv, name).transpose(1, 0, 2)
                expected = reference_attention(q[b:b + 1], K, V, positions[b], window)[0]
                np.testing.assert_allclose(out[b], expected, atol=3e-5)
                alone = np.empty((1, H, D), np.float32)
                attention_decode(q[b:b + 1], keys[slots[b]][None], values[slots[b]][None], SLOT_0,
                                 lengths[b:b + 1], scale, partial, alone)
                np.testing.assert_array_equal(out[b], alone[0])
        for cache in pool.caches:
            cache.advance(1)


def test_the_trainable_layer_caches_in_blocks_too():
    """MultiQueryAttention.forward_with_cache runs the models' kernels over a q8_0 cache: close to
    the uncached float32 forward, and a cache grown across calls (its block rows copied) gives what
    one call gives."""
    from mqa_gen.layer import MultiQueryAttention, MultiQueryAttentionConfig

    config = MultiQueryAttentionConfig(num_heads=4, head_dim=32, num_kv_heads=2, rope_theta=10000.0)
    layer = MultiQueryAttention(128, config, np.random.default_rng(1), dtype=np.float32)
    x = np.random.default_rng(0).standard_normal((2, 9, 128)).astype(np.float32)
    whole = layer.forward(x)
    blocks, cache = layer.forward_with_cache(x, cache_dtype="q8_0")
    assert cache.dtype == "q8_0" and cache.bytes_per_token == 2 * 2 * 34
    np.testing.assert_allclose(blocks, whole, atol=2e-2 * np.abs(whole).max())
    first, grown = layer.forward_with_cache(x[:, :4], cache_dtype="q8_0", max_seq_len=4)
    rest, grown = layer.forward_with_cache(x[:, 4:], grown)  # grows: the stored blocks are copied
    assert grown.max_seq_len > 4
    np.testing.assert_allclose(np.concatenate([first, rest], 1), blocks, atol=1e-5)


# ───────────────────────────── the real models ─────────────────────────────


def greedy(model, ids, n, cache_dtype):
    """n greedy token ids after prompt ids, with a KV cache of type cache_dtype."""
    cache = model.new_cache(len(ids) + n, cache_dtype)
    logits, out = model.forward(ids, cache), []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = model.forward(out[-1:], cache)
    return out


def test_smollm2_with_a_q8_0_cache_stays_close_to_f16(smollm2):
    """q8_0 rounds each K/V element to 1/254 of its block's range: the logits move a little, the
    greedy text mostly not (llama.cpp reports about 0.1 % perplexity for q8_0 caches)."""
    ids = load_fixture("logits.json")["prompts"][1]["ids"]
    model = smollm2.model
    full = model.forward(ids, model.new_cache(32))
    for name, tolerance in (("f16", 0.05), ("q8_0", 0.5)):
        logits = model.forward(ids, model.new_cache(32, name))
        assert int(np.argmax(logits)) == int(np.argmax(full))
        assert np.abs(logits - full).max() < tolerance * np.abs(full).max() / 10
    same = total = 0
    for case in load_fixture("greedy.json")["prompts"]:
        half = greedy(model, case["prompt_ids"], 16, "f16")
        q8 = greedy(model, case["prompt_ids"], 16, "q8_0")
        same, total = same + sum(a == b for a, b in zip(half, q8)), total + len(half)
        assert half[:4] == q8[:4]
    assert same >= 0.75 * total
    q4 = greedy(model, ids, 4, "q4_0")  # q4_0 runs; its text may drift
    assert len(q4) == 4 and all(0 <= t < smollm2.config.vocab_size for t in q4)


def test_gemma3_with_a_q8_0_cache_past_its_sliding_window(gemma3):
    """Gemma 3 (head_dim 256, 8 blocks a row; local layers in rings of 512): a prompt that wraps the
    rings gives the f16 cache's next tokens."""
    case = max(load_fixture("greedy.json", "gemma3")["prompts"], key=lambda c: len(c["prompt_ids"]))
    assert len(case["prompt_ids"]) > gemma3.config.sliding_window
    assert greedy(gemma3.model, case["prompt_ids"], 3, "q8_0") == greedy(gemma3.model, case["prompt_ids"], 3, "f16")


@pytest.mark.parametrize("name", list(BLOCK_TYPES))
def test_the_fused_decode_step_over_a_pool_of_blocks_gives_the_unfused_logits(monkeypatch, smollm2, name):
    """Three sequences of different lengths decoding together over a q8_0 / q4_0 KVCachePool: the
    fused layer step (mqa_gen.decode_layer) and the unfused blocks give the same logits, bit for bit."""
    from test_decode_layer import _both_paths

    prompts = [[2, 651, 6037, 314, 5384], [2, 1276, 314], [2, 9, 10, 11, 12, 13, 14]]
    fused, unfused = _both_paths(monkeypatch, smollm2.model, prompts, steps=3, cache_dtype=name)
    np.testing.assert_array_equal(fused, unfused)


# ───────────────────────────── prompt-cache files ─────────────────────────────


@pytest.mark.parametrize("name", list(BLOCK_TYPES))
def test_a_saved_block_cache_continues_as_the_original(smollm2, tmp_path, name):
    from mqa_gen.prompt_cache import model_identity

    model, ids = smollm2.model, load_fixture("logits.json")["prompts"][0]["ids"]
    cache = model.new_cache(64, name)
    model.forward(ids, cache)
    cache.label_tokens(ids)
    model_id = model_identity(smollm2.gguf)
    save_prompt_cache(tmp_path / "p.cache", cache, model_id)
    assert read_prompt_cache_meta(tmp_path / "p.cache")["dtype"] == name
    back, _ = load_prompt_cache(tmp_path / "p.cache", model_id, config=model.config, dtype=name, max_seq_len=64)
    np.testing.assert_array_equal(model.forward([42], back), model.forward([42], cache))


def test_a_file_that_names_its_type_float16_still_loads(tmp_path):
    """Files written before the llama.cpp names say "float16": read as f16, and --cache-dtype
    float16 or f16 both match it."""
    cache = KVCache(2, 1, 8, 16, "f16")
    for layer in range(2):
        cache.layers[layer].update_and_fetch(np.ones((3, 1, 8), np.float32), np.zeros((3, 1, 8), np.float32), 0)
    cache.advance(3)
    new, old = tmp_path / "new.cache", tmp_path / "old.cache"
    save_prompt_cache(new, cache, "m" * 64)
    with np.load(new, allow_pickle=False) as npz:
        members = {key: npz[key] for key in npz.files}
    meta = json.loads(members["meta"].tobytes())
    meta["dtype"] = "float16"
    members["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    with open(old, "wb") as f:
        np.savez(f, **members)
    assert zipfile.is_zipfile(old)
    for dtype in ("float16", "f16", None):
        back, _ = load_prompt_cache(old, "m" * 64, dtype=dtype)
        assert back.dtype == "f16" and back.length == 3
        np.testing.assert_array_equal(back.layer_view(1)[0], cache.layer_view(1)[0])


# ───────────────────────────── the CLI ─────────────────────────────


@pytest.mark.parametrize("given,reported", [("q8_0", "q8_0"), ("q4_0", "q4_0"), ("float16", "f16"),
                                            ("float32", "f32"), ("f16", "f16")])
def test_cli_takes_llama_cpp_names_and_the_old_aliases(invoke, given, reported):
    result = invoke("generate", "--prompt", "The capital of France is", "--no-chat", "-n", "4", "--temp", "0",
                    "--json", "--cache-dtype", given)
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["settings"]["cache_dtype"] == reported and len(out["token_ids"]) == 4


def test_cli_refuses_a_block_cache_for_a_head_dim_it_cannot_hold(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny.gguf")["path"]  # head_dim 8
    result = CliRunner().invoke(cli, ["generate", "-m", str(path), "--prompt", "hi", "-n", "1", "--cache-dtype",
                                      "q8_0"])
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --cache-dtype q8_0:") and "multiple of 32" in lines[0]


def test_bench_cache_formula_counts_blocks(invoke):
    """bench-cache's bytes per token for q8_0 rows: 2 × 30 layers × KV heads × 2 blocks × 34 bytes."""
    result = invoke("bench-cache", "--no-measure", "--json", "--cache-dtype", "q8_0", "--contexts", "512")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["cache_dtype"] == "q8_0"
    per_token = {v["n_kv_heads"]: v["kv_bytes_per_token"] for v in out["variants"]}
    assert per_token == {kv: 2 * 30 * kv * 2 * 34 for kv in (1, 3, 9)}
