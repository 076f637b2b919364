"""Fair scheduling of blocking jobs (decodes, tokenizing) on a thread pool shared by all callers.

A thread pool's queue is FIFO: one caller that submits a thousand decodes makes
everyone else wait behind them. `FairDispatcher` keeps one queue per caller in
front of the pool, keeps no more chunks in the pool than it has threads, and when
a thread frees up gives it the next jobs of the callers that have been served
least (in job weight, such as decode bytes), so a caller of cheap images is not
held behind a caller of expensive ones.

Jobs travel in chunks: whatever is queued when a thread frees up (up to
``max_chunk`` jobs and ``chunk_weight`` of weight, and no more than its share
when several threads are free) goes to that thread in one hand-over, and comes
back in one. A hand-over costs about 80 us of CPU (a thread wake-up each way and
the event loop's wake-up), more than a small image's whole decode, so under load
it is paid per chunk, not per job; an idle pool still starts a lone job at once.

Light jobs run one chunk at a time. A second thread pays only for work that lets go
of the GIL (Pillow's decoding and resampling, which grow with the pixels in and
out); a job that is mostly Python (a small image for a small crop, a text to
tokenize) holds it, so two such chunks side by side take turns on the GIL and only
add the cost of handing it over: 64 px JPEGs for the tests' 32 px model went at
0.67-1.0x the images/s on two threads as on one, for 1.4-2x the CPU per image (docs/
PERFORMANCE.md). The submitter says which jobs are light; another chunk goes out
beside running ones only when a queued job or a running chunk is not, or when the
running light chunk has held its thread for two time slices (a chunk stops between
jobs after one): a job judged light from its few bytes can still be slow (a large
image that compresses well), and the jobs behind it then wait two slices at most.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, Generic, TypeVar

T = TypeVar("T")

logger = logging.getLogger(__name__)


class JobDropped(RuntimeError):  # noqa: N818 (an outcome, not a fault)
    """The outcome of a job whose caller left before it started: it never ran."""


class Job(Generic[T]):
    """One queued job; ``FairDispatcher.drop`` takes it back while it has not started."""

    __slots__ = ("abandoned", "caller", "finish", "light", "queued", "weight", "work")

    def __init__(
        self,
        caller: str,
        weight: int,
        work: Callable[[], T],
        finish: Callable[[T | BaseException], None],
        abandoned: Callable[[], bool] | None,
        light: bool = False,
    ) -> None:
        self.caller = caller
        self.weight = weight
        self.work = work
        self.finish = finish
        self.abandoned = abandoned
        self.light = light
        self.queued = True


def _finish(job: Job[Any], outcome: Any) -> None:
    """Hand a job its outcome; a bug in one job's continuation must not stop the others'."""
    try:
        job.finish(outcome)
    except Exception:
        logger.exception("a job's continuation failed")


def _run_chunk(jobs: list[Job[Any]], slice_s: float) -> list[Any]:
    """Run the jobs in turn (in a worker thread); a job's exception is its outcome.

    After ``slice_s`` it stops between two jobs and returns the outcomes so far: the
    jobs it did not start go back to their queues, so one slow decode does not hold
    a chunk of other images (or another caller's turn) behind it.
    """
    outcomes: list[Any] = []
    deadline = time.perf_counter() + slice_s
    for job in jobs:
        # Whether its caller is still there: a read of a future's state, safe here.
        if job.abandoned is not None and job.abandoned():
            outcomes.append(JobDropped("the caller left before the job started"))
            continue
        try:
            outcomes.append(job.work())
        except Exception as exc:
            outcomes.append(exc)
        if time.perf_counter() > deadline:
            break
    return outcomes


class FairDispatcher:
    """Runs jobs on ``executor``, ``slots`` chunks at a time, least-served callers' jobs first."""

    def __init__(
        self,
        executor: Executor,
        slots: int,
        *,
        max_chunk: int = 16,
        chunk_weight: int = 8 << 20,
        slice_s: float = 0.005,
    ) -> None:
        self._executor = executor
        self._slots = slots
        self._max_chunk = max_chunk
        self._chunk_weight = chunk_weight
        self._slice_s = slice_s
        self._flush_pending = False
        self._running = 0  # chunks in the executor
        # When each running chunk of light jobs only started (time.monotonic()).
        self._light_started: list[float] = []
        self._spread_timer: asyncio.TimerHandle | None = None
        self._queued = 0  # jobs waiting for a chunk
        self._queued_heavy = 0  # of which jobs not light
        self._queues: dict[str, collections.deque[Job[Any]]] = {}
        # Weight served per caller with jobs queued or running (charged when a job goes
        # into a chunk); a caller that comes back starts level with the least served, not
        # counting what is still in chunks, so being away earns it no credit.
        self._served: dict[str, int] = {}
        self._in_chunks: dict[str, int] = {}
        self._jobs: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def running(self) -> int:
        """Chunks handed to the executor and not finished."""
        return self._running

    def submit(
        self,
        caller: str,
        weight: int,
        work: Callable[[], T],
        finish: Callable[[T | BaseException], None],
        abandoned: Callable[[], bool] | None = None,
        *,
        light: bool = False,
    ) -> Job[T]:
        """Queue ``work`` for ``caller``; ``finish`` gets its outcome on the event loop.

        ``light``: the work is mostly Python (it holds the GIL), so it runs in no chunk
        beside another chunk of light jobs.

        ``finish`` is called exactly once: with the result, the exception the work
        raised, or JobDropped when the job was dropped before it started (``drop``, or
        ``abandoned()`` true when its turn came, or the executor shut down). A job that
        has started always runs to its end.
        """
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if caller not in self._served:
            self._served[caller] = min(
                (served - self._in_chunks.get(c, 0) for c, served in self._served.items()),
                default=0,
            )
        self._jobs[caller] = self._jobs.get(caller, 0) + 1
        job = Job(caller, weight, work, finish, abandoned, light)
        self._queues.setdefault(caller, collections.deque()).append(job)
        self._queued += 1
        self._queued_heavy += not light
        if self._running < self._slots and not self._flush_pending:
            # Handed over at the end of this turn of the event loop, with whatever else
            # this turn submits (the images of one call, of calls that arrived together).
            self._flush_pending = True
            self._loop.call_soon(self._flush)
        return job

    def charge(self, caller: str, weight: int) -> None:
        """Count ``weight`` more as served to ``caller`` (what a job turned out to cost)."""
        if caller in self._served:
            self._served[caller] += weight

    def drop(self, job: Job[Any]) -> None:
        """Take back a job that has not started: its finish gets JobDropped now."""
        if not job.queued:
            return  # running or finished: it runs to its end
        queue = self._queues[job.caller]
        queue.remove(job)
        if not queue:
            del self._queues[job.caller]
        self._queued -= 1
        self._queued_heavy -= not job.light
        job.queued = False
        self._leave(job.caller)
        _finish(job, JobDropped("the caller left before the job started"))

    async def run(
        self, caller: str, weight: int, job: Callable[[], T], on_done: Callable[[], None]
    ) -> T:
        """Run ``job`` in its fair turn and return its result.

        ``on_done`` is called once, when the job has finished in its thread or was dropped
        before it started: a caller that is cancelled meanwhile does not cut a job short,
        so whatever the job holds must be released there, not by the caller.
        """
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()

        def finish(outcome: T | BaseException) -> None:
            on_done()
            if future.done():
                return
            if isinstance(outcome, JobDropped) and future.cancelled():
                return
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

        queued = self.submit(caller, weight, job, finish, future.done)
        try:
            return await future
        except asyncio.CancelledError:
            self.drop(queued)
            raise

    def _flush(self) -> None:
        self._flush_pending = False
        self._dispatch()

    def _dispatch(self) -> None:
        while self._running < self._slots and self._queued:
            if (
                self._running
                and len(self._light_started) == self._running
                and not self._queued_heavy
            ):
                # Light jobs beside light jobs would only take turns on the GIL, unless the
                # running ones have held their thread for two slices: then one job is slow.
                held = time.monotonic() - min(self._light_started)
                if held < 2 * self._slice_s:
                    self._spread_later(2 * self._slice_s - held)
                    break
            free = self._slots - self._running
            share = -(-self._queued // free)  # ceil: every free thread gets some
            chunk = self._take(min(self._max_chunk, share))
            if not chunk:
                continue  # only abandoned jobs were queued; they are finished now
            started = time.monotonic() if all(job.light for job in chunk) else None
            self._running += 1
            if started is not None:
                self._light_started.append(started)
            try:
                handed = self._executor.submit(_run_chunk, chunk, self._slice_s)
            except RuntimeError as exc:  # the executor has shut down: the server stops
                self._out_of_running(started)
                self._out_of_chunk(chunk)
                self._finish(chunk, [JobDropped(str(exc))] * len(chunk))
                continue
            handed.add_done_callback(
                functools.partial(self._from_worker, chunk=chunk, started=started)
            )

    def _out_of_running(self, started: float | None) -> None:
        self._running -= 1
        if started is not None:
            self._light_started.remove(started)

    def _spread_later(self, delay: float) -> None:
        """Look again once the running light chunk has held its thread for two slices."""
        if self._spread_timer is None and self._loop is not None:
            self._spread_timer = self._loop.call_later(delay, self._spread_due)

    def _spread_due(self) -> None:
        self._spread_timer = None
        self._dispatch()

    def _take(self, limit: int) -> list[Job[Any]]:
        """Up to ``limit`` jobs, least-served caller first, within the chunk weight."""
        chunk: list[Job[Any]] = []
        weight = 0
        while self._queues and len(chunk) < limit:
            # Least served first; between equals, the caller with fewer jobs (a newcomer).
            # One caller queued (a lone stream): it is the least served, no search.
            if len(self._queues) == 1:
                caller = next(iter(self._queues))
            else:
                caller = min(self._queues, key=lambda c: (self._served[c], self._jobs[c]))
            queue = self._queues[caller]
            job = queue[0]
            if chunk and weight + job.weight > self._chunk_weight:
                break
            queue.popleft()
            if not queue:
                del self._queues[caller]
            self._queued -= 1
            self._queued_heavy -= not job.light
            job.queued = False
            if job.abandoned is not None and job.abandoned():
                self._leave(caller)
                _finish(job, JobDropped("the caller left before the job started"))
                continue
            self._served[caller] += job.weight
            self._in_chunks[caller] = self._in_chunks.get(caller, 0) + job.weight
            weight += job.weight
            chunk.append(job)
        return chunk

    def _from_worker(
        self, handed: Future[list[Any]], chunk: list[Job[Any]], started: float | None
    ) -> None:
        # In the worker thread: hand the outcomes to the event loop in one wake-up.
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed loop: the process is exiting
            self._loop.call_soon_threadsafe(self._chunk_done, handed, chunk, started)

    def _chunk_done(
        self, handed: Future[list[Any]], chunk: list[Job[Any]], started: float | None
    ) -> None:
        self._out_of_running(started)
        self._out_of_chunk(chunk)
        if handed.cancelled():
            outcomes: list[Any] = [JobDropped("the executor shut down")] * len(chunk)
        else:
            error = handed.exception()
            outcomes = handed.result() if error is None else [error] * len(chunk)
        done = len(outcomes)
        if done < len(chunk):
            self._requeue(chunk[done:])
        self._finish(chunk[:done], outcomes)
        self._dispatch()

    def _out_of_chunk(self, chunk: list[Job[Any]]) -> None:
        for job in chunk:
            left = self._in_chunks.get(job.caller, 0) - job.weight
            if left > 0:
                self._in_chunks[job.caller] = left
            else:
                self._in_chunks.pop(job.caller, None)

    def _requeue(self, jobs: list[Job[Any]]) -> None:
        """Put jobs a worker did not start back at the head of their callers' queues."""
        for job in reversed(jobs):
            self._served[job.caller] -= job.weight
            self._queues.setdefault(job.caller, collections.deque()).appendleft(job)
            job.queued = True
            self._queued += 1
            self._queued_heavy += not job.light

    def _finish(self, chunk: list[Job[Any]], outcomes: list[Any]) -> None:
        for job, outcome in zip(chunk, outcomes, strict=True):
            self._leave(job.caller)
            _finish(job, outcome)

    def _leave(self, caller: str) -> None:
        self._jobs[caller] -= 1
        if not self._jobs[caller]:
            del self._jobs[caller]
            del self._served[caller]
