"""Load a model by name or path: GGUF → config, weights and tokenizer, in one object."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from .config import ModelConfig
from .gguf_file import GGUFFile, read_gguf
from .kernels import kernels_are_compiled
from .models import build_model, check_tensors, config_from_gguf
from .registry import resolve_model
from .repack_cache import RepackCache
from .tokenizer import Tokenizer


@dataclass
class LoadedModel:
    """Everything generation needs: ``model`` (forward/new_cache), its ``config``, ``tokenizer``,
    the parsed ``gguf`` file, the resolved ``path`` and ``load_seconds`` (wall time of loading)."""

    name: str
    path: str
    config: ModelConfig
    model: object
    tokenizer: Tokenizer
    gguf: GGUFFile
    load_seconds: float


def load(name_or_path: str) -> LoadedModel:
    """Resolve, parse and load a model (a known name such as ``smollm2-135m-instruct`` or a path).

    Raises:
        ModelNotInstalledError, ModelFileError, UnsupportedModelError, ConfigError: see
        :mod:`mqa_gen.errors`; each carries a one-line message.
    """
    start = time.perf_counter()
    path = resolve_model(name_or_path)
    gguf = read_gguf(path)
    config = config_from_gguf(gguf)
    check_tensors(gguf, config)
    # Repacked weights come from (and, on the first load of a file, go to) a memory-mapped cache:
    # repacking takes 0.25 s for SmolLM2 and 1.8 s for Gemma 3 (see mqa_gen.repack_cache).
    gguf = replace(gguf, repacked=RepackCache.open(gguf))
    # The tokenizer is built on a second thread while the weights are repacked (or mapped from
    # the cache) and the first prefill's kernels load: much of each runs outside the GIL (the
    # tokenizers library's Rust, NumPy copies). Gemma 3's 262k-token tokenizer takes ~1 s, so
    # its start gains most: 0.4 s from the weights, ~0.13 s from the kernels.
    with ThreadPoolExecutor(max_workers=1) as pool:
        tokenizer_job = pool.submit(Tokenizer.from_gguf, gguf)
        try:
            model = build_model(gguf, config)
            if kernels_are_compiled():  # else the CLI compiles them next, with its progress bar
                model.preload_kernels()
        finally:
            tokenizer = tokenizer_job.result()  # a tokenizer error is reported first, as before
    if gguf.repacked is not None:
        gguf.repacked.save()  # only when something was repacked; never raises
    return LoadedModel(name_or_path, path, config, model, tokenizer, gguf, time.perf_counter() - start)
