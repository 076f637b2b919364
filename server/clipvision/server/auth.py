"""Optional bearer-token check: every call but health must carry the operator's token."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from clipvision.server.errors import Reason, UnauthenticatedError
from clipvision.server.interceptors import rich_status

# Kubernetes' gRPC probes send no credentials, so health stays open.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)

MISSING = UnauthenticatedError(
    Reason.UNAUTHENTICATED,
    "This server needs a bearer token; send the metadata 'authorization: Bearer <token>'.",
)
WRONG = UnauthenticatedError(Reason.UNAUTHENTICATED, "The bearer token is not valid.")


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses calls without ``authorization: Bearer <token>`` with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._expected = token.encode()

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        error = self._refusal(handler_call_details.invocation_metadata or ())
        if error is None:
            return handler
        status = rich_status(error)

        async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await context.abort(status.code, status.details, status.trailing_metadata)

        replace: Callable[..., grpc.RpcMethodHandler[Any, Any]] = handler._replace  # type: ignore[attr-defined]
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            if getattr(handler, kind) is not None:
                return replace(**{kind: refuse})
        return handler

    def _refusal(self, metadata: Any) -> UnauthenticatedError | None:
        values = [value for key, value in metadata if key == "authorization"]
        if not values:
            return MISSING
        scheme, _, token = str(values[0]).partition(" ")
        if scheme.lower() != "bearer":
            return MISSING
        # Constant time: the comparison must not reveal how much of a guess was right.
        if not hmac.compare_digest(token.strip().encode(), self._expected):
            return WRONG
        return None
