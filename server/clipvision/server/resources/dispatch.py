"""Fair scheduling of blocking jobs (decodes) on a thread pool shared by every caller.

A thread pool's queue is FIFO: one caller that submits a thousand decodes makes
everyone else wait behind them. `FairDispatcher` keeps one queue per caller in
front of the pool, submits no more jobs than the pool has threads, and when a
thread frees up starts the next job of the caller that has been served least
(in job weight, such as decode bytes), so a caller of cheap images is not held
behind a caller of expensive ones.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")


class _Job:
    __slots__ = ("turn", "weight")

    def __init__(self, weight: int, turn: asyncio.Future[None]) -> None:
        self.weight = weight
        self.turn = turn


class FairDispatcher:
    """Runs jobs on ``executor``, ``slots`` at a time, the least-served caller's next first."""

    def __init__(self, executor: Executor, slots: int) -> None:
        self._executor = executor
        self._slots = slots
        self._running = 0
        self._queues: dict[str, collections.deque[_Job]] = {}
        # Weight served per caller with jobs queued or running; a caller that comes back
        # starts level with the least served, so being away earns it no credit.
        self._served: dict[str, int] = {}
        self._jobs: dict[str, int] = {}

    @property
    def running(self) -> int:
        """Jobs submitted to the executor and not finished."""
        return self._running

    async def run(
        self, caller: str, weight: int, job: Callable[[], T], on_done: Callable[[], None]
    ) -> T:
        """Run ``job`` in its fair turn and return its result.

        ``on_done`` is called once, when the job has finished in its thread or was dropped
        before it started: a caller that is cancelled meanwhile does not cut a job short,
        so whatever the job holds must be released there, not by the caller.
        """
        self._join(caller)
        try:
            await self._turn(caller, weight)
        except BaseException:
            self._leave(caller)
            on_done()
            raise
        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor, job)
        except BaseException:  # an executor shut down (the server stopping) runs nothing
            self._running -= 1
            self._leave(caller)
            on_done()
            self._next()
            raise

        def finished(done: asyncio.Future[T]) -> None:
            if not done.cancelled():
                done.exception()  # retrieved here, where a departed caller cannot
            self._running -= 1
            self._leave(caller)
            on_done()
            self._next()

        future.add_done_callback(finished)
        return await asyncio.shield(future)

    async def _turn(self, caller: str, weight: int) -> None:
        if self._running < self._slots and not self._queues:
            self._start(caller, weight)
            return
        job = _Job(weight, asyncio.get_running_loop().create_future())
        self._queues.setdefault(caller, collections.deque()).append(job)
        try:
            await job.turn
        except asyncio.CancelledError:
            if job.turn.done() and not job.turn.cancelled():
                self._running -= 1  # started just as we were cancelled: hand the slot on
                self._next()
            else:
                queue = self._queues.get(caller)
                if queue is not None and job in queue:  # else _next has dropped it already
                    queue.remove(job)
                    if not queue:
                        del self._queues[caller]
            raise

    def _start(self, caller: str, weight: int) -> None:
        self._running += 1
        self._served[caller] += weight

    def _next(self) -> None:
        while self._running < self._slots and self._queues:
            # Least served first; between equals, the caller with fewer jobs (a newcomer).
            caller = min(self._queues, key=lambda c: (self._served[c], self._jobs[c]))
            queue = self._queues[caller]
            job = queue.popleft()
            if not queue:
                del self._queues[caller]
            if not job.turn.done():
                self._start(caller, job.weight)
                job.turn.set_result(None)

    def _join(self, caller: str) -> None:
        if caller not in self._served:
            self._served[caller] = min(self._served.values(), default=0)
        self._jobs[caller] = self._jobs.get(caller, 0) + 1

    def _leave(self, caller: str) -> None:
        self._jobs[caller] -= 1
        if not self._jobs[caller]:
            del self._jobs[caller]
            del self._served[caller]
