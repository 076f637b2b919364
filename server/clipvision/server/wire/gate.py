"""The call gate: what every call passes before any handler runs, for every service on the port.

gRPC's own admission is one pool for everything and reads a unary request
with no time limit, so idle streams, health watches or half-sent messages could
hold every slot. The gate instead:

- refuses a call without the bearer token (when one is set) from its headers
  alone, before it holds a slot or a byte of its message is read;
- keeps separate pools for unary calls, streams and health watches, each
  bounded in all and per connection; health checks (grpc.health.v1's Check, and
  the Open Inference Protocol's ServerLive and ServerReady) need no slot and no
  token, so probes are always answered. When a pool is full, the holder idle the
  longest (a call still waiting for its message, a stream that neither sends nor
  receives) makes room, never a call that is working;
- reads a unary request message itself, within ``read_timeout_s``, and parses
  every request message itself, so a missing, truncated or malformed message
  gets INVALID_ARGUMENT with a plain message instead of silence or a Python
  exception's text;
- ends streams idle for ``stream_idle_timeout_s``;
- counts every refusal by method, status and reason, and logs it at a bounded rate.

To do this it hands grpc a request-streaming handler with raw bytes in place of
each handler, and calls the real one with the parsed request.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import grpc

from clipvision.server.api.call_context import caller_of
from clipvision.server.errors import (
    ClipVisionError,
    InvalidRequestError,
    MethodNotFoundError,
    OverloadedError,
    Reason,
    RequestTimeoutError,
    ServiceUnavailableError,
)
from clipvision.server.ops.auth import BearerToken
from clipvision.server.ops.calls import GateMark, open_gate_mark
from clipvision.server.ops.logs import RateLimitedLog
from clipvision.server.ops.metrics import ServerMetrics
from clipvision.server.resources.admission import MemoryBudget, ReadHold
from clipvision.server.wire.interceptors import HandlerCache, abort, rich_status
from clipvision.server.wire.slots import Slot, SlotPool

logger = logging.getLogger(__name__)

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
# What a probe asks (no slot, no token, the probes' read room): grpc's health check, and the
# Open Inference Protocol's liveness and readiness, which HTTP serves as probes too
# (GET /v2/health/live and /ready). ModelReady is an ordinary call on both.
PROBES = frozenset(
    {
        HEALTH_CHECK,
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
    }
)
UNKNOWN_METHOD = "unknown"

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]


class CallKind(Enum):
    """Which pool a call is counted in."""

    PROBE = "probe"
    WATCH = "watch"
    UNARY = "unary"
    STREAM = "stream"


# The calls that need no token, and read their request in the probes' room.
_HEALTH = (CallKind.PROBE, CallKind.WATCH)
# The largest request such a call may send: a health request names a service (a few dozen
# bytes), OIP's liveness and readiness requests are empty. A watch keeps its request's room
# for as long as it watches, so without a cap a caller without the token could fill the
# probes' room with a few watches naming megabyte-long services.
HEALTH_REQUEST_BYTES = 4096


@dataclass(frozen=True)
class GateLimits:
    """How many calls of each kind, and how long a caller may take to send its request."""

    max_calls: int = 256
    max_calls_per_connection: int = 64
    max_streams: int = 128
    max_streams_per_connection: int = 16
    max_watches: int = 64
    max_watches_per_connection: int = 4
    read_timeout_s: float = 10.0
    stream_idle_timeout_s: float = 300.0
    # When a pool is full, a call that has waited this long for its request message, or a
    # stream idle this long, is ended to make room; legitimate callers are never that slow.
    evict_reading_after_s: float = 1.0
    evict_idle_stream_after_s: float = 10.0
    # Whether clients may present certificates (mutual TLS): without, a caller is its
    # connection, and gRPC core is not asked for identities on every call.
    client_certificates: bool = True


@dataclass(eq=False)  # compared and hashed by identity: the gate keys calls in dicts
class _Call:
    """One guarded call: its slot, its task, and the error it was ended with, if evicted."""

    label: str
    task: asyncio.Task[Any] | None
    mark: GateMark
    kind: CallKind
    slot: Slot | None = None
    ended_with: ClipVisionError | None = None


class CallGate(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """The first interceptor: authentication, call slots, and reading and parsing requests."""

    def __init__(
        self,
        limits: GateLimits,
        metrics: ServerMetrics | None = None,
        token: str | None = None,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.limits = limits
        self._metrics = metrics
        # Request messages are read only against room in the memory budget's read room.
        self._budget = budget
        # Calls whose read is pending while they hold read room: the monotonic time it began.
        self._reading: dict[_Call, float] = {}
        self._token = BearerToken(token) if token else None
        self.pools = {
            CallKind.UNARY: SlotPool(
                "unary",
                limits.max_calls,
                limits.max_calls_per_connection,
                limits.evict_reading_after_s,
            ),
            CallKind.STREAM: SlotPool(
                "stream",
                limits.max_streams,
                limits.max_streams_per_connection,
                limits.evict_idle_stream_after_s,
            ),
            # Watches are idle by nature: the oldest makes room for a new one.
            CallKind.WATCH: SlotPool(
                "watch", limits.max_watches, limits.max_watches_per_connection, 0.0
            ),
        }
        self._log = RateLimitedLog(logger)
        # A guarded handler keeps each call's state in the call, not in itself.
        self._guarded_handlers = HandlerCache(
            lambda handler, method: self._guarded(handler, _kind(method, handler), method)
        )
        self._sweeper: asyncio.Task[None] | None = None
        if metrics is not None:
            metrics.watch_call_slots({pool.name: pool for pool in self.pools.values()})

    def start(self) -> None:
        """Start ending streams that stay idle too long (and readers holding room others need)."""
        if self._sweeper is None and (
            self.limits.stream_idle_timeout_s > 0 or self._budget is not None
        ):
            self._sweeper = asyncio.get_running_loop().create_task(
                self._sweep(), name="call-gate-sweeper"
            )

    async def stop(self) -> None:
        """Stop the sweeper."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def _sweep(self) -> None:
        timeout = self.limits.stream_idle_timeout_s
        interval = min(1.0, timeout / 4) if timeout > 0 else 1.0
        while True:
            await asyncio.sleep(interval)
            if timeout > 0:
                self.pools[CallKind.STREAM].evict_idle(timeout)
            self._make_read_room(probe=False)
            self._make_read_room(probe=True)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            # The path is the caller's: never a metrics label or a log line as is.
            return self._refusal_handler(
                UNKNOWN_METHOD,
                MethodNotFoundError(
                    Reason.METHOD_NOT_FOUND,
                    "This server has no such method; reflection lists the ones it has.",
                ),
            )
        kind = _kind(method, handler)
        if self._token is not None and kind not in _HEALTH:
            refusal = self._token.refusal(handler_call_details.invocation_metadata or ())
            if refusal is not None:
                return self._refusal_handler(method, refusal)
        return self._guarded_handlers.get(handler, method)

    def refuse_unregistered(self) -> grpc.Status:
        """Count and log (at a bounded rate) a call on a path no service registered, which the
        listener answers before grpc reads the path; returns the status it answers with."""
        error = MethodNotFoundError(
            Reason.METHOD_NOT_FOUND,
            "This server has no such method; reflection lists the ones it has.",
        )
        status = rich_status(error)
        if self._metrics is not None:
            self._metrics.on_refused(UNKNOWN_METHOD, status.code.name, error.reason.value)
        self._log.log(
            logging.INFO,
            f"{UNKNOWN_METHOD} {error.reason.value}",
            "a call on an unregistered path refused: %s %s",
            status.code.name,
            error.reason.value,
        )
        return status

    # -- handlers ---------------------------------------------------------------------------

    def _refusal_handler(self, label: str, error: ClipVisionError) -> Handler:
        async def refuse(request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await self._refuse(context, label, error)

        return grpc.stream_unary_rpc_method_handler(refuse)

    def _guarded(self, handler: Handler, kind: CallKind, label: str) -> Handler:
        deserialize = handler.request_deserializer
        serializer = handler.response_serializer
        behaviour: Any
        if handler.request_streaming:
            behaviour = (
                handler.stream_stream if handler.response_streaming else handler.stream_unary
            )
        else:
            behaviour = handler.unary_stream if handler.response_streaming else handler.unary_unary

        async def request_of(
            call: _Call, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> Any:
            if handler.request_streaming:
                return self._messages(call, request_iterator, deserialize, context)
            return await self._read(call, context, deserialize)

        if not handler.response_streaming:

            async def unary_response(
                request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> Any:
                async with self._admitted(kind, label, context) as call:
                    request = await request_of(call, request_iterator, context)
                    return await behaviour(request, context)

            return grpc.stream_unary_rpc_method_handler(
                unary_response, response_serializer=serializer
            )

        if inspect.isasyncgenfunction(behaviour):

            async def stream_response(
                request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                async with self._admitted(kind, label, context) as call:
                    request = await request_of(call, request_iterator, context)
                    async for response in behaviour(request, context):
                        if call.slot is not None:
                            call.slot.touch()
                        yield response

            return grpc.stream_stream_rpc_method_handler(
                stream_response, response_serializer=serializer
            )

        # Reader/writer style (grpc's health Watch): a coroutine that writes through context.
        async def written_response(
            request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> None:
            async with self._admitted(kind, label, context) as call:
                request = await request_of(call, request_iterator, context)
                await behaviour(request, context)

        return grpc.stream_stream_rpc_method_handler(
            written_response, response_serializer=serializer
        )

    # -- admission, reading, parsing ------------------------------------------------------

    def _admitted(
        self, kind: CallKind, label: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> _Admission:
        """Hold a slot of ``kind``'s pool for the call; end it with its error if evicted."""
        return _Admission(self, kind, label, context)

    async def _enter(
        self, kind: CallKind, label: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> _Call:
        call = _Call(label, asyncio.current_task(), open_gate_mark(), kind)
        pool = self.pools.get(kind)
        if pool is not None:
            call.slot = pool.acquire(context.peer(), lambda: self._evict(call, kind))
            if call.slot is None:
                await self._refuse(context, label, _full(pool))
        return call

    async def _exit(
        self,
        call: _Call,
        context: grpc.aio.ServicerContext[Any, Any],
        error: BaseException | None,
    ) -> bool:
        """Whatever the call ended with: give back its slot and read room, and answer an
        evicted call or a reading or parsing fault with its status (True: handled)."""
        try:
            if isinstance(error, asyncio.CancelledError):
                if call.ended_with is None:
                    return False  # the caller cancelled, or the server is stopping
                if call.task is not None:
                    call.task.uncancel()
                await self._refuse(context, call.label, call.ended_with)
                return True
            if isinstance(error, ClipVisionError):
                # From reading or parsing; EmbeddingService maps its own errors before here.
                error.__traceback__ = None  # grpc keeps the abort in a cycle with the call
                await self._refuse(context, call.label, error)
                return True
            return False
        finally:
            self._reading.pop(call, None)
            _release_unclaimed(call)
            if call.slot is not None:
                call.slot.release()

    def _evict(self, call: _Call, kind: CallKind) -> None:
        if call.ended_with is not None or call.task is None or call.task.done():
            return
        if kind in (CallKind.UNARY, CallKind.PROBE):  # a probe is evicted only while reading
            call.ended_with = RequestTimeoutError(
                Reason.REQUEST_READ_TIMEOUT,
                "The call was ended because its request message had not arrived and others "
                "needed its slot; send the message right after the call starts.",
            )
        else:
            call.ended_with = ServiceUnavailableError(
                Reason.STREAM_IDLE,
                "The stream was idle (no message either way) and was ended to free its slot; "
                "open a new one when you have work.",
            )
        call.mark.ended_by_gate = True
        call.task.cancel()

    async def _read(
        self,
        call: _Call,
        context: grpc.aio.ServicerContext[Any, Any],
        deserialize: Callable[[bytes], Any] | None,
    ) -> Any:
        timeout = self.limits.read_timeout_s
        hold = await self._reserve_read(call, context, timeout)
        # Given back when the call ends, whatever happens, unless the handler takes it over.
        call.mark.read_hold = hold
        # A timer that ends the call as an eviction does (_admitted answers with the error):
        # one loop timer (asyncio.timeout's context manager showed in the loop's profile).
        timer = asyncio.get_running_loop().call_later(timeout, self._read_expired, call)
        try:
            raw = await context.read()
        finally:
            timer.cancel()
            self._reading.pop(call, None)
        if raw is grpc.aio.EOF:  # type: ignore[attr-defined]  # grpc-stubs predates it
            raise InvalidRequestError(
                Reason.REQUEST_MISSING,
                "The call ended without a complete request message (none, truncated, or over "
                "the size limit); send exactly one message.",
            )
        if call.kind in _HEALTH and len(raw) > HEALTH_REQUEST_BYTES:
            raise InvalidRequestError(
                Reason.REQUEST_TOO_LARGE,
                f"A health request is at most {HEALTH_REQUEST_BYTES} bytes (it names a "
                f"service); this one has {len(raw)}.",
            )
        if call.slot is not None:
            call.slot.set_idle(False)
        if hold is not None:
            # The raw bytes and the message parsed from them, until the handler's items are
            # admitted (it takes the hold over) or the call ends.
            hold.shrink(2 * len(raw))
        return _parse(raw, deserialize)

    def _read_expired(self, call: _Call) -> None:
        if call.ended_with is not None or call.task is None or call.task.done():
            return
        call.ended_with = RequestTimeoutError(
            Reason.REQUEST_READ_TIMEOUT,
            f"The request message did not arrive within {self.limits.read_timeout_s:g} s of "
            "the call's start; send it right after the call starts.",
        )
        call.mark.ended_by_gate = True
        call.task.cancel()

    async def _messages(
        self,
        call: _Call,
        request_iterator: AsyncIterator[bytes],
        deserialize: Any,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[Any]:
        while True:
            # The last message's room, unless its item took it over.
            _release_unclaimed(call)
            hold = await self._reserve_read(call, context, None)
            try:
                # Not through grpc's request iterator: its generator keeps the last message it
                # yielded until asked for the next, which may wait long for room; so each
                # waiting stream kept a message outside the budget (20 MB images: 2.5 GiB for
                # 128 streams). It also warned, collected never awaited, if the stream was
                # cancelled while waiting for room.
                raw = await context.read()
            except BaseException:
                # Cancelled or failed: given back here, not left on the call, since a stream's
                # handler may read in a task of its own that ends after the call, when
                # nothing would give it back any more.
                if hold is not None:
                    hold.release()
                raise
            finally:
                self._reading.pop(call, None)
            if raw is grpc.aio.EOF:  # type: ignore[attr-defined]  # grpc-stubs predates it
                if hold is not None:
                    hold.release()
                return
            if hold is not None:
                # Taken over by the handler's item, or given back at the next read (or when
                # the call ends, if anything below fails).
                call.mark.read_hold = hold
            if call.slot is not None:
                call.slot.touch()
            if hold is not None:
                hold.shrink(2 * len(raw))
            message = _parse(raw, deserialize)
            # Not held while the handler works on the message: an image stream's raw bytes
            # would otherwise stay in memory beside the parsed copy until the next one.
            del raw
            yield message
            # Nor once handed over: the next read may wait long for room, and a stream holding
            # its last message meanwhile holds it outside the budget (its item's admission
            # gave those bytes back when it was answered).
            del message

    async def _reserve_read(
        self, call: _Call, context: grpc.aio.ServicerContext[Any, Any], wait_s: float | None
    ) -> ReadHold | None:
        """Room in the memory budget for the largest message, before grpc receives one.

        A unary call waits at most ``wait_s`` (then MEMORY_BUDGET_FULL); a stream waits as
        long as it takes (it stops reading: backpressure). Waiting, it first makes room by
        ending the call that has waited longest for a message while holding room. Health
        checks and watches read in a room of their own, which streams holding the read room
        cannot fill, and which they, needing no token, cannot take from anyone else.
        """
        if self._budget is None:
            return None
        caller = caller_of(context, self.limits.client_certificates)
        probe = call.kind in _HEALTH
        hold = self._budget.try_reserve_read(caller, probe)
        if hold is None:
            self._make_read_room(probe)
            hold = await self._budget.reserve_read(caller, wait_s, probe)
        self._reading[call] = time.monotonic()
        return hold

    def _make_read_room(self, probe: bool) -> None:
        """While someone waits for read room (the probes' own, or everyone else's), end the
        call idle longest with a read pending in that room, once it has waited
        ``evict_reading_after_s`` for its message: legitimate callers send their messages
        at once, and a stream between messages can open again."""
        if self._budget is None or not self._budget.read_room(probe).waiting:
            return
        readers = (entry for entry in self._reading.items() if (entry[0].kind in _HEALTH) == probe)
        idlest = min(readers, key=lambda entry: entry[1], default=None)
        if idlest is None:
            return
        call, since = idlest
        if time.monotonic() - since < self.limits.evict_reading_after_s:
            return
        self._reading.pop(call, None)
        self._evict(call, call.kind)

    async def _refuse(
        self, context: grpc.aio.ServicerContext[Any, Any], label: str, error: ClipVisionError
    ) -> None:
        """Count and log (at a bounded rate) a refused call, then end it with its status."""
        status = rich_status(error)
        code = status.code.name
        if self._metrics is not None:
            self._metrics.on_refused(label, code, error.reason.value)
        self._log.log(
            logging.INFO,
            f"{label} {error.reason.value}",
            "%s refused: %s %s (peer %s)",
            label,
            code,
            error.reason.value,
            _peer(context),
        )
        await abort(context, status.code, status.details, status.trailing_metadata)


class _Admission:
    """``async with`` a call's admission by the gate (a class, not a generator-based context
    manager: it runs for every call, and costs less so)."""

    __slots__ = ("_call", "_context", "_gate", "_kind", "_label")

    def __init__(
        self,
        gate: CallGate,
        kind: CallKind,
        label: str,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        self._gate = gate
        self._kind = kind
        self._label = label
        self._context = context
        self._call: _Call | None = None

    async def __aenter__(self) -> _Call:
        self._call = await self._gate._enter(self._kind, self._label, self._context)
        return self._call

    async def __aexit__(self, kind: Any, error: BaseException | None, trace: Any) -> bool:
        assert self._call is not None
        return await self._gate._exit(self._call, self._context, error)


def _kind(method: str, handler: Handler) -> CallKind:
    if method in PROBES:
        return CallKind.PROBE
    if method == HEALTH_WATCH:
        return CallKind.WATCH
    return CallKind.STREAM if handler.request_streaming else CallKind.UNARY


def _full(pool: SlotPool) -> OverloadedError:
    return OverloadedError(
        Reason.TOO_MANY_CALLS,
        f"The server has no free {pool.name} call slot for this caller (at most "
        f"{pool.per_connection} per connection and {pool.capacity} in all); retry shortly, "
        "or on another replica.",
        retry_after_s=1.0,
    )


def _parse(raw: bytes, deserialize: Callable[[bytes], Any] | None) -> Any:
    if deserialize is None:
        return raw
    try:
        return deserialize(raw)
    except Exception:  # protobuf raises DecodeError, and others for deep or odd inputs
        raise InvalidRequestError(
            Reason.REQUEST_MALFORMED,
            "The request message is not a valid protobuf encoding of this method's request "
            "type; check the client's generated code matches the server's proto.",
        ) from None


def _peer(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    try:
        return str(context.peer())
    except Exception:  # the peer string is the transport's; never let a log line fail a call
        return "?"


def _release_unclaimed(call: _Call) -> None:
    """Give back the read room of the call's last message if no handler took it over."""
    hold, call.mark.read_hold = call.mark.read_hold, None
    if hold is not None:
        hold.release()
