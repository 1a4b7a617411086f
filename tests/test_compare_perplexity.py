"""benchmarks/compare_perplexity.py: the q8_0-vs-f16 table's arithmetic (each tool against its own
f16 run). Oracle: relative differences worked out by hand from the PPL values the rows carry."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def compare():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("compare_perplexity")
    finally:
        sys.path.remove(str(BENCHMARKS))


def row(model, cache, fa, llama, ours):
    return {"model": model, "cache": cache, "fa": fa, "llama": llama, "ours": ours}


def test_each_tool_is_set_against_its_own_f16_run(compare):
    results = [
        row("a", "f16", "on", {"ppl": 40.0}, {"ppl": 50.0}),
        row("a", "q8_0", "on", {"ppl": 40.1}, {"ppl": 49.9}),  # +0.25 % and −0.2 %
        row("a", "f16", "off", {"ppl": 80.0}, None),  # the -fa off reference is not the baseline
        row("b", "q4_0", "on", {"ppl": 33.0}, {"ppl": 22.0}),  # listed before its f16 row
        row("b", "f16", "on", {"ppl": 30.0}, {"ppl": 20.0}),  # +10 % for both
    ]
    deltas = compare.cache_deltas(results)
    assert [(d["model"], d["cache"]) for d in deltas] == [("a", "q8_0"), ("b", "q4_0")]
    assert deltas[0]["llama"] == pytest.approx(0.25)
    assert deltas[0]["ours"] == pytest.approx(-0.2)
    assert deltas[1]["llama"] == pytest.approx(10.0)
    assert deltas[1]["ours"] == pytest.approx(10.0)


def test_a_missing_run_leaves_its_cell_empty(compare):
    results = [
        row("a", "f16", "on", {"ppl": 40.0}, {"skipped": "no f16 yet"}),
        row("a", "q8_0", "on", {"error": "exit 1"}, {"ppl": 41.0}),
        row("b", "q8_0", "on", {"ppl": 12.0}, {"ppl": 12.0}),  # no f16 run for b: no row
    ]
    assert compare.cache_deltas(results) == [{"model": "a", "cache": "q8_0", "llama": None, "ours": None}]
