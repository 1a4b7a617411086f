"""Shared fixtures: the real default model (SmolLM2-135M-Instruct Q4_1), loaded once per session,
the Gemma 3 270M file, and the oracle fixtures written by scripts/make_fixtures.py (transformers on
the same GGUF)."""

from __future__ import annotations

import json
import shutil
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "smollm2"
REPO = Path(__file__).resolve().parent.parent


def mqa_gen_exe() -> str:
    """The installed console script: beside this interpreter (the venv, activated or not), else on PATH."""
    beside = Path(sys.executable).with_name("mqa-gen")
    exe = str(beside) if beside.exists() else shutil.which("mqa-gen")
    assert exe, "the mqa-gen console script is not installed"
    return exe


@contextmanager
def deadline(seconds: int, error: type[BaseException] = AssertionError):
    """Raise ``error`` (instead of hanging the suite) when the block runs longer than ``seconds``:
    SIGALRM raises in the main thread, between bytecodes or when a blocking call returns EINTR."""

    def expired(signum, frame):
        raise error(f"still running after {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def load_fixture(name: str, model: str = "smollm2"):
    """A JSON fixture by file name from tests/fixtures/<model>/ ("smollm2", "gemma3"); a missing
    fixture fails the test (CI always has them)."""
    with open(FIXTURES.parent / model / name, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session", autouse=True)
def private_repack_cache(tmp_path_factory) -> None:
    """Repacked-weight cache files (mqa_gen.repack_cache) go to a folder of this session, for the
    library and the CLI subprocesses alike, never to the user's cache."""
    import os

    os.environ["MQA_GEN_REPACK_DIR"] = str(tmp_path_factory.mktemp("repacked"))


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels() -> None:
    """Compile (or load) every Numba kernel once before any test, so that no test's stderr depends on
    whether it happened to be the first to need a kernel (the CLI announces a first-run compile)."""
    from mqa_gen.kernels import compile_kernels, kernels_are_compiled

    if not kernels_are_compiled():
        compile_kernels()


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from mqa_gen.registry import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3_path() -> str:
    """Gemma 3 270M Q4_K_M, assembled from its chunk packages into the model cache on first use."""
    from mqa_gen.registry import resolve_model

    return resolve_model("gemma3-270m")


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """The loaded default model (config, model, tokenizer, gguf)."""
    from mqa_gen.loading import load

    return load(smollm2_path)


@pytest.fixture(scope="session")
def gemma3(gemma3_path):
    """The loaded Gemma 3 270M model (config, model, tokenizer, gguf)."""
    from mqa_gen.loading import load

    return load(gemma3_path)


@pytest.fixture
def invoke(smollm2, monkeypatch):
    """Run the CLI in-process (click's CliRunner) with the session's SmolLM2 instead of loading it
    again: ``invoke("generate", "--prompt", …, input=None)`` → the click Result."""
    import importlib

    from click.testing import CliRunner

    from mqa_gen.cli import cli

    module = importlib.import_module("mqa_gen.cli.common")
    monkeypatch.setattr(module, "load_model", lambda name, quiet: smollm2)

    def run(*args, input=None):
        return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)

    return run
