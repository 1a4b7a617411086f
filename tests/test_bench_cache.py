"""``mqa-gen bench-cache`` and its library: formulas, measured cache bytes, perplexity, sequences
that fit a KV budget, batched decode, CLI contract.

Measurements use small contexts (≤ 128 tokens) and a couple of decode steps so the tests stay
quick; the full default run is documented in README.md. Speeds are checked to be measured
(positive numbers in the right places), never compared: the machine is shared.
"""

from __future__ import annotations

import importlib
import csv
import io
import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from mqa_gen import bench_cache as bench
from mqa_gen.cli import cli
from mqa_gen.cli.bench_cache import CSV_COLUMNS, read_config
from mqa_gen.errors import ConfigError
from mqa_gen.perplexity import PerplexityError, perplexity, read_text, window_ids
from mqa_gen.regroup import regroup_model

from conftest import mqa_gen_exe

#: SmolLM2-135M: 30 layers × head_dim 64 × 2 (K and V) × 4 bytes = 15,360 bytes per KV head.
SMOLLM2_BYTES_PER_TOKEN = {1: 15_360, 3: 46_080, 9: 138_240}


def smollm2_sequence_bytes(n_kv_heads: int, context: int, itemsize: int = 4) -> int:
    """KV bytes of one SmolLM2-135M sequence, written out independently of the library:
    2 (K and V) × 30 layers × n_kv_heads × head_dim 64 × itemsize × context."""
    return 2 * 30 * n_kv_heads * 64 * itemsize * context


@pytest.fixture(scope="module")
def config(smollm2_path):
    return read_config(smollm2_path)


@pytest.fixture
def one_thread():
    """Numba on one thread while the test runs (the shared 2-core machine stalls two-thread kernels),
    restored afterwards."""
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(before)


@pytest.fixture
def invoke(smollm2, monkeypatch):
    """Run the CLI in-process with the session's model instead of loading it again."""
    module = importlib.import_module("mqa_gen.cli.bench_cache")
    monkeypatch.setattr(module, "load_model", lambda name, quiet: smollm2)

    def run(*args):
        return CliRunner().invoke(cli, ["bench-cache", *args], catch_exceptions=False)

    return run


# --- formulas and settings -----------------------------------------------------------------------


def test_formula_bytes_per_token_for_smollm2(config):
    kv = bench.default_kv_heads(config)
    assert kv == [1, 3, 9]
    result = bench.formula_result("smollm2", config, kv, [512, 2048, 8192])
    assert [v.label for v in result.variants] == ["MQA", "GQA", "MHA"]
    assert [v.native for v in result.variants] == [False, True, False]
    for v in result.variants:
        assert v.kv_bytes_per_token == SMOLLM2_BYTES_PER_TOKEN[v.n_kv_heads]
        assert v.ratio_to_mha == pytest.approx(v.n_kv_heads / 9)
        assert [p.kv_bytes for p in v.points] == [c * v.kv_bytes_per_token for c in (512, 2048, 8192)]
    half = bench.formula_result("smollm2", config, kv, [512], "float16")
    assert [v.kv_bytes_per_token * 2 for v in half.variants] == [15_360, 46_080, 138_240]


def test_settings_are_checked(config):
    assert bench.parse_int_list(" 2048,512,512 ", "--contexts") == [512, 2048]
    with pytest.raises(bench.BenchError, match="comma-separated integers"):
        bench.parse_int_list("512,lots", "--contexts")
    with pytest.raises(ConfigError, match="valid: 1, 3, 9"):
        bench.check_kv_heads(config, [1, 2])
    with pytest.raises(bench.BenchError, match="outside 1 … 8192"):
        bench.check_contexts(config, [0])
    with pytest.raises(bench.BenchError, match="outside 1 … 8192"):
        bench.check_contexts(config, [8193])
    with pytest.raises(bench.BenchError, match="shorter than --decode-tokens"):
        bench.check_contexts(config, [4], decode_tokens=8)


# --- measurement on the real model ---------------------------------------------------------------


#: Bytes of one K or V row of head_dim 64: f32, f16, and llama.cpp's q8_0 / q4_0 (two blocks of 34 / 18).
ROW_BYTES = {"float32": 256, "float16": 128, "q8_0": 68, "q4_0": 36}


