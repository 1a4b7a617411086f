"""The memory-mapped cache of repacked weights (mqa_gen.repack_cache): what a load takes from it is
exactly what repacking the GGUF tensor gives; a damaged, truncated or foreign cache file is rebuilt
without an error; a changed model file never reuses the old entry; concurrent first loads leave a
valid file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gguf_factory import write_tiny_llama
from mqa_gen import repack_cache
from mqa_gen.gguf_file import read_gguf
from mqa_gen.linear import REPACKERS, QuantizedLinear
from mqa_gen.loading import load

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """An empty cache folder, and every model cached however small."""
    folder = tmp_path / "repacked"
    monkeypatch.setenv("MQA_GEN_REPACK_DIR", str(folder))
    monkeypatch.delenv("MQA_GEN_NO_REPACK_CACHE", raising=False)
    monkeypatch.setattr(repack_cache, "MIN_CACHED_BYTES", 0)
    return folder


def tiny_model(path: Path, seed: int = 0) -> Path:
    """A tiny llama whose matrices are all Q4_1 (d_model 32, d_ff 64: multiples of the block)."""
    write_tiny_llama(path, tensor_type="Q4_1", d_ff=64, rng_seed=seed)
    return path


def expected_packed(path: Path) -> dict[str, tuple[np.ndarray, ...]]:
    """Every kernel-typed tensor of the file, repacked by the repacking functions themselves."""
    gguf = read_gguf(path)
    out = {}
    for name, t in gguf.tensors.items():
        if t.type_name in REPACKERS and len(t.shape) == 2:
            repack, _ = REPACKERS[t.type_name]
            out[name] = repack(np.asarray(t.data), *t.shape)
    return out


def quantized_linears(model) -> dict[int, QuantizedLinear]:
    """The model's QuantizedLinear objects, found by walking its attributes."""
    found, seen, stack = {}, set(), [model]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (np.ndarray, str, bytes, int, float)):
            continue
        seen.add(id(obj))
        if isinstance(obj, QuantizedLinear):
            found[id(obj)] = obj
            continue
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif type(obj).__module__.startswith("mqa_gen") and isinstance(getattr(obj, "__dict__", None), dict):
            stack.extend(vars(obj).values())
    return found


def cached_arrays(path: Path) -> dict[str, tuple[np.ndarray, ...]]:
    """What the cache file of ``path`` holds, read through a fresh RepackCache."""
    gguf = read_gguf(path)
    store = repack_cache.RepackCache.open(gguf)
    out = {}
    for name, t in gguf.tensors.items():
        if t.type_name in REPACKERS and len(t.shape) == 2:
            got = store.get(name, t.type_name, tuple(t.shape))
            if got is not None:
                out[name] = got
    return out


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert len(got[name]) == len(want[name])
        for a, b in zip(got[name], want[name]):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)


def cache_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".bin") if folder.exists() else []


def model_arrays(loaded) -> list[tuple[np.ndarray, ...]]:
    return sorted((tuple(np.asarray(a).copy() for a in q.packed) for q in quantized_linears(loaded.model).values()),
                  key=lambda arrays: arrays[0].tobytes())


def test_round_trip_gives_the_repacked_arrays(tmp_path, cache_dir):
    path = tiny_model(tmp_path / "m.gguf")
    want = expected_packed(path)
    first = load(str(path))  # repacks and writes the cache file
    assert len(cache_files(cache_dir)) == 1
    assert_same(cached_arrays(path), want)
    second = load(str(path))  # from the cache: the same arrays, writable (the kernels' types)
    for q in quantized_linears(second.model).values():
        assert all(a.flags.writeable and type(a) is np.ndarray for a in q.packed)
    for a, b in zip(model_arrays(first), model_arrays(second)):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    ids = np.array(second.tokenizer.encode("hello"), dtype=np.int64)
    np.testing.assert_array_equal(first.model.forward(ids, first.model.new_cache(16)),
                                  second.model.forward(ids, second.model.new_cache(16)))


