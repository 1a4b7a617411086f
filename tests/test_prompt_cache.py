"""Prompt caches: prefix reuse in the generation loop, the file format, and every way a file is refused.

The reuse tests run the real model and compare with the transformers fixtures and with a run
without any cache (token ids equal, logits within 1e-5 of their scale); the refusal tests check that each bad
file gives one ``error:`` line and exit code 2 and is never overwritten; the save tests simulate a
kill at each step of the atomic write.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from mqa_gen.cache import KVCache
from mqa_gen.cli import cli
from mqa_gen.generate import stream_generate
from mqa_gen.prompt_cache import (
    FORMAT,
    VERSION,
    PromptCacheError,
    load_prompt_cache,
    model_identity,
    read_prompt_cache_meta,
    save_prompt_cache,
)

from conftest import REPO, load_fixture
from gguf_factory import write_tiny_llama

GREEDY = {c["name"]: c for c in load_fixture("greedy.json")["prompts"]}
MODEL_ID = "0" * 64


def filled_cache(length=7, capacity=16, dtype="float32", n_layers=2, n_kv_heads=3, head_dim=4, seed=0):
    """A synthetic cache holding ``length`` random rows labelled with ids 100, 101, …"""
    cache = KVCache(n_layers, n_kv_heads, head_dim, capacity, dtype)
    rng = np.random.default_rng(seed)
    for layer in range(n_layers):
        k = rng.standard_normal((length, n_kv_heads, head_dim)).astype(np.float32)
        cache.layers[layer].update_and_fetch(k, -2 * k, cache.length)
    cache.advance(length)
    cache.label_tokens(range(100, 100 + length))
    return cache


def assert_one_line(message: str, *fragments: str):
    assert "\n" not in message and "Traceback" not in message
    for fragment in fragments:
        assert fragment in message, message


# ───────────────────────────── the cache's token ids ─────────────────────────────


def test_token_ids_follow_advance_truncate_and_labels():
    cache = filled_cache(length=5)
    assert cache.token_ids.tolist() == [100, 101, 102, 103, 104]
    assert cache.common_prefix([100, 101, 9, 103]) == 2
    assert cache.common_prefix([100, 101, 102, 103, 104, 105, 106]) == 5  # capped at length
    cache.truncate(3)
    assert cache.token_ids.tolist() == [100, 101, 102]
    cache.advance(2)  # rows written by code that does not know their ids: unknown, never matched
    assert cache.token_ids.tolist() == [100, 101, 102, -1, -1]
    assert cache.common_prefix([100, 101, 102, 103, 104]) == 3
    cache.label_tokens([7, 8])
    assert cache.common_prefix([100, 101, 102, 7, 8]) == 5
    with pytest.raises(ValueError):
        cache.label_tokens(range(6))
    with pytest.raises(ValueError):
        cache.token_ids[0] = 5  # a read-only view


# ───────────────────────────── file format ─────────────────────────────


# dtype given → (name the file records, stored array dtype, head_dim, stored row width): llama.cpp's
# q8_0 / q4_0 rows are head_dim / 32 blocks of 34 / 18 bytes.
STORED = {"float32": ("f32", np.float32, 4, 4), "f16": ("f16", np.uint16, 4, 4),
          "q8_0": ("q8_0", np.int8, 64, 68), "q4_0": ("q4_0", np.uint8, 32, 18)}


@pytest.mark.parametrize("dtype", list(STORED))
def test_round_trip_saves_only_the_stored_rows(tmp_path, dtype):
    name, storage, head_dim, width = STORED[dtype]
    cache = filled_cache(length=7, capacity=64, dtype=dtype, head_dim=head_dim)
    path = tmp_path / "c.npz"
    size = save_prompt_cache(path, cache, MODEL_ID, extra={"note": "hi"})
    assert size == path.stat().st_size
    with np.load(path, allow_pickle=False) as npz:
        assert npz["k_0"].shape == npz["v_1"].shape == (3, 7, width)  # [n_kv_heads, length, row width]
        assert npz["k_0"].dtype == storage
        assert npz["tokens"].tolist() == list(range(100, 107))
    meta = read_prompt_cache_meta(path)
    assert (meta["format"], meta["version"], meta["length"]) == (FORMAT, VERSION, 7)
    assert (meta["dtype"], meta["n_kv_heads"], meta["n_layers"], meta["head_dim"]) == (name, 3, 2, head_dim)

    back, extra = load_prompt_cache(path, MODEL_ID, max_seq_len=20)
    assert extra == {"note": "hi"}
    assert (back.length, back.max_seq_len, back.dtype) == (7, 20, name)
    for layer in range(2):  # the stored bytes themselves, not only what they decode to
        for a, b in zip(back.layers[layer].rows(7, 7), cache.layers[layer].rows(7, 7), strict=True):
            np.testing.assert_array_equal(a, b)
    assert back.token_ids.tolist() == cache.token_ids.tolist()
    for layer in range(2):
        for a, b in zip(back.layer_view(layer), cache.layer_view(layer), strict=True):
            np.testing.assert_array_equal(a, b)
    short = load_prompt_cache(path, MODEL_ID, max_seq_len=4)[0]  # a smaller context keeps a prefix
    assert (short.length, short.token_ids.tolist()) == (4, [100, 101, 102, 103])


def test_no_pickle_anywhere(tmp_path):
    """A file with an object array (which only pickle could read) is refused, never unpickled."""
    path = tmp_path / "evil.npz"
    good = tmp_path / "good.npz"
    save_prompt_cache(good, filled_cache(), MODEL_ID)
    with np.load(good) as npz:
        arrays = dict(npz)
    arrays["tokens"] = np.array([object()] * 7, dtype=object)
    np.savez(path, **arrays)
    with pytest.raises(PromptCacheError) as e:
        load_prompt_cache(path, MODEL_ID)
    assert_one_line(str(e.value), str(path), "tokens")


# ───────────────────────────── refusals ─────────────────────────────


def rewrite_meta(src, dst, **changes):
    with np.load(src) as npz:
        arrays = dict(npz)
    meta = json.loads(arrays["meta"].tobytes())
    meta.update(changes)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(dst, **arrays)


class Config:
    def __init__(self, n_layers=2, n_kv_heads=3, head_dim=4):
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim


def bad_files(tmp_path):
    """(name, path, expected fragment, load kwargs) for every way a file must be refused."""
    good = tmp_path / "good.npz"
    save_prompt_cache(good, filled_cache(length=9), MODEL_ID)
    data = good.read_bytes()
    cases = []

    def add(name, content, fragment, **kw):
        path = tmp_path / f"{name}.npz"
        if content is not None:
            path.write_bytes(content)
        cases.append((name, path, fragment, kw))

    add("other_model", data, "different model", model_id="f" * 64)
    add("other_kv_heads", data, "KV heads", config=Config(n_kv_heads=1))
    add("other_layers", data, "layers", config=Config(n_layers=3))
    add("other_dtype", data, "holds a KV cache of type f32, this run uses --cache-dtype f16", dtype="float16")
    for cut in (len(data) // 2, len(data) - 10, 30, 0):
        add(f"truncated_{cut}", data[:cut], "empty" if cut == 0 else "truncated")
    add("random_bytes", np.random.default_rng(1).bytes(5000), "not a prompt-cache file")
    add("random_zip", b"PK\x03\x04" + np.random.default_rng(2).bytes(5000), "truncated or corrupt")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # inside the K/V data: the zip CRC catches it
    add("flipped_byte", bytes(flipped), "corrupt")
    rewrite_meta(good, tmp_path / "version.npz", version=99)
    cases.append(("version", tmp_path / "version.npz", "format version 99", {}))
    rewrite_meta(good, tmp_path / "length.npz", length=10)
    cases.append(("lying_length", tmp_path / "length.npz", "corrupt", {}))
    add("missing", None, "does not exist")
    np.save(tmp_path / "bare.npy", np.zeros(3))
    cases.append(("bare_npy", tmp_path / "bare.npy", "not a prompt-cache file", {}))
    return cases


def test_every_bad_file_is_refused_with_one_line(tmp_path):
    for _name, path, fragment, kw in bad_files(tmp_path):
        model_id = kw.pop("model_id", MODEL_ID)
        with pytest.raises(PromptCacheError) as e:
            load_prompt_cache(path, model_id, **kw)
        assert_one_line(str(e.value), str(path), fragment)


# ───────────────────────────── atomic save ─────────────────────────────


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("where", ["savez", "fsync", "replace"])
def test_a_failed_save_leaves_the_old_file_intact(tmp_path, monkeypatch, where):
    path = tmp_path / "c.npz"
    old = filled_cache(length=5, seed=1)
    save_prompt_cache(path, old, MODEL_ID)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    target = {"savez": (np, "savez"), "fsync": (os, "fsync"), "replace": (os, "replace")}[where]
    monkeypatch.setattr(*target, boom)
    with pytest.raises(PromptCacheError) as e:
        save_prompt_cache(path, filled_cache(length=9, seed=2), MODEL_ID)
    monkeypatch.undo()
    assert_one_line(str(e.value), str(path), "No space left")
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []
    back = load_prompt_cache(path, MODEL_ID)[0]
    assert back.length == 5 and np.array_equal(back.layer_view(1)[0], old.layer_view(1)[0])


def test_a_save_replaces_a_prompt_cache_but_no_other_file(tmp_path):
    """chat's ``/save notes.txt`` must not erase the notes; an earlier cache is replaced, and an
    empty file (nothing to lose) is written."""
    notes, other_zip, empty, cache = tmp_path / "notes.txt", tmp_path / "a.zip", tmp_path / "e", tmp_path / "c"
    notes.write_text("important data\n")
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("x.txt", "not a prompt cache")
    empty.write_bytes(b"")
    for path in (notes, other_zip, tmp_path):
        before = path.read_bytes() if path.is_file() else None
        with pytest.raises(PromptCacheError) as e:
            save_prompt_cache(path, filled_cache(length=3), MODEL_ID)
        assert_one_line(str(e.value), str(path))
        assert before is None or path.read_bytes() == before
    save_prompt_cache(empty, filled_cache(length=3), MODEL_ID)
    save_prompt_cache(cache, filled_cache(length=3), MODEL_ID)
    save_prompt_cache(cache, filled_cache(length=5), MODEL_ID)
    assert load_prompt_cache(empty, MODEL_ID)[0].length == 3 and load_prompt_cache(cache, MODEL_ID)[0].length == 5


def test_ctrl_c_during_save_leaves_the_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    save_prompt_cache(path, filled_cache(length=5), MODEL_ID)
    before = path.read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_prompt_cache(path, filled_cache(length=9), MODEL_ID)
    assert path.read_bytes() == before and leftovers(tmp_path) == []


def test_a_killed_writer_leaves_the_old_file_in_place(tmp_path):
    """A real process dies (os._exit, no cleanup) after writing the new data, before the rename."""
    path = tmp_path / "c.npz"
    save_prompt_cache(path, filled_cache(length=5), MODEL_ID)
    before = path.read_bytes()
    child = f"""