@pytest.mark.parametrize("cache_dtype", list(ROW_BYTES))
def test_measured_cache_bytes_equal_the_formula(smollm2, cache_dtype):
    ids = window_ids(smollm2.tokenizer, read_text(), 16)
    result = bench.run_bench("smollm2", smollm2.model, [1, 3, 9], [32, 96], cache_dtype=cache_dtype,
                             decode_tokens=2, repeats=2, decode_ids=ids)
    assert result.measured and result.method["fill"] == "direct" and result.method["repeats"] == 2
    for v in result.variants:
        assert v.kv_bytes_per_token * 256 == SMOLLM2_BYTES_PER_TOKEN[v.n_kv_heads] * ROW_BYTES[cache_dtype]
        for p in v.points:
            assert p.measured_kv_bytes == p.kv_bytes == p.context * v.kv_bytes_per_token
            assert p.decode_tokens_per_s > 0 and len(p.decode_runs_tokens_per_s) == 2


def test_prefill_fill_holds_the_same_bytes_as_direct_writes(smollm2):
    ids = window_ids(smollm2.tokenizer, read_text(), 8)
    net = regroup_model(smollm2.model, 1)
    direct = bench.measure_decode(net, 20, decode_tokens=2, repeats=1, fill="direct", token_ids=ids)
    prefill = bench.measure_decode(net, 20, decode_tokens=2, repeats=1, fill="prefill", token_ids=ids)
    assert direct[0] == prefill[0] == 20 * 15_360


def test_direct_fill_writes_every_layer():
    from mqa_gen.cache import KVCache

    cache = KVCache(n_layers=2, n_kv_heads=1, head_dim=4, max_seq_len=300)
    bench.fill_direct(cache, 300)
    assert cache.length == 300 and bench.held_bytes(cache) == 300 * cache.bytes_per_token
    k, v = cache.layer_view(1)
    assert np.count_nonzero(k) == k.size and np.array_equal(k, v)


# --- perplexity (native against the oracle: tests/test_model_parity.py) -------------------------


def test_mha_expanded_perplexity_equals_native_and_mqa_is_higher(smollm2):
    ids = window_ids(smollm2.tokenizer, read_text(), 48)
    native = perplexity(smollm2.model, ids).perplexity
    mha = perplexity(regroup_model(smollm2.model, 9), ids).perplexity
    mqa = perplexity(regroup_model(smollm2.model, 1), ids).perplexity
    half = perplexity(smollm2.model, ids, "float16").perplexity
    assert mha == pytest.approx(native, rel=1e-4)
    assert mqa > native
    assert half == pytest.approx(native, rel=1e-2)


def test_perplexity_needs_two_tokens(smollm2):
    with pytest.raises(PerplexityError):
        perplexity(smollm2.model, [1])
    with pytest.raises(PerplexityError):
        window_ids(smollm2.tokenizer, "Hello", 1)


# --- CLI -----------------------------------------------------------------------------------------


def test_no_measure_prints_the_formula_table_without_loading_weights(invoke, monkeypatch):
    module = importlib.import_module("mqa_gen.cli.bench_cache")
    monkeypatch.setattr(module, "load_model", lambda *a: pytest.fail("--no-measure loaded the weights"))
    result = invoke("--no-measure")
    assert result.exit_code == 0, result.stderr
    for text in ("15,360", "46,080", "138,240", "1/9", "1/3", "8,192", "1,080.0 MiB"):
        assert text in result.stdout


def test_no_measure_json_follows_the_schema(invoke):
    result = invoke("--no-measure", "--json", "--cache-dtype", "float16")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) >= {"model", "config", "variants"}
    assert out["config"]["n_heads"] == 9 and out["config"]["n_kv_heads"] == 3
    assert [v["label"] for v in out["variants"]] == ["MQA", "GQA", "MHA"]
    for v in out["variants"]:
        assert set(v) >= {"label", "n_kv_heads", "kv_bytes_per_token", "perplexity", "points"}
        assert v["kv_bytes_per_token"] == SMOLLM2_BYTES_PER_TOKEN[v["n_kv_heads"]] // 2
        assert v["perplexity"] is None
        assert [p["context"] for p in v["points"]] == [512, 2048, 8192]
        for p in v["points"]:
            assert set(p) >= {"context", "kv_bytes", "measured_kv_bytes", "decode_tokens_per_s"}
            assert p["measured_kv_bytes"] is None and p["decode_tokens_per_s"] is None


