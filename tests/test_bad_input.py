"""Bad input that used to escape the error contract (issue 14, part 2): one test or more per kind.

Each kind of input — a model file's metadata and weights, a prompt-cache file, a flag, a prompt,
a chat template — once ended in a Python exception (exit 1), a hang, a memory blow-up or an abort.
Every case here must end in one of our :class:`~mqa_gen.errors.MqaGenError` subclasses (one line,
exit code 2 through the CLI), raised before anything large is allocated or any long work starts.
Tiny GGUF files come from :func:`gguf_factory.write_tiny_llama`; a damaged weight is written into
a good file's tensor data with the ``gguf`` package's own reader. ``tests/test_fuzz.py`` throws
random mutations at the same code.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner
from gguf_factory import MERGES, write_tiny_llama

from mqa_gen.cache import KVCache, KVCachePool, memory_limit_bytes
from mqa_gen.cli import cli
from mqa_gen.errors import (
    ChatTemplateError,
    ConfigError,
    ModelFileError,
    MqaGenError,
    NumericalError,
    PromptError,
    SizeError,
)
from mqa_gen.loading import load
from mqa_gen.prompt_cache import PromptCacheError, load_prompt_cache, save_prompt_cache

from conftest import deadline, mqa_gen_exe

MODEL_ID = "0" * 64


def one_error_line(result, *fragments: str) -> str:
    """A click result that ended as the contract says: exit 2, one ``error:`` line on stderr."""
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def run_cli(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A good tiny llama file (context 64 tokens)."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf")["path"]


def poke_tensor(path: str, name: str, change) -> None:
    """Change tensor ``name``'s bytes in the file in place: ``change(data)`` edits the writable
    memory map the ``gguf`` package's reader gives (F32: the values; quantised: uint8 blocks)."""
    from gguf import GGUFReader

    reader = GGUFReader(path, "r+")
    tensor = next(t for t in reader.tensors if t.name == name)
    change(tensor.data)
    reader.data.flush()
    del reader


# ───────────────────────────── 1. non-finite numbers ─────────────────────────────


@pytest.mark.parametrize("key, value", [
    ("llama.rope.freq_base", float("nan")),
    ("llama.rope.freq_base", float("inf")),
    ("llama.rope.freq_base", 0.0),
    ("llama.rope.freq_base", -10000.0),
    ("llama.attention.layer_norm_rms_epsilon", float("nan")),
    ("llama.attention.layer_norm_rms_epsilon", float("-inf")),
    ("llama.attention.layer_norm_rms_epsilon", 0.0),
    ("llama.attention.layer_norm_rms_epsilon", 1e-50),  # 0 as float32: a zero row would divide by 0
])
def test_non_finite_or_non_positive_metadata_is_refused_at_load(tmp_path, key, value):
    import gguf

    path = write_tiny_llama(tmp_path / "m.gguf", overrides={key: (value, gguf.GGUFValueType.FLOAT64)})["path"]
    with pytest.raises(ConfigError) as e:
        load(path)
    assert path in str(e.value) and "finite number > 0" in str(e.value)


def test_nan_in_a_norm_is_refused_at_load_naming_the_tensor(tmp_path):
    path = write_tiny_llama(tmp_path / "m.gguf")["path"]

    def nan(data):
        data[3] = np.nan

    poke_tensor(path, "blk.1.ffn_norm.weight", nan)
    with pytest.raises(ModelFileError) as e:
        load(path)
    assert "blk.1.ffn_norm.weight" in str(e.value) and "NaN or infinite" in str(e.value)


@pytest.mark.parametrize("half_bits", [0x7E00, 0x7C00])  # float16 NaN, +inf
def test_a_non_finite_block_scale_is_refused_at_load(tmp_path, half_bits):
    """A Q8_0 block is a float16 scale then 32 int8 codes; the scale of block 0 of a matrix."""
    path = write_tiny_llama(tmp_path / "m.gguf", tensor_type="Q8_0")["path"]

    def bad_scale(data):
        data[0, 0:2] = np.frombuffer(np.uint16(half_bits).tobytes(), np.uint8)

    poke_tensor(path, "blk.0.attn_q.weight", bad_scale)
    with pytest.raises(ModelFileError) as e:
        load(path)
    assert "blk.0.attn_q.weight" in str(e.value)


