"""``mqa-gen bench-cache --cache-types``: the study of the two ways to shrink a KV cache — fewer KV
heads (MQA / GQA regrouping) and a smaller element type (f16, q8_0, q4_0) — side by side.

Byte figures are written out here from the storage formats (llama.cpp's ggml block layouts: q8_0
= 32 int8 + one f16 scale = 34 bytes per 32 values, q4_0 = 32 nibbles + one f16 scale = 18 bytes),
not read from the library. Measured runs are tiny (≤ 32 tokens) and compare no speeds.
"""

from __future__ import annotations

import csv
import importlib
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner

from mqa_gen import bench_cache as bench
from mqa_gen.cli import cli
from mqa_gen.cli.bench_cache import CSV_COLUMNS, read_config
from mqa_gen.perplexity import perplexity, read_text, window_ids
from mqa_gen.regroup import regroup_model
from mqa_gen.window_compare import score_window

#: Bytes of one element (K or V value) of each cache type: f32, f16, q8_0 = 34/32, q4_0 = 18/32.
ELEMENT_BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
TYPES = ["f32", "f16", "q8_0", "q4_0"]


def smollm2_bytes_per_token(n_kv_heads: int, cache_type: str) -> int:
    """2 (K and V) × 30 layers × n_kv_heads × head_dim 64 × bytes per element."""
    return round(2 * 30 * n_kv_heads * 64 * ELEMENT_BYTES[cache_type])


@pytest.fixture(scope="module")
def config(smollm2_path):
    return read_config(smollm2_path)


@pytest.fixture
def invoke(smollm2, monkeypatch):
    """The CLI in-process with the session's model instead of loading it again."""
    module = importlib.import_module("mqa_gen.cli.bench_cache")
    monkeypatch.setattr(module, "load_model", lambda name, quiet: smollm2)

    def run(*args):
        return CliRunner().invoke(cli, ["bench-cache", *args], catch_exceptions=False)

    return run


def test_variant_grid_is_kv_heads_times_cache_types_with_storage_bytes(config):
    result = bench.formula_result("smollm2", config, [1, 3, 9], [512, 2048], cache_types=TYPES,
                                  kv_budget_bytes=2**30, kv_budget_source="--kv-budget")
    assert [(v.n_kv_heads, v.cache_dtype) for v in result.variants] == [(n, t) for n in (1, 3, 9) for t in TYPES]
    assert result.cache_types == TYPES
    mha_f32 = smollm2_bytes_per_token(9, "f32")
    for v in result.variants:
        expected = smollm2_bytes_per_token(v.n_kv_heads, v.cache_dtype)
        assert v.kv_bytes_per_token == expected
        assert v.ratio_to_mha == pytest.approx(expected / mha_f32)
        for p in v.points:
            assert p.kv_bytes == p.context * expected
            assert p.fit_sequences == 2**30 // (p.context * expected)
    # MQA with a q4_0 cache: 1/9 of the heads × 18/128 of the bytes per element of MHA f32
    assert result.variants[3].ratio_to_mha == pytest.approx(1 / 9 * 18 / 128)
    names = [result.variant_name(v) for v in result.variants]
    assert names[0] == "MQA, f32" and names[5] == "GQA-3 (native), f16" and names[-1] == "MHA, q4_0"


def test_without_cache_types_the_result_is_the_single_dtype_one(config):
    one = bench.formula_result("smollm2", config, [1, 9], [512], "f16")
    assert one.cache_types == ["f16"] and [v.cache_dtype for v in one.variants] == ["f16", "f16"]
    assert [one.variant_name(v) for v in one.variants] == ["MQA", "MHA"]
    assert one.variants[0].ratio_to_mha == pytest.approx(1 / 9)  # relative to MHA of the same type


def test_cache_types_are_checked(config):
    assert bench.check_cache_types(["float16", "q8_0", "f16", " "], config) == ["f16", "q8_0"]
    with pytest.raises(bench.BenchError, match="--cache-types"):
        bench.check_cache_types(["f32", "q5_1"], config)
    with pytest.raises(bench.BenchError, match="needs at least one type"):
        bench.check_cache_types(["", " "], config)


@pytest.mark.parametrize("value", ["f32,q5_1", ","])
def test_bad_cache_types_give_one_line_and_exit_2(invoke, value):
    result = invoke("--no-measure", "--cache-types", value)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and "--cache-types" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_no_measure_json_and_csv_carry_the_cache_type_of_each_variant(invoke):
    result = invoke("--no-measure", "--json", "--contexts", "512", "--cache-types", "f32,q8_0,q4_0")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["cache_types"] == ["f32", "q8_0", "q4_0"]
    assert len(out["variants"]) == 9
    for v in out["variants"]:
        assert set(v) >= {"label", "n_kv_heads", "cache_dtype", "kv_bytes_per_token", "perplexity",
                          "kl_vs_native_f32", "top1_agreement_vs_native_f32", "points"}
        assert v["kv_bytes_per_token"] == smollm2_bytes_per_token(v["n_kv_heads"], v["cache_dtype"])
        assert v["kl_vs_native_f32"] is None and v["top1_agreement_vs_native_f32"] is None
    table = invoke("--no-measure", "--csv", "--contexts", "64,128", "--kv-heads", "1", "--cache-types", "f16,q4_0")
    assert table.stdout.splitlines()[0] == ",".join(CSV_COLUMNS)
    rows = list(csv.DictReader(io.StringIO(table.stdout)))
    assert [(r["cache_dtype"], int(r["context"])) for r in rows] == [("f16", 64), ("f16", 128), ("q4_0", 64),
                                                                      ("q4_0", 128)]
    assert int(rows[3]["kv_bytes"]) == 128 * smollm2_bytes_per_token(1, "q4_0")


