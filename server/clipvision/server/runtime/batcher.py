"""Continuous batching: whatever is queued when the device frees up forms the next batch.

One class batches both modalities: it takes the batch function it runs on the
device thread (images: stack, forward, copy; texts: pad, forward, copy), one
executor hop per batch. All batchers share the one device thread, whose FIFO
alternates between them, so neither modality starves the other.

There is no timer by default: while the device works on one batch, new items
queue up (their preprocessing overlapping the forward pass), and they all go
together as soon as it is free. Admission is bounded and fair between callers
(admission.FairPool): unary callers are refused when the model's capacity is taken,
unless another caller holds more than its share, which they wait for briefly;
streams wait for room. Batches are filled round-robin from per-caller queues, so
one caller's backlog does not delay everyone else's images by whole batches.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

from clipvision.server.errors import ClipVisionError, InternalError, OverloadedError, Reason
from clipvision.server.resources.admission import BudgetObserver, FairPool
from clipvision.server.runtime.image_encoder import FloatArray, l2_normalize_rows

Modality = Literal["image", "text"]
Payload = TypeVar("Payload")

logger = logging.getLogger(__name__)


class BatchObserver(Protocol):
    """Receives what the batcher does, for metrics."""

    def on_batch(self, model: str, size: int, seconds: float, modality: Modality = "image") -> None:
        """A batch of ``size`` items took ``seconds`` on the device (forward and copy)."""


@dataclass(frozen=True)
class Embedded:
    """One item's raw features and where its time went in the batcher."""

    features: FloatArray
    normalized: FloatArray
    """The features scaled to unit length (computed per batch on the device thread)."""
    queue_s: float
    """From submission to the start of the batch it went in."""
    inference_s: float
    """Device time of that batch (forward and copy to host), which the image shared."""


Delivery = Callable[[Embedded | BaseException], None]


class _Item(Generic[Payload]):
    """One queued item: its payload, where its result goes, and whether anyone still waits."""

    __slots__ = ("deliver", "enqueued", "gone", "payload")

    def __init__(
        self, payload: Payload, deliver: Delivery, gone: Callable[[], bool], enqueued: float
    ) -> None:
        self.payload = payload
        self.deliver = deliver
        self.gone = gone
        # perf_counter() at submission: the queue wait is measured per item, not per batch.
        self.enqueued = enqueued