def test_decode_attention_gives_nan_not_zero_division_for_nan_input():
    """NaN scores made every exponential 0 and the final 1/total divide by zero (ZeroDivisionError,
    or SystemError from inside the parallel region); now they give NaN, which the sampler's
    caller reports."""
    from mqa_gen.kernels import attention_decode
    from mqa_gen.kernels.attention import decode_partial_shape
    from mqa_gen.kernels.rowwise import softmax_inplace

    q = np.full((1, 2, 4), np.nan, np.float32)
    k = np.ones((1, 1, 8, 4), np.float32)
    out = np.zeros((1, 2, 4), np.float32)
    partial = np.empty(decode_partial_shape(1, 8, 2, 4), np.float32)
    attention_decode(q, k, k, np.zeros(1, np.int64), np.full(1, 8, np.int64), np.float32(0.5), partial, out)
    assert np.isnan(out).all()
    for row in (np.full(4, np.nan, np.float32), np.full(4, -np.inf, np.float32)):
        softmax_inplace(row)
        assert np.isnan(row).all()


def damaged_model(path):
    """The tiny model loaded, then its final norm gain set to NaN in memory (past the load-time
    checks, as garbage weights that are finite but overflow would be): every logit is NaN."""
    loaded = load(path)
    loaded.model.final_norm = np.full_like(loaded.model.final_norm, np.nan)
    return loaded


def test_nan_logits_end_generation_with_a_numerical_error(tiny):
    from mqa_gen.generate import stream_generate

    loaded = damaged_model(tiny)
    with pytest.raises(NumericalError) as e:
        list(stream_generate(loaded.model, loaded.tokenizer, loaded.tokenizer.encode("the cat"), max_tokens=3))
    assert "NaN logits" in str(e.value) and "damaged model file" in str(e.value)


def test_nan_logits_in_the_batch_scheduler(tiny):
    from mqa_gen.scheduler import Request, Scheduler

    loaded = damaged_model(tiny)
    scheduler = Scheduler(loaded.model, loaded.tokenizer, batch_size=2, ctx_size=32)
    with pytest.raises(NumericalError):
        list(scheduler.run([Request(loaded.tokenizer.encode("the cat"), max_tokens=3)]))


def test_a_nan_prompt_cache_row_is_named_as_a_likely_cause(tiny):
    """A reused cache whose V rows are NaN (given in memory; a file like it is refused at load)."""
    from mqa_gen.generate import stream_generate

    loaded = load(tiny)
    ids = loaded.tokenizer.encode("the cat the cat")
    cache = loaded.model.new_cache(32)
    list(stream_generate(loaded.model, loaded.tokenizer, ids, max_tokens=1, cache=cache))
    cache.layers[0].values[:, :2, :] = np.nan
    with pytest.raises(NumericalError) as e:
        list(stream_generate(loaded.model, loaded.tokenizer, ids + [5], max_tokens=2, cache=cache))
    assert "prompt cache" in str(e.value)


def test_nan_logits_through_the_cli_are_one_line_exit_2(tiny, monkeypatch):
    import importlib

    loaded = damaged_model(tiny)
    monkeypatch.setattr(importlib.import_module("mqa_gen.cli.common"), "load_model", lambda name, quiet: loaded)
    one_error_line(run_cli("generate", "-m", tiny, "--prompt", "the cat", "--no-chat", "-n", "3"),
                   "NaN logits", "damaged model file")


# ───────────────────────────── 2. tokenizer metadata ─────────────────────────────


def _int_array(values):
    import gguf

    return values, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32


@pytest.mark.parametrize("overrides, fragment", [
    ({"tokenizer.ggml.merges": MERGES + ["Ġ zzzz"]}, "out of vocabulary"),  # tokenizers' bare Exception
    ({"tokenizer.ggml.token_type": _int_array([1, 2])}, "token types"),
    ({"tokenizer.ggml.tokens": _int_array(list(range(265)))}, "invalid tokenizer metadata"),
    ({"tokenizer.ggml.bos_token_id": "one"}, "invalid tokenizer metadata"),
    ({"tokenizer.chat_template": 7}, "chat_template"),
])
def test_tokenizer_metadata_the_library_rejects_is_a_model_file_error(tmp_path, overrides, fragment):
    path = write_tiny_llama(tmp_path / "m.gguf", overrides=overrides)["path"]
    with pytest.raises(ModelFileError) as e:
        load(path)
    assert fragment in str(e.value) and "\n" not in str(e.value)


