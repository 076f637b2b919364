"""Calls with many items: ordered streams (images and texts alike) and all-or-none batches.

``answer_in_order`` is the one implementation of a bidirectional embedding stream:
one answer per request, in request order, a bounded window of items in flight,
backpressure by reading more slowly, and a drain that answers what was admitted
before it ends the stream with UNAVAILABLE (SERVER_DRAINING).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

from clipvision.server.errors import Reason, ServiceUnavailableError

Request = TypeVar("Request")
Response = TypeVar("Response")
T = TypeVar("T")


class Drain(Protocol):
    """The server's drain state (models.ModelRegistry)."""

    @property
    def draining(self) -> bool:
        """Whether the server has started to drain."""

    async def wait_draining(self) -> None:
        """Return once the server starts to drain."""


class _Drained:
    """Put in a stream's queue when the server starts draining, to wake its writer."""


_DRAINED = _Drained()


def stream_drained() -> ServiceUnavailableError:
    """The status a draining server ends a stream with."""
    return ServiceUnavailableError(
        Reason.SERVER_DRAINING,
        "The server is shutting down; every request answered so far stands, send the rest to "
        "another replica.",
    )


class StreamItem(Generic[Response]):
    """One admitted request of a stream: the future of its outcome, how to answer it, and
    optionally a future the reader waits for before it reads on (backpressure for memory)."""

    __slots__ = ("admitted", "future", "respond")

    def __init__(
        self,
        future: asyncio.Future[Any],
        respond: Callable[[Any], Response],
        admitted: asyncio.Future[None] | None = None,
    ) -> None:
        self.future = future
        self.respond = respond
        self.admitted = admitted


async def answer_in_order(
    requests: AsyncIterator[Request],
    start: Callable[[Request], Awaitable[StreamItem[Response]]],
    *,
    window: int,
    drain: Drain,
) -> AsyncIterator[Response]:
    """Answer each request with ``respond`` of the outcome ``start`` sets going, in order.

    ``start`` returns once the item may start (waiting there is the stream's
    backpressure for capacity), with the future of its outcome, the function that
    turns that outcome (a result or an exception) into the response, and optionally
    a future the reader also waits for before it reads on (backpressure for memory).
    At most ``window`` items are in flight. When the server drains the reader stops,
    every admitted item is answered, then the stream ends with UNAVAILABLE.
    """
    loop = asyncio.get_running_loop()
    # Full queue = the reader waits = the server stops reading = HTTP/2 flow control
    # pushes back on the client. That is the stream's backpressure.
    pending: asyncio.Queue[StreamItem[Response] | _Drained | None] = asyncio.Queue(maxsize=window)

    async def read() -> None:
        try:
            async for request in requests:
                if drain.draining:
                    # Unanswered, so the client sends it elsewhere. No end marker: the
                    # writer must end with UNAVAILABLE, not as if the client were done.
                    return
                item = await start(request)
                # Not held while the next one is read: reading may wait for memory (the gate's
                # read room), and this request's bytes are counted only until it is answered.
                del request
                try:
                    await pending.put(item)
                except asyncio.CancelledError:
                    item.future.cancel()  # never answered, so it must not be computed
                    raise
                if item.admitted is not None:
                    await item.admitted
        except asyncio.CancelledError:
            raise
        except Exception:
            await pending.put(None)  # the writer answers what is admitted, then re-raises
            raise
        await pending.put(None)

    reader = loop.create_task(read(), name="stream-reader")
    drained = False

    async def watch_drain() -> None:
        # Stop reading, and wake the writer if it waits on an empty queue; when the
        # queue is not empty the writer sees `drained` before it waits again.
        nonlocal drained
        await drain.wait_draining()
        drained = True
        reader.cancel()
        with contextlib.suppress(asyncio.QueueFull):
            pending.put_nowait(_DRAINED)

    watcher = loop.create_task(watch_drain(), name="stream-drain")
    try:
        while True:
            if drained and pending.empty():
                # Everything admitted is answered: send the client to another replica.
                raise stream_drained()
            item = await pending.get()
            if item is None:
                break  # the client is done (a drain changes nothing then)
            if isinstance(item, _Drained):
                continue
            try:
                outcome = await item.future
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                outcome = exc
            yield item.respond(outcome)
        await reader  # re-raises a read failure
    finally:
        reader.cancel()
        watcher.cancel()
        while not pending.empty():
            leftover = pending.get_nowait()
            if isinstance(leftover, StreamItem):
                leftover.future.cancel()


def answered(response: T) -> asyncio.Future[T]:
    """A future already holding ``response``: an item answered without any work."""
    future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    future.set_result(response)
    return future