import os, sys
sys.path.insert(0, {str(REPO / 'tests')!r})
from test_prompt_cache import filled_cache, MODEL_ID
from mqa_gen.prompt_cache import save_prompt_cache
os.fsync = lambda fd: os._exit(9)  # the kill: after the data is written, before fsync and rename
save_prompt_cache({str(path)!r}, filled_cache(length=9, seed=3), MODEL_ID)
"""
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert path.read_bytes() == before  # the old file, whole
    assert len(leftovers(tmp_path)) == 1  # the dead writer's temporary file, which nothing reads
    assert load_prompt_cache(path, MODEL_ID)[0].length == 5


# ───────────────────────────── model identity ─────────────────────────────


def test_model_identity_tells_models_apart(tmp_path):
    from mqa_gen.gguf_file import read_gguf

    a = write_tiny_llama(tmp_path / "a.gguf")["path"]
    same = write_tiny_llama(tmp_path / "same.gguf")["path"]
    weights = write_tiny_llama(tmp_path / "w.gguf", rng_seed=1)["path"]  # same layout, other weights
    meta = write_tiny_llama(tmp_path / "m.gguf", overrides={"general.name": "other"})["path"]
    kv = write_tiny_llama(tmp_path / "kv.gguf", n_kv_heads=2)["path"]
    ids = [model_identity(read_gguf(p)) for p in (a, same, weights, meta, kv)]
    assert ids[0] == ids[1] and len(ids[0]) == 64
    assert len(set(ids[1:])) == 4


# ───────────────────────────── reuse in the generation loop ─────────────────────────────


def test_reloaded_cache_gives_the_same_tokens_and_logits(smollm2, tmp_path):
    """A chat prompt's cache, saved and reloaded, serves another chat prompt with the same system
    prefix: only the new suffix is prefilled, and the continuation is transformers' own."""
    model, tok = smollm2.model, smollm2.tokenizer
    first, second = GREEDY["question"], GREEDY["haiku"]
    model_id = model_identity(smollm2.gguf)
    gen = stream_generate(model, tok, first["prompt_ids"], max_tokens=4, ctx_size=128)
    list(gen)
    assert gen.stats.reused_tokens == 0
    assert gen.cache.token_ids.tolist() == first["prompt_ids"] + gen.token_ids[:-1]
    path = tmp_path / "chat.npz"
    save_prompt_cache(path, gen.cache, model_id)

    shared = next(i for i, (a, b) in enumerate(zip(first["prompt_ids"], second["prompt_ids"], strict=False)) if a != b)
    assert shared > 20  # the default system prompt
    cache, _ = load_prompt_cache(path, model_id, config=model.config, dtype="float32", max_seq_len=128)
    n = 8
    reused = stream_generate(model, tok, second["prompt_ids"], max_tokens=n, cache=cache)
    list(reused)
    s = reused.stats
    assert (s.reused_tokens, s.prefill_tokens) == (shared, len(second["prompt_ids"]) - shared)
    assert reused.token_ids == second["continuation_ids"][:n]

    # Logits: the suffix on the reloaded prefix against one fresh pass over the whole prompt.
    fresh = model.forward(second["prompt_ids"], model.new_cache(128))
    prefix, _ = load_prompt_cache(path, model_id, max_seq_len=128)
    prefix.truncate(shared)
    # The two passes multiply in different orders (a short suffix runs the quantised kernels, the
    # full prompt dequantises + BLAS), so they agree to float32 rounding: 1e-5 of the logits' scale.
    reloaded = model.forward(second["prompt_ids"][shared:], prefix)
    assert np.abs(reloaded - fresh).max() <= 1e-5 * np.abs(fresh).max()