# ───────────────────────────── 3. sizes that cannot be allocated ─────────────────────────────


@pytest.mark.parametrize("context", [2**31, 4_000_000_000])
def test_a_context_beyond_int32_positions_is_refused_at_load(tmp_path, context):
    import gguf

    path = write_tiny_llama(tmp_path / "m.gguf",
                            overrides={"llama.context_length": (context, gguf.GGUFValueType.UINT32)})["path"]
    with pytest.raises(ConfigError) as e:
        load(path)
    assert f"{context:,}" in str(e.value)


@pytest.mark.parametrize("blocks", [2**20, 2**31])
def test_a_block_count_beyond_the_tensors_is_refused_before_any_per_layer_work(tmp_path, blocks):
    """2**20 layers in an 80 KB file took 34 s to refuse (a tensor list built per layer); 2**31
    ran out of memory. The file's tensor count bounds the layers before anything is built."""
    import gguf

    path = write_tiny_llama(tmp_path / "m.gguf",
                            overrides={"llama.block_count": (blocks, gguf.GGUFValueType.UINT32)})["path"]
    with deadline(30), pytest.raises(ConfigError) as e:
        load(path)
    assert f"{blocks:,}" in str(e.value) and "tensors" in str(e.value)


def test_a_cache_beyond_memory_and_swap_is_refused_before_mapping(monkeypatch):
    """Computed in Python integers: 2**63 tokens neither overflow nor reach mmap."""
    import mqa_gen.cache as cache_module

    monkeypatch.setattr(cache_module, "memory_limit_bytes", lambda: 8 * 2**30)
    for tokens in (2**26, 2**40, 2**63):  # 2**26 × (2·2·1·8·4 + 8) B = 8.5 GiB > 8 GiB
        with pytest.raises(SizeError) as e:
            KVCache(2, 1, 8, tokens)
        assert f"{tokens:,} tokens" in str(e.value) and "lower --ctx-size" in str(e.value)
    with pytest.raises(SizeError):
        KVCachePool(64, 2, 1, 8, 2**20)  # 64 slots × 136 MiB
    assert KVCache(2, 1, 8, 2**20).max_seq_len == 2**20  # 136 MiB: fine


def test_memory_limit_is_known_here():
    limit = memory_limit_bytes()
    assert limit is None or limit > 2**20


@pytest.mark.parametrize("ctx", [str(2**40), str(2**63)])
def test_a_huge_ctx_size_flag_is_one_line_exit_2(tiny, ctx):
    one_error_line(run_cli("generate", "-m", tiny, "--prompt", "hi", "--no-chat", "--ctx-size", ctx),
                   "KV cache", "lower --ctx-size")


def test_a_model_claiming_two_billion_tokens_asks_for_ctx_size(tmp_path, monkeypatch):
    import gguf

    import mqa_gen.cache as cache_module

    monkeypatch.setattr(cache_module, "memory_limit_bytes", lambda: 8 * 2**30)
    path = write_tiny_llama(tmp_path / "m.gguf",
                            overrides={"llama.context_length": (2**31 - 1, gguf.GGUFValueType.UINT32)})["path"]
    one_error_line(run_cli("generate", "-m", path, "--prompt", "hi", "--no-chat", "-n", "2"), "lower --ctx-size")
    result = run_cli("generate", "-m", path, "--prompt", "hi", "--no-chat", "-n", "2", "--ctx-size", "32")
    assert result.exit_code == 0, result.stderr


# ───────────────────────────── 4. prompt-cache files ─────────────────────────────


def small_cache(length=6, n_layers=2):
    cache = KVCache(n_layers, 1, 4, 16)
    rng = np.random.default_rng(0)
    for layer in range(n_layers):
        k = rng.standard_normal((length, 1, 4)).astype(np.float32)
        cache.layers[layer].update_and_fetch(k, 2 * k, 0)
    cache.advance(length)
    cache.label_tokens(range(10, 10 + length))
    return cache


def arrays_of(path):
    with np.load(path, allow_pickle=False) as npz:
        return dict(npz)


def write_npz(path, arrays, compress=False):
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        (np.savez_compressed if compress else np.savez)(f, **arrays)


