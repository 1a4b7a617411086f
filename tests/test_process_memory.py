"""glibc's malloc keeps a prefill's freed work arrays (mqa_gen/process_memory.py)."""

from __future__ import annotations

import platform
import resource

import numpy as np
import pytest

from mqa_gen.process_memory import keep_freed_memory

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


@glibc
def test_arrays_of_a_few_mib_come_back_without_new_page_faults():
    import mqa_gen  # noqa: F401  (sets the thresholds at import)

    def faults_of_reuse(size_mib: float) -> int:
        n = int(size_mib * 2**20 / 4)
        np.ones(n, np.float32)  # the heap grows once
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            a = np.ones(n, np.float32)  # touches every page
            del a
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    pages = 3.5 * 2**20 // 4096  # one 3.5 MiB array (a 1536 x 576 float32 matrix): 896 pages
    assert faults_of_reuse(3.5) < pages  # 20 fresh mmaps would fault 20 x 896 times


@glibc
def test_the_users_environment_wins(monkeypatch):
    assert keep_freed_memory()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert not keep_freed_memory()
