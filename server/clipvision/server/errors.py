"""Domain errors: raised where a fault is detected, mapped to statuses in one place.

Nothing here imports grpc. Each error carries the canonical status code number
(google.rpc.Code), a stable UPPER_SNAKE_CASE reason and one actionable sentence
for the caller; the interceptor and the in-band ItemError both read them.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import ClassVar


class Code(IntEnum):
    """Canonical status code numbers, as google.rpc.Code and every gRPC library define them."""

    CANCELLED = 1
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


class Reason(StrEnum):
    """Stable machine-readable reasons, sent as ErrorInfo.reason and ItemError.reason."""

    IMAGE_MISSING = "IMAGE_MISSING"
    IMAGE_EMPTY = "IMAGE_EMPTY"
    IMAGE_TOO_LARGE = "IMAGE_TOO_LARGE"
    IMAGE_TOO_MANY_PIXELS = "IMAGE_TOO_MANY_PIXELS"
    IMAGE_TOO_SMALL = "IMAGE_TOO_SMALL"
    IMAGE_FORMAT_UNSUPPORTED = "IMAGE_FORMAT_UNSUPPORTED"
    IMAGE_DECODE_FAILED = "IMAGE_DECODE_FAILED"
    URI_INVALID = "URI_INVALID"
    URI_SCHEME_REFUSED = "URI_SCHEME_REFUSED"
    URI_PATH_REFUSED = "URI_PATH_REFUSED"
    URI_HOST_REFUSED = "URI_HOST_REFUSED"
    URI_ADDRESS_REFUSED = "URI_ADDRESS_REFUSED"
    URI_UNREADABLE = "URI_UNREADABLE"
    TOO_MANY_IMAGES = "TOO_MANY_IMAGES"
    QUEUE_FULL = "QUEUE_FULL"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    MODEL_LOADING = "MODEL_LOADING"
    MODEL_LOAD_FAILED = "MODEL_LOAD_FAILED"
    SERVER_DRAINING = "SERVER_DRAINING"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    INTERNAL = "INTERNAL"
    # Refused by the call gate, before any handler runs.
    TOO_MANY_CALLS = "TOO_MANY_CALLS"
    REQUEST_MISSING = "REQUEST_MISSING"
    REQUEST_MALFORMED = "REQUEST_MALFORMED"
    REQUEST_READ_TIMEOUT = "REQUEST_READ_TIMEOUT"
    STREAM_IDLE = "STREAM_IDLE"
    METHOD_NOT_FOUND = "METHOD_NOT_FOUND"
    # A file:// URI names a FIFO, device, directory or socket, not a regular file.
    URI_NOT_A_FILE = "URI_NOT_A_FILE"
    # The memory budget: full for now (RESOURCE_EXHAUSTED), or one image needs more than all of it.
    MEMORY_BUDGET_FULL = "MEMORY_BUDGET_FULL"
    IMAGE_OVER_MEMORY_BUDGET = "IMAGE_OVER_MEMORY_BUDGET"
    # Texts and Classify.
    TEXT_EMPTY = "TEXT_EMPTY"
    TEXT_TOO_LONG = "TEXT_TOO_LONG"
    TEXT_TOO_LARGE = "TEXT_TOO_LARGE"
    TOO_MANY_TEXTS = "TOO_MANY_TEXTS"
    LABELS_MISSING = "LABELS_MISSING"
    TOO_MANY_LABELS = "TOO_MANY_LABELS"
    PROMPT_TEMPLATE_INVALID = "PROMPT_TEMPLATE_INVALID"
    # The model is served without the tower a call needs (FAILED_PRECONDITION).
    MODALITY_NOT_SERVED = "MODALITY_NOT_SERVED"
    # HTTP: a body over --max-message-bytes; a call past its deadline (the Connect-Timeout-Ms
    # header, or --http-timeout); OpenAI requests this server cannot honour as sent.
    REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    INPUT_TOKENS_UNSUPPORTED = "INPUT_TOKENS_UNSUPPORTED"
    DIMENSIONS_UNSUPPORTED = "DIMENSIONS_UNSUPPORTED"


ERROR_DOMAIN = "clipvision.dev"


class ClipVisionError(Exception):
    """A fault a caller can act on; subclasses fix the status code."""

    code: ClassVar[Code] = Code.INTERNAL

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason.value}: {self.message})"


class InvalidImageError(ClipVisionError):
    """The image bytes or URI cannot be turned into pixels."""

    code = Code.INVALID_ARGUMENT


class InvalidTextError(ClipVisionError):
    """The text cannot be embedded as sent (empty, too large, too long without truncation)."""

    code = Code.INVALID_ARGUMENT


class ModalityNotServedError(ClipVisionError):
    """The model is served without the tower (or tokenizer) the call needs."""

    code = Code.FAILED_PRECONDITION


class InvalidRequestError(ClipVisionError):
    """The request as a whole breaks the contract or a server limit."""

    code = Code.INVALID_ARGUMENT


class ModelNotFoundError(ClipVisionError):
    """The request names a model this server does not serve."""

    code = Code.NOT_FOUND


class ServiceUnavailableError(ClipVisionError):
    """The server cannot take work now (loading, draining); retrying elsewhere or later helps."""

    code = Code.UNAVAILABLE


class OverloadedError(ClipVisionError):
    """The server's queue is full; the caller should retry after ``retry_after_s``."""

    code = Code.RESOURCE_EXHAUSTED

    def __init__(self, reason: Reason, message: str, *, retry_after_s: float) -> None:
        super().__init__(reason, message)
        self.retry_after_s = retry_after_s


class UriRefusedError(ClipVisionError):
    """The image URI points somewhere the operator has not allowed."""

    code = Code.PERMISSION_DENIED


class UnauthenticatedError(ClipVisionError):
    """The call carries no valid bearer token."""

    code = Code.UNAUTHENTICATED


class RequestTimeoutError(ClipVisionError):
    """The call's request message did not arrive in the time the server allows."""

    code = Code.DEADLINE_EXCEEDED


class MethodNotFoundError(ClipVisionError):
    """The call names a method this server does not have."""

    code = Code.UNIMPLEMENTED


class InternalError(ClipVisionError):
    """A bug: the caller gets a generic message, the log gets the traceback."""

    code = Code.INTERNAL


class CheckpointError(Exception):
    """A model cannot be loaded as configured; raised at start, before serving."""
