"""The decode thread-count policy (mqa_gen/thread_governor.py), on a simulated machine whose step
times depend on the thread count, and on the real model: any count gives the same logits."""

from __future__ import annotations

import numpy as np
import pytest

from mqa_gen import thread_governor
from mqa_gen.thread_governor import (FIRST_INTERVAL, LOOK_INTERVAL, MAX_INTERVAL, PROBE_SHARE, PROBE_STEPS,
                                     REFERENCE_STEPS, ThreadGovernor, free_cpus, prefill_threads,
                                     uncrowded_count)


class Machine:
    """Numba's thread count and a clock; a decode step at n threads takes ``cost(n)`` seconds."""

    def __init__(self, threads: int, cost):
        self.threads, self.cost, self.now = threads, cost, 0.0
        self.sets = 0
        self.history: list[int] = []  # the count each step ran at

    def get(self) -> int:
        return self.threads

    def set(self, n: int) -> None:
        self.sets += 1
        self.threads = n

    def clock(self) -> float:
        return self.now

    def run(self, gov: ThreadGovernor, steps: int, rows: int = 1) -> None:
        for _ in range(steps):
            with gov.step(rows):
                self.history.append(self.threads)
                self.now += self.cost(self.threads)


def contended(n: int) -> float:
    """Another process holds one of 2 cores: 2 threads stall in every parallel region."""
    return {1: 0.026, 2: 1.2}[n]


def quiet(n: int) -> float:
    return {1: 0.030, 2: 0.018}[n]


def test_a_busy_core_keeps_decode_on_one_thread_from_the_first_step():
    m = Machine(2, contended)
    gov = ThreadGovernor(m.get, m.set, m.clock)
    m.run(gov, 2000)
    # a new thread starts on 1 thread (no slow step on a contended count before the first probe)
    assert m.history[:2] == [1, 1]
    assert gov.threads == 1 and gov.moves == 0
    # probes up to 2 threads end after their first slow step, and are spaced so that together
    # they cost at most about PROBE_SHARE of the time
    probes_up = m.history.count(2)
    assert probes_up == gov.probes >= 1
    assert probes_up * contended(2) <= 2 * PROBE_SHARE * 2000 * contended(1)