def with_meta(arrays, **changes):
    meta = json.loads(arrays["meta"].tobytes())
    meta.update(changes)
    return {**arrays, "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.cache"
    save_prompt_cache(path, small_cache(), MODEL_ID)
    return path


def refused(path, *fragments):
    with deadline(30), pytest.raises(PromptCacheError) as e:
        load_prompt_cache(path, MODEL_ID)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_deeply_nested_meta_json_is_refused(good_file, tmp_path):
    """json.loads raised RecursionError on nesting 10⁵ deep."""
    arrays = arrays_of(good_file)
    arrays["meta"] = np.frombuffer(b"[" * 100_000 + b"]" * 100_000, np.uint8)
    write_npz(tmp_path / "nested.cache", arrays)
    refused(tmp_path / "nested.cache", "unreadable meta record")


def test_a_huge_layer_count_is_refused_before_building_per_layer_lists(good_file, tmp_path):
    """A default windows list of n_layers zeros was built (MemoryError) before any check."""
    write_npz(tmp_path / "layers.cache", with_meta(arrays_of(good_file), n_layers=10**12))
    refused(tmp_path / "layers.cache", "arrays for 1,000,000,000,000 layers")


def test_huge_dimensions_are_refused_by_the_member_sizes(good_file, tmp_path):
    for field in ("length", "n_kv_heads", "head_dim"):
        write_npz(tmp_path / f"{field}.cache", with_meta(arrays_of(good_file), **{field: 2**40}))
        refused(tmp_path / f"{field}.cache", "corrupt")


def test_a_compressed_member_is_refused_before_inflating(good_file, tmp_path):
    """A zip bomb: 256 MiB of zeros deflate to 256 KB. Stored members only, so nothing read can be
    larger than the file."""
    arrays = arrays_of(good_file)
    arrays["k_0"] = np.zeros((1, 2**26, 1), np.float32)
    path = tmp_path / "bomb.cache"
    write_npz(path, arrays, compress=True)
    assert path.stat().st_size < 2**21
    refused(path, "compressed")


def test_a_duplicated_member_is_refused(good_file, tmp_path):
    path = tmp_path / "dup.cache"
    path.write_bytes(good_file.read_bytes())
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(path, "a") as z:
        z.writestr("k_0.npy", z.read("k_1.npy"))
    refused(path, "appears twice")


@pytest.mark.parametrize("change", ["zeroed", "scaled", "swapped", "nan"])
def test_changed_kv_data_with_a_valid_zip_is_refused(good_file, tmp_path, change):
    """Rewritten with fresh CRCs: only the digest in the meta record tells."""
    arrays = arrays_of(good_file)
    if change == "zeroed":
        arrays["v_1"] = np.zeros_like(arrays["v_1"])
    elif change == "scaled":
        arrays["k_0"] = arrays["k_0"] * np.float32(1.5)
    elif change == "swapped":
        arrays["k_0"], arrays["k_1"] = arrays["k_1"], arrays["k_0"]
    else:
        arrays["k_0"] = arrays["k_0"].copy()
        arrays["k_0"][0, 0, 0] = np.nan
    write_npz(tmp_path / "changed.cache", arrays)
    refused(tmp_path / "changed.cache", "does not match the digest")


def test_nan_kv_data_is_refused_even_with_a_matching_digest(good_file, tmp_path):
    from mqa_gen.prompt_cache import arrays_digest

    arrays = arrays_of(good_file)
    arrays["v_0"] = arrays["v_0"].copy()
    arrays["v_0"][0, 1, 2] = np.inf
    kv = {k: v for k, v in arrays.items() if k != "meta"}
    write_npz(tmp_path / "nan.cache", with_meta(arrays, digest=arrays_digest(kv)))
    refused(tmp_path / "nan.cache", "v_0", "NaN or infinite")


def test_a_version_1_file_without_a_digest_is_refused_with_a_way_out(good_file, tmp_path):
    arrays = arrays_of(good_file)
    meta = json.loads(arrays["meta"].tobytes())
    del meta["digest"]
    meta["version"] = 1
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    write_npz(tmp_path / "v1.cache", arrays)
    refused(tmp_path / "v1.cache", "format version 1", "delete the file")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_without_blocking(tmp_path):
    """Opening a FIFO for reading blocks until a writer comes: forever, here."""
    fifo = tmp_path / "pipe.cache"
    os.mkfifo(fifo)
    refused(fifo, "not a regular file")


def test_a_directory_and_a_missing_file_are_refused(tmp_path):
    refused(tmp_path, "is a directory")
    refused(tmp_path / "absent.cache", "does not exist")


def test_the_next_save_removes_a_killed_writers_temporary_file(tmp_path):
    """A writer killed with SIGKILL mid-save leaves its .tmp; the next save of that file removes
    it, and leaves alone one that a live writer holds (its flock)."""
    import fcntl

    from mqa_gen.atomic_file import TEMP_SUFFIX, temp_prefix

    path = tmp_path / "c.cache"
    child = f"""
import os, signal, sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_bad_input import small_cache
from mqa_gen.prompt_cache import save_prompt_cache
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
save_prompt_cache({str(path)!r}, small_cache(), "0" * 64)
"""
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    dead = [p for p in tmp_path.iterdir() if p.name.endswith(TEMP_SUFFIX)]
    assert len(dead) == 1 and dead[0].name.startswith(temp_prefix(path))
    live = tmp_path / f"{temp_prefix(path)}abcd1234{TEMP_SUFFIX}"
    live.write_bytes(b"half")
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        save_prompt_cache(path, small_cache(), MODEL_ID)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, live.name])
    assert load_prompt_cache(path, MODEL_ID)[0].length == 6


