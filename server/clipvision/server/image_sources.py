"""Turn an ``Image`` message (inline bytes or a URI) into encoded image bytes.

``data:`` URIs need no fetch and are always accepted. ``file://`` and
``http(s)://`` URIs are read only as the operator's FetchPolicy allows.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from urllib.parse import unquote_to_bytes

from clipvision.server.errors import InvalidImageError, Reason, UriRefusedError
from clipvision.server.fetch import FetchPolicy, UriFetcher, read_file_uri
from clipvision.server.preprocess import ImageLimits
from clipvision.v1 import embedding_service_pb2 as pb


class ImageSources:
    """Resolves images to bytes under the server's limits and fetch policy (thread-safe)."""

    def __init__(self, limits: ImageLimits, policy: FetchPolicy | None = None) -> None:
        self._limits = limits
        self._policy = policy or FetchPolicy()
        self._fetcher = UriFetcher(self._policy, limits.max_image_bytes)

    def close(self) -> None:
        """Release pooled HTTP connections."""
        self._fetcher.close()

    async def resolve(self, image: pb.Image) -> bytes:
        """The encoded bytes of ``image``, without blocking the event loop."""
        if image.WhichOneof("source") == "content":
            return image.content
        return await asyncio.to_thread(self.image_bytes, image)

    def image_bytes(self, image: pb.Image) -> bytes:
        """The encoded bytes of ``image``; a missing, bad or refused source raises."""
        source = image.WhichOneof("source")
        if source == "content":
            return image.content
        if source == "uri":
            return self._resolve_uri(image.uri)
        raise InvalidImageError(
            Reason.IMAGE_MISSING, "The request has no image; set Image.content or Image.uri."
        )

    def _resolve_uri(self, uri: str) -> bytes:
        scheme, sep, rest = uri.partition(":")
        scheme = scheme.lower()
        if sep and scheme == "data":
            return _data_uri(rest, self._limits)
        if sep and scheme == "file":
            return read_file_uri(uri, self._policy, self._limits.max_image_bytes)
        if sep and scheme in ("http", "https"):
            if not self._policy.fetching:
                raise UriRefusedError(
                    Reason.URI_SCHEME_REFUSED,
                    f"{scheme}:// image URIs are not enabled on this server; send the image "
                    "bytes in Image.content or as a data: URI.",
                )
            return self._fetcher.fetch(uri)
        raise InvalidImageError(
            Reason.URI_INVALID,
            f"Image URI scheme {scheme[:20]!r} is not supported; use a data: URI or Image.content.",
        )


def _data_uri(rest: str, limits: ImageLimits) -> bytes:
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
