"""Turn what a caller has (bytes, a path, a file object, a PIL image) into an ``Image`` message."""

from __future__ import annotations

import io
import os
from typing import IO, Any, Protocol, TypeAlias, runtime_checkable

import grpc

from clipvision.client._errors import IMAGE_UNREADABLE, ClipVisionError, error_from_status
from clipvision.v1 import embedding_service_pb2 as pb


@runtime_checkable
class PilImageLike(Protocol):
    """What the client needs from a ``PIL.Image.Image``; Pillow itself is never imported."""

    @property
    def mode(self) -> str:
        """The pixel format, for example ``"RGB"``."""

    def save(self, fp: IO[bytes], format: str | None = None, **params: Any) -> None:
        """Encode the image into ``fp``."""

    def convert(self, mode: str) -> PilImageLike:
        """A copy of the image in another mode."""


@runtime_checkable
class ReadableBinary(Protocol):
    """A file object opened in binary mode."""

    def read(self) -> bytes:
        """The rest of the file."""


ImageInput: TypeAlias = (
    bytes
    | bytearray
    | memoryview
    | str
    | os.PathLike[str]
    | ReadableBinary
    | PilImageLike
    | pb.Image
)
"""One image: encoded bytes, a file path, a binary file object, a PIL image or an ``Image`` message.

A ``str`` is always a path; to send a URI (``data:``, or a scheme the operator
enabled), pass ``Image(uri=...)`` from ``clipvision.v1.embedding_service_pb2``.
"""

# Modes PNG stores as they are; anything else (CMYK, YCbCr, LAB, HSV, F) is sent as RGB,
# which is what the server converts every image to anyway.
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"})

# Room for the id, model name and framing of a stream request around the image bytes.
_MESSAGE_OVERHEAD = 4096


def to_image(image: ImageInput, max_message_bytes: int) -> pb.Image:
    """The ``Image`` message for ``image``.

    Raises ImageReadError when a path or file cannot be read and InvalidImageError
    when the encoded image cannot fit in one message; both before anything is
    sent, so that a stream can report them in place and go on. Raises TypeError
    for inputs of no supported type.
    """
    message = image if isinstance(image, pb.Image) else pb.Image(content=_content(image))
    size = message.ByteSize()
    if size > max_message_bytes - _MESSAGE_OVERHEAD:
        raise error_from_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            "IMAGE_TOO_LARGE",
            f"The image is {size} bytes and a message may be at most {max_message_bytes} "
            "bytes (the server's limit, or the client's max_message_bytes where less); shrink "
            "the image, or raise the server's --max-message-bytes (and the client's).",
        )
    return message


def _content(image: ImageInput) -> bytes:
    if isinstance(image, bytes):
        return image
    if isinstance(image, bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | os.PathLike):
        return _read_path(os.fspath(image))
    if isinstance(image, PilImageLike):
        return _encode_pil(image)
    if isinstance(image, ReadableBinary):
        return _read_file(image)
    raise TypeError(
        f"cannot embed a {type(image).__name__}; pass bytes, a path, a binary file object, "
        "a PIL image or an Image message"
    )


def _read_path(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise _unreadable(f"Cannot read {path}: {exc.strerror or exc}.") from exc


def _read_file(file: ReadableBinary) -> bytes:
    try:
        data = file.read()
    except OSError as exc:
        raise _unreadable(f"Cannot read the file object: {exc.strerror or exc}.") from exc
    if not isinstance(data, bytes | bytearray):
        raise TypeError("the file object returned text; open it in binary mode ('rb')")
    return bytes(data)


def _encode_pil(image: PilImageLike) -> bytes:
    # PNG is lossless: the server sees exactly the caller's pixels.
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _unreadable(message: str) -> ClipVisionError:
    return error_from_status(grpc.StatusCode.INVALID_ARGUMENT, IMAGE_UNREADABLE, message)
