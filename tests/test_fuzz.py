"""Fuzzing: mutated model files and prompt-cache files end in success or one of our errors.

Seeded mutators (case i of a target uses ``numpy.random.default_rng([SEED, target, i])``, so a
failure names the case that reproduces it) over:

* tiny GGUF files from :func:`gguf_factory.write_tiny_llama` (llama F32, llama Q8_0, Gemma 3):
  bytes flipped, set to extreme integers or floats, cut, repeated, in the header and beyond; and
  metadata values replaced by hostile ones (NaN, ±inf, 0, -1, 2**31, 2**63-1, wrong types, long
  strings, arrays). Each case loads the file, renders its chat template and generates two tokens.
* a real prompt-cache file, saved by :func:`~mqa_gen.prompt_cache.save_prompt_cache` from the tiny
  model's own cache: bytes flipped, cut or appended; the meta record's fields replaced; members
  dropped, duplicated, compressed, or given other shapes and dtypes. Each case loads it for the
  model and, when it loads, generates two tokens from it.

Every case must end in success or a :class:`~mqa_gen.errors.MqaGenError` — never another
exception, a hang (each case runs under a SIGALRM deadline), a crash, or a NumPy RuntimeWarning
(an extra line on stderr beside the one ``error:`` line). ``MQA_GEN_FUZZ_CASES`` sets the cases per
target (default 300: about 20 s here); ``MQA_GEN_FUZZ_SEED`` another seed (default 14). Runs of
3,000 cases per target with seeds 7 and 14 passed when this was written.
"""

from __future__ import annotations

import io
import json
import os
import struct
import traceback
import zipfile

import numpy as np
import pytest
from conftest import deadline
from gguf_factory import write_tiny_llama

from mqa_gen.errors import MqaGenError

CASES = int(os.environ.get("MQA_GEN_FUZZ_CASES", "300"))
SEED = int(os.environ.get("MQA_GEN_FUZZ_SEED", "14"))
CASE_SECONDS = 30  # a case needs well under a second; beyond this it is a hang
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

HOSTILE_NUMBERS = [float("nan"), float("inf"), float("-inf"), 0.0, -1.0, 1e-45, 1e38, -0.0]
HOSTILE_INTS = [0, 1, -1, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**20, 3, 65]


class Hang(Exception):
    """A case ran past :data:`CASE_SECONDS`."""


def outcome(run) -> str | None:
    """None when ``run()`` succeeds or raises an MqaGenError; else the unexpected exception."""
    try:
        with deadline(CASE_SECONDS, Hang):
            run()
    except MqaGenError:
        return None
    except Exception as e:  # noqa: BLE001 - the point: anything else is a finding
        return f"{type(e).__name__}: {str(e)[:200]}\n{traceback.format_exc(limit=6)}"
    return None


# ───────────────────────────── byte-level mutations ─────────────────────────────


def mutate_bytes(data: bytes, rng: np.random.Generator, focus: int) -> tuple[bytes, str]:
    """One to four random edits, most of them in the first ``focus`` bytes (the header)."""
    out = bytearray(data)
    done = []
    for _ in range(int(rng.integers(1, 5))):
        at = int(rng.integers(0, focus if rng.random() < 0.8 else len(out)))
        kind = int(rng.integers(0, 6))
        if kind == 0:
            out[at] ^= 1 << int(rng.integers(0, 8))
            done.append(f"flip@{at}")
        elif kind == 1:
            out[at] = int(rng.integers(0, 256))
            done.append(f"byte@{at}")
        elif kind == 2:
            value = HOSTILE_INTS[int(rng.integers(0, len(HOSTILE_INTS)))] & (2**64 - 1)
            out[at:at + 8] = struct.pack("<Q", value)
            done.append(f"u64={value}@{at}")
        elif kind == 3:
            value = HOSTILE_NUMBERS[int(rng.integers(0, len(HOSTILE_NUMBERS)))]
            out[at:at + 4] = struct.pack("<f", value)
            done.append(f"f32={value}@{at}")
        elif kind == 4:
            del out[at:]
            done.append(f"cut@{at}")
            break
        else:
            n = int(rng.integers(1, 64))
            out[at:at] = out[at:at + n]
            done.append(f"repeat{n}@{at}")
    return bytes(out), " ".join(done)


# ───────────────────────────── model files ─────────────────────────────

METADATA_KEYS = [
    "{arch}.block_count", "{arch}.context_length", "{arch}.embedding_length", "{arch}.feed_forward_length",
    "{arch}.attention.head_count", "{arch}.attention.head_count_kv", "{arch}.rope.freq_base",
    "{arch}.attention.layer_norm_rms_epsilon", "{arch}.attention.key_length", "{arch}.vocab_size",
    "{arch}.attention.sliding_window", "{arch}.rope.scaling.type", "general.architecture",
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
]


