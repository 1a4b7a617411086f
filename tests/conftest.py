"""Shared fixtures: the real default model (SmolLM2-135M-Instruct Q4_1), loaded once per session,
and the oracle fixtures written by scripts/make_fixtures.py (transformers on the same GGUF)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "smollm2"
REPO = Path(__file__).resolve().parent.parent


def load_fixture(name: str):
    """A JSON fixture by file name; a missing fixture fails the test (CI always has them)."""
    with open(FIXTURES / name, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from mqa_gen.registry import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """The loaded default model (config, model, tokenizer, gguf)."""
    from mqa_gen.loading import load

    return load(smollm2_path)
