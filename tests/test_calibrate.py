"""K/V calibration and ``mqa-gen convert`` on a tiny synthetic llama GGUF (fast; no real model).

The converted file is an ordinary GGUF: ``generate`` and ``bench-cache`` take it unchanged.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from click.testing import CliRunner

from mqa_gen.calibrate import (
    attention_layer,
    calibrate_kv,
    calibration_chunks,
    collect_attention_inputs,
    fit_kv,
    relative_mse,
)
from mqa_gen.cli import cli
from mqa_gen.convert import mean_pooled_kv, write_regrouped_gguf
from mqa_gen.errors import ConfigError
from mqa_gen.gguf_file import read_gguf
from mqa_gen.loading import load
from mqa_gen.regroup import regroup_model

from conftest import REPO
from gguf_factory import write_tiny_llama

CALIBRATION_TEXT = REPO / "mqa_gen" / "data" / "ppl_english.txt"
HELD_OUT_TEXT = REPO / "sample_prompts" / "long_document.txt"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A GQA model: 4 query heads, 2 KV heads of 8, 2 layers, byte-level vocabulary."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_llama(path, n_heads=4, n_kv_heads=2, head_dim=8, n_layers=2, d_ff=24, context_length=256)
    return load(str(path))


def calibration_ids(tiny, n=128):
    return tiny.tokenizer.encode(CALIBRATION_TEXT.read_text(encoding="utf-8"))[:n]


class _Recorder:
    """Wraps a model's attention block, keeping each call's input and output."""

    def __init__(self, attention):
        self.attention, self.calls = attention, []

    def __call__(self, x, *args):
        y = self.attention(x, *args)
        self.calls.append((np.array(x), np.array(y)))
        return y


def recorded_attention(model, ids):
    """Inputs and outputs of every layer's attention block when ``model`` runs ``ids``."""
    blocks, recorders = [], []
    for block in model.blocks:
        block = copy.copy(block)
        block.attention = _Recorder(block.attention)
        recorders.append(block.attention)
        blocks.append(block)
    probe = model.replace(blocks=blocks)
    probe.forward(ids, probe.new_cache(len(ids)), all_logits=True)  # every layer attends with every row
    return [r.calls[0] for r in recorders]


@pytest.mark.parametrize("n_kv_heads", [None, 1])
def test_the_layer_reproduces_the_models_attention(tiny, n_kv_heads):
    """The MultiQueryAttention built from the file (with RoPE, GGUF row order) gives the model's own
    attention output: natively, and mean-pooled against ``regroup_model`` (what --kv-heads runs)."""
    ids = calibration_ids(tiny, 40)
    model = tiny.model if n_kv_heads is None else regroup_model(tiny.model, n_kv_heads)
    calls = recorded_attention(model, ids)
    inputs = collect_attention_inputs(tiny.model, tiny.gguf, tiny.config, np.asarray([ids]))
    for layer, (x, y) in enumerate(calls):
        mqa = attention_layer(tiny.gguf, tiny.config, layer, n_kv_heads)
        assert mqa.config.num_kv_heads == (n_kv_heads or 2) and mqa.config.rope_theta == 10000.0
        np.testing.assert_allclose(mqa.forward(x[None])[0], y, atol=1e-5, rtol=0)
        if n_kv_heads is None:  # the native model's normed states are what calibration records
            np.testing.assert_allclose(inputs[layer][0], x, atol=1e-6, rtol=0)


def test_calibrated_loss_is_below_mean_pooled(tiny):
    ids = calibration_ids(tiny)
    seen = []
    result = calibrate_kv(tiny.model, tiny.gguf, tiny.config, 1, ids, steps=30, lr=1e-2, chunk_tokens=64,
                          max_tokens=128, progress=lambda fit, s: seen.append(fit.layer))
    assert seen == [0, 1] and result.tokens == (2, 64)
    for fit in result.fits:
        assert fit.after < 0.8 * fit.before, fit
    # The returned weights are what the fit measured: recompute the loss from them.
    inputs = collect_attention_inputs(tiny.model, tiny.gguf, tiny.config, calibration_chunks(ids, 64, 128))
    for layer, fit in enumerate(result.fits):
        target = attention_layer(tiny.gguf, tiny.config, layer).forward(inputs[layer])
        mqa = attention_layer(tiny.gguf, tiny.config, layer, 1)
        assert relative_mse(mqa.forward(inputs[layer]), target) == pytest.approx(fit.before, rel=1e-5)
        wk, wv = result.kv_weights[layer]
        assert wk.shape == (8, 32) and wv.shape == (8, 32)
        mqa.projection("w_k")[...], mqa.projection("w_v")[...] = wk, wv
        mqa.weights_changed()
        assert relative_mse(mqa.forward(inputs[layer]), target) == pytest.approx(fit.after, rel=1e-4)