def test_a_fully_cached_prompt_prefills_one_token(smollm2):
    case = GREEDY["counting"]
    model, tok = smollm2.model, smollm2.tokenizer
    first = stream_generate(model, tok, case["prompt_ids"], max_tokens=3, ctx_size=64)
    list(first)
    again = stream_generate(model, tok, case["prompt_ids"], max_tokens=3, cache=first.cache)
    list(again)
    n = len(case["prompt_ids"])
    assert (again.stats.reused_tokens, again.stats.prefill_tokens) == (n - 1, 1)
    assert again.token_ids == first.token_ids == case["continuation_ids"][:3]
    assert again.cache.length == n + 2


def test_an_unlabelled_cache_is_never_reused(smollm2):
    """Rows written by a bare forward() carry no ids: they are dropped, not trusted."""
    case = GREEDY["counting"]
    cache = smollm2.model.new_cache(64)
    smollm2.model.forward([5, 6, 7], cache)
    gen = stream_generate(smollm2.model, smollm2.tokenizer, case["prompt_ids"], max_tokens=3, cache=cache)
    list(gen)
    assert gen.stats.reused_tokens == 0 and gen.token_ids == case["continuation_ids"][:3]


def test_a_cache_of_other_dimensions_is_rejected(smollm2):
    with pytest.raises(ValueError, match="KV heads"):
        stream_generate(smollm2.model, smollm2.tokenizer, [1, 2], cache=KVCache(30, 1, 64, 16))


