"""Compile every kernel once, up front, and remember that we did.

Numba compiles on first call and caches the machine code on disk (``cache=True``). The first run
of a fresh install therefore spends tens of seconds compiling; we say so on stderr before it starts
(so it never looks hung) and compile all kernels with the exact argument types the model uses, so
later runs only load the cache. Each kernel module lists its own calls in a ``warm_up()`` beside
its kernels; this module runs them and keeps a small marker file, keyed by the kernel sources, the
Numba version and the CPU, that records that the cache is warm.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import numba

from . import attention, cache_rows, decode_layer, halfprec, quant, rowwise
from .numba_cache import user_cache_dir

#: The kernel modules the model runs, each with a ``warm_up()``. attention_grad's kernels (the
#: training path of :class:`~mqa_gen.layer.MultiQueryAttention`) compile on first use instead.
WARMED_MODULES = (rowwise, halfprec, cache_rows, attention, quant, decode_layer)


def _marker_path(what: str = "kernels") -> Path:
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for source in sorted(here.glob("*.py")):
        digest.update(source.read_bytes())
    digest.update(f"{numba.__version__}|{sys.version}|{platform.machine()}|{here}".encode())
    cache_root = Path(os.environ.get("NUMBA_CACHE_DIR") or user_cache_dir()).parent
    return cache_root / f"{what}-compiled-{digest.hexdigest()[:16]}"


def kernels_are_compiled() -> bool:
    """True when a previous run compiled (and cached) every kernel for this install."""
    return _marker_path().exists()


def _forget_cached_kernels(folder: str | None = None) -> None:
    """Delete this package's kernels from Numba's disk cache.

    Numba checks a cached function against its own source file only, so a kernel whose file did
    not change but which calls a kernel from a file that did (the fused decode step calls the
    quantised products and the row-wise kernels; attention calls the cache-row readers) would load
    its old machine code — with the old callee inside, giving other bits than the fresh callee
    alone (seen: logits 1e-4 apart after a change to the float16 reader). The marker's digest
    covers every kernel source, so when it is missing every kernel starts over. ``folder``: the
    cache folder (default: where Numba keeps this package's kernels)."""
    folder = folder or getattr(getattr(rowwise.rmsnorm, "_cache", None), "_cache_path", None)
    if not folder or not os.path.isdir(folder):
        return
    here = Path(__file__).resolve().parent
    stems = {source.stem for source in here.glob("*.py")}
    for name in os.listdir(folder):
        if name.endswith((".nbi", ".nbc")) and name.split(".", 1)[0] in stems:
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass  # another process's file, or a read-only cache: it compiles again at worst


def compile_kernels(progress: Callable[[int, int], None] | None = None) -> None:
    """Run each kernel module's ``warm_up()`` (:data:`WARMED_MODULES`: every kernel called once on
    tiny inputs with every argument type the model uses), so Numba compiles and caches them; then
    write the marker file. Without the marker for these sources, kernels cached from other
    sources are deleted first (:func:`_forget_cached_kernels`). A marker that cannot be written only costs compiling being announced
    again next run. ``progress(done, total)`` is called before the first module and after each
    (modules warmed, of all), for a progress bar."""
    if not kernels_are_compiled():  # a kernel source changed (or a first run): no old machine code
        _forget_cached_kernels()
    total = len(WARMED_MODULES)
    for done, module in enumerate(WARMED_MODULES):
        if progress is not None:
            progress(done, total)
        module.warm_up()
    if progress is not None:
        progress(total, total)
    marker = _marker_path()
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:
        pass  # a read-only home only costs the notice being shown again


def int8_kernels_are_compiled() -> bool:
    """True when an earlier run compiled (and cached) the ``--int8-dot`` kernels for this install."""
    return _marker_path("int8-kernels").exists()


def compile_int8_kernels() -> bool:
    """Compile (or load) the ``--int8-dot`` kernels (:func:`~mqa_gen.kernels.int8_dot.warm_up`, and
    the fused decode step with row-quad codes)
    unless a marker says an earlier run did, after :func:`compile_kernels` (they share helpers).
    Returns True when it compiled, False when the marker was there."""
    from . import int8_dot

    marker = _marker_path("int8-kernels")
    if marker.exists():
        return False
    if not kernels_are_compiled():
        compile_kernels()
    int8_dot.warm_up()
    decode_layer.warm_up(int8_dot=True)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:
        pass
    return True
