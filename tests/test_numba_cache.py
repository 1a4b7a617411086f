"""Where compiled kernels are cached: beside the sources when writable, else the user's cache folder,
even when Numba was imported before the kernels (as the CLI does to set the thread count)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

READ_ONLY_INSTALL = """
import os, sys
import numba  # before the kernels, as cli/common.set_threads does
os.access = lambda path, mode: False  # every folder read-only, the package's included
import numpy as np
from mqa_gen.kernels import rmsnorm
x = np.ones((1, 4), np.float32)
rmsnorm(x, x[0], 1e-5, np.empty_like(x))
print(os.environ["NUMBA_CACHE_DIR"])
"""


def test_read_only_install_caches_kernels_in_the_user_folder(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    env.pop("NUMBA_CACHE_DIR", None)
    proc = subprocess.run([sys.executable, "-c", READ_ONLY_INSTALL], capture_output=True, text=True,
                          env=env, check=True, timeout=300)
    folder = tmp_path / "mqa-gen" / "numba"
    assert Path(proc.stdout.strip()) == folder
    assert any(p.name.startswith("rowwise.rmsnorm") for p in folder.rglob("*.nbi")), list(folder.rglob("*"))


def test_a_users_numba_cache_dir_is_kept(tmp_path):
    code = "import os, mqa_gen.kernels; print(os.environ['NUMBA_CACHE_DIR'])"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "mine")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=True, timeout=300)
    assert proc.stdout.strip() == str(tmp_path / "mine")