def test_a_bad_prompt_cache_through_the_cli_is_one_line(tiny, good_file, tmp_path):
    fifo = tmp_path / "pipe.cache"
    os.mkfifo(fifo)
    with deadline(60):
        one_error_line(run_cli("generate", "-m", tiny, "--prompt", "hi", "--no-chat", "-n", "2",
                               "--prompt-cache", str(fifo)), "not a regular file")


# ───────────────────────────── 5. prompts that are not UTF-8 ─────────────────────────────


def test_tokenizer_refuses_lone_surrogates(tiny):
    tok = load(tiny).tokenizer
    with pytest.raises(PromptError) as e:
        tok.encode("the \udcff cat")
    assert "byte 0xff at character 5" in str(e.value)


def test_invalid_utf8_in_the_prompt_argument_is_one_line_exit_2(tiny):
    """Through the real entry point: the shell hands bytes, Python decodes them with
    surrogateescape, and the tokenizer raised TypeError."""
    proc = subprocess.run([mqa_gen_exe(), "generate", "-m", tiny, "--no-chat", "--prompt", b"caf\xe9 au lait"],
                          capture_output=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.decode().splitlines() == ["error: --prompt is not valid UTF-8 (byte 0xe9 at character 4)"]
    assert proc.stdout == b""


def test_invalid_utf8_on_stdin_is_one_line_exit_2(tiny):
    one_error_line(run_cli("generate", "-m", tiny, "--no-chat", "--prompt", "-", input=b"ok \xff\xfe"),
                   "stdin is not valid UTF-8", "byte 0xff at byte 4")


def test_invalid_utf8_in_a_chat_line_is_refused_and_the_chat_goes_on(tiny):
    result = run_cli("chat", "-m", tiny, "-n", "2", "--quiet", input=b"caf\xe9\nhello\n/stats\n")
    assert result.exit_code == 0, result.stderr
    # stdout is not a terminal: the "> " prompts and /stats go to stderr, beside the error line.
    lines = [re.sub(r"^(> )+", "", line) for line in result.stderr.splitlines()]
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == ["error: this message is not valid UTF-8 (byte 0xe9 at character 4)"]
    assert "2 messages" in result.stderr  # "hello" and its answer: the bad line never joined


def test_invalid_utf8_calibration_text_is_one_line_exit_2(tmp_path):
    gqa = write_tiny_llama(tmp_path / "gqa.gguf", n_kv_heads=2)["path"]  # 2 → 1 reads the calibration text
    text = tmp_path / "calib.txt"
    text.write_bytes(b"the cat \xff sat")
    one_error_line(run_cli("convert", "-m", gqa, "--kv-heads", "1", "--calibrate", str(text), "--no-eval",
                           "-o", str(tmp_path / "out.gguf"), "--quiet"), "calibration text",
                   "is not valid UTF-8 (byte 0xff at byte 9)")


def test_invalid_utf8_in_a_prompt_file_names_the_byte_as_stdin_does(tiny, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_bytes(b"\xff\xfe hello")
    one_error_line(run_cli("generate", "-m", tiny, "--no-chat", "--prompt-file", str(path)),
                   f"prompt file {path} is not valid UTF-8 (byte 0xff at byte 1)")


# ───────────────────────────── 6. chat templates ─────────────────────────────

HOSTILE_TEMPLATES = {
    "huge string": "{{ 'x' * 10**8 }}",
    "huge list": "{{ ([1] * 10**9)|length }}",
    "huge number": "{{ 10 ** (10 ** 8) }}",
    "doubling with ~": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}{{ ns.s|length }}",
    "doubling with +": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}"
                       "{% endfor %}{{ ns.s|length }}",
    "padding method": "{{ 'x'.center(10**10) }}",
    "padding filter": "{{ 'x'|center(10**10) }}",
    "folded at compile time": "{{ 'x'|center(10000000000) }}",
    "format filter width": "{{ '%*d'|format(9999999999, 1) }}",
    "replace blow-up": "{{ ('x' * 100000)|replace('', 'y' * 100) }}",
    "indent filter": "{{ 'a\nb'|indent(10**10) }}",
    "format width": "{{ '{:>9999999999}'.format(1) }}",
    "percent width": "{{ '%9999999999d' % 1 }}",
    "star width": "{{ '%*d' % (9999999999, 1) }}",
    "long output": "{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}",
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "exponential macro": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "endless recursion": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
}


