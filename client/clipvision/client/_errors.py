"""Typed exceptions, built from a status code and an ErrorInfo reason by one mapping function.

A failed call carries a gRPC status with a ``google.rpc.Status`` in its
trailers; a failed stream item carries an in-band ``ItemError``; the client
itself refuses some images and texts before sending them. All three end up in
:func:`error_from_status`, so the same fault raises the same exception class
whichever way it arrived.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from clipvision.v1 import embedding_service_pb2 as pb

ERROR_DOMAIN = "clipvision.dev"

# A reason the client sets itself when it cannot read an image (missing file,
# permission denied); the server never sends it.
IMAGE_UNREADABLE = "IMAGE_UNREADABLE"
# A reason the client sets itself for a str that UTF-8 cannot encode (a lone
# surrogate, from os.fsdecode or a bad decode): such a text cannot be sent at all.
TEXT_NOT_UTF8 = "TEXT_NOT_UTF8"


class ClipVisionError(Exception):
    """A call or one item (image or text) failed; ``code``, ``reason`` and ``message`` say why.

    ``reason`` is the stable UPPER_SNAKE_CASE reason from the server's
    ErrorInfo or ItemError (empty when the status carried none, as for
    transport failures). ``retry_after_s`` is the server's RetryInfo delay, if
    it sent one.
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        reason: str = "",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        label = f"{self.code.name} {self.reason}" if self.reason else self.code.name
        return f"{self.message} [{label}]"

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(code={self.code.name}, reason={self.reason!r}, message={self.message!r})"


class InvalidImageError(ClipVisionError):
    """The image cannot be embedded: undecodable, unsupported, empty, too large or too small."""


class ImageReadError(InvalidImageError):
    """The client could not read the image (a missing file, no permission); nothing was sent."""


class InvalidTextError(ClipVisionError):
    """The text cannot be embedded: empty, too large, too long with truncation off, or not UTF-8."""


class InvalidRequestError(ClipVisionError):
    """The request breaks the contract or a server limit, for example too many images."""


class ModelNotFoundError(ClipVisionError):
    """The request names a model the server does not serve."""


class ModalityNotServedError(ClipVisionError):
    """The model is served without what the call needs, for example texts on a vision-only model."""


class PermissionDeniedError(ClipVisionError):
    """The server refused the request, for example a ``file://`` or ``https://`` image URI."""


class UnauthenticatedError(ClipVisionError):
    """The server wants credentials the call did not carry, or refused them."""


class ResourceExhaustedError(ClipVisionError):
    """A message over the size limit, or a server that is overloaded; see ``retry_after_s``."""


class UnavailableError(ClipVisionError):
    """The server cannot take work now (unreachable, loading, draining); retry later."""


class DeadlineExceededError(ClipVisionError):
    """The call's deadline passed before the server answered."""


class CallCancelledError(ClipVisionError):
    """The call was cancelled before it finished."""


class InternalError(ClipVisionError):
    """The server failed because of a bug; its log has the details."""


_BY_CODE: dict[grpc.StatusCode, type[ClipVisionError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: ModalityNotServedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CallCancelledError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
}

_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def error_from_status(
    code: grpc.StatusCode | int,
    reason: str,
    message: str,
    *,
    retry_after_s: float | None = None,
) -> ClipVisionError:
    """The exception for a status code (enum or number), a reason and a message.

    This is the one mapping from the wire to exception classes: call statuses,
    in-band ItemErrors and the client's own refusals all go through it.
    """
    status = code if isinstance(code, grpc.StatusCode) else _CODES_BY_NUMBER.get(code)
    if status is None:
        status = grpc.StatusCode.UNKNOWN
    cls: type[ClipVisionError]
    if reason == IMAGE_UNREADABLE:
        cls = ImageReadError
    elif status is grpc.StatusCode.INVALID_ARGUMENT and reason.startswith(("IMAGE_", "URI_")):
        cls = InvalidImageError
    elif status is grpc.StatusCode.INVALID_ARGUMENT and reason.startswith("TEXT_"):
        cls = InvalidTextError
    else:
        cls = _BY_CODE.get(status, ClipVisionError)
    return cls(message, code=status, reason=reason, retry_after_s=retry_after_s)


def error_from_rpc_error(error: grpc.RpcError) -> ClipVisionError:
    """The typed exception for a failed call, read from its status and ErrorInfo detail."""
    call: grpc.Call = error  # type: ignore[assignment]  # every RpcError grpc raises is a Call
    code = call.code() or grpc.StatusCode.UNKNOWN
    message = call.details() or code.name.replace("_", " ").lower()
    reason = ""
    retry_after_s: float | None = None
    try:
        status = rpc_status.from_call(call)
    except ValueError:  # details that contradict the status: trust the status
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == ERROR_DOMAIN or not reason:
                reason = info.reason
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after_s = retry.retry_delay.ToTimedelta().total_seconds()
    return error_from_status(code, reason, message, retry_after_s=retry_after_s)


def error_from_item(item: pb.ItemError) -> ClipVisionError:
    """The typed exception for one item's in-band ItemError."""
    return error_from_status(item.code, item.reason, item.message)
