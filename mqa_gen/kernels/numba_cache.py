"""Where Numba keeps the compiled kernels (``@njit(cache=True)``).

Numba writes its cache beside the source when it can. When the package is installed read-only we
point it at a user cache folder instead (``NUMBA_CACHE_DIR`` set by the user always wins).
:func:`configure_numba_cache` must run before any kernel is decorated, since Numba picks a
function's cache folder then; ``mqa_gen.kernels`` calls it before importing its submodules.
This module imports nothing from Numba, so importing it cannot settle Numba's configuration early.
"""

from __future__ import annotations

import os
import sys


def user_cache_dir() -> str:
    """The per-user folder for compiled kernels when the package's own folder is read-only:
    ``$XDG_CACHE_HOME/mqa-gen/numba`` (``~/.cache/mqa-gen/numba`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mqa-gen", "numba")


def configure_numba_cache() -> None:
    """Set ``NUMBA_CACHE_DIR`` to :func:`user_cache_dir` when the kernels' folder (or its
    ``__pycache__``) is not writable and the user has not set it; otherwise change nothing."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    here = os.path.dirname(os.path.abspath(__file__))
    pycache = os.path.join(here, "__pycache__")
    writable = os.access(pycache, os.W_OK) if os.path.isdir(pycache) else os.access(here, os.W_OK)
    if writable:
        return
    os.environ["NUMBA_CACHE_DIR"] = user_cache_dir()
    if "numba" in sys.modules:
        # Numba read its environment when it was imported (the CLI imports it to set the thread
        # count before loading the kernels): make it read NUMBA_CACHE_DIR again.
        from numba.core import config

        config.reload_config()