@pytest.mark.parametrize("name", HOSTILE_TEMPLATES)
def test_templates_that_build_huge_values_or_loop_are_refused(name, monkeypatch):
    import mqa_gen.chat as chat

    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.5)
    with deadline(30), pytest.raises(ChatTemplateError) as e:
        chat.render_chat(HOSTILE_TEMPLATES[name], [{"role": "user", "content": "hi"}])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("template, expected", [
    ("{{ '%d' % 10**9 }}", "1000000000"),
    ("{{ '{}'.format(10**9) }}", "1000000000"),
    ("{{ 12345678|string }}", "12345678"),
    ("{{ 'x'|center(5) }}|{{ '%5d' % 3 }}|{{ 'ab' * 2 }}|{{ [1] + [2] }}|{{ 2 ** 10 }}", "  x  |    3|abab|[1, 2]|1024"),
    ("{{ messages|map(attribute='content')|join(', ') ~ '!' }}", "hi!"),
])
def test_ordinary_operations_stay_within_the_budget(template, expected):
    from mqa_gen.chat import render_chat

    assert render_chat(template, [{"role": "user", "content": "hi"}]) == expected


def test_the_render_budget_grows_with_the_conversation():
    """A 3 MB message (beyond the 1 MiB base) still renders through a template that repeats it."""
    from mqa_gen.chat import render_chat
    from gguf_factory import CHATML_TEMPLATE

    content = "word " * 600_000
    out = render_chat(CHATML_TEMPLATE + "{{ messages[0]['content'] ~ '' }}", [{"role": "user", "content": content}])
    assert out.count(content) == 2


def test_a_hostile_template_in_a_model_file_is_one_line_through_the_cli(tmp_path, monkeypatch):
    import mqa_gen.chat as chat

    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.5)
    path = write_tiny_llama(tmp_path / "m.gguf", overrides={"tokenizer.chat_template": HOSTILE_TEMPLATES["nested loops"]})
    with deadline(60):
        one_error_line(run_cli("generate", "-m", path["path"], "--prompt", "hi", "-n", "2"),
                       "chat template", "0.5 s")


def test_rendering_restores_an_existing_trace_function():
    import sys

    from mqa_gen.chat import render_chat

    calls = []

    def tracer(frame, event, arg):
        calls.append(event)
        return None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        render_chat("{{ messages[0]['content'] }}", [{"role": "user", "content": "hi"}])
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(previous)


def test_every_failure_kind_derives_from_mqa_gen_error():
    from mqa_gen.prompt_cache import PromptCacheError as P

    for kind in (ConfigError, ModelFileError, NumericalError, SizeError, PromptError, ChatTemplateError, P):
        assert issubclass(kind, MqaGenError) and kind.exit_code == 2