def test_fit_never_ends_above_its_start(tiny):
    x = np.random.default_rng(0).standard_normal((1, 16, 32)).astype(np.float32)
    target = attention_layer(tiny.gguf, tiny.config, 0).forward(x)
    mqa = attention_layer(tiny.gguf, tiny.config, 0, 1)
    before, after = fit_kv(mqa, x, target, steps=3, lr=10.0)  # a step size that diverges
    assert after <= before
    assert relative_mse(mqa.forward(x), target) == pytest.approx(after, rel=1e-5)


def test_calibration_input_errors(tiny):
    with pytest.raises(ConfigError, match="valid: 1, 2, 4"):
        calibrate_kv(tiny.model, tiny.gguf, tiny.config, 3, calibration_ids(tiny))
    with pytest.raises(ConfigError, match="need at least 2"):
        calibrate_kv(tiny.model, tiny.gguf, tiny.config, 1, [5])
    assert calibration_chunks(range(10), 4, 9).shape == (2, 4)
    assert calibration_chunks(range(3), 4, 9).shape == (1, 3)


def test_written_gguf_changes_only_kv_and_head_count(tiny, tmp_path):
    from gguf import GGUFReader

    kv = mean_pooled_kv(tiny.gguf, tiny.config, 1)
    kv[1] = (kv[1][0] + 0.5, kv[1][1] - 0.25)  # something that is not mean-pooling
    out = tmp_path / "mqa.gguf"
    size = write_regrouped_gguf(tiny.path, out, tiny.config, 1, kv, kv_type="F16")
    assert size == out.stat().st_size
    src, dst = GGUFReader(tiny.path), GGUFReader(out)
    assert list(src.fields) == list(dst.fields)
    for key, field in src.fields.items():
        if key.startswith("GGUF."):
            continue
        assert dst.fields[key].types == field.types, key
        if key == "llama.attention.head_count_kv":
            assert dst.fields[key].contents() == 1
        else:
            assert dst.fields[key].contents() == field.contents(), key
    assert [t.name for t in src.tensors] == [t.name for t in dst.tensors]
    for a, b in zip(src.tensors, dst.tensors):
        if ".attn_k." in a.name or ".attn_v." in a.name:
            layer, which = int(a.name.split(".")[1]), int(".attn_v." in a.name)
            assert b.tensor_type.name == "F16"
            np.testing.assert_array_equal(np.asarray(b.data), kv[layer][which].astype(np.float16))
        else:
            assert a.tensor_type == b.tensor_type and np.asarray(a.data).tobytes() == np.asarray(b.data).tobytes()
    reloaded = load(str(out))
    assert reloaded.config.n_kv_heads == 1
    meta = read_gguf(out).metadata
    assert meta["llama.attention.head_count_kv"] == 1


def test_writer_refuses_to_overwrite_the_source(tiny):
    from mqa_gen.errors import ModelFileError

    with pytest.raises(ModelFileError, match="is the source model"):
        write_regrouped_gguf(tiny.path, tiny.path, tiny.config, 1, mean_pooled_kv(tiny.gguf, tiny.config, 1))


