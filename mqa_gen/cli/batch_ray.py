"""``mqa-gen batch --ray``: the prompts of one batch run on a Ray cluster, through Ray Data.

This process (the *driver*) does everything the local path does up to the requests — reads and
checks every line, applies ``--resume``, tokenises each prompt and draws each seed
(:mod:`mqa_gen.cli.batch`) — and then, instead of one :class:`~mqa_gen.scheduler.Scheduler`, sends
the requests through a Ray Data pipeline: ``from_items`` → ``map_batches`` over a pool of
:class:`BatchActor` s, each of which loads the model once and runs its share through its own
scheduler (continuous batching, ``--batch-size`` slots, ``--threads-per-actor`` Numba threads).
Results come back as tasks finish and are written by the local path's writer: input order, one
flushed line each, ``--resume`` alike. This is Ray Data's offline batch inference recipe (a
class-based UDF over an actor pool, the model loaded in the constructor).

Why the driver tokenises and draws the seeds: a task run again after its actor died runs the very
same requests, so it gives the very same lines; and a bad prompt stops the run before any actor
starts, as it does locally.

Faults: an actor that dies (killed, out of memory, its node lost) is restarted by Ray, on any node
with room (``max_restarts``), and the task it held runs again there (``max_task_retries``). A
task's output is all or nothing, so a prompt's line arrives once; the driver also drops any
position it has already written, so a line can never be written twice.

Rows travel as JSON text (a position and a request; a position and a result line), never as
pickled objects of ours.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, fields

import numpy as np

from ..batch_output import result_line
from ..errors import MqaGenError
from ..sampling import SamplingParams
from ..scheduler import Request

#: How to get Ray, for the message when it is missing.
INSTALL_HINT = "pip install 'mqa-gen[ray]'"

#: Times Ray may restart one actor that died (each restart loads the model again), and times it
#: may run a task again on a restarted actor. Bounded, so that an actor that dies on every try
#: (a node short of memory) fails the run instead of looping; the lines written so far stay.
MAX_RESTARTS = 3
MAX_TASK_RETRIES = 3

#: Object store of a runtime we start: the rows are short JSON strings (a few KiB per prompt), and
#: Ray Data streams them with backpressure, spilling to disk beyond this.
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20

#: Seconds to wait for a TCP connection to a cluster's address before saying it is not there.
CONNECT_TIMEOUT_S = 10

#: Most prompts in one Ray task, in multiples of the slots: a task's prompts fill the slots in
#: waves, so a multiple of them leaves no wave half empty; a task lost with its actor costs at
#: most this much work again.
MAX_WAVES_PER_TASK = 8


class RayBatchError(MqaGenError):
    """``--ray`` cannot run: Ray is not installed, the cluster cannot be reached or lacks the CPUs
    asked for, or the run failed on the cluster (the lines written before it are kept)."""


# ───────────────────────────── requests and results as JSON rows ─────────────────────────────


def encode_request(request: Request, item_id) -> str:
    """A request and its input line's ``id`` as one JSON object (the row an actor receives).

    Every field of :class:`~mqa_gen.sampling.SamplingParams` travels, so the actor samples exactly
    as this process would; ``request.id`` (the position) travels in its own column; ``on_token``
    (a callback) cannot travel and must be None.
    """
    if request.on_token is not None:
        raise ValueError("a request with an on_token callback cannot run on Ray")
    params = {f.name: getattr(request.params, f.name) for f in fields(request.params)}
    params["suppress_ids"] = sorted(params["suppress_ids"])
    return json.dumps({"id": item_id, "prompt_ids": list(request.prompt_ids), "params": params,
                       "max_tokens": request.max_tokens, "stop": list(request.stop),
                       "eos_ids": sorted(request.eos_ids), "logprobs": request.logprobs})


def decode_request(text: str, position: int) -> tuple[Request, object]:
    """:func:`encode_request`'s inverse: the :class:`~mqa_gen.scheduler.Request` (its ``id`` =
    ``position``) and the line's ``id``."""
    row = json.loads(text)
    params = dict(row["params"], suppress_ids=frozenset(row["params"]["suppress_ids"]))
    request = Request([int(t) for t in row["prompt_ids"]], SamplingParams(**params), row["max_tokens"],
                      tuple(row["stop"]), frozenset(row["eos_ids"]), row["logprobs"], id=position)
    return request, row["id"]


# ───────────────────────────── the actor ─────────────────────────────