# ───────────────────────────── streams, sizes and outputs (a newcomer's findings) ─────────────────────────────


@pytest.mark.parametrize("verb", [["info"], ["list"], ["bench-cache", "--no-measure"]])
def test_a_table_whose_reader_left_exits_141(verb):
    """rich's own broken-pipe handler exits 1; ours gives the contract's 141, quietly."""
    proc = subprocess.run(f"'{mqa_gen_exe()}' {' '.join(verb)} | true; exit ${{PIPESTATUS[0]}}", shell=True,
                          executable="/bin/bash", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 141 and proc.stderr == ""


def test_closed_stdout_and_stdin():
    """`>&-`: nothing can be delivered, 141 at once; `<&-`: an empty stdin, so an empty prompt (2)."""
    closed_out = subprocess.run(f"'{mqa_gen_exe()}' generate -p hi -n 2 >&-", shell=True, capture_output=False,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    assert closed_out.returncode == 141 and closed_out.stderr == ""
    closed_in = subprocess.run(f"'{mqa_gen_exe()}' generate -p - <&-", shell=True, capture_output=True, text=True,
                               timeout=120)
    assert closed_in.returncode == 2 and closed_in.stderr.strip() == "error: the prompt is empty"


def test_an_endless_prompt_or_input_is_refused_not_read_until_memory_runs_out(tmp_path):
    """`-f /dev/zero` and an endless stdin end at the size limit with one line, exit 2."""
    one_error_line(run_cli("generate", "-f", "/dev/zero"), "longer than 64 MiB")
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:  # sparse: 1 GiB + 1 byte of zeros, no disk used
        f.truncate(1024 * 2**20 + 1)
    one_error_line(run_cli("batch", str(big)), "longer than 1,024 MiB")


def test_batch_outputs_and_budgets_that_cannot_work(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "Hello"}\n', encoding="utf-8")
    for value in ("nan", "inf"):
        one_error_line(run_cli("batch", str(source), "--kv-budget", value), "--kv-budget must be a finite")
    one_error_line(run_cli("batch", str(source), "-o", str(tmp_path), "--overwrite"), "is a folder")
    one_error_line(run_cli("batch", str(source), "-o", str(tmp_path / "no" / "out.jsonl")), "does not exist")
    if os.path.exists("/dev/full"):
        one_error_line(run_cli("batch", str(source), "-o", "/dev/full", "--overwrite", "-n", "1", "-q"),
                       "cannot write the results", "--resume")


def test_bench_cache_refuses_a_plot_it_could_not_write_before_measuring(tmp_path):
    pytest.importorskip("matplotlib")
    one_error_line(run_cli("bench-cache", "--plot", str(tmp_path / "nodir" / "x.png")), "does not exist")
    one_error_line(run_cli("bench-cache", "--plot", str(tmp_path / "x.txt")), "not an image format")


def test_stop_strings_must_be_text_that_can_match():
    one_error_line(run_cli("generate", "-p", "hi", "--stop", "\udcff"), "--stop is not valid UTF-8")
    one_error_line(run_cli("generate", "-p", "hi", "--stop", ""), "--stop needs a non-empty string")
    one_error_line(run_cli("generate", "-p", "hi", "-sys", "\udcff"), "--system-prompt is not valid UTF-8")


def test_a_huge_prompt_is_refused_before_it_is_tokenised(smollm2, tmp_path):
    """20 million characters cannot fit 8,192 tokens whatever they are: refused at once (the longest
    piece bounds the bytes a token stands for), not after seconds of tokenising."""
    tok = smollm2.tokenizer
    longest = max(len(tok.token_bytes(i)) for i in range(tok.vocab_size))
    assert tok.surely_longer_than("x" * (8192 * longest + 1), 8192)
    assert not tok.surely_longer_than("x" * (8192 * longest), 8192)  # might fit: tokenise and count
    assert tok.surely_longer_than("é" * (8192 * longest // 2 + 1), 8192)  # two bytes a character
    big = tmp_path / "big.txt"
    big.write_text("x" * 20_000_000, encoding="utf-8")
    with deadline(20):
        one_error_line(run_cli("generate", "-f", str(big), "--no-chat"), "longer than the context of 8,192 tokens")


def test_a_model_path_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    with deadline(20):
        one_error_line(run_cli("info", "-m", str(fifo)), "not a regular file")
