"""The KV cache: preallocated, written in place, sized by the formula."""

from __future__ import annotations

import numpy as np
import pytest

from mqa_gen.cache import KVCache, kv_bytes_per_token


# Bytes of one row of head_dim = 64: 4 or 2 bytes an element, or llama.cpp's blocks of 32 (a 2-byte
# float16 scale plus 32 one-byte codes for q8_0, plus 16 bytes of nibbles for q4_0) — ggml-common.h.
ROW_BYTES_64 = {"f32": 64 * 4, "float32": 64 * 4, "f16": 64 * 2, "float16": 64 * 2,
                "q8_0": 2 * (2 + 32), "q4_0": 2 * (2 + 16)}


@pytest.mark.parametrize("dtype", list(ROW_BYTES_64))
def test_bytes_match_the_formula(dtype):
    cache = KVCache(n_layers=30, n_kv_heads=3, head_dim=64, max_seq_len=512, dtype=dtype)
    assert cache.bytes_per_token == 2 * 30 * 3 * ROW_BYTES_64[dtype] == kv_bytes_per_token(30, 3, 64, dtype)
    assert cache.nbytes == 512 * cache.bytes_per_token
    assert cache.dtype == {"float32": "f32", "float16": "f16"}.get(dtype, dtype)  # aliases report llama.cpp's name


def test_rows_are_written_in_place_without_reallocation():
    cache = KVCache(2, 2, 4, 10)
    arrays = [id(a) for layer in cache.layers for a in (layer.keys, layer.values)]
    rng = np.random.default_rng(0)
    rows = []
    for step in (3, 1, 1):
        k = rng.standard_normal((step, 2, 4)).astype(np.float32)
        for layer in range(2):
            cache.layers[layer].update_and_fetch(k, -k, cache.length)
        cache.advance(step)
        rows.append(k)
    assert [id(a) for layer in cache.layers for a in (layer.keys, layer.values)] == arrays
    assert cache.length == 5
    written = np.concatenate(rows)  # (5, KV, D)
    k0, v0 = cache.layer_view(0)
    np.testing.assert_array_equal(k0, written.transpose(1, 0, 2))
    np.testing.assert_array_equal(v0, -written.transpose(1, 0, 2))


def test_float16_storage_round_trips_through_float16():
    cache = KVCache(1, 1, 3, 4, dtype="float16")
    k = np.array([[[0.1, -2.5, 1e-3]]], np.float32)
    cache.layers[0].update_and_fetch(k, k, cache.length)
    cache.advance(1)
    np.testing.assert_array_equal(cache.layer_view(0)[0][0, 0], k[0, 0].astype(np.float16).astype(np.float32))


def test_truncate_and_capacity():
    cache = KVCache(1, 1, 2, 3)
    cache.layers[0].update_and_fetch(np.zeros((2, 1, 2), np.float32), np.zeros((2, 1, 2), np.float32), cache.length)
    cache.advance(2)
    cache.truncate(1)
    assert cache.length == 1 and cache.used_bytes == cache.bytes_per_token
    with pytest.raises(ValueError):
        cache.truncate(2)
    with pytest.raises(ValueError, match="full"):
        cache.layers[0].update_and_fetch(np.zeros((3, 1, 2), np.float32), np.zeros((3, 1, 2), np.float32), cache.length)
    with pytest.raises(ValueError):
        KVCache(1, 0, 2, 3)
    with pytest.raises(ValueError):
        KVCache(1, 1, 2, 3, dtype="int8")


def test_ring_layer_keeps_the_last_window_rows_in_slot_position_mod_window():
    window = 4
    cache = KVCache(2, 1, 2, 16, windows=(window, 0))
    assert cache.capacity(0) == window and cache.capacity(1) == 16
    rows = np.arange(11, dtype=np.float32)[:, None, None] * np.ones((1, 1, 2), np.float32)  # row p = p
    for chunk in (np.s_[0:3], np.s_[3:9], np.s_[9:10], np.s_[10:11]):  # prefill longer than the ring, then decode
        for layer in range(2):
            cache.layers[layer].update_and_fetch(rows[chunk], -rows[chunk], cache.length)
        cache.advance(rows[chunk].shape[0])
    k_ring, v_ring = cache.layer_view(0)
    np.testing.assert_array_equal(k_ring[0, :, 0], [7, 8, 9, 10])  # position order
    np.testing.assert_array_equal(v_ring[0, :, 0], [-7, -8, -9, -10])
    np.testing.assert_array_equal(cache.layers[0].keys[0, :, 0], [8, 9, 10, 7])  # slot p % 4
    np.testing.assert_array_equal(cache.layer_view(1)[0][0, :, 0], np.arange(11))
    # Bytes count the ring at its window: 4 + 11 rows of 2 values, K and V, float32.
    assert cache.used_bytes == cache.bytes_at(11) == 2 * (4 + 11) * 2 * 4
    assert cache.nbytes == 2 * (4 + 16) * 2 * 4


def test_a_wrapped_ring_only_rolls_back_one_position():
    cache = KVCache(1, 1, 2, 16, windows=(4,))
    z = np.zeros((6, 1, 2), np.float32)
    cache.layers[0].update_and_fetch(z[:3], z[:3], cache.length)
    cache.advance(3)
    assert cache.can_truncate(0)  # not wrapped yet: any rollback is exact
    cache.layers[0].update_and_fetch(z, z, cache.length)
    cache.advance(6)
    assert cache.can_truncate(8) and cache.can_truncate(9)
    assert not cache.can_truncate(7)
    with pytest.raises(ValueError, match="sliding-window"):
        cache.truncate(5)
    cache.reset()
    assert cache.length == 0