def test_csv_has_one_row_per_variant_and_context(invoke):
    result = invoke("--no-measure", "--csv", "--contexts", "128,64", "--kv-heads", "9,1")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0] == ",".join(CSV_COLUMNS)
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(r["label"], int(r["context"])) for r in rows] == [("MQA", 64), ("MQA", 128), ("MHA", 64), ("MHA", 128)]
    assert int(rows[1]["kv_bytes"]) == 128 * 15_360 and rows[1]["measured_kv_bytes"] == ""


def test_measured_run_json_csv_and_plot(invoke, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    args = ["--contexts", "32,64", "--decode-tokens", "2", "--repeats", "1", "--ppl-tokens", "12"]
    result = invoke(*args, "--json", "--plot", str(png))
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["measured"] and out["method"]["decode_tokens"] == 2 and out["method"]["fill"] == "direct"
    ppl = {v["n_kv_heads"]: v["perplexity"] for v in out["variants"]}
    assert ppl[9] == pytest.approx(ppl[3], rel=1e-4) and ppl[1] > ppl[3]
    for v in out["variants"]:
        for p in v["points"]:
            assert p["measured_kv_bytes"] == p["kv_bytes"] == p["context"] * v["kv_bytes_per_token"]
            assert p["decode_tokens_per_s"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = invoke(*args, "--kv-heads", "1", "--ppl-tokens", "0", "--quiet")
    assert table.exit_code == 0, table.stderr
    text = " ".join(table.stdout.split())  # the caption wraps at the table's width
    assert "measured bytes" in text and "yes" in text and "direct writes" in text


@pytest.mark.parametrize("args, message", [
    (["--kv-heads", "2"], "valid: 1, 3, 9"),
    (["--kv-heads", "1,4"], "valid: 1, 3, 9"),
    (["--contexts", "0"], "outside 1 … 8192"),
    (["--contexts", "512,100000"], "outside 1 … 8192"),
    (["--contexts", "512,abc"], "comma-separated integers"),
    (["--contexts", "4", "--decode-tokens", "8"], "shorter than --decode-tokens"),
    (["--json", "--csv"], "at most one of --json and --csv"),
    (["--batch-sizes", "0"], "--batch-sizes 0 is not a batch size"),
    (["--batch-sizes", "1,-4"], "--batch-sizes -4 is not a batch size"),
    (["--batch-sizes", "1,many"], "comma-separated integers"),
    (["--batch-sizes", ","], "--batch-sizes needs at least one value"),
    (["--no-measure", "--batch-sizes", "1,4"], "cannot be used with --no-measure"),
    (["--kv-budget", "0"], "--kv-budget must be a size in MiB > 0"),
    (["--kv-budget", "-512"], "--kv-budget must be a size in MiB > 0"),
    (["--kv-budget", "lots"], "--kv-budget takes a size in MiB"),
])
def test_bad_values_give_one_line_and_exit_2(invoke, args, message):
    result = invoke(*args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_plot_without_matplotlib_is_one_line_and_exit_2(invoke, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    result = invoke("--no-measure", "--plot", str(tmp_path / "x.png"))
    assert result.exit_code == 2
    assert "needs matplotlib" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_installed_entry_point_no_measure_and_bad_kv_heads():
    import subprocess

    exe = mqa_gen_exe()
    proc = subprocess.run([exe, "bench-cache", "--no-measure", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    per_token = [v["kv_bytes_per_token"] for v in json.loads(proc.stdout)["variants"]]
    assert per_token == [15_360, 46_080, 138_240]
    bad = subprocess.run([exe, "bench-cache", "--kv-heads", "2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == ("error: --kv-heads 2 is not valid for this model (n_heads=9, native n_kv_heads=3); "
                                  "valid: 1, 3, 9")


def test_gemma_formula_counts_sliding_window_layers_at_their_window(gemma3_path):
    """Gemma 3 270M: 15 of 18 layers keep at most 512 positions, so at context C the cache holds
    3·C + 15·min(C, 512) rows of K and V per KV head (head_dim 256, float32)."""
    from mqa_gen.bench_cache import default_contexts, formula_result
    from mqa_gen.cli.bench_cache import read_config

    config = read_config(gemma3_path)
    contexts = list(default_contexts(config))
    assert contexts == [512, 4096, 16384]
    result = formula_result("gemma3-270m", config, [1, 4], contexts)
    for variant in result.variants:
        row_bytes = 2 * variant.n_kv_heads * 256 * 4
        assert [p.kv_bytes for p in variant.points] == [row_bytes * (3 * c + 15 * min(c, 512)) for c in contexts]
    mqa, mha = result.variants
    assert mqa.native and mqa.label == "MQA" and mha.label == "MHA"
    assert all(4 * a.kv_bytes == b.kv_bytes for a, b in zip(mqa.points, mha.points))


# --- sequences that fit a KV budget --------------------------------------------------------------


def test_batch_sizes_and_budget_are_checked():
    assert bench.check_batch_sizes([16, 1, 4, 4]) == [1, 4, 16]
    with pytest.raises(bench.BenchError, match="--batch-sizes 0 is not a batch size"):
        bench.check_batch_sizes([1, 0])
    assert bench.parse_kv_budget("512") == 512 * 2**20
    assert bench.parse_kv_budget("1.5") == 3 * 2**19
    for bad in ("0", "-1", "nan", "inf", "half"):
        with pytest.raises(bench.BenchError, match="--kv-budget"):
            bench.parse_kv_budget(bad)
    assert bench.count_steps(3, 2, True) == 6 and bench.count_steps(3, 2, True, batched=True) == 8  # + the f32 reference


@pytest.mark.parametrize("cache_dtype, size", [("float32", 4), ("float16", 2), ("q8_0", 34 / 32), ("q4_0", 18 / 32)])
def test_fit_column_is_the_budget_over_one_sequences_bytes(config, cache_dtype, size):
    budget = 1000 * 2**20 + 12_345
    contexts = [64, 512, 8192]
    result = bench.formula_result("smollm2", config, [1, 3, 9], contexts, cache_dtype, budget, "--kv-budget")
    assert result.kv_budget_bytes == budget and result.kv_budget_source == "--kv-budget"
    for v in result.variants:
        assert [p.fit_sequences for p in v.points] == [budget // smollm2_sequence_bytes(v.n_kv_heads, c, size)
                                                       for c in contexts]
    mqa, gqa, mha = result.variants
    for a, b, c in zip(mqa.points, gqa.points, mha.points):  # floors: at least n_heads / n_kv_heads times
        assert a.fit_sequences >= 9 * c.fit_sequences and b.fit_sequences >= 3 * c.fit_sequences
    assert bench.formula_result("smollm2", config, [1], [64]).variants[0].points[0].fit_sequences is None


def test_mqa_fits_n_heads_over_n_kv_heads_times_the_sequences_of_mha(config):
    """With a budget of exactly 7 MHA sequences, MQA (1 of 9 KV heads) fits 63 and GQA-3 fits 21."""
    budget = 7 * smollm2_sequence_bytes(9, 2048)
    result = bench.formula_result("smollm2", config, [1, 3, 9], [2048], "float32", budget)
    fits = {v.n_kv_heads: v.points[0].fit_sequences for v in result.variants}
    assert fits == {9: 7, 3: 7 * 9 // 3, 1: 7 * 9 // 1}


def test_gemma_fit_counts_sliding_window_layers_at_their_window(gemma3_path):
    """A Gemma 3 270M sequence of 4096 tokens holds 3·4096 + 15·512 rows per KV head (head_dim 256)."""
    config = read_config(gemma3_path)
    budget = 2**30
    (mqa,) = bench.formula_result("gemma3-270m", config, [1], [4096], "float32", budget).variants
    assert mqa.points[0].fit_sequences == budget // (2 * (3 * 4096 + 15 * 512) * 256 * 4)


def test_cli_states_the_budget_it_used(invoke, monkeypatch):
    result = invoke("--no-measure", "--json", "--contexts", "512", "--kv-budget", "1000")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["kv_budget_bytes"] == 1000 * 2**20 and out["kv_budget_source"] == "--kv-budget"
    for v in out["variants"]:
        assert v["points"][0]["fit_sequences"] == 1000 * 2**20 // smollm2_sequence_bytes(v["n_kv_heads"], 512)

    import mqa_gen.cache

    monkeypatch.setattr(mqa_gen.cache, "available_memory_bytes", lambda: 10 * 2**30)
    table = invoke("--no-measure", "--contexts", "512")
    assert table.exit_code == 0, table.stderr
    text = " ".join(table.stdout.split())  # the caption wraps
    assert "seqs in budget" in text and "9,216 MiB (90% of MemAvailable)" in text
    assert f"{int(0.9 * 10 * 2**30) // smollm2_sequence_bytes(1, 512):,}" in table.stdout  # MQA: 1,228

    monkeypatch.setattr(mqa_gen.cache, "available_memory_bytes", lambda: None)
    unknown = invoke("--no-measure", "--json", "--contexts", "512")
    out = json.loads(unknown.stdout)
    assert out["kv_budget_bytes"] is None and out["variants"][0]["points"][0]["fit_sequences"] is None
    assert "seqs in budget" not in invoke("--no-measure", "--contexts", "512").stdout


# --- batched decode on the real model ------------------------------------------------------------


def test_batched_decode_columns_on_the_real_model(smollm2, one_thread):
    """Contexts 32 and 64, batch sizes 1 and 2, with a budget that holds two sequences of every
    variant at 32 tokens but only one at 64: B = 2 at 64 is skipped, not measured."""
    together_64 = sum(smollm2_sequence_bytes(n, 64) for n in (1, 3, 9))
    budget = together_64 * 3 // 2
    result = bench.run_bench("smollm2", smollm2.model, [1, 3, 9], [32, 64], decode_tokens=2, repeats=1,
                             batch_sizes=[1, 2], kv_budget_bytes=budget, kv_budget_source="--kv-budget")
    assert result.batch_sizes == [1, 2] and result.method["batch_sizes"] == [1, 2]
    assert result.method["batch_skipped"] == {"64": [2]}
    for v in result.variants:
        at_32, at_64 = v.points
        for b in (1, 2):
            assert at_32.batch_decode_tokens_per_s[b] > 0 and len(at_32.batch_decode_runs_tokens_per_s[b]) == 1
        assert at_64.batch_decode_tokens_per_s[1] > 0
        assert at_64.batch_decode_tokens_per_s[2] is None and at_64.batch_decode_runs_tokens_per_s[2] == []
        assert at_32.decode_tokens_per_s > 0  # the single-sequence column is still there
        assert [p.fit_sequences for p in v.points] == [budget // smollm2_sequence_bytes(v.n_kv_heads, c)
                                                       for c in (32, 64)]
    assert bench.batch_plot_context(result) == 32  # the largest context measured at every batch size

    rows = result.rows()
    assert list(rows[0]) == [*bench.ROW_KEYS, "decode_tokens_per_s_b1", "decode_tokens_per_s_b2"]
    assert all(r["decode_tokens_per_s_b1"] > 0 for r in rows)
    assert [r["decode_tokens_per_s_b2"] is None for r in rows] == [False, True] * 3

    from mqa_gen.cli.bench_cache import write_csv

    out = io.StringIO()
    write_csv(result, out)
    csv_rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert out.getvalue().splitlines()[0].endswith(",fit_sequences,kl_vs_native_f32,top1_agreement_vs_native_f32,decode_tokens_per_s_b1,decode_tokens_per_s_b2")
    assert [r["decode_tokens_per_s_b2"] == "" for r in csv_rows] == [False, True] * 3
    assert all(int(r["kv_budget_bytes"]) == budget for r in csv_rows)

    points = json.loads(json.dumps(result.as_dict()))["variants"][0]["points"]
    assert set(points[0]["batch_decode_tokens_per_s"]) == {"1", "2"}
    assert points[1]["batch_decode_tokens_per_s"]["2"] is None


def test_cli_batch_sizes_table_json_and_plot(invoke, one_thread, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "batched.png"
    args = ["--contexts", "64", "--batch-sizes", "2,1", "--decode-tokens", "2", "--repeats", "1", "--ppl-tokens", "0",
            "--threads", "1", "--kv-budget", "4096"]
    result = invoke(*args, "--json", "--plot", str(png))
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["batch_sizes"] == [1, 2] and out["method"]["batch_skipped"] == {}
    assert out["kv_budget_bytes"] == 4096 * 2**20
    fits = {}
    for v in out["variants"]:
        (p,) = v["points"]
        assert p["decode_tokens_per_s"] > 0
        assert set(p["batch_decode_tokens_per_s"]) == {"1", "2"}
        assert all(s > 0 for s in p["batch_decode_tokens_per_s"].values())
        assert p["fit_sequences"] == 4096 * 2**20 // smollm2_sequence_bytes(v["n_kv_heads"], 64)
        fits[v["n_kv_heads"]] = p["fit_sequences"]
    assert fits[1] >= 9 * fits[9]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = invoke(*args, "--kv-heads", "1", "--quiet")
    assert table.exit_code == 0, table.stderr
    text = " ".join(table.stdout.split())  # the caption wraps
    for part in ("decode tok/s B=1", "decode tok/s B=2", "| decode tok/s |", "seqs in budget",
                 "4,096 MiB (--kv-budget)", f"{fits[1]:,}"):
        assert part.replace("|", "┃") in text
