"""What every HTTP call passes, for every route: HTTP's call gate and interceptor in one place.

In order, before a route's handler runs:

- the bearer token (when the operator set one), from the headers alone; the probes
  (health, readiness) need none;
- the deadline: ``Connect-Timeout-Ms`` when the caller sends one, never more than the
  server's ``--http-timeout``; past it the call is cancelled (DEADLINE_EXCEEDED, 504);
- the body: room for the largest message is reserved in the memory budget's read room
  before a byte is read (as the gRPC gate does), the body is read within
  ``--request-read-timeout`` and at most ``--max-message-bytes`` (413 past it, at once
  when Content-Length says so), and the room is cut to what was read;
- a client that disconnects cancels its call, so its queued items are dropped.

Then each call is counted (``protocol="http"``), logged once when it fails, answered
with its request id and stage timings as headers, and any fault is rendered in its
route's protocol; unexpected exceptions are INTERNAL (500) with a generic sentence, the
traceback logged only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from clipvision.server.errors import (
    ClipVisionError,
    Code,
    InvalidRequestError,
    Reason,
    RequestTimeoutError,
)
from clipvision.server.http.statuses import INTERNAL, Fault
from clipvision.server.ops.auth import BearerToken
from clipvision.server.ops.calls import (
    CallRecord,
    log_failed_call,
    open_call,
    open_gate_mark,
    request_id_from,
)
from clipvision.server.ops.logs import RateLimitedLog
from clipvision.server.ops.metrics import ServerMetrics
from clipvision.server.pipelines.scope import CallScope
from clipvision.server.resources.admission import UNARY_WAIT_S, MemoryBudget

logger = logging.getLogger(__name__)

PROTOCOL = "http"
TIMEOUT_HEADER = "connect-timeout-ms"
# At most ten digits, as Connect's protocol says.
_TIMEOUT_MS = re.compile(r"[0-9]{1,10}")

Render = Callable[[Fault], Response]


@dataclass(frozen=True)
class HttpLimits:
    """What one HTTP call may send and how long it may take."""

    max_body_bytes: int
    read_timeout_s: float
    timeout_s: float
    max_calls: int = 256


class HttpCall:
    """One HTTP call as a route's handler sees it: the request, its body, its scope."""

    def __init__(self, request: Request, scope: CallScope, body: bytes) -> None:
        self.request = request
        self.scope = scope
        self._body: bytes | None = body

    def take_body(self) -> bytes:
        """The request body, handed over once: the handler's parsed form replaces it."""
        body, self._body = self._body or b"", None
        return body


Handler = Callable[[HttpCall], Awaitable[Response]]