def test_convert_cli_then_generate_and_bench_cache_accept_the_file(tiny, tmp_path):
    out = tmp_path / "calibrated.gguf"
    runner = CliRunner()
    result = runner.invoke(cli, [
        "convert", "-m", tiny.path, "--kv-heads", "1", "--calibrate", str(CALIBRATION_TEXT),
        "--steps", "30", "--lr", "1e-2", "--calib-tokens", "128", "--chunk-tokens", "64",
        "--ppl-text", str(HELD_OUT_TEXT), "--ppl-tokens", "128", "-o", str(out), "--json", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n_kv_heads"] == 1 and report["native_kv_heads"] == 2
    assert set(report["perplexity"]) >= {"native", "mean_pooled", "calibrated", "text", "tokens"}
    assert report["perplexity"]["text"] == str(HELD_OUT_TEXT)
    assert report["method"] == "pca" and report["fit"] is True
    assert report["calibration"]["fit_weights"] == ["w_q", "w_k", "w_v", "w_o"]
    for layer in report["calibration"]["layers"]:
        assert layer["rel_error_calibrated"] < layer["rel_error_merged"]

    gen = runner.invoke(cli, ["generate", "-m", str(out), "--prompt", "the cat", "--no-chat", "-n", "5",
                              "--json", "-q"])
    assert gen.exit_code == 0, gen.output
    assert len(json.loads(gen.stdout)["token_ids"]) == 5

    bench = runner.invoke(cli, ["bench-cache", "-m", str(out), "--contexts", "64,128", "--no-measure", "--json"])
    assert bench.exit_code == 0, bench.output
    variants = {v["n_kv_heads"]: v for v in json.loads(bench.stdout)["variants"]}
    assert variants[1]["label"] == "MQA" and 4 in variants  # native is MQA now; MHA by replication


def test_convert_cli_text_output_and_mean_pooled_only(tiny, tmp_path):
    out = tmp_path / "pooled.gguf"
    result = CliRunner().invoke(cli, ["convert", "-m", tiny.path, "--kv-heads", "1", "--method", "mean", "--no-fit",
                                      "--ppl-text", str(HELD_OUT_TEXT), "--ppl-tokens", "64", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert "mean-pooled MQA (1 KV head)" in result.stdout and "calibrated" not in result.stdout
    assert "native GQA (2 KV heads)" in result.stdout
    expected = mean_pooled_kv(tiny.gguf, tiny.config, 1)
    written = load(str(out))
    np.testing.assert_array_equal(attention_layer(written.gguf, written.config, 1).projection("w_k"), expected[1][0])


@pytest.mark.parametrize("args, message", [
    (["--kv-heads", "3"], "valid: 1, 2, 4"),
    (["--kv-heads", "1", "--calibrate", "/no/such/file"], "does not exist"),
    (["--kv-heads", "1", "--fit-weights", "qx"], "letters q, k, v, o"),
    (["--kv-heads", "1", "--method", "median"], "'median' is not one of"),
    (["--kv-heads", "2"], "already has 2 KV heads: --kv-heads must differ"),
])
def test_convert_cli_errors(tiny, tmp_path, args, message):
    result = CliRunner().invoke(cli, ["convert", "-m", tiny.path, *args, "-o", str(tmp_path / "x.gguf"), "-q"])
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "x.gguf").exists()


def test_convert_cli_refuses_an_output_it_could_not_write_before_converting(tiny, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    for output, problem in ((tmp_path / "no" / "x.gguf", "does not exist"), (tmp_path, "is a directory"),
                            (notes, "exists and is not a GGUF file")):
        result = CliRunner().invoke(cli, ["convert", "-m", tiny.path, "--kv-heads", "1", "-o", str(output)])
        assert result.exit_code == 2 and problem in result.stderr
        assert "layer 1/" not in result.stderr  # refused before any conversion work
    assert notes.read_text() == "keep me\n"


def test_convert_cli_refuses_to_overwrite_its_source(tiny):
    result = CliRunner().invoke(cli, ["convert", "-m", tiny.path, "--kv-heads", "1", "-o", tiny.path, "-q"])
    assert result.exit_code == 2 and "is the source model" in result.stderr


@pytest.mark.parametrize("inputs", ["native", "converted"])
def test_conversion_to_the_native_head_count_is_exact_in_both_input_modes(tiny, inputs):
    """Same KV-head count: every merge is the identity, and the streams the calibration carries
    through the layers (run block by block over all chunks at once) give the original attention's
    output back exactly, so every layer's error is ~0."""
    from mqa_gen.calibrate import calibrate_attention

    result = calibrate_attention(tiny.model, tiny.gguf, tiny.config, 2, calibration_ids(tiny), method="pca", steps=0,
                                 chunk_tokens=32, max_tokens=96, inputs=inputs)
    assert result.tokens == (3, 32)
    for fit in result.fits:
        assert fit.before < 1e-10 and fit.after == fit.before


def test_converted_inputs_fit_layer_0_like_native_inputs(tiny):
    """Layer 0's input is the embedding in both modes, so its merge and target agree; later layers
    see the converted stream and a target that closes the residual gap."""
    from mqa_gen.calibrate import calibrate_attention

    kw = dict(method="aligned", steps=5, lr=1e-2, chunk_tokens=32, max_tokens=96)
    native = calibrate_attention(tiny.model, tiny.gguf, tiny.config, 1, calibration_ids(tiny), inputs="native", **kw)
    converted = calibrate_attention(tiny.model, tiny.gguf, tiny.config, 1, calibration_ids(tiny), inputs="converted", **kw)
    assert converted.fits[0].before == pytest.approx(native.fits[0].before, rel=1e-6)
    np.testing.assert_allclose(converted.layers[0].wk, native.layers[0].wk, rtol=1e-5, atol=1e-6)
    assert converted.fits[1].before != pytest.approx(native.fits[1].before, rel=1e-3)


@pytest.mark.parametrize("method", ["aligned", "svd", "pca"])
def test_convert_cli_merge_without_fit_writes_all_four_projections(tiny, tmp_path, method):
    from mqa_gen.calibrate import attention_weights, merged_weights
    from mqa_gen.head_merge import merge_heads

    out = tmp_path / f"{method}.gguf"
    result = CliRunner().invoke(cli, ["convert", "-m", tiny.path, "--kv-heads", "1", "--method", method, "--no-fit",
                                      "--calib-tokens", "96", "--chunk-tokens", "32", "--ppl-text",
                                      str(HELD_OUT_TEXT), "--ppl-tokens", "64", "-o", str(out), "--json", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == method and report["fit"] is False
    assert set(report["perplexity"]) >= {"native", "mean_pooled", "merged"} and "calibrated" not in report["perplexity"]
    written = load(str(out))
    assert written.config.n_kv_heads == 1
    if method == "svd":  # needs no text: the file holds exactly the library's merge (as float32)
        expected = merged_weights(tiny.gguf, tiny.config, 1, "svd")
        for layer in range(tiny.config.n_layers):
            got = attention_weights(written.gguf, written.config, layer)
            for a, b in ((got.wq, expected[layer].wq), (got.wk, expected[layer].wk), (got.wo, expected[layer].wo)):
                np.testing.assert_array_equal(a, b.astype(np.float32))
    else:  # W_q and W_o changed (maps folded in), W_k is not the mean-pooled one
        got = attention_weights(written.gguf, written.config, 0)
        native = attention_weights(tiny.gguf, tiny.config, 0)
        assert not np.allclose(got.wq, native.wq)
        assert not np.allclose(got.wk, merge_heads(native, 1, "mean").wk)


def test_models_the_conversion_cannot_reproduce_are_refused(tiny):
    """A block with QK-norm (Gemma 3) or without an attention gain is refused in one line."""
    import copy as copy_

    from mqa_gen.calibrate import calibrate_attention, check_convertible

    check_convertible(tiny.model)
    blocks = [copy_.copy(b) for b in tiny.model.blocks]
    blocks[1].attention = copy_.copy(blocks[1].attention)
    blocks[1].attention.q_norm = np.ones(tiny.config.head_dim, np.float32)
    odd = tiny.model.replace(blocks=blocks)
    with pytest.raises(ConfigError, match="supports llama-architecture models"):
        calibrate_attention(odd, tiny.gguf, tiny.config, 1, calibration_ids(tiny), steps=0)


def test_minibatch_fit_lowers_the_loss_and_never_ends_above_its_start(tiny):
    from mqa_gen.calibrate import fit_layer

    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 16, 32)).astype(np.float32)
    target = attention_layer(tiny.gguf, tiny.config, 0).forward(x)
    mqa = attention_layer(tiny.gguf, tiny.config, 0, 1)
    seen = []
    before, after = fit_layer(mqa, x, target, 30, 1e-2, ("w_q", "w_k", "w_v", "w_o"),
                              on_step=lambda step, loss: seen.append(step), minibatch=2)
    assert seen == list(range(1, 31)) and after < 0.8 * before
    assert relative_mse(mqa.forward(x), target) == pytest.approx(after, rel=1e-5)
    diverging = attention_layer(tiny.gguf, tiny.config, 0, 1)
    before, after = fit_layer(diverging, x, target, 3, 10.0, ("w_k", "w_v"), minibatch=2)
    assert after == before
    assert relative_mse(diverging.forward(x), target) == pytest.approx(before, rel=1e-5)


def test_calibration_ids_are_the_chat_conversations_then_the_prose(tiny, tmp_path):
    from mqa_gen.calibrate import DEFAULT_CHAT, DEFAULT_TEXT
    from mqa_gen.calibrate import calibration_ids as shipped_ids
    from mqa_gen.errors import PromptError

    tok = tiny.tokenizer
    expected = []
    for line in DEFAULT_CHAT.read_text(encoding="utf-8").splitlines():  # ChatML written out by hand
        expected += tok.encode("".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                                       for m in json.loads(line)["messages"]))
    prose = tok.encode(DEFAULT_TEXT.read_text(encoding="utf-8"))
    assert len(expected) > 1000
    assert shipped_ids(tok) == expected + prose
    assert shipped_ids(tok, CALIBRATION_TEXT) == tok.encode(CALIBRATION_TEXT.read_text(encoding="utf-8"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(PromptError, match="calibration text .* is not valid UTF-8"):
        shipped_ids(tok, bad)