def test_score_window_matches_a_direct_kl_and_argmax():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 50, size=9)
    ref = rng.standard_normal((9, 50)).astype(np.float32)
    logits = (ref + 0.3 * rng.standard_normal((9, 50))).astype(np.float32)
    score = score_window(logits, ids, ref)
    p = np.exp(ref[:-1].astype(np.float64))
    p /= p.sum(axis=1, keepdims=True)
    q = np.exp(logits[:-1].astype(np.float64))
    q /= q.sum(axis=1, keepdims=True)
    assert score.kl_mean == pytest.approx(float(np.mean(np.sum(p * np.log(p / q), axis=1))), rel=1e-9)
    assert score.top1_agreement == pytest.approx(float(np.mean(p.argmax(1) == q.argmax(1))))
    nll = -np.log(q[np.arange(8), ids[1:]])
    assert score.perplexity == pytest.approx(float(np.exp(nll.mean())), rel=1e-9)
    same = score_window(ref, ids, ref)
    assert same.kl_mean == pytest.approx(0.0, abs=1e-12) and same.top1_agreement == 1.0


def test_measured_study_perplexity_kl_and_bytes(smollm2, tmp_path):
    ids = window_ids(smollm2.tokenizer, read_text(), 24)
    result = bench.run_bench("smollm2", smollm2.model, [1, 3], [32], cache_types=["f32", "q4_0"], decode_tokens=2,
                             repeats=1, ppl_ids=ids, ppl_text_name="t")
    by = {(v.n_kv_heads, v.cache_dtype): v for v in result.variants}
    assert set(by) == {(1, "f32"), (1, "q4_0"), (3, "f32"), (3, "q4_0")}
    # native with an f32 cache is the reference itself
    assert by[3, "f32"].kl_vs_native_f32 == pytest.approx(0.0, abs=1e-6)
    assert by[3, "f32"].top1_agreement_vs_native_f32 == 1.0
    for (n, t), v in by.items():
        # perplexity equals the package's perplexity module on the same regrouped model and cache type
        assert v.perplexity == pytest.approx(perplexity(regroup_model(smollm2.model, n), ids, t).perplexity, rel=1e-6)
        assert 0 <= v.top1_agreement_vs_native_f32 <= 1 and v.kl_vs_native_f32 >= -1e-9
        point = v.points[0]
        assert point.measured_kv_bytes == point.kv_bytes == 32 * smollm2_bytes_per_token(n, t)
        assert point.decode_tokens_per_s > 0
    assert by[1, "f32"].kl_vs_native_f32 > by[3, "q4_0"].kl_vs_native_f32 > 0  # MQA pooling moves it most
    png = tmp_path / "pareto.png"
    bench.plot(result, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_front_keeps_points_nothing_beats_on_both_axes():
    points = [(100.0, 10.0), (50.0, 12.0), (50.0, 11.0), (200.0, 9.0), (300.0, 9.5), (10.0, 30.0)]
    assert bench.pareto_front(points) == [5, 2, 0, 3]


def test_pareto_labels_of_neighbouring_markers_do_not_share_a_spot():
    # Display positions (points): a marker 8 pt right of one whose 60-pt label sits above it at the
    # same height takes the spot below; one 8 pt right but 30 pt higher, or 80 pt right, keeps its.
    points = [(108.0, 50.0), (20.0, 300.0), (100.0, 50.0), (180.0, 50.0), (116.0, 80.0)]
    widths = [60.0] * 5
    assert bench.label_offsets(points, widths) == [(5, -11), (5, 4), (5, 4), (5, 4), (5, 4)]


def test_pareto_axes_read_as_plain_numbers():
    pytest.importorskip("matplotlib")
    major, minor = bench._plain_log_formatter(minor=False), bench._plain_log_formatter(minor=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.scatter([1e4, 4e4], [26.3, 30.2])
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(major)
    ax.yaxis.set_minor_formatter(minor)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels(minor=True) if t.get_text()]
    plt.close(fig)
    assert "27" in labels and "28.5" in labels and not any("times" in s or "^" in s for s in labels)


def test_pareto_labels_in_one_row_do_not_overlap():
    # Four markers 25 pt apart at one height with 60-pt labels (SmolLM2's native GQA row): the third
    # finds above and below taken (by the first's and second's labels) and goes higher; the fourth
    # is clear of the first's label above.
    points = [(100.0, 50.0), (125.0, 50.0), (150.0, 50.0), (175.0, 50.0)]
    assert bench.label_offsets(points, [60.0] * 4) == [(5, 4), (5, -11), (5, 15), (5, 4)]