class HttpExchange:
    """Token, deadline, body and books for every HTTP route (see the module's docstring)."""

    def __init__(
        self,
        limits: HttpLimits,
        budget: MemoryBudget,
        metrics: ServerMetrics | None = None,
        token: str | None = None,
    ) -> None:
        self.limits = limits
        self._budget = budget
        self._metrics = metrics
        self._token = BearerToken(token) if token else None
        self._log = RateLimitedLog(logger)
        self._calls = 0

    def connection_cut(self, why: str) -> None:
        """Count and log (at a bounded rate) a connection the listener closed: its request
        head was too slow ("head timeout"), or room was needed ("connections")."""
        reason = Reason.REQUEST_READ_TIMEOUT if why == "head timeout" else Reason.TOO_MANY_CALLS
        code = Code.DEADLINE_EXCEEDED if why == "head timeout" else Code.RESOURCE_EXHAUSTED
        if self._metrics is not None:
            self._metrics.on_refused("connection", code.name, reason.value, PROTOCOL)
        self._log.log(logging.INFO, f"cut {why}", "HTTP connection closed: %s", why)

    def route(
        self,
        label: str,
        handler: Handler,
        render: Render,
        *,
        body: bool = True,
        probe: bool = False,
    ) -> Callable[[Request], Awaitable[Response]]:
        """A Starlette endpoint that runs ``handler`` behind the exchange; ``label`` names it
        in metrics and logs (a fixed string, never the caller's path), ``render`` answers its
        faults, ``body`` says whether it reads one, ``probe`` that it needs no token."""

        async def endpoint(request: Request) -> Response:
            return await self._answer(request, label, handler, render, body, probe)

        return endpoint

    def refuse(self, label: str, fault: Fault, render: Render) -> Response:
        """Count, log (at a bounded rate) and answer a call refused before any handler."""
        if self._metrics is not None:
            self._metrics.on_refused(label, fault.code.name, fault.reason, PROTOCOL)
        self._log.log(
            logging.INFO,
            f"{label} {fault.reason}",
            "HTTP %s refused: %s %s",
            label,
            fault.code.name,
            fault.reason,
        )
        # Refused before its body was read (or while): the connection cannot carry another
        # request, and a slow sender must not keep it.
        return _with_headers(render(fault), {**fault.headers(), "connection": "close"})

    async def _answer(
        self,
        request: Request,
        label: str,
        handler: Handler,
        render: Render,
        body: bool,
        probe: bool,
    ) -> Response:
        headers = request.headers
        record = open_call(label, request_id_from(headers.items()))
        mark = open_gate_mark()
        if self._token is not None and not probe:
            refusal = self._token.refusal(headers.items())
            if refusal is not None:
                return self._stamped(self.refuse(label, Fault.of(refusal), render), record)
        try:
            timeout_s = self._timeout_s(request)
        except ClipVisionError as exc:
            return self._stamped(self.refuse(label, Fault.of(exc), render), record)
        if not probe and self._calls >= self.limits.max_calls:
            busy = Fault(
                Code.RESOURCE_EXHAUSTED,
                Reason.TOO_MANY_CALLS.value,
                f"The server has {self.limits.max_calls} HTTP calls in progress "
                "(--max-concurrent-rpcs); retry shortly, or on another replica.",
                retry_after_s=1.0,
            )
            return self._stamped(self.refuse(label, busy, render), record)
        self._calls += 1
        try:
            return await self._run(request, record, mark, label, handler, render, body, timeout_s)
        finally:
            self._calls -= 1

    async def _run(
        self,
        request: Request,
        record: CallRecord,
        mark: Any,
        label: str,
        handler: Handler,
        render: Render,
        body: bool,
        timeout_s: float,
    ) -> Response:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        client = request.client
        caller = f"http:{client.host}:{client.port}" if client else "http:unknown"
        scope = CallScope(caller, lambda: max(0.0, deadline - loop.time()))
        fault: Fault | None = None
        try:
            async with asyncio.timeout_at(deadline):
                if body:
                    try:
                        raw = await self._read(request, scope, mark)
                    except ClipVisionError as exc:
                        return self._stamped(self.refuse(label, Fault.of(exc), render), record)
                else:
                    raw = b""
                response = await _unless_disconnected(
                    request, handler(HttpCall(request, scope, raw))
                )
        except TimeoutError:
            fault = Fault(
                Code.DEADLINE_EXCEEDED,
                Reason.DEADLINE_EXCEEDED.value,
                f"The call did not finish within its deadline of {timeout_s:g} s "
                f"({TIMEOUT_HEADER}, at most --http-timeout); retry with a longer one.",
            )
        except _DisconnectedError:
            self._finish(record, label, Code.CANCELLED, "")
            return Response(status_code=499)
        except ClipVisionError as exc:
            fault = Fault.of(exc)
        except Exception as exc:  # a bug: logged with its traceback, never shown
            self._finish(record, label, Code.INTERNAL, Reason.INTERNAL.value, exc)
            return self._stamped(render(INTERNAL), record)
        finally:
            hold, mark.read_hold = mark.read_hold, None
            if hold is not None:
                hold.release()
        if fault is not None:
            self._finish(record, label, fault.code, fault.reason)
            return self._stamped(_with_headers(render(fault), fault.headers()), record)
        self._finish(record, label, None, "")
        return self._stamped(response, record)

    def _timeout_s(self, request: Request) -> float:
        """The call's timeout: the caller's Connect-Timeout-Ms, within the server's own."""
        value = request.headers.get(TIMEOUT_HEADER)
        if value is None:
            return self.limits.timeout_s
        if not _TIMEOUT_MS.fullmatch(value):
            raise InvalidRequestError(
                Reason.REQUEST_MALFORMED,
                f"The {TIMEOUT_HEADER} header must be a whole number of milliseconds "
                "(at most ten digits).",
            )
        return min(int(value) / 1000, self.limits.timeout_s)

    async def _read(self, request: Request, scope: CallScope, mark: Any) -> bytes:
        """The body, read into the memory budget's read room (see the module's docstring)."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        hold = self._budget.try_reserve_read(scope.caller)
        if hold is None:
            hold = await self._budget.reserve_read(scope.caller, UNARY_WAIT_S)
        mark.read_hold = hold  # given back when the call ends, unless a plane takes it over
        chunks: list[bytes] = []
        size = 0
        timeout = self.limits.read_timeout_s
        try:
            async with asyncio.timeout(timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise _too_large(limit)
                    chunks.append(chunk)
        except TimeoutError:
            raise RequestTimeoutError(
                Reason.REQUEST_READ_TIMEOUT,
                f"The request body did not arrive within {timeout:g} s; send it right after "
                "the headers.",
            ) from None
        except ClientDisconnect:
            raise _DisconnectedError from None
        raw = b"".join(chunks)
        # The raw body and what it is parsed into, until the items are admitted (a plane
        # takes the hold over) or the call ends.
        hold.shrink(2 * len(raw))
        return raw

    def _finish(
        self,
        record: CallRecord,
        label: str,
        code: Code | None,
        reason: str,
        exc: BaseException | None = None,
    ) -> None:
        name = "OK" if code is None else code.name
        if self._metrics is not None:
            self._metrics.on_call(label, name, record.elapsed_s, PROTOCOL)
        if code is None:
            return
        log_failed_call(logger, record, label, name, reason, exc, PROTOCOL)

    @staticmethod
    def _stamped(response: Response, record: CallRecord) -> Response:
        """The response with the request id and, for calls that embedded images, the
        timings gRPC sends as trailing metadata."""
        return _with_headers(response, dict(record.trailing_metadata()))


class _DisconnectedError(Exception):
    """The client closed the connection before its answer."""


async def _unless_disconnected(request: Request, work: Awaitable[Response]) -> Response:
    """The handler's response; if the client disconnects first, the handler is cancelled
    (its queued items are dropped before compute) and _DisconnectedError raised."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            # A cancellation of this call itself (the deadline, or the server stopping).
            if not watch.done() or watch.cancelled():
                raise asyncio.CancelledError
            raise _DisconnectedError
    return task.result()


async def _disconnect(request: Request) -> None:
    """Returns when the client has disconnected (the body, if any, was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _too_large(limit: int) -> InvalidRequestError:
    return InvalidRequestError(
        Reason.REQUEST_TOO_LARGE,
        f"The request body is larger than this server's limit of {limit} bytes "
        "(--max-message-bytes); send fewer or smaller items per request.",
    )


def _with_headers(response: Response, headers: dict[str, str]) -> Response:
    for key, value in headers.items():
        response.headers[key] = value
    return response