def test_on_a_quiet_machine_decode_moves_up_at_once_and_probes_grow_rare():
    m = Machine(2, quiet)
    gov = ThreadGovernor(m.get, m.set, m.clock)
    m.run(gov, 2000)
    assert gov.threads == 2 and gov.moves == 1
    # steps 0 (one-time costs) and 1 (the reference) on 1 thread, then the probe up that wins
    up = m.history.index(2)
    assert up == FIRST_INTERVAL + 1 and m.history[up:up + PROBE_STEPS] == [2] * PROBE_STEPS
    on_one = m.history[up + PROBE_STEPS:].count(1)
    assert gov.probes - 1 <= on_one <= (gov.probes - 1) * PROBE_STEPS  # only probe steps ran at 1 thread
    # the interval doubles up to MAX_INTERVAL, then stays: a handful of probes
    doublings = int(np.log2(MAX_INTERVAL // FIRST_INTERVAL))
    assert gov.probes <= doublings + 2000 // MAX_INTERVAL + 2
    assert on_one / 2000 < 0.03


def test_a_slow_first_step_does_not_keep_a_quiet_machine_on_one_thread():
    # A new process's first decode step loads kernels and touches the cache's pages: 49 ms where
    # the next ones take 7 (measured, SmolLM2 at depth 0). As a reference it would make any count
    # look 5x faster or slower; it is not one.
    steps = {"n": 0}

    def cost(n: int) -> float:
        steps["n"] += 1
        return 0.049 if steps["n"] == 1 else {1: 0.0088, 2: 0.0065}[n]

    m = Machine(2, cost)
    gov = ThreadGovernor(m.get, m.set, m.clock)
    m.run(gov, 64)
    assert gov.moves == 1 and gov.threads == 2
    assert m.history.count(1) <= 2 + 2 * PROBE_STEPS  # the start, then only probe steps on 1 thread


def test_when_the_other_process_ends_decode_goes_back_to_all_threads():
    state = {"busy": True}
    m = Machine(2, lambda n: contended(n) if state["busy"] else quiet(n))
    gov = ThreadGovernor(m.get, m.set, m.clock)
    m.run(gov, 100)
    assert gov.threads == 1
    state["busy"] = False
    m.run(gov, 2 * MAX_INTERVAL + REFERENCE_STEPS + PROBE_STEPS)
    assert gov.threads == 2


def test_seen_busy_cpus_spare_the_probes_up_their_contended_steps():
    """With another task seen runnable (free_cpus), no step ever runs on a count that would share
    a CPU; without the count (None), each probe up pays for one contended step."""
    m = Machine(2, contended)
    gov = ThreadGovernor(m.get, m.set, m.clock, free_cpus=lambda: 1)
    m.run(gov, 2000)
    assert set(m.history) == {1} and gov.probes == 0
    m = Machine(2, contended)
    gov = ThreadGovernor(m.get, m.set, m.clock, free_cpus=lambda: None)
    m.run(gov, 2000)
    assert m.history.count(2) == gov.probes >= 1


def test_a_task_that_starts_late_is_met_at_the_next_look_not_the_next_scheduled_probe():
    state = {"busy": False}
    m = Machine(2, lambda n: contended(n) if state["busy"] else quiet(n))
    gov = ThreadGovernor(m.get, m.set, m.clock, free_cpus=lambda: 1 if state["busy"] else 2)
    m.run(gov, 3000)  # quiet: on 2 threads, the probe interval grown to its maximum
    assert gov.threads == 2 and gov._interval == MAX_INTERVAL
    state["busy"] = True
    start = len(m.history)
    m.run(gov, LOOK_INTERVAL + 1)
    m.run(gov, 1)
    assert gov.threads == 1  # two looks in a row, then one probe step down (a move at once)
    assert m.history[start:].count(2) <= LOOK_INTERVAL + 1
    state["busy"] = False
    m.run(gov, 2 * MAX_INTERVAL)
    assert gov.threads == 2  # and back when it ends, by the timings as before


def test_a_task_seen_in_one_look_only_moves_nothing():
    """A reader woken by our own output (a terminal, a pipe) is runnable for a moment: one look
    may catch it, the next does not, and the count stays."""
    looks = {"n": 0}

    def flickering() -> int:
        looks["n"] += 1
        return 1 if looks["n"] % 2 else 2

    m = Machine(2, quiet)
    gov = ThreadGovernor(m.get, m.set, m.clock, free_cpus=flickering)
    m.run(gov, 3000)
    still = Machine(2, quiet)
    plain = ThreadGovernor(still.get, still.set, still.clock)
    still.run(plain, 3000)
    assert gov.threads == 2 and gov.moves == plain.moves == 1
    assert looks["n"] > 3000 // LOOK_INTERVAL and gov.probes <= plain.probes + 1


def test_free_cpus_counts_other_processes_runnable_tasks_only_where_it_sees_the_whole_machine(tmp_path, monkeypatch):
    proc = tmp_path / "proc"
    tasks = proc / "self" / "task"
    for task, state in ((101, "R"), (102, "S"), (103, "R")):  # ours: the caller and a spinning worker
        (tasks / str(task)).mkdir(parents=True)
        (tasks / str(task) / "stat").write_text(f"{task} (py (worker) x) {state} 1 2 3\n")
    (proc / "loadavg").write_text("0.50 0.40 0.30 3/120 4567\n")
    monkeypatch.setattr(thread_governor.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(thread_governor.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert free_cpus(str(proc)) == 3  # 3 running, 2 of them ours: 1 other task on 4 CPUs
    (proc / "loadavg").write_text("0.50 0.40 0.30 1/120 4567\n")  # read at another moment than ours
    assert free_cpus(str(proc)) == 4
    (proc / "loadavg").write_text("9.0 9.0 9.0 9/120 4567\n")  # 7 others on 4 CPUs
    assert free_cpus(str(proc)) == 0
    assert free_cpus(str(tmp_path / "absent")) is None
    (proc / "loadavg").write_text("0.50 0.40\n")
    assert free_cpus(str(proc)) is None
    # a cpuset narrower than the machine: the count covers the neighbours' CPUs too
    (proc / "loadavg").write_text("0.50 0.40 0.30 3/120 4567\n")
    monkeypatch.setattr(thread_governor.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert free_cpus(str(proc)) is None


def test_free_cpus_on_this_machine_sees_a_busy_process():
    import os
    import subprocess
    import sys
    import time

    if thread_governor.free_cpus() is None:
        pytest.skip("no whole-machine count of runnable tasks here")
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 5\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)
        busy_looks = [thread_governor.free_cpus() for _ in range(20)]
    finally:
        spinner.kill()
        spinner.wait()
    # the spinner is runnable at every look; other tasks of a shared machine can only take more
    assert all(look is not None and 0 <= look <= os.cpu_count() - 1 for look in busy_looks)


def test_a_prefill_chunk_runs_on_the_threads_no_other_task_crowds(monkeypatch):
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")
    monkeypatch.delenv("MQA_GEN_FIXED_THREADS", raising=False)
    seen = {"free": [1, 1]}
    monkeypatch.setattr(thread_governor, "free_cpus", lambda: seen["free"].pop(0))
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        with prefill_threads():
            inside = numba.get_num_threads()
        assert inside == 1 and numba.get_num_threads() == 2 and seen["free"] == []  # two looks, then back
        seen["free"] = [1, 2]  # a task seen once only (woken for a moment): the count stays
        assert uncrowded_count(2) == 2 and seen["free"] == []
        seen["free"] = [None]
        assert uncrowded_count(2) == 2
        seen["free"] = [0, 0]  # every CPU wanted: still one thread
        assert uncrowded_count(2) == 1
        seen["free"] = [1, 1]
        with thread_governor.fixed_threads():  # a pinned count is left as set, without a look
            assert uncrowded_count(2) == 2 and seen["free"] == [1, 1]
    finally:
        numba.set_num_threads(before)


def test_a_count_set_from_outside_becomes_the_new_ceiling():
    m = Machine(2, contended)
    gov = ThreadGovernor(m.get, m.set, m.clock)
    m.run(gov, 50)
    assert gov.threads == 1
    m.threads = 2  # the user asks for 2 again (numba.set_num_threads between steps)
    m.run(gov, 1)
    assert gov.ceiling == 2 and m.history[-1] == 2


def test_a_count_set_from_outside_equal_to_the_governors_own_is_the_new_ceiling():
    """A process that runs several commands (tests, a library user): the governor had settled on
    1 thread under ceiling 2, then `--threads 1` sets the same count. Told of it, it never probes
    back up to 2."""
    m = Machine(2, contended)
    gov = ThreadGovernor(m.get, m.set, m.clock)
    m.run(gov, 50)
    assert gov.threads == 1 and gov.ceiling == 2
    m.threads = 1  # set_threads(1): the count it already had
    gov.count_set_from_outside()
    before = len(m.history)
    m.run(gov, 2 * MAX_INTERVAL)
    assert gov.ceiling == 1 and set(m.history[before:]) == {1} and m.threads == 1


def test_one_thread_as_the_ceiling_is_left_alone():
    m = Machine(1, quiet)
    gov = ThreadGovernor(m.get, m.set, m.clock)
    m.run(gov, 300)
    assert m.sets == 0 and set(m.history) == {1} and gov.probes == 0


def test_a_probe_is_dropped_when_the_batch_changes_under_it():
    m = Machine(2, quiet)  # 2 threads would win after 3 probe steps…
    gov = ThreadGovernor(m.get, m.set, m.clock)
    m.run(gov, FIRST_INTERVAL + 1, rows=4)  # on 1 thread (the first step after a start is no reference)
    m.run(gov, 1, rows=4)  # the probe's first step
    assert m.history[-1] == 2
    m.run(gov, 1, rows=5)  # …but a sequence joined: steps of 5 rows are not comparable with 4
    assert gov.moves == 0 and gov.threads == 1 and m.threads == 1


def test_fixed_threads_turns_it_off(monkeypatch):
    monkeypatch.setenv("MQA_GEN_FIXED_THREADS", "1")
    assert thread_governor.governor() is None
    monkeypatch.delenv("MQA_GEN_FIXED_THREADS")
    assert isinstance(thread_governor.governor(), ThreadGovernor)


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_logits_are_the_same_bits_on_one_and_two_threads(smollm2, batch, monkeypatch):
    """The policy may change the count between any two steps: that must not change a bit."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")
    monkeypatch.setenv("MQA_GEN_FIXED_THREADS", "1")
    model, ids = smollm2.model, smollm2.tokenizer.encode("The capital of France is")
    before = numba.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            numba.set_num_threads(threads)
            caches = [model.new_cache(64, "float16") for _ in range(batch)]
            for b, cache in enumerate(caches):
                model.forward(ids[: len(ids) - b], cache)
            steps = [model.decode([7 + b for b in range(batch)], caches) for _ in range(3)]
            results.append(np.stack(steps))
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(results[0], results[1])


def test_fixed_threads_pins_the_count_within_its_block():
    with thread_governor.fixed_threads():
        assert thread_governor.governor() is None
        with thread_governor.fixed_threads():
            pass
        assert thread_governor.governor() is None
    assert isinstance(thread_governor.governor(), ThreadGovernor)


def test_a_long_prefill_chunk_runs_numba_on_one_thread_and_gives_the_count_back(smollm2, monkeypatch):
    """Chunks BLAS multiplies keep Numba's kernels on 1 thread (one_numba_thread's docstring); a
    decode-sized chunk keeps the count; an error inside gives the count back too."""
    import numba

    from mqa_gen.kernels import rmsnorm as real_rmsnorm
    from mqa_gen.linear import SMALL_BATCH
    from mqa_gen.models import base

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")
    seen = []

    def counting_rmsnorm(*args):
        seen.append(numba.get_num_threads())
        return real_rmsnorm(*args)

    monkeypatch.setattr(base, "rmsnorm", counting_rmsnorm)  # every RMSNorm of the forward pass
    # the routing alone: no looks at other tasks (OpenBLAS's threads, spinning after the long
    # chunk's products where NumPy loaded before mqa_gen, would be one)
    monkeypatch.setattr(thread_governor, "free_cpus", lambda: None)
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        model = smollm2.model
        model.forward(np.arange(SMALL_BATCH + 1) + 100, model.new_cache(128, "float16"))
        assert seen and set(seen) == {1} and numba.get_num_threads() == 2
        seen.clear()
        model.forward(np.arange(SMALL_BATCH) + 100, model.new_cache(128, "float16"))
        assert seen and set(seen) == {2}
        with pytest.raises(ZeroDivisionError), thread_governor.one_numba_thread():
            1 / 0
        assert numba.get_num_threads() == 2
    finally:
        numba.set_num_threads(before)