class MicroBatcher(Generic[Payload]):
    """Queues prepared items of one model and modality and runs them through the device.

    ``run_batch`` turns a list of payloads into one row of float32 features per
    payload; it runs on ``device_executor``. One future per item; items whose
    caller has gone (a cancelled future, which is what a passed deadline or a
    client cancellation leaves) are dropped before compute; a batch that fails is
    retried item by item so that only the guilty item fails; the number of
    outputs is checked against the number of inputs.
    """

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[Payload]], FloatArray],
        device_executor: Executor,
        *,
        modality: Modality = "image",
        max_batch_size: int,
        max_batch_delay_s: float = 0.0,
        max_queue_size: int = 256,
        observer: BatchObserver | None = None,
        admission_observer: BudgetObserver | None = None,
    ) -> None:
        self.name = name
        self.modality = modality
        self._run_batch = run_batch
        self._executor = device_executor
        self._max_batch_size = max_batch_size
        self._max_batch_delay_s = max_batch_delay_s
        self._observer = observer
        self._admission_observer = admission_observer
        self.capacity = FairPool(max_queue_size)
        # One FIFO per caller, in round-robin order: a caller moves to the back once it
        # has put an image in a batch.
        self._queues: dict[str, collections.deque[_Item[Payload]]] = {}
        self._queued = 0
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._in_compute: list[_Item[Payload]] = []
        self.busy_since: float | None = None  # monotonic start of the batch on the device
        # Seconds per image on the device, smoothed: sizes the RetryInfo delay.
        self._seconds_per_image = 0.05

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(
                self._run(), name=f"batcher-{self.name}-{self.modality}"
            )

    async def stop(self) -> None:
        """Stop the loop; images queued or in compute are cancelled."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        queued = [item for queue in self._queues.values() for item in queue]
        self._queues.clear()
        self._queued = 0
        for item in [*self._in_compute, *queued]:
            if not item.gone():
                item.deliver(asyncio.CancelledError())

    @contextlib.asynccontextmanager
    async def admit(self, caller: str, count: int, wait_s: float) -> AsyncIterator[None]:
        """Admit ``count`` images of a unary call, or raise OverloadedError (QUEUE_FULL).

        Refused at once when the capacity is taken, unless ``caller`` is under its share
        while another caller is over it: then it waits up to ``wait_s``, first in line for
        what that caller gives back.
        """
        pool = self.capacity
        admitted = pool.try_take(caller, count)
        if not admitted and wait_s > 0 and pool.starved(caller, count):
            if self._admission_observer is not None:
                self._admission_observer.on_admission_wait("queue")
            admitted = await pool.take_within(caller, count, wait_s)
        if not admitted:
            if self._admission_observer is not None:
                self._admission_observer.on_admission_refused(Reason.QUEUE_FULL.value)
            retry_after = max(0.05, pool.used * self._seconds_per_image)
            raise OverloadedError(
                Reason.QUEUE_FULL,
                f"Model {self.name!r} has {pool.used} {self.modality}s in flight, its "
                f"limit is {pool.limit}; retry after {retry_after:.2f} s or on "
                "another replica.",
                retry_after_s=retry_after,
            )
        try:
            yield
        finally:
            pool.give(caller, count)

    async def reserve(self, caller: str, count: int = 1) -> None:
        """Admit ``count`` items of ``caller``, waiting for room in fair order (backpressure).

        Every reservation must be matched by one ``release`` of the same count.
        """
        if not self.capacity.try_take(caller, count):
            if self._admission_observer is not None:
                self._admission_observer.on_admission_wait("queue")
            await self.capacity.take(caller, count)

    def release(self, caller: str, count: int = 1) -> None:
        """Give back the room of ``count`` items admitted with ``reserve``."""
        self.capacity.give(caller, count)

    async def submit(self, payload: Payload, caller: str = "") -> Embedded:
        """Embed one prepared item; returns its raw projected features and timings."""
        future: asyncio.Future[Embedded] = asyncio.get_running_loop().create_future()
        self.put(payload, caller, functools.partial(_settle, future), future.done)
        return await future

    def put(
        self, payload: Payload, caller: str, deliver: Delivery, gone: Callable[[], bool]
    ) -> None:
        """Queue one prepared item without waiting: ``deliver`` gets its Embedded (or the
        exception it failed with) on the event loop, once; an item for which ``gone()``
        is true when its batch forms is dropped unseen, and delivered nothing."""
        item = _Item(payload, deliver, gone, time.perf_counter())
        self._queues.setdefault(caller, collections.deque()).append(item)
        self._queued += 1
        self._arrived.set()

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch:
                self._in_compute = batch
                try:
                    await self._compute(batch)
                finally:
                    self._in_compute = []

    async def _next_batch(self) -> list[_Item[Payload]]:
        while not self._queued:
            self._arrived.clear()
            await self._arrived.wait()
        if self._max_batch_delay_s > 0:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._max_batch_delay_s
            while self._queued < self._max_batch_size:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), timeout)
                except TimeoutError:
                    break
        batch = self._take(self._max_batch_size)
        # A caller that cancelled (or whose deadline passed) costs no compute.
        return [item for item in batch if not item.gone()]

    def _take(self, size: int) -> list[_Item[Payload]]:
        """Up to ``size`` items, one per caller in turn (round-robin across batches too)."""
        batch: list[_Item[Payload]] = []
        while len(batch) < size and self._queues:
            for caller in list(self._queues):
                if len(batch) == size:
                    break
                queue = self._queues.pop(caller)
                batch.append(queue.popleft())
                if queue:
                    self._queues[caller] = queue  # to the back of the round
        self._queued -= len(batch)
        return batch

    async def _compute(self, batch: list[_Item[Payload]]) -> None:
        started = time.perf_counter()
        try:
            rows, normalized, seconds = await self._embed([item.payload for item in batch])
        except Exception as exc:
            if len(batch) == 1:
                if isinstance(exc, ClipVisionError):
                    # The item's own fault, found on the device thread (a JPEG that only the
                    # CPU could decode and cannot): answered with its reason, as elsewhere.
                    _fail(batch[0], exc)
                    return
                logger.exception(
                    "forward pass failed for one %s of model %s", self.modality, self.name
                )
                _fail(
                    batch[0],
                    InternalError(Reason.INTERNAL, f"The model failed on this {self.modality}."),
                )
                return
            logger.warning(
                "a batch of %d %ss failed; retrying one by one",
                len(batch),
                self.modality,
                exc_info=True,
            )
            for item in batch:
                if not item.gone():
                    await self._compute([item])
            return
        for item, row, unit in zip(batch, rows, normalized, strict=True):
            if not item.gone():
                _deliver(item, Embedded(row, unit, started - item.enqueued, seconds))

    async def _embed(self, payloads: list[Payload]) -> tuple[FloatArray, FloatArray, float]:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        self.busy_since = time.monotonic()
        try:
            # Forward, copy and normalization in one hop of the device thread.
            rows, normalized = await loop.run_in_executor(self._executor, self._forward, payloads)
        finally:
            self.busy_since = None
        seconds = time.perf_counter() - started
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * seconds / len(payloads)
        if self._observer is not None:
            self._observer.on_batch(self.name, len(payloads), seconds, self.modality)
        return rows, normalized, seconds

    def _forward(self, payloads: list[Payload]) -> tuple[FloatArray, FloatArray]:
        """On the device thread: the batch's raw rows, checked, and the same rows normalized
        (one numpy pass per batch instead of one per item on the event loop)."""
        rows = self._run_batch(payloads)
        if rows.ndim != 2 or rows.shape[0] != len(payloads):
            raise RuntimeError(
                f"the model returned {rows.shape[0] if rows.ndim else 0} rows for "
                f"{len(payloads)} {self.modality}s"
            )
        return rows, l2_normalize_rows(rows)


def _fail(item: _Item[Payload], error: Exception) -> None:
    if not item.gone():
        _deliver(item, error)


def _deliver(item: _Item[Payload], outcome: Embedded | BaseException) -> None:
    """Hand an item its outcome; a bug in one item's continuation must not stop the batch."""
    try:
        item.deliver(outcome)
    except Exception:
        logger.exception("delivering a batch result failed")


def _settle(future: asyncio.Future[Embedded], outcome: Embedded | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, asyncio.CancelledError):
        future.cancel()
    elif isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