# ───────────────────────────── the CLI ─────────────────────────────


@pytest.fixture
def invoke(smollm2, monkeypatch):
    """Run the CLI in-process; the default model is the session's, any other path is loaded."""
    from mqa_gen.loading import load

    module = importlib.import_module("mqa_gen.cli.common")
    monkeypatch.setattr(module, "load_model",
                        lambda name, quiet: smollm2 if name == "smollm2-135m-instruct" else load(name))

    def run(*args):
        return CliRunner().invoke(cli, ["generate", *args], catch_exceptions=False)

    return run


def test_cli_second_run_reuses_the_prefix_and_updates_the_file(invoke, tmp_path):
    path = str(tmp_path / "p.cache")
    common = ("--chat", "--ctx-size", "128", "--prompt-cache", path)
    first_case, second_case = GREEDY["question"], GREEDY["haiku"]
    one = invoke("--prompt", first_case["prompt"], "-n", "4", *common)
    assert one.exit_code == 0, one.stderr
    assert "reused" not in one.stderr and "prompt cache" in one.stderr
    assert read_prompt_cache_meta(path)["length"] == len(first_case["prompt_ids"]) + 3

    two = invoke("--prompt", second_case["prompt"], "-n", "6", "--json", *common)
    assert two.exit_code == 0, two.stderr
    out = json.loads(two.stdout)
    assert out["token_ids"] == second_case["continuation_ids"][:6]
    stats = out["stats"]
    assert stats["reused_tokens"] > 20 and stats["prefill_tokens"] == out["prompt_tokens"] - stats["reused_tokens"]
    assert f"({stats['reused_tokens']} reused, {stats['prefill_tokens']} prefilled)" in two.stderr
    assert read_prompt_cache_meta(path)["length"] == len(second_case["prompt_ids"]) + 5

    three = invoke("--prompt", second_case["prompt"], "-n", "6", "--json", *common)
    again = json.loads(three.stdout)
    assert again["token_ids"] == out["token_ids"]
    assert again["stats"]["reused_tokens"] == len(second_case["prompt_ids"]) - 1


