"""The one thread that runs the model for the explorer (``analyze.py serve``).

    worker = ModelWorker(max_jobs=16)
    value = await worker.call(lambda: explorer.prompt_features("The file"))
    async for step in worker.stream(lambda: explorer.generation(request)):
        ...                                 # leaving the loop cancels the job

Everything that touches the model is a job: an iterator whose every ``next`` is one short
piece of model work (a prompt's forward pass, one decoding step). The worker takes one step
of each waiting job in turn, so a long generation in one tab does not hold up a prompt
typed in another: it loses one decoding step's time, not the whole generation's. A
background job (the first statistics scan of an SAE) steps only when no other job waits.
Only this thread ever runs the model, so no forward pass overlaps another and no request
needs a lock; a job that is cancelled (its client left, or pressed stop) is closed before
its next step, which runs its ``finally`` blocks (an intervention's hooks are removed there).
Requests that do not run the model (feature cards from the statistics cache) never wait
here.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from sae.errors import ConfigError


class Busy(ConfigError):
    """More jobs are waiting than the worker accepts."""


class _Job:
    def __init__(
        self,
        steps: Callable[[], Iterator[Any]],
        emit: Callable[[str, Any], None],
        background: bool = False,
    ):
        self.make, self.steps, self.emit = steps, None, emit
        self.background = background
        self.cancelled = threading.Event()

    def step(self) -> str | None:
        """Run one step; None while the job goes on, else how it ended: "done", "error"
        or "cancelled"."""
        if self.cancelled.is_set():
            self.close()
            return "cancelled"
        try:
            if self.steps is None:
                self.steps = iter(self.make())
            item = next(self.steps)
        except StopIteration:
            self.emit("done", None)
            return "done"
        except Exception as e:  # the request fails; the worker goes on
            self.emit("error", e)
            return "error"
        self.emit("item", item)
        return None

    def close(self) -> None:
        close = getattr(self.steps, "close", None)
        if close is not None:
            close()


class ModelWorker:
    """Round-robin runner of model jobs on one daemon thread (module docstring)."""

    def __init__(self, max_jobs: int = 16):
        self.max_jobs = max_jobs
        self._inbox: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._count = 0  # jobs accepted and not over (read and written under _lock)
        self.ended: collections.Counter[str] = collections.Counter()  # how jobs ended
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="sae-model", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Someone waits on a foreground job; a background job (a statistics scan) only
        # takes a step when no foreground job is waiting, so a prompt typed during a scan
        # waits for the rest of one scan batch, not for a turn behind it.
        queues = {False: collections.deque(), True: collections.deque()}
        while True:
            if not (queues[False] or queues[True]) or not self._inbox.empty():
                job = self._inbox.get()  # blocks only when idle
                if job is None:
                    return
                queues[job.background].append(job)
                continue
            active = queues[False] or queues[True]
            job = active.popleft()
            outcome = job.step()
            if outcome is None:
                active.append(job)
                continue
            with self._lock:
                self._count -= 1
                self.ended[outcome] += 1

    @property
    def jobs(self) -> int:
        """Jobs accepted and not over."""
        return self._count

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=10)

    def _submit(self, steps: Callable[[], Iterator[Any]], emit, background: bool = False) -> _Job:
        with self._lock:
            if self._count >= self.max_jobs:
                raise Busy(f"the model is busy with {self._count} requests; try again shortly")
            self._count += 1
        job = _Job(steps, emit, background)
        self._inbox.put(job)
        return job

    async def stream(self, steps: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
        """The items of the iterator ``steps()`` makes, each produced on the worker; an
        exception raised there is raised here; leaving early cancels the job."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        job = self._submit(
            steps, lambda kind, v: loop.call_soon_threadsafe(inbox.put_nowait, (kind, v))
        )
        try:
            while True:
                kind, value = await inbox.get()
                if kind == "done":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            job.cancelled.set()

    def background(self, steps: Callable[[], Iterator[Any]]) -> None:
        """Run ``steps()`` on the worker with nobody waiting on it, a step whenever no
        other job waits: its items and its end are dropped (it keeps its own record, as
        ``StatsScan`` does)."""
        self._submit(steps, lambda kind, value: None, background=True)

    async def call(self, fn: Callable[[], Any]) -> Any:
        """fn() run on the worker as a one-step job."""
        items = self.stream(lambda: iter((fn(),)))
        try:
            async for value in items:
                return value
        finally:
            await items.aclose()
        raise RuntimeError("the model job ended without a result")