def hostile_value(rng: np.random.Generator):
    """A metadata value as :func:`write_tiny_llama`'s ``overrides`` takes it."""
    import gguf

    T = gguf.GGUFValueType
    kind = int(rng.integers(0, 8))
    if kind == 0:
        return (HOSTILE_NUMBERS[int(rng.integers(0, len(HOSTILE_NUMBERS)))], T.FLOAT32)
    if kind == 1:
        value = HOSTILE_INTS[int(rng.integers(0, len(HOSTILE_INTS)))]
        return (value, T.UINT64 if value >= 0 else T.INT64)
    if kind == 2:
        return (float(rng.choice([1e300, float("nan"), -1e-300])), T.FLOAT64)
    if kind == 3:
        return "x" * int(rng.integers(0, 5000))
    if kind == 4:
        return ([int(v) for v in rng.integers(-3, 300, int(rng.integers(0, 20)))], T.ARRAY, T.INT32)
    if kind == 5:
        return [chr(int(c)) * int(rng.integers(1, 4)) for c in rng.integers(32, 0x2FF, int(rng.integers(0, 20)))]
    if kind == 6:
        return (bool(rng.integers(0, 2)), T.BOOL)
    return None  # drop the key


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_models")
    return {
        "llama-f32": write_tiny_llama(folder / "f32.gguf"),
        "llama-q8_0": write_tiny_llama(folder / "q8.gguf", tensor_type="Q8_0"),
        "gemma3": write_tiny_llama(folder / "gemma3.gguf", arch="gemma3", n_heads=2, n_kv_heads=1, head_dim=16,
                                   n_layers=6),
    }


def exercise_model(path: str) -> None:
    """Load, render the chat template (if any), encode, and generate two tokens."""
    from mqa_gen.chat import render_chat
    from mqa_gen.generate import stream_generate
    from mqa_gen.loading import load

    loaded = load(path)
    tok = loaded.tokenizer
    text = "the cat sat"
    if tok.chat_template is not None:
        text = render_chat(tok.chat_template, [{"role": "user", "content": text}])
    ids = tok.encode(text)
    if ids and len(ids) < loaded.config.context_length:
        list(stream_generate(loaded.model, tok, ids, max_tokens=2, eos_ids=[]))


def header_size(path: str) -> int:
    """Bytes before the first tensor's data (where the metadata and tensor infos live)."""
    from mqa_gen.gguf_file import read_gguf
    from mqa_gen.prompt_cache import _file_offset

    return min(_file_offset(np.asarray(t.data)) for t in read_gguf(path).tensors.values())


def test_fuzz_model_files(model_files, tmp_path):
    findings = []
    names = sorted(model_files)
    for i in range(CASES):
        rng = np.random.default_rng([SEED, 1, i])
        name = names[i % len(names)]
        base = model_files[name]
        path = str(tmp_path / f"case{i}.gguf")
        if rng.random() < 0.5:
            data = open(base["path"], "rb").read()
            mutated, what = mutate_bytes(data, rng, header_size(base["path"]))
            with open(path, "wb") as f:
                f.write(mutated)
        else:
            arch = base["metadata"]["arch"]
            keys = [METADATA_KEYS[int(k)].format(arch=arch) for k in rng.integers(0, len(METADATA_KEYS), 2)]
            overrides = {key: hostile_value(rng) for key in keys}
            what = f"overrides {overrides!r:.300}"
            extra = {"arch": "gemma3", "n_heads": 2, "n_kv_heads": 1, "head_dim": 16, "n_layers": 6} \
                if arch == "gemma3" else {}
            try:
                write_tiny_llama(path, overrides=overrides, tensor_type="Q8_0" if name == "llama-q8_0" else "F32",
                                 **extra)
            except (TypeError, ValueError, OverflowError, struct.error):
                continue  # a value the writer itself cannot store: no file to test
        finding = outcome(lambda: exercise_model(path))
        if finding:
            findings.append(f"case {i} ({name}: {what}): {finding}")
        os.unlink(path)
    assert not findings, "\n\n".join(findings[:5]) + f"\n\n{len(findings)} of {CASES} cases failed"


# ───────────────────────────── prompt-cache files ─────────────────────────────