def test_cli_refuses_a_file_of_another_model(invoke, tmp_path):
    tiny = write_tiny_llama(tmp_path / "tiny.gguf")["path"]
    path = str(tmp_path / "tiny.cache")
    made = invoke("-m", tiny, "--prompt", "the", "-n", "2", "--prompt-cache", path)
    assert made.exit_code == 0, made.stderr
    before = open(path, "rb").read()
    refused = invoke("--prompt", "Hello", "--no-chat", "-n", "2", "--prompt-cache", path)
    assert refused.exit_code == 2 and refused.stdout == ""
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "different model (tiny-llama)" in lines[0]
    assert open(path, "rb").read() == before  # never overwritten


@pytest.mark.parametrize("args,fragment", [
    (["--kv-heads", "1"], "made with 3 KV heads, this run uses 1"),
    (["--cache-dtype", "float16"], "holds a KV cache of type f32, this run uses --cache-dtype f16"),
    (["--cache-dtype", "q8_0"], "holds a KV cache of type f32, this run uses --cache-dtype q8_0"),
])
def test_cli_refuses_other_kv_heads_or_dtype(invoke, tmp_path, args, fragment):
    path = str(tmp_path / "p.cache")
    assert invoke("--prompt", "Hello", "--no-chat", "-n", "2", "--prompt-cache", path).exit_code == 0
    before = open(path, "rb").read()
    refused = invoke("--prompt", "Hello", "--no-chat", "-n", "2", "--prompt-cache", path, *args)
    assert refused.exit_code == 2 and refused.stdout == ""
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0]
    assert open(path, "rb").read() == before


@pytest.mark.parametrize("content", ["truncated", "random", "empty"])
def test_cli_refuses_damaged_files(invoke, tmp_path, content):
    path = tmp_path / "p.cache"
    save_prompt_cache(path, filled_cache(length=5), MODEL_ID)
    data = path.read_bytes()
    bad = {"truncated": data[: len(data) * 2 // 3], "random": os.urandom(4096), "empty": b""}[content]
    path.write_bytes(bad)
    result = invoke("--prompt", "Hello", "--no-chat", "-n", "2", "--prompt-cache", str(path))
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: prompt cache {path}")
    assert path.read_bytes() == bad


def test_cli_missing_folder_is_refused_before_generating(invoke, tmp_path):
    result = invoke("--prompt", "Hello", "--no-chat", "-n", "2", "--prompt-cache", str(tmp_path / "no" / "p.cache"))
    assert result.exit_code == 2
    assert result.stderr.startswith("error:") and "does not exist" in result.stderr


def test_zip_members_are_stored_uncompressed(tmp_path):
    """Loading is a copy, not a decompression (the time-to-first-token benchmark depends on it)."""
    path = tmp_path / "c.npz"
    save_prompt_cache(path, filled_cache(), MODEL_ID)
    with zipfile.ZipFile(path) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
