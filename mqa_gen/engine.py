"""A long-running batched engine for a server: one worker thread owns the model and a
:class:`~mqa_gen.scheduler.Scheduler`; other threads submit requests and read their tokens.

The worker loops over :meth:`Scheduler.step <mqa_gen.scheduler.Scheduler.step>`: between two steps
it drops the requests whose client went away (:meth:`Engine.cancel`, their slot free for the next
step) and admits waiting ones while a slot is free, so requests that arrive while others decode
join the running batch (continuous batching, as llama-server's slots). Each sampled token is
handed to its request's ``deliver`` callback from the worker thread; an asyncio server passes one
that puts the event on the request's queue with ``loop.call_soon_threadsafe``.

Requests beyond the slots wait in a bounded queue; beyond it :meth:`Engine.submit` refuses
(:class:`EngineBusy`, an HTTP server's 503), so a burst cannot grow memory without limit.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .scheduler import Completion, Request, Scheduler


class EngineBusy(Exception):
    """The wait queue is full: try again later."""


@dataclass
class Event:
    """What the worker hands a request's ``deliver``.

    Attributes:
        kind: ``token`` (one sampled token: ``step`` and ``logprob``), ``done`` (``completion``)
            or ``error`` (``message``: the request failed; the engine goes on).
    """

    kind: str
    step: object = None
    logprob: object = None
    completion: Completion | None = None
    message: str = ""


@dataclass(eq=False)
class Handle:
    """A submitted request: its :class:`~mqa_gen.scheduler.Request` and whether it was cancelled."""

    request: Request
    deliver: Callable[[Event], None]
    cancelled: bool = field(default=False)


class Engine:
    """The worker thread, its scheduler and its wait queue.

    Args:
        scheduler: the :class:`~mqa_gen.scheduler.Scheduler` to drive (only the worker touches it).
        max_queue: most requests waiting for a slot (≥ 0; besides those a free slot takes at the
            next step) before :meth:`submit` refuses.
        threads: Numba threads for the worker (Numba's thread count is per thread); None = leave it.
    """

    def __init__(self, scheduler: Scheduler, max_queue: int = 64, threads: int | None = None):
        self.scheduler, self.max_queue, self.threads = scheduler, max_queue, threads
        self._waiting: collections.deque[Handle] = collections.deque()
        self._cancelled: list[Handle] = []
        self._running: dict[int, Handle] = {}  # id(request) -> handle, for the requests in a slot
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="mqa-gen-engine", daemon=True)

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the worker to end after its current step, and wait for it (at most ``timeout`` s)."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiting)

    def submit(self, request: Request, deliver: Callable[[Event], None]) -> Handle:
        """Queue ``request`` (already checked with :meth:`Scheduler.check`); its events go to
        ``deliver`` (called from the worker thread: it must not block).

        Raises:
            EngineBusy: ``max_queue`` requests already wait.
        """
        handle = Handle(request, deliver)
        request.on_token = lambda step, logprob: deliver(Event("token", step=step, logprob=logprob))
        with self._cond:
            # free slots take waiting requests at the next step, so they do not count as queued
            # (read without the worker's lock: off by one at most, for one step)
            free = max(0, self.scheduler.batch_size - self.scheduler.busy_slots)
            if len(self._waiting) >= self.max_queue + free:
                raise EngineBusy(f"{len(self._waiting)} requests are waiting for a slot")
            self._waiting.append(handle)
            self._cond.notify()
        return handle

    def cancel(self, handle: Handle) -> None:
        """Drop a request (its client went away): out of the queue now, or out of its slot before
        the next decode step. No more events are delivered for it."""
        with self._cond:
            handle.cancelled = True
            try:
                self._waiting.remove(handle)
            except ValueError:
                self._cancelled.append(handle)
            self._cond.notify()

    def _next_request(self) -> Request | None:
        with self._cond:
            while self._waiting:
                handle = self._waiting.popleft()
                if not handle.cancelled:
                    self._running[id(handle.request)] = handle
                    return handle.request
        return None

    def _loop(self) -> None:
        if self.threads:
            import numba

            numba.set_num_threads(self.threads)
        sched = self.scheduler
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._cancelled and not sched.active:
                    self._cond.wait()
                if self._stop:
                    sched.cancel_all()
                    return
                cancelled, self._cancelled = self._cancelled, []
            for handle in cancelled:
                sched.cancel(handle.request)
                self._running.pop(id(handle.request), None)
            try:
                for completion in sched.step(self._next_request):
                    handle = self._running.pop(id(completion.request), None)
                    if handle is not None and not handle.cancelled:
                        handle.deliver(Event("done", completion=completion))
            except Exception as e:  # noqa: BLE001 - one bad step fails its requests, not the server
                message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                sched.cancel_all()
                for handle in self._running.values():
                    if not handle.cancelled:
                        handle.deliver(Event("error", message=message))
                self._running.clear()
