"""The bookkeeping of an embedding stream: what is in flight, in input order.

Both clients drive an EmbedImageStream or an EmbedTextStream the same way:
pull inputs until the window is full, then hand out results oldest first. An
input the client refused before sending (an unreadable file, a text UTF-8
cannot encode) holds its place in the window as an error, so results come out
in input order whatever happened to each one.

The window keeps each request until it is answered, so that when the stream
breaks (a replica killed, or draining and ending the stream with UNAVAILABLE)
the client can send exactly the unanswered requests again on a new stream.
Answered requests have left the window: nothing is yielded twice, and an
in-band error is an answer, so it is never retried.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

import grpc

from clipvision.client._errors import (
    ClipVisionError,
    error_from_item,
    error_from_rpc_error,
    error_from_status,
)
from clipvision.v1 import embedding_service_pb2 as pb

logger = logging.getLogger("clipvision.client")
# Pause before the n-th consecutive restart: none for the first (a draining replica's
# peers are up), then doubling, so a cluster that is down is not hammered.
RESTART_BACKOFF_S = (0.0, 0.25, 0.5, 1.0, 2.0)
# What grpc.aio reports, instead of the server's status, when it was sending a request
# on a stream that the server had just ended (a draining replica ending the stream
# with UNAVAILABLE): a local failure, not a verdict of the server.
_AIO_SEND_FAILED = "Internal error from Core"

RequestT = TypeVar("RequestT", pb.EmbedImageStreamRequest, pb.EmbedTextStreamRequest)
ResponseT = TypeVar("ResponseT", pb.EmbedImageStreamResponse, pb.EmbedTextStreamResponse)
ValueT = TypeVar("ValueT")


class StreamWindow(Generic[RequestT, ResponseT, ValueT]):
    """The inputs of one stream that have no result yet, oldest first, at most ``size`` of them.

    ``method`` and ``noun`` ("EmbedImageStream", "images") name the stream in
    errors and logs; ``value`` turns an answered embedding into what the caller
    gets (a vector, a TextEmbedding).
    """

    def __init__(
        self, size: int, method: str, noun: str, value: Callable[[pb.Embedding], ValueT]
    ) -> None:
        if size < 1:
            raise ValueError("the stream window must be at least 1")
        self._size = size
        self.method = method
        self.noun = noun
        self._value = value
        self._pending: deque[RequestT | ClipVisionError] = deque()
        self._sent = 0

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def full(self) -> bool:
        """Whether the window holds as many inputs as it may."""
        return len(self._pending) >= self._size

    def add(self, request: RequestT | ClipVisionError) -> RequestT | None:
        """Take the next input's request, or the client's error for it; returns the request,
        numbered, to send, or None for a refused input."""
        self._pending.append(request)
        if isinstance(request, ClipVisionError):
            return None
        request.id = str(self._sent)
        self._sent += 1
        return request

    def unanswered_requests(self) -> list[RequestT]:
        """The requests sent and not yet answered, oldest first: what a new stream re-sends."""
        return [entry for entry in self._pending if not isinstance(entry, ClipVisionError)]

    def pop_refused(self) -> ClipVisionError | None:
        """The oldest input's error if the client refused it; it leaves the window."""
        head = self._pending[0] if self._pending else None
        if isinstance(head, ClipVisionError):
            self._pending.popleft()
            return head
        return None

    def match(self, response: ResponseT) -> ValueT | ClipVisionError:
        """The result of the oldest input, which ``response`` must answer."""
        head = self._pending.popleft() if self._pending else None
        expected = None if head is None or isinstance(head, ClipVisionError) else head.id
        if response.id != expected:
            raise error_from_status(
                grpc.StatusCode.INTERNAL,
                "STREAM_OUT_OF_ORDER",
                f"The server answered request {response.id!r} when {expected!r} was due; it "
                f"breaks the {self.method} contract.",
            )
        if response.HasField("error"):
            return error_from_item(response.error)
        return self._value(response.embedding)

    def unanswered(self) -> ClipVisionError:
        """The error for a stream that ended while requests were still due."""
        return error_from_status(
            grpc.StatusCode.INTERNAL,
            "STREAM_INCOMPLETE",
            f"The server closed the stream with {len(self._pending)} {self.noun} unanswered; it "
            f"breaks the {self.method} contract.",
        )


class StreamRestarts:
    """When a broken stream may be resumed on a new one, and how long to wait first.

    Only UNAVAILABLE is resumed: it is what a killed or unreachable replica, a
    closed connection and a draining server produce, and every request on the
    stream is idempotent. (So is grpc.aio's local "Internal error from Core",
    which replaces UNAVAILABLE when a request was being sent as the server ended
    the stream.) ``limit`` bounds consecutive restarts: any answer
    resets the count, so a long ingestion survives any number of rolling
    restarts and connection-age rotations, but not a cluster that stays down.
    """

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("max_stream_restarts must not be negative")
        self.limit = limit
        self._consecutive = 0

    def answered(self) -> None:
        """A response arrived: the stream is making progress."""
        self._consecutive = 0

    def next_delay(
        self, error: grpc.RpcError, window: StreamWindow[RequestT, ResponseT, ValueT]
    ) -> float | None:
        """Seconds to wait before resuming after ``error``, or None to give up and raise it."""
        # The asyncio client's AioRpcError is not a grpc.Call, but has the same accessors.
        call = error if isinstance(error, grpc.Call | grpc.aio.AioRpcError) else None
        if call is None or not _broken_stream(call) or self._consecutive >= self.limit:
            return None
        delay = RESTART_BACKOFF_S[min(self._consecutive, len(RESTART_BACKOFF_S) - 1)]
        self._consecutive += 1
        logger.warning(
            "%s broke (%s: %s); resuming on a new stream with %d "
            "unanswered %s (restart %d of at most %d in a row)",
            window.method,
            call.code().name,
            call.details(),
            len(window.unanswered_requests()),
            window.noun,
            self._consecutive,
            self.limit,
        )
        return delay


def _broken_stream(call: grpc.Call | grpc.aio.AioRpcError) -> bool:
    code = call.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    return code == grpc.StatusCode.INTERNAL and call.details() == _AIO_SEND_FAILED


def stream_error(error: grpc.RpcError) -> ClipVisionError:
    """The exception for a stream that broke for good (restarts spent or turned off).

    grpc.aio's local "Internal error from Core" stands for the status it hid: the
    server ended the stream (draining, most likely), so it is reported as
    UNAVAILABLE, which is what the caller can act on, rather than as a server bug.
    """
    if isinstance(error, grpc.Call | grpc.aio.AioRpcError) and (
        error.code() == grpc.StatusCode.INTERNAL and error.details() == _AIO_SEND_FAILED
    ):
        return error_from_status(
            grpc.StatusCode.UNAVAILABLE,
            "STREAM_BROKEN",
            "The server ended the stream while a request was being sent (it may be draining); "
            "retry on another replica.",
        )
    return error_from_rpc_error(error)