@pytest.mark.parametrize("damage", ["flip_data_byte", "truncate", "garbage_header", "empty"])
def test_damaged_cache_file_is_rebuilt_silently(tmp_path, cache_dir, damage, capfd):
    path = tiny_model(tmp_path / "m.gguf")
    want = expected_packed(path)
    load(str(path))
    (cache_file,) = cache_files(cache_dir)
    data = bytearray(cache_file.read_bytes())
    if damage == "flip_data_byte":
        data[-100] ^= 0xFF  # in the last array's data
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage_header":
        data[8:40] = b"\xff" * 32
    else:
        data = bytearray()
    cache_file.write_bytes(bytes(data))
    capfd.readouterr()
    reloaded = load(str(path))  # no exception
    assert capfd.readouterr().err == ""
    assert_same(cached_arrays(path), want)  # the file is whole again
    assert len(model_arrays(reloaded)) == len(want)
    for arrays in model_arrays(reloaded):
        assert any(all(np.array_equal(x, y) for x, y in zip(arrays, w)) for w in want.values())


def test_changed_model_file_does_not_reuse_the_old_cache(tmp_path, cache_dir):
    path = tiny_model(tmp_path / "m.gguf", seed=0)
    load(str(path))
    old = cached_arrays(path)
    # Another model at the same path, same size and layout, and the old modification time: the
    # fingerprint still differs (the header bytes' hash or the inode).
    stat = os.stat(path)
    replacement = tiny_model(tmp_path / "other.gguf", seed=1)
    os.replace(replacement, path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    want = expected_packed(path)
    assert any(not np.array_equal(old[n][0], want[n][0]) for n in want)  # the models do differ
    gguf = read_gguf(path)
    store = repack_cache.RepackCache.open(gguf)
    assert all(store.get(n, gguf.tensors[n].type_name, tuple(gguf.tensors[n].shape)) is None for n in want)
    loaded = load(str(path))
    assert_same(cached_arrays(path), want)
    assert len(cache_files(cache_dir)) == 1  # the entry was replaced, not added beside
    assert len(model_arrays(loaded)) == len(want)


def test_touched_model_file_gets_a_new_fingerprint(tmp_path, cache_dir):
    path = tiny_model(tmp_path / "m.gguf")
    before = repack_cache.fingerprint(read_gguf(path))
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 1))
    assert repack_cache.fingerprint(read_gguf(path)) != before


def test_concurrent_first_loads_leave_a_valid_file(tmp_path, cache_dir):
    path = tiny_model(tmp_path / "m.gguf")
    script = ("import sys; from mqa_gen import repack_cache; repack_cache.MIN_CACHED_BYTES = 0\n"
              "from mqa_gen.loading import load\n"
              "for _ in range(3):\n"
              "    load(sys.argv[1])\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path)], env=env, stderr=subprocess.PIPE)
             for _ in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    assert len(cache_files(cache_dir)) == 1
    assert not [p for p in cache_dir.iterdir() if p.suffix == ".tmp"]
    assert_same(cached_arrays(path), expected_packed(path))


def test_turned_off_or_small_models_write_nothing(tmp_path, cache_dir, monkeypatch):
    path = tiny_model(tmp_path / "m.gguf")
    monkeypatch.setenv("MQA_GEN_NO_REPACK_CACHE", "1")
    load(str(path))
    assert cache_files(cache_dir) == []
    monkeypatch.delenv("MQA_GEN_NO_REPACK_CACHE")
    monkeypatch.setattr(repack_cache, "MIN_CACHED_BYTES", 1 << 30)
    load(str(path))
    assert cache_files(cache_dir) == []


def test_unwritable_cache_folder_is_not_an_error(tmp_path, cache_dir, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    monkeypatch.setenv("MQA_GEN_REPACK_DIR", str(blocker / "sub"))  # cannot be created
    path = tiny_model(tmp_path / "m.gguf")
    loaded = load(str(path))
    assert len(model_arrays(loaded)) == len(expected_packed(path))
