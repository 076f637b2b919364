"""The one place where domain errors become gRPC statuses with google.rpc.Status details."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from clipvision.server.errors import (
    ERROR_DOMAIN,
    ClipVisionError,
    InternalError,
    OverloadedError,
    Reason,
)
from clipvision.v1 import embedding_service_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name

logger = logging.getLogger(__name__)

GENERIC_INTERNAL = InternalError(
    Reason.INTERNAL, "The server hit an unexpected error; it has been logged, please retry."
)


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
    """

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        # Health and reflection keep their own semantics; only our service is mapped.
        if handler is None or not method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        # RpcMethodHandler is a namedtuple; _replace swaps in the wrapped behaviour.
        replace: Callable[..., grpc.RpcMethodHandler[Any, Any]] = handler._replace  # type: ignore[attr-defined]
        if handler.unary_unary is not None:
            return replace(unary_unary=_wrap_unary(handler.unary_unary, method))
        if handler.stream_unary is not None:
            return replace(stream_unary=_wrap_unary(handler.stream_unary, method))
        if handler.unary_stream is not None:
            return replace(unary_stream=_wrap_stream(handler.unary_stream, method))
        if handler.stream_stream is not None:
            return replace(stream_stream=_wrap_stream(handler.stream_stream, method))
        return handler


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: Exception, method: str) -> None:
    if isinstance(exc, ClipVisionError) and not isinstance(exc, InternalError):
        error: ClipVisionError = exc
        logger.info("%s failed: %s %s", method, error.code.name, error.reason.value)
    else:
        logger.error("%s failed with an unexpected error", method, exc_info=exc)
        error = GENERIC_INTERNAL
    status = rich_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


def _is_passthrough(exc: Exception) -> bool:
    # context.abort() raises AbortError; a status set by grpc itself must not be rewritten.
    return isinstance(exc, grpc.aio.AbortError | grpc.RpcError)


def _wrap_unary(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await behavior(request, context)
        except Exception as exc:
            if _is_passthrough(exc):
                raise
            await _abort(context, exc, method)

    return wrapped


def _wrap_stream(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def wrapped(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request, context):
                yield response
        except Exception as exc:
            if _is_passthrough(exc):
                raise
            await _abort(context, exc, method)

    return wrapped