@pytest.fixture(scope="module")
def cache_setup(tmp_path_factory):
    """The tiny model, and a real prompt-cache file saved from its cache after a generation."""
    from mqa_gen.generate import stream_generate
    from mqa_gen.loading import load
    from mqa_gen.prompt_cache import model_identity, save_prompt_cache

    folder = tmp_path_factory.mktemp("fuzz_cache")
    loaded = load(write_tiny_llama(folder / "m.gguf", n_kv_heads=2)["path"])
    model_id = model_identity(loaded.gguf)
    ids = loaded.tokenizer.encode("the cat sat on the mat")
    gen = stream_generate(loaded.model, loaded.tokenizer, ids, max_tokens=4, eos_ids=[], ctx_size=32)
    list(gen)
    path = folder / "real.cache"
    save_prompt_cache(path, gen.cache, model_id, extra={"messages": [{"role": "user", "content": "hi"}]})
    return loaded, model_id, ids, path.read_bytes()


def rewrite_members(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """A structure-aware change: the meta record's fields, or whole members."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = {info.filename: z.read(info) for info in z.infolist()}
    arrays = {name[:-4]: np.load(io.BytesIO(raw), allow_pickle=False) for name, raw in members.items()}
    meta = json.loads(arrays["meta"].tobytes())
    kind = int(rng.integers(0, 7))
    compress = False
    duplicate = None
    if kind == 0:
        field = str(rng.choice(["n_layers", "n_kv_heads", "head_dim", "length", "version", "windows", "dtype",
                                "digest", "extra", "model_id", "format"]))
        values = [0, -1, 1, 2**31, 2**62, 10**30, "x", None, [], {}, 1.5, True, [0] * 3]
        value = values[int(rng.integers(0, len(values)))]
        meta[field] = value
        what = f"meta {field}={value!r:.60}"
    elif kind == 1:
        depth = int(rng.integers(1000, 200_000))
        arrays["meta"] = np.frombuffer(b"[" * depth + b"]" * depth, np.uint8)
        what = f"meta nested {depth}"
    elif kind == 2:
        name = str(rng.choice([n for n in arrays if n != "meta"]))
        del arrays[name]
        what = f"drop {name}"
    elif kind == 3:
        name = str(rng.choice([n for n in arrays if n != "meta"]))
        shape = tuple(int(s) for s in rng.integers(0, 9, int(rng.integers(0, 4))))
        dtype = rng.choice([np.float32, np.uint16, np.int64, np.float64, np.int8])
        arrays[name] = rng.standard_normal(shape).astype(dtype) if shape else np.zeros((), dtype)
        what = f"reshape {name} {shape} {np.dtype(dtype)}"
    elif kind == 4:
        name = str(rng.choice([n for n in arrays if n.startswith(("k_", "v_"))]))
        arrays[name] = (arrays[name] * rng.choice([0.0, 1.5, -1.0, np.nan])).astype(arrays[name].dtype)
        what = f"scale {name}"
    elif kind == 5:
        compress = True
        what = "compressed"
    else:
        duplicate = str(rng.choice(list(arrays)))
        what = f"duplicate {duplicate}"
    if kind != 1:
        arrays["meta"] = np.frombuffer(json.dumps(meta, default=str).encode(), np.uint8)
    buffer = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buffer, **arrays)
    if duplicate is not None:
        with zipfile.ZipFile(buffer, "a") as z, pytest.warns(UserWarning):
            z.writestr(f"{duplicate}.npy", members[f"{duplicate}.npy"])
    return buffer.getvalue(), what


def exercise_cache(loaded, model_id: str, ids: list[int], path: str) -> None:
    from mqa_gen.generate import stream_generate
    from mqa_gen.prompt_cache import load_prompt_cache

    cache, _ = load_prompt_cache(path, model_id, config=loaded.model.config, dtype="float32", max_seq_len=32)
    list(stream_generate(loaded.model, loaded.tokenizer, ids, max_tokens=2, eos_ids=[], cache=cache))


def test_fuzz_prompt_cache_files(cache_setup, tmp_path):
    loaded, model_id, ids, data = cache_setup
    findings = []
    for i in range(CASES):
        rng = np.random.default_rng([SEED, 2, i])
        if rng.random() < 0.5:
            mutated, what = mutate_bytes(data, rng, len(data))
        else:
            mutated, what = rewrite_members(data, rng)
        path = str(tmp_path / f"case{i}.cache")
        with open(path, "wb") as f:
            f.write(mutated)
        finding = outcome(lambda: exercise_cache(loaded, model_id, ids, path))
        if finding:
            findings.append(f"case {i} ({what}): {finding}")
        os.unlink(path)
    assert not findings, "\n\n".join(findings[:5]) + f"\n\n{len(findings)} of {CASES} cases failed"


def test_the_unmutated_files_succeed(model_files, cache_setup, tmp_path):
    """The fuzzers' starting points work, so a refusal in a case is the mutation's doing."""
    for written in model_files.values():
        exercise_model(written["path"])
    loaded, model_id, ids, data = cache_setup
    (tmp_path / "c.cache").write_bytes(data)
    exercise_cache(loaded, model_id, ids, str(tmp_path / "c.cache"))
