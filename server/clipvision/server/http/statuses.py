"""A fault as HTTP answers it: the status for each code, Retry-After, and Connect's code names.

Every route answers a domain error with the HTTP status that Connect's protocol gives
its code (invalid_argument 400, not_found 404, resource_exhausted 429, unavailable
503...), and a body in its own protocol's shape; the fault is the same for all.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from clipvision.server.errors import ClipVisionError, Code, InternalError, OverloadedError, Reason
from clipvision.v1 import embedding_service_pb2 as pb

logger = logging.getLogger(__name__)

# Connect's table (connectrpc.com/docs/protocol#error-codes); 499 is nginx's "client closed".
HTTP_STATUS = {
    Code.CANCELLED: 499,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.PERMISSION_DENIED: 403,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.UNAUTHENTICATED: 401,
}
# Reasons HTTP has a more precise status for than their code's.
REASON_STATUS = {
    Reason.REQUEST_TOO_LARGE: 413,
    Reason.REQUEST_READ_TIMEOUT: 408,
    Reason.METHOD_NOT_FOUND: 404,
}

INTERNAL_MESSAGE = "The server hit an unexpected error; it has been logged, please retry."


@dataclass(frozen=True)
class Fault:
    """What a failed call answers: a status code number, a stable reason, one sentence."""

    code: Code
    reason: str
    message: str
    retry_after_s: float | None = None

    @classmethod
    def of(cls, error: ClipVisionError) -> Fault:
        """The fault of a domain error (with its retry delay when overloaded)."""
        retry = error.retry_after_s if isinstance(error, OverloadedError) else None
        return cls(error.code, error.reason.value, error.message, retry)

    @classmethod
    def of_item(cls, error: pb.ItemError, where: str) -> Fault:
        """The fault of an in-band item error, its message prefixed with the item it names."""
        return cls(Code(error.code), error.reason, f"{where}: {error.message}")

    @property
    def status(self) -> int:
        """The HTTP status that answers it."""
        special = REASON_STATUS.get(Reason(self.reason)) if self.reason in _REASONS else None
        return special or HTTP_STATUS.get(self.code, 500)

    @property
    def connect_code(self) -> str:
        """Connect's name of the code: invalid_argument, resource_exhausted..."""
        return self.code.name.lower()

    def headers(self) -> dict[str, str]:
        """Retry-After (whole seconds, rounded up) when the caller should retry later."""
        if self.retry_after_s is None:
            return {}
        return {"retry-after": str(max(1, math.ceil(self.retry_after_s)))}


INTERNAL = Fault(Code.INTERNAL, Reason.INTERNAL.value, INTERNAL_MESSAGE)
_REASONS = frozenset(reason.value for reason in Reason)


def item_result(outcome: Any, index: int, what: str = "input") -> Any:
    """An item's result; its fault raised for the whole request, naming the item, for the
    protocols without per-item errors (OpenAI, Weaviate)."""
    if not isinstance(outcome, Exception):
        return outcome
    if isinstance(outcome, ClipVisionError):
        raise type(outcome)(outcome.reason, f"{what}[{index}]: {outcome.message}") from None
    logger.error("unexpected failure on %s[%d]", what, index, exc_info=outcome)
    raise InternalError(
        Reason.INTERNAL, f"{what}[{index}]: the server failed on this item; it has been logged."
    ) from None