class BatchActor:
    """One actor of the pool (a Ray Data class-based UDF): loads the model once, then runs each batch
    of rows it is given through one :class:`~mqa_gen.scheduler.Scheduler`.

    Args:
        model: a known model name or a GGUF path, resolved on the actor's node (so the model
            package, or the file at that path, must be there).
        options: the generation options of :func:`~mqa_gen.cli.common.setup_generation` (plain
            values: ``--ctx-size``, ``--kv-heads``, ``--cache-dtype``, sampling defaults …), the
            same as the driver's, so the actor's model is the driver's.
        threads: Numba threads for its kernels (``--threads-per-actor``).
        slots: sequences decoding together (the driver's ``--batch-size`` capped by the KV budget).

    Raises:
        MqaGenError: the model cannot be loaded on this node (Ray reports it to the driver).
    """

    def __init__(self, model: str, options: dict, threads: int, slots: int):
        from ..scheduler import Scheduler
        from .common import setup_generation

        t0 = time.perf_counter()
        setup = setup_generation(model, True, threads, draw_seed=False, **options)
        self.tokenizer = setup.loaded.tokenizer
        self.scheduler = Scheduler(setup.net, self.tokenizer, batch_size=slots, ctx_size=setup.ctx,
                                   cache_dtype=setup.cache_dtype)
        self.load_seconds = time.perf_counter() - t0
        self.name = f"{os.uname().nodename}:{os.getpid()}"
        self.tasks = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one task's rows.

        Args:
            batch: ``position`` int64 [R] (the request's place in the run) and ``request`` str [R]
                (:func:`encode_request`).

        Returns:
            ``position`` int64 [R]; ``result`` str [R], each the JSON of
            :func:`~mqa_gen.batch_output.result_line`; and, for the run's statistics, ``task``
            str [R] (this actor and task), ``task_seconds`` float64 [R] (the task's wall time, s)
            and ``load_seconds`` float64 [R] (this actor's start-up: model load, kernels, s).
        """
        t0 = time.perf_counter()
        ids = {}
        requests = []
        for position, text in zip(batch["position"], batch["request"]):
            request, item_id = decode_request(str(text), int(position))
            ids[request.id] = item_id
            requests.append(request)
        positions, results = [], []
        for completion in self.completions(requests):
            positions.append(completion.request.id)
            results.append(json.dumps(result_line(completion, ids[completion.request.id], self.tokenizer),
                                      ensure_ascii=False))
        self.tasks += 1
        n = len(positions)
        return {"position": np.array(positions, dtype=np.int64), "result": np.array(results, dtype=object),
                "task": np.array([f"{self.name}/{self.tasks}"] * n, dtype=object),
                "task_seconds": np.full(n, time.perf_counter() - t0),
                "load_seconds": np.full(n, self.load_seconds)}

    def completions(self, requests: list[Request]) -> Iterator:
        """The :class:`~mqa_gen.scheduler.Completion` of every request, as each finishes."""
        return self.scheduler.run(requests)


# ───────────────────────────── the runtime ─────────────────────────────


def recorded_local_cluster() -> str | None:
    """Where Ray records the cluster that ``ray start`` runs on this machine (the file ``ray.init()``
    reads to join it; ``ray stop`` removes it), when that file exists."""
    tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    path = os.path.join(tmp, "ray", "ray_current_cluster")
    return path if os.path.exists(path) else None


def check_reachable(address: str | None) -> None:
    """Refuse, within :data:`CONNECT_TIMEOUT_S`, a cluster address nothing listens on: ``ray.init``
    itself retries such an address for minutes. ``address``: ``--ray``'s value (None or ``auto``:
    ``RAY_ADDRESS``, else the recorded local cluster). An address without a port is left to Ray.

    Raises:
        RayBatchError: no connection to HOST:PORT.
    """
    if address in (None, "auto"):
        address = os.environ.get("RAY_ADDRESS")
        recorded = recorded_local_cluster()
        if not address and recorded:
            with open(recorded, encoding="utf-8") as f:
                address = f.read().strip()
    if not address:
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise RayBatchError(f"cannot reach the Ray cluster at {address}: {e.strerror or e} (is `ray start` "
                            "running there?)") from None


def import_ray(start_local: bool):
    """Import Ray (and Ray Data), or say how to install it.

    ``start_local``: this process will start its own runtime. Ray reads at import whether the
    runtime may serve other machines; a private runtime must not, so it then listens on the
    loopback interface only (127.0.0.1; Ray's switch for single-machine runtimes), and sends no
    usage statistics.

    Raises:
        RayBatchError: Ray is not installed.
    """
    if start_local and "ray" not in sys.modules:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
        import ray.data  # noqa: F401  (part of the extra; fail here, not mid-run)
    except ImportError:
        raise RayBatchError(f"--ray needs Ray Data, which is not installed: {INSTALL_HINT}") from None
    return ray


@dataclass
class RayRunStats:
    """What a Ray run did, for the stats line and the benchmark.

    Attributes:
        connect_seconds: joining or starting the runtime (s).
        first_result_seconds: from submitting the pipeline to the first results (actors started,
            model loaded, one task run; s).
        tasks: task name → its wall time (s). actors: actor name → its start-up (model load, s).
        prompts, prompt_tokens, generated_tokens: over the lines received.
    """

    connect_seconds: float = 0.0
    first_result_seconds: float | None = None
    tasks: dict[str, float] = field(default_factory=dict)
    actors: dict[str, float] = field(default_factory=dict)
    prompts: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0

    @property
    def busy_seconds(self) -> float:
        """Actor time spent in tasks, all actors together (s)."""
        return sum(self.tasks.values())

    @property
    def tokens_per_actor_second(self) -> float:
        """Generated tokens per second of one busy actor: the throughput one more actor adds."""
        return self.generated_tokens / self.busy_seconds if self.busy_seconds else 0.0

    @property
    def mean_load_seconds(self) -> float:
        """An actor's start-up (model load and kernels), mean over the actors that reported (s)."""
        return sum(self.actors.values()) / len(self.actors) if self.actors else 0.0


class RayBatch:
    """The Ray side of one ``mqa-gen batch --ray`` run: the connection, the pool, the results.

    Args:
        address: ``--ray``'s value: None (no ADDRESS) joins ``RAY_ADDRESS`` or the cluster ``ray
            start`` runs on this machine when there is one, else starts a private runtime on
            127.0.0.1 for this run; ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT`` join that one.
            A process already connected to Ray (a script, a test) keeps its connection.
        actors: ``--actors`` (None: as many as the cluster's CPUs allow at ``threads`` each).
        threads: ``--threads-per-actor``.
        quiet: ``-q``: no Ray warnings on stderr.

    Raises:
        RayBatchError: Ray is not installed, or nothing listens at the cluster's address.
    """

    def __init__(self, address: str | None, actors: int | None, threads: int, quiet: bool):
        already = sys.modules.get("ray") is not None and sys.modules["ray"].is_initialized()
        self.start_local = not already and address is None and not os.environ.get("RAY_ADDRESS") \
            and recorded_local_cluster() is None
        self.ray = import_ray(self.start_local)
        if not already and not self.start_local:
            check_reachable(address)
        self.address, self.requested_actors, self.threads, self.quiet = address, actors, threads, quiet
        self.owned = False  # whether close() disconnects (we connected) and stops the runtime (we started it)
        self.actors = 0
        self.cluster_cpus = 0
        self.stats = RayRunStats()

    def connect(self) -> None:
        """Join or start the runtime, and size the pool (:attr:`actors`).

        Raises:
            RayBatchError: the cluster cannot be reached, or has fewer CPUs than ``actors ×
                threads`` (an actor pool that can never fill would wait for ever).
        """
        ray = self.ray
        t0 = time.perf_counter()
        level = logging.ERROR if self.quiet else logging.WARNING
        if not ray.is_initialized():
            try:
                if self.start_local:
                    ray.init(address="local", include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                             log_to_driver=False, logging_level=level)
                else:
                    ray.init(address=self.address or "auto", log_to_driver=False, logging_level=level)
            except (ConnectionError, ValueError, RuntimeError) as e:
                where = self.address or os.environ.get("RAY_ADDRESS") or recorded_local_cluster() or "auto"
                raise RayBatchError(f"cannot join the Ray cluster ({where}): {_first_line(e)}") from None
            self.owned = True
        self.stats.connect_seconds = time.perf_counter() - t0
        self.cluster_cpus = int(ray.cluster_resources().get("CPU", 0))
        self.actors = self.requested_actors or max(1, self.cluster_cpus // self.threads)
        if self.actors * self.threads > self.cluster_cpus:
            raise RayBatchError(f"--actors {self.actors} × --threads-per-actor {self.threads} needs "
                                f"{self.actors * self.threads} CPUs; the Ray cluster has {self.cluster_cpus}")

    def describe(self) -> str:
        """The pool in words: ``2 actors × 1 thread``."""
        return (f"{self.actors} actor{'s' if self.actors != 1 else ''} × {self.threads} "
                f"thread{'s' if self.threads != 1 else ''}")

    def where(self) -> str:
        """The runtime in words, for stderr."""
        if self.start_local:
            return "a local Ray runtime on 127.0.0.1"
        where = self.address or os.environ.get("RAY_ADDRESS")
        return f"the Ray cluster at {where}" if where else "the Ray cluster `ray start` runs here"

    def results(self, requests: list[tuple[Request, object]], *, model: str, options: dict, slots: int
                ) -> Iterator[tuple[int, dict]]:
        """Run every request on the pool; yield ``(position, result line)`` as tasks finish, each
        position once.

        Args:
            requests: each :class:`~mqa_gen.scheduler.Request` (its ``id`` = its position among the
                lines this run writes) with its input line's ``id``.
            model, options: what every actor loads (:class:`BatchActor`); a model path is made
                absolute here, since actors do not share this process's working directory.
            slots: each actor's scheduler slots.

        Raises:
            RayBatchError: the run failed on the cluster (an actor that died more than
                :data:`MAX_RESTARTS` times, a model missing on a node); the lines yielded stay.
        """
        ray = self.ray
        if os.path.exists(model):
            model = os.path.abspath(model)
        rows = [{"position": r.id, "request": encode_request(r, item_id)} for r, item_id in requests]
        per_task = max(1, min(math.ceil(len(rows) / self.actors), MAX_WAVES_PER_TASK * slots))
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours is on stderr already
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR if self.quiet else logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled": by us
        # A failed run's stack trace: our error line gives its cause (Ray's session logs keep the rest).
        logging.getLogger("ray.data.exceptions").setLevel(logging.CRITICAL)
        dataset = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / per_task)))
        with warnings.catch_warnings():
            # Ray Data 2.60 names no parameter for the actors' retry options and warns about passing
            # them as remote arguments (its default is unbounded); pyproject pins Ray below their removal.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
            dataset = dataset.map_batches(
                BatchActor, fn_constructor_args=(model, options, self.threads, slots), batch_size=per_task,
                batch_format="numpy", num_cpus=self.threads,
                compute=ray.data.ActorPoolStrategy(size=self.actors, max_tasks_in_flight_per_actor=1),
                max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES)
        t0 = time.perf_counter()
        seen: set[int] = set()
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                if self.stats.first_result_seconds is None:
                    self.stats.first_result_seconds = time.perf_counter() - t0
                for position, text, task, task_s, load_s in zip(batch["position"], batch["result"], batch["task"],
                                                                 batch["task_seconds"], batch["load_seconds"]):
                    position = int(position)
                    if position in seen:  # never twice, whatever a retry delivers
                        continue
                    seen.add(position)
                    obj = json.loads(text)
                    self.stats.tasks[str(task)] = float(task_s)
                    self.stats.actors[str(task).rsplit("/", 1)[0]] = float(load_s)
                    self.stats.prompts += 1
                    self.stats.prompt_tokens += obj["prompt_tokens"]
                    self.stats.generated_tokens += len(obj["token_ids"])
                    yield position, obj
        except ray.exceptions.RayError as e:
            raise RayBatchError(f"the Ray run failed: {_root_cause(e)}") from None

    def close(self) -> None:
        """Disconnect, when this object connected; a runtime it started stops with it."""
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()
        self.owned = False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


#: The last line of a Python traceback as Ray quotes it: ``package.module.SomeError: message``.
_RAISED = re.compile(r"^(?P<name>[\w.]*(?:Error|Exception|Interrupt|Exit)): (?P<message>.+)$")


def _root_cause(e: BaseException) -> str:
    """The message of the error an actor raised, through Ray's wrappers: a RayTaskError carries the
    original as ``cause``; an actor that died in its constructor (a model missing on its node)
    comes back as an ActorDiedError that only quotes the traceback, whose last ``Name: message``
    line is the original. Ours (``mqa_gen.…``) are one line of their own; anything else keeps its
    name; a death with no traceback (killed, out of memory) keeps Ray's last line."""
    seen, link = set(), e
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, MqaGenError):
            return str(link)
        link = getattr(link, "cause", None) or link.__cause__
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in reversed(lines):
        raised = _RAISED.match(line)
        if raised:
            ours = raised["name"].startswith("mqa_gen.")
            return raised["message"] if ours else f"{raised['name'].rsplit('.', 1)[-1]}: {raised['message']}"
    return lines[-1] if lines else type(e).__name__
