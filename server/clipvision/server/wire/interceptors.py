"""The one place where domain errors become gRPC statuses with google.rpc.Status details.

The same interceptor keeps each call's books: its request id (the caller's
``x-request-id`` or a new one), the stage timings in trailing metadata, the
``clipvision_requests_total`` count, and one log line for each failed call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc._cython import cygrpc  # type: ignore[attr-defined]  # no stubs: grpc internals
from grpc_status import rpc_status

from clipvision.inference_v2 import grpc_service_pb2 as oip
from clipvision.server.errors import (
    ERROR_DOMAIN,
    ClipVisionError,
    InternalError,
    OverloadedError,
    Reason,
)
from clipvision.server.ops.calls import (
    CallRecord,
    ended_by_gate,
    log_failed_call,
    open_call,
    request_id_from,
)
from clipvision.server.ops.metrics import ServerMetrics
from clipvision.v1 import embedding_service_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
# Our services: EmbeddingService and the Open Inference Protocol's (oip_servicer).
MAPPED_SERVICES = (
    f"/{SERVICE_NAME}/",
    f"/{oip.DESCRIPTOR.services_by_name['GRPCInferenceService'].full_name}/",
)

logger = logging.getLogger(__name__)

# How close to its deadline a cancelled call must be to count as DEADLINE_EXCEEDED.
DEADLINE_SLACK_S = 0.1

GENERIC_INTERNAL = InternalError(
    Reason.INTERNAL, "The server hit an unexpected error; it has been logged, please retry."
)


class HandlerCache:
    """An interceptor's wrapped handlers, built once per registered method.

    grpc asks every interceptor for the handler of every call; the wrapping holds no
    state of a call, so it is kept per method, checked against the handler grpc found.
    Only registered methods are kept (the caller has refused the others), so it is
    bounded by the services served.
    """

    def __init__(
        self,
        wrap: Callable[[grpc.RpcMethodHandler[Any, Any], str], grpc.RpcMethodHandler[Any, Any]],
    ) -> None:
        self._wrap = wrap
        self._built: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    def get(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """The wrapped form of ``handler``, which grpc found for ``method``."""
        built = self._built.get(method)
        if built is not None and built[0] is handler:
            return built[1]
        wrapped = self._wrap(handler, method)
        self._built[method] = (handler, wrapped)
        return wrapped


def rich_status(error: ClipVisionError) -> grpc.Status:
    """The gRPC status for a domain error: ErrorInfo with its reason, RetryInfo when overloaded."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=error.reason.value, domain=ERROR_DOMAIN))
    details = [info]
    if isinstance(error, OverloadedError):
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        details.append(any_pb2.Any())
        details[-1].Pack(retry)
    status = status_pb2.Status(code=int(error.code), message=error.message, details=details)
    result: grpc.Status = rpc_status.to_status(status)
    return result


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Turns ClipVisionError into its status and anything unexpected into a bare INTERNAL.

    Unexpected exceptions are logged with their traceback and never shown to the
    caller; cancellation and statuses already set by grpc pass through untouched.
    Every EmbeddingService call also gets a request id, trailing metadata with
    its timings, a count in ``metrics`` and, when it fails, one log line.
    """

    def __init__(self, metrics: ServerMetrics | None = None) -> None:
        self._metrics = metrics
        self._wrapped = HandlerCache(self._wrap)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        # Health and reflection keep their own semantics; only our services are mapped.
        if handler is None or not method.startswith(MAPPED_SERVICES):
            return handler
        return self._wrapped.get(handler, method)

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        books = _CallBooks(method.rpartition("/")[2], self._metrics)
        # RpcMethodHandler is a namedtuple; _replace swaps in the wrapped behaviour.
        replace: Callable[..., grpc.RpcMethodHandler[Any, Any]] = handler._replace  # type: ignore[attr-defined]
        if handler.unary_unary is not None:
            return replace(unary_unary=_wrap_unary(handler.unary_unary, books))
        if handler.stream_unary is not None:
            return replace(stream_unary=_wrap_unary(handler.stream_unary, books))
        if handler.unary_stream is not None:
            return replace(unary_stream=_wrap_stream(handler.unary_stream, books))
        if handler.stream_stream is not None:
            return replace(stream_stream=_wrap_stream(handler.stream_stream, books))
        return handler


class _CallBooks:
    """Opens each call's record and closes it with metadata, a count and a log line."""

    def __init__(self, method: str, metrics: ServerMetrics | None) -> None:
        self.method = method
        self._metrics = metrics

    def open(self, context: grpc.aio.ServicerContext[Any, Any]) -> CallRecord:
        return open_call(self.method, request_id_from(context.invocation_metadata()))

    def succeeded(self, record: CallRecord, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        context.set_trailing_metadata(record.trailing_metadata())
        if _expired(context):
            # A stream whose deadline passed sees the end of its requests and finishes
            # before grpc cancels it; the caller got DEADLINE_EXCEEDED, so count that.
            self._log(record, grpc.StatusCode.DEADLINE_EXCEEDED, "")
            self._count(record, grpc.StatusCode.DEADLINE_EXCEEDED)
            return
        self._count(record, grpc.StatusCode.OK)

    async def failed(
        self, record: CallRecord, context: grpc.aio.ServicerContext[Any, Any], exc: Exception
    ) -> None:
        """Log and count the failure, then abort with its status (this raises)."""
        if isinstance(exc, ClipVisionError) and not isinstance(exc, InternalError):
            error: ClipVisionError = exc
            self._log(record, _status_code(int(error.code)), error.reason.value)
        else:
            error = GENERIC_INTERNAL
            self._log(record, _status_code(int(error.code)), error.reason.value, exc)
        self._count(record, _status_code(int(error.code)))
        status = rich_status(error)
        exc.__traceback__ = None  # its frames hold the request; see _wrap_unary
        del exc
        await abort(
            context,
            status.code,
            status.details,
            (*status.trailing_metadata, *record.trailing_metadata()),
        )

    def ended(
        self, record: CallRecord, context: grpc.aio.ServicerContext[Any, Any], cancelled: bool
    ) -> None:
        """A call that ended without our mapping: cancelled, or a status grpc set itself."""
        if ended_by_gate():
            return  # the call gate ended it, and counts and logs it as refused
        if cancelled:
            expired = _expired(context)
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
        else:
            code = _status_code(context.code())
        self._log(record, code, "")
        self._count(record, code)

    def _count(self, record: CallRecord, code: grpc.StatusCode) -> None:
        if self._metrics is not None:
            self._metrics.on_call(self.method, code.name, record.elapsed_s)

    def _log(
        self,
        record: CallRecord,
        code: grpc.StatusCode,
        reason: str,
        exc: BaseException | None = None,
    ) -> None:
        log_failed_call(logger, record, self.method, code.name, reason, exc)


async def abort(
    context: grpc.aio.ServicerContext[Any, Any],
    code: grpc.StatusCode,
    details: str,
    trailing_metadata: Sequence[tuple[str, str | bytes]],
) -> NoReturn:
    """End the call with this status, as ``context.abort`` does (it raises AbortError).

    A caller that resets its call just before the status goes out makes grpc's send fail;
    grpc then logs an ERROR with a traceback for such a call (rate-limited: ops/logs.py),
    which a client can cause at will (the attack bench's truncated messages did, 0-4 lines
    a run). The call is gone, so it ends as a cancelled one instead: CancelledError, which
    grpc logs at debug level.
    """
    try:
        await context.abort(code, details, tuple(trailing_metadata))
    except cygrpc.ExecuteBatchError:
        raise asyncio.CancelledError from None
    raise AssertionError("context.abort returned")  # it always raises


def _expired(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """Whether the call's deadline has passed (or all but: see DEADLINE_SLACK_S).

    time_remaining() is None without a deadline and 0 once it has passed. The
    client's own timer usually fires first and resets the stream a little before
    the server's: a cancellation that close to the deadline is the deadline.
    """
    remaining = context.time_remaining()
    return remaining is not None and remaining <= DEADLINE_SLACK_S


def _status_code(code: object) -> grpc.StatusCode:
    if isinstance(code, grpc.StatusCode):
        return code
    for member in grpc.StatusCode:
        if member.value[0] == code:
            return member
    return grpc.StatusCode.UNKNOWN


def _is_passthrough(exc: Exception) -> bool:
    # context.abort() raises AbortError; a status set by grpc itself must not be rewritten.
    return isinstance(exc, grpc.aio.AbortError | grpc.RpcError)


def _wrap_unary(behavior: Callable[..., Any], books: _CallBooks) -> Callable[..., Any]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        record = books.open(context)
        try:
            response = await behavior(request, context)
        except asyncio.CancelledError:
            books.ended(record, context, cancelled=True)
            raise
        except Exception as exc:
            if _is_passthrough(exc):
                books.ended(record, context, cancelled=False)
                raise
            # grpc keeps the abort's exception, whose traceback holds this frame, in a cycle
            # with the call: without this the request (images and all) would live until a
            # full garbage collection.
            del request
            await books.failed(record, context, exc)
        books.succeeded(record, context)
        return response

    return wrapped


def _wrap_stream(behavior: Callable[..., Any], books: _CallBooks) -> Callable[..., Any]:
    async def wrapped(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        record = books.open(context)
        try:
            async for response in behavior(request, context):
                yield response
        except asyncio.CancelledError:
            books.ended(record, context, cancelled=True)
            raise
        except GeneratorExit:
            # The caller went away between two responses: grpc closes the generator.
            books.ended(record, context, cancelled=True)
            raise
        except Exception as exc:
            if _is_passthrough(exc):
                books.ended(record, context, cancelled=False)
                raise
            await books.failed(record, context, exc)
        books.succeeded(record, context)

    return wrapped
