"""Turn an ``Image`` message (inline bytes or a URI) into encoded image bytes.

``data:`` URIs need no fetch and are always accepted. ``file://`` and
``http(s)://`` are refused until the operator enables them.
"""

from __future__ import annotations

import base64
import binascii
from urllib.parse import unquote_to_bytes

from clipvision.server.errors import InvalidImageError, Reason, UriRefusedError
from clipvision.server.preprocess import ImageLimits
from clipvision.v1 import embedding_service_pb2 as pb

REFUSED_SCHEMES = {"file", "http", "https"}


def image_bytes(image: pb.Image, limits: ImageLimits) -> bytes:
    """The encoded bytes of ``image``; a missing, bad or refused source raises a domain error."""
    source = image.WhichOneof("source")
    if source == "content":
        return image.content
    if source == "uri":
        return _resolve_uri(image.uri, limits)
    raise InvalidImageError(
        Reason.IMAGE_MISSING, "The request has no image; set Image.content or Image.uri."
    )


def _resolve_uri(uri: str, limits: ImageLimits) -> bytes:
    scheme, sep, rest = uri.partition(":")
    if scheme.lower() in REFUSED_SCHEMES:
        raise UriRefusedError(
            Reason.URI_SCHEME_REFUSED,
            f"{scheme.lower()}:// image URIs are not enabled on this server; send the image "
            "bytes in Image.content or as a data: URI.",
        )
    if not sep or scheme.lower() != "data":
        raise InvalidImageError(
            Reason.URI_INVALID,
            f"Image URI scheme {scheme[:20]!r} is not supported; use a data: URI or Image.content.",
        )
    header, comma, payload = rest.partition(",")
    if not comma:
        raise InvalidImageError(
            Reason.URI_INVALID,
            "The data: URI has no comma before its payload (data:[type];base64,...).",
        )
    is_base64 = header.lower().endswith(";base64")
    # Refuse before decoding: base64 grows data by 4/3, so the payload length bounds the bytes.
    estimated = len(payload) * 3 // 4 if is_base64 else len(payload)
    if estimated > limits.max_image_bytes:
        raise InvalidImageError(
            Reason.IMAGE_TOO_LARGE,
            f"The image in the data: URI is about {estimated} bytes; the limit is "
            f"{limits.max_image_bytes} bytes.",
        )
    if not is_base64:
        return unquote_to_bytes(payload)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(
            Reason.URI_INVALID, "The data: URI payload is not valid base64."
        ) from exc
