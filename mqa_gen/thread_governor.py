"""Decode on as many threads as pay off right now: ``--threads`` is a ceiling, not an order.

Every decode step launches a few dozen parallel regions (one per weight product and attention
call), and each region ends when its slowest thread does. When another process holds one of the
cores, the thread that shares it waits for a time slice in every region: measured on this 2-core
machine, decode fell from 38 tok/s on 1 thread to under 1 tok/s on 2 (cli/common.py's
``idle_cores`` note). The load average, read once at start-up, cannot see a job that starts
later, nor one that ends.

So the decode steps measure themselves. :class:`ThreadGovernor` runs each step at its current
thread count c, and now and then runs a few *probe* steps at a neighbour (c − 1 or c + 1, within
1 .. the ceiling, alternately). It moves there when the probe steps' median time is clearly
below that of the steps just before at c with the same number of rows (the step's cost depends
on the rows and, slowly, on the depth, which a few neighbouring steps share), or at once when a
probe step takes less than half as long. An OS thread's first decode steps run on 1 thread and
its first probe goes up: a quiet machine reaches the ceiling by the fifth step, and a busy one
pays for no step on a contended count before the governor knows. A probe step that is much slower
than c's steps ends the probe at once, so probing toward a contended count costs one slow step,
not several. The
probe interval doubles after each probe that loses, and grows further when that probe was
costly (:data:`PROBE_SHARE`), up to :data:`MAX_INTERVAL` steps; it drops back after a move. On a
quiet machine probing costs about 1 % of the steps; under contention, at most a few %.

Where the kernel's count of runnable tasks describes the CPUs we run on (Linux, an affinity
mask as wide as the machine), the governor also looks at it every few steps (:func:`free_cpus`,
~50 µs): a probe up that would put a thread on a CPU another task wants is skipped at no cost
instead of paying one contended step (10–20 normal ones), and a count that another task crowds in
two looks in a row is probed down at once rather than at the next scheduled probe, which on a long
quiet run may be 1,024 steps away. It looks at the end of a step, before the caller writes the
step's token: a reader woken by the previous token (a terminal, a pipe) has gone back to sleep
by then, and a second look tells a task that stays from one that passed. The timings still decide
every move.

The thread count never changes what is computed: every kernel splits its work by rows or
tiles, not by the number of threads, so the logits are the same bits at any count
(tests/test_thread_governor.py). Numba's thread count belongs to the calling OS thread, and so
does the governor (:func:`governor` keeps one per thread). ``MQA_GEN_FIXED_THREADS=1`` turns it
off (benchmarks that pin a count).

This is a measurement-driven policy of our own; llama.cpp and mlx-lm run the count they are given.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager

#: Steps before the first probe, between a move and the next probe, and the most the interval
#: grows to.
FIRST_INTERVAL = 1
AFTER_MOVE_INTERVAL = 8
MAX_INTERVAL = 1024
#: After a probe that lost, wait long enough that its cost is at most this share of the time
#: decoding in between: a probe step k times slower than usual waits ≥ k / PROBE_SHARE steps.
PROBE_SHARE = 0.05
#: Probe steps at the neighbour count (their median is compared).
PROBE_STEPS = 3
#: Steps at the current count that the probe is compared with (median of the latest, same rows).
REFERENCE_STEPS = 2
#: Move only when the probe's median is below this fraction of the reference median (no flapping
#: on noise); move at once when one probe step is below MOVE_AT_ONCE_BELOW × the reference (a
#: contended count is 10–20× slower, and each of its steps costs a tenth of a second or more);
#: end a probe at once when one of its steps exceeds ABORT × the reference.
MOVE_BELOW = 0.9
MOVE_AT_ONCE_BELOW = 0.5
ABORT_ABOVE = 1.5
#: Steps between two looks at the CPUs other tasks want (:func:`free_cpus`), and before the next
#: chance of a probe up that a look stopped.
LOOK_INTERVAL = 8


class ThreadGovernor:
    """Chooses the thread count of each decode step, between 1 and a ceiling, by timing the steps.

    Use :meth:`step` around each decode step::

        with governor.step(rows):      # sets the thread count for this step
            logits = run_decode_step()

    Args:
        get_threads, set_threads: read and set the calling thread's kernel thread count
            (``numba.get_num_threads`` / ``numba.set_num_threads``; tests pass fakes).
        clock: seconds, monotonic (``time.perf_counter``).
        free_cpus: how many of the machine's CPUs no other process wants now, or None when
            unknown (:func:`free_cpus`); None (the default) or always None: the timings alone
            decide.

    The ceiling is the count found set before the first step, and again whenever someone else
    changed it between steps (``--threads``, :func:`mqa_gen.cli.common.set_threads`, a
    library user's ``numba.set_num_threads``): the governor then starts over from that count.
    """

    def __init__(self, get_threads: Callable[[], int], set_threads: Callable[[int], None],
                 clock: Callable[[], float] = time.perf_counter,
                 free_cpus: Callable[[], int | None] | None = None):
        self._get, self._set, self._clock = get_threads, set_threads, clock
        self._free_cpus = free_cpus
        self._until_look = LOOK_INTERVAL
        self._free_seen: int | None = None  # what the latest look saw (None: nothing, or unknown)
        self._crowded_before = False  # the latest look saw other tasks on our count's CPUs
        self.ceiling = 0  # not seen yet
        self.threads = 0
        self._times: deque[tuple[int, float]] = deque(maxlen=REFERENCE_STEPS * 4)  # (rows, seconds) at `threads`
        self._interval = FIRST_INTERVAL
        self._until_probe = FIRST_INTERVAL
        self._probe_to = 0  # the count being probed (0: none)
        self._probe_times: list[float] = []
        self._reference = 0.0
        self._direction = -1  # the next probe goes down first: contention is the usual news
        self._fresh = True  # no probe since the start: the first comes after one reference step
        # This OS thread's first decode step is no reference: in a new process it carries one-time
        # costs (the decode kernels loaded, the first pages touched; 49 ms against 7–9 ms for the
        # next ones at depth 0), against which any probe would look 5x faster. Later restarts keep
        # their first step: under contention it is the evidence.
        self._first_step = True
        self.moves = 0  # how many times the count changed (for reports and tests)
        self.probes = 0

    def count_set_from_outside(self) -> None:
        """The thread count was just set (``--threads``): the next step takes it as the ceiling and
        starts over. :meth:`step` sees a change by itself, but not a count equal to the one it had
        picked — a ``-t 1`` after it had settled on 1 thread kept the old ceiling of 2, and its
        next probe went back up to 2."""
        self.ceiling = 0

    def _restart(self, ceiling: int) -> None:
        self.ceiling = ceiling
        # A thread's first start begins on 1 thread and probes up: when a core is busy, each early
        # step on all threads costs 0.2 s or more (two of them before the first probe: 0.4 s of a
        # 2.5 s generation), a step on 1 thread costs at most ~1.5x a quiet 2-thread step, and the
        # probe up is cut at its first slow step. Later restarts (a count set from outside) begin at
        # the new ceiling, as asked.
        self.threads = 1 if self._first_step else ceiling
        self._times.clear()
        self._interval = self._until_probe = FIRST_INTERVAL
        self._probe_to, self._probe_times = 0, []
        self._fresh = True

    @contextmanager
    def step(self, rows: int):
        """Time one decode step of ``rows`` rows at the count this policy picks for it."""
        current = self._get()
        if not self.ceiling or current != (self._probe_to or self.threads):  # a new count: the ceiling
            self._restart(current)
        if self.ceiling > 1 and not self._probe_to and self._until_probe <= 0:
            self._start_probe(rows)
        count = self._probe_to or self.threads
        if count != current:
            self._set(count)
        start = self._clock()
        yield
        self._record(rows, self._clock() - start)

    def _look_at_other_tasks(self) -> None:
        """At the end of a step not probing, every LOOK_INTERVAL steps and before each probe:
        note the free CPUs for the next probe up, and probe down at the next step when other tasks
        crowd our count in this look and the one before (module docstring)."""
        self._until_look -= 1
        if self._free_cpus is None or self.ceiling <= 1 or (self._until_look > 0 and self._until_probe > 0):
            return
        self._until_look = LOOK_INTERVAL
        self._free_seen = free = self._free_cpus()
        crowded = free is not None and free < self.threads
        if crowded and not self._crowded_before:
            self._until_look = 1  # look again after the next step
        elif crowded:
            self._direction, self._until_probe = -1, 0
            crowded = False
        self._crowded_before = crowded

    def _start_probe(self, rows: int) -> None:
        # the first probe follows the first reference step: a restart on a contended count costs
        # one slow step
        needed = 1 if self._fresh else REFERENCE_STEPS
        same = [s for r, s in self._times if r == rows][-needed:]
        if len(same) < needed:  # too few comparable steps yet: look again a bit later
            self._until_probe = needed
            return
        target = self.threads + self._direction
        if not 1 <= target <= self.ceiling:
            self._direction = -self._direction
            target = self.threads + self._direction
        free, self._free_seen = self._free_seen, None
        if target > self.threads and free is not None and free < target:
            # a thread would share a CPU: a contended step. Look again soon; the interval stays.
            self._until_probe = LOOK_INTERVAL
            return
        self._direction = -self._direction  # alternate down and up
        self._probe_to, self._probe_times, self._fresh = target, [], False
        self._reference = statistics.median(same)
        self._probe_rows = rows
        self.probes += 1

    def _record(self, rows: int, seconds: float) -> None:
        if not self._probe_to:
            if self._first_step:
                self._first_step = False
            else:
                self._times.append((rows, seconds))
            self._until_probe -= 1
            self._look_at_other_tasks()
            return
        if rows != self._probe_rows:  # the batch changed under the probe: not comparable, drop it
            self._end_probe(moved=False)
            return
        self._probe_times.append(seconds)
        if seconds > ABORT_ABOVE * self._reference:
            self._end_probe(moved=False)
        elif seconds < MOVE_AT_ONCE_BELOW * self._reference:
            self._end_probe(moved=True)
        elif len(self._probe_times) == PROBE_STEPS:
            self._end_probe(moved=statistics.median(self._probe_times) < MOVE_BELOW * self._reference)

    def _end_probe(self, moved: bool) -> None:
        if moved:
            self.threads = self._probe_to
            self._times.clear()
            self._times.extend((self._probe_rows, s) for s in self._probe_times)
            # probing back will cost about what the old count cost: space it out as a lost probe
            gain = self._reference / max(statistics.median(self._probe_times), 1e-9)
            self._interval = min(MAX_INTERVAL, max(AFTER_MOVE_INTERVAL, int(gain / PROBE_SHARE)))
            self.moves += 1
        else:
            worst = max(self._probe_times, default=0.0) / self._reference if self._reference > 0 else 0.0
            self._interval = min(MAX_INTERVAL, max(self._interval * 2, int(worst / PROBE_SHARE)))
        self._until_probe = self._interval
        self._probe_to, self._probe_times = 0, []
        self._set(self.threads)


def _runnable_tasks(proc: str) -> int | None:
    """The machine's runnable tasks (threads) now: the number before the slash in /proc/loadavg's
    fourth field (proc(5); cheap where /proc/stat is not, on machines with many CPUs), or None."""
    try:
        with open(f"{proc}/loadavg", "rb") as f:
            return int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return None


def _own_runnable_threads(proc: str) -> int | None:
    """This process's runnable threads now (state R in /proc/self/task/*/stat, proc(5)): the
    caller, and kernel workers spinning between parallel regions (Numba's, OpenBLAS's), or None."""
    task_dir = f"{proc}/self/task"
    try:
        tasks = os.listdir(task_dir)
    except OSError:
        return None
    running = 0
    for task in tasks:
        try:
            with open(f"{task_dir}/{task}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # a thread that just ended
            continue
        after_name = stat.rfind(b")")  # the name, in parentheses, may hold spaces and parentheses
        running += stat[after_name + 2:after_name + 3] == b"R"
    return running


def free_cpus(proc: str = "/proc") -> int | None:
    """How many of this machine's CPUs no other process's runnable task wants now (the machine's
    runnable tasks less this process's), or None where the count does not describe the CPUs we run
    on: no /proc (not Linux), or an affinity mask narrower than the machine (a container's cpuset,
    whose neighbours' tasks are counted too). A snapshot of two counts read ~50 µs apart: a task
    that runs in bursts may be caught either way."""
    cpus = os.cpu_count()
    if not cpus or not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) != cpus:
        return None
    running, own = _runnable_tasks(proc), _own_runnable_threads(proc)
    if running is None or own is None:
        return None
    return max(0, cpus - max(0, running - own))  # more tasks than CPUs: none free


_local = threading.local()


def _count_pinned() -> bool:
    """Whether the calling OS thread's count stays as set: ``MQA_GEN_FIXED_THREADS=1`` or inside
    :func:`fixed_threads`."""
    return os.environ.get("MQA_GEN_FIXED_THREADS") == "1" or getattr(_local, "fixed", False)


def governor() -> ThreadGovernor | None:
    """The calling OS thread's governor of Numba's thread count, or None when
    ``MQA_GEN_FIXED_THREADS=1`` or inside :func:`fixed_threads` (the count stays as set)."""
    if _count_pinned():
        return None
    gov = getattr(_local, "governor", None)
    if gov is None:
        import numba

        gov = _local.governor = ThreadGovernor(numba.get_num_threads, numba.set_num_threads, free_cpus=free_cpus)
    return gov


def count_set_from_outside() -> None:
    """Tell the calling OS thread's governor, if it has one, that its thread count was just set
    from outside (:meth:`ThreadGovernor.count_set_from_outside`)."""
    gov = getattr(_local, "governor", None)
    if gov is not None:
        gov.count_set_from_outside()


@contextmanager
def fixed_threads():
    """Within this block, decode steps of the calling OS thread run at the thread count as set:
    for measurements whose variants must be compared at one count (bench-cache)."""
    before = getattr(_local, "fixed", False)
    _local.fixed = True
    try:
        yield
    finally:
        _local.fixed = before


#: Seconds between the two looks that must both see a CPU taken before a prefill chunk runs on
#: fewer threads (a task woken for a moment is gone again by the second).
SECOND_LOOK_AFTER = 0.001


def uncrowded_count(threads: int) -> int:
    """The thread count, at most ``threads``, whose threads each have a CPU no other task wants
    now: ``threads`` itself unless two looks :data:`SECOND_LOOK_AFTER` apart both see fewer free
    CPUs (:func:`free_cpus`), or where the count is unknown or pinned (:func:`fixed_threads`,
    ``MQA_GEN_FIXED_THREADS=1``)."""
    if threads <= 1 or _count_pinned():
        return threads
    free = free_cpus()
    if free is None or free >= threads:
        return threads
    time.sleep(SECOND_LOOK_AFTER)
    free = free_cpus()
    return threads if free is None or free >= threads else max(1, free)


@contextmanager
def prefill_threads():
    """Within this block (a prefill chunk whose products run on Numba's threads: up to
    SMALL_BATCH rows, or int8 dot products), the calling OS thread's Numba kernels run on
    :func:`uncrowded_count` threads; the count it had comes back after. A decode step is timed
    against its neighbours (:class:`ThreadGovernor`); a prefill chunk is one long step with none,
    so it looks at the other tasks instead. Measured with one core busy (BENCHMARKS.md): a
    23-token prompt took ~1.1 s on 2 contended threads against 0.2 s on 1."""
    import numba

    before = numba.get_num_threads()
    count = uncrowded_count(before)
    if count != before:
        numba.set_num_threads(count)
    try:
        yield
    finally:
        if count != before:
            numba.set_num_threads(before)


@contextmanager
def one_numba_thread():
    """Within this block, the calling OS thread's Numba kernels run on 1 thread; the count it had
    comes back after (the governor sees no change). For prefill chunks, whose weight products are
    NumPy's BLAS on all cores: a Numba kernel on 2 threads leaves its OpenMP worker spinning for
    milliseconds after it returns (libgomp's spin-wait, which decode steps need, see
    ``mqa_gen/__init__.py``), and a BLAS product started in that time shares a core with it —
    measured here, a 512 × 576 × 1536 product took 7.9 ms after a 2-thread kernel against 3.9 ms
    after a 1-thread one, and a 512-token prefill went from 270 to 386 tok/s (SmolLM2) and from
    365 to 626 (Gemma 3). The Numba kernels of a prefill (dequantising, norms, softmax, SwiGLU) are
    not faster on 2 threads there anyway: they ran in the same time on 1."""
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(before)

