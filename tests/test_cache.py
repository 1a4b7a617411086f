"""The KV cache: preallocated, written in place, sized by the formula."""

from __future__ import annotations

import numpy as np
import pytest

from mqa_gen.cache import KVCache, kv_bytes_per_token


@pytest.mark.parametrize("dtype,itemsize", [("float32", 4), ("float16", 2)])
def test_bytes_match_the_formula(dtype, itemsize):
    cache = KVCache(n_layers=30, n_kv_heads=3, head_dim=64, max_seq_len=512, dtype=dtype)
    assert cache.bytes_per_token == 2 * 30 * 3 * 64 * itemsize == kv_bytes_per_token(30, 3, 64, itemsize)
    assert cache.nbytes == 512 * cache.bytes_per_token


def test_rows_are_written_in_place_without_reallocation():
    cache = KVCache(2, 2, 4, 10)
    arrays = [id(a) for a in cache.keys + cache.values]
    rng = np.random.default_rng(0)
    rows = []
    for step in (3, 1, 1):
        k = rng.standard_normal((step, 2, 4)).astype(np.float32)
        for layer in range(2):
            cache.write(layer, k, -k)
        cache.advance(step)
        rows.append(k)
    assert [id(a) for a in cache.keys + cache.values] == arrays
    assert cache.length == 5
    written = np.concatenate(rows)  # (5, KV, D)
    k0, v0 = cache.layer_view(0)
    np.testing.assert_array_equal(k0, written.transpose(1, 0, 2))
    np.testing.assert_array_equal(v0, -written.transpose(1, 0, 2))


def test_float16_storage_round_trips_through_float16():
    cache = KVCache(1, 1, 3, 4, dtype="float16")
    k = np.array([[[0.1, -2.5, 1e-3]]], np.float32)
    cache.write(0, k, k)
    cache.advance(1)
    np.testing.assert_array_equal(cache.layer_view(0)[0][0, 0], k[0, 0].astype(np.float16).astype(np.float32))


def test_truncate_and_capacity():
    cache = KVCache(1, 1, 2, 3)
    cache.write(0, np.zeros((2, 1, 2), np.float32), np.zeros((2, 1, 2), np.float32))
    cache.advance(2)
    cache.truncate(1)
    assert cache.length == 1 and cache.used_bytes == cache.bytes_per_token
    with pytest.raises(ValueError):
        cache.truncate(2)
    with pytest.raises(ValueError, match="full"):
        cache.write(0, np.zeros((3, 1, 2), np.float32), np.zeros((3, 1, 2), np.float32))
    with pytest.raises(ValueError):
        KVCache(1, 0, 2, 3)
    with pytest.raises(ValueError):
        KVCache(1, 1, 2, 3, dtype="int8")
