"""Turn an ``Image`` message (inline bytes or a URI) into encoded image bytes.

``data:`` URIs need no fetch and are always accepted. ``file://`` and
``http(s)://`` URIs are read only as the operator's FetchPolicy allows.
"""

from __future__ import annotations

import asyncio
import binascii
from urllib.parse import unquote_to_bytes

from clipvision.server.config.limits import FetchPolicy, ImageLimits
from clipvision.server.errors import ClipVisionError, InvalidImageError, Reason, UriRefusedError
from clipvision.server.pipelines.fetch import UriFetcher, check_uri_text, read_file_uri
from clipvision.v1 import embedding_service_pb2 as pb

# What a data: URI may hold before its comma ("image/svg+xml;charset=utf-8;base64" and such).
DATA_HEADER_CHARS = 1024
# Larger base64 payloads are decoded in a worker thread, in slices: binascii holds
# the GIL while it works (about 4 ms per MiB), so one call on a whole 27 MB
# payload would stall the event loop for over 100 ms.
_INLINE_BASE64_CHARS = 1 << 20
_BASE64_SLICE_CHARS = 1 << 18  # a multiple of 4: every slice decodes on its own


class ImageSources:
    """Resolves images to bytes under the server's limits and fetch policy; one per server."""

    def __init__(self, limits: ImageLimits, policy: FetchPolicy | None = None) -> None:
        self._limits = limits
        self._policy = policy or FetchPolicy()
        self._fetcher = UriFetcher(self._policy, limits.max_image_bytes)

    async def aclose(self) -> None:
        """Release pooled HTTP connections."""
        await self._fetcher.aclose()

    def close(self) -> None:
        """Release pooled HTTP connections soon; call it on the event loop (as app.stop does)."""
        self._fetcher.close()

    async def resolve(self, image: pb.Image) -> bytes:
        """The encoded bytes of ``image``; a missing, bad or refused source raises.

        Nothing here blocks the event loop: files are read in a worker thread,
        remote images are fetched on the loop, large base64 is decoded off it.
        """
        source = image.WhichOneof("source")
        if source == "content":
            return image.content
        if source != "uri":
            raise InvalidImageError(
                Reason.IMAGE_MISSING, "The request has no image; set Image.content or Image.uri."
            )
        # Read once: each access to a string field builds a new copy of it.
        uri = image.uri
        try:
            return await self._resolve_uri(uri)
        except ClipVisionError as exc:
            error = exc
        # A failed call's exception can outlive the call until the cycle collector
        # runs, and its traceback holds every frame's locals: raised from here, with
        # no traceback of its own, it holds no copy of the URI (which may be 60 MB).
        del uri
        raise _detached(error)

    async def _resolve_uri(self, uri: str) -> bytes:
        scheme, sep, _ = uri[:16].partition(":")
        scheme = scheme.lower()
        if sep and scheme == "data":
            return await self._data_uri(uri)
        check_uri_text(uri)
        if sep and scheme == "file":
            max_bytes = self._limits.max_image_bytes
            return await asyncio.to_thread(read_file_uri, uri, self._policy, max_bytes)
        if sep and scheme in ("http", "https"):
            if not self._policy.fetching:
                raise UriRefusedError(
                    Reason.URI_SCHEME_REFUSED,
                    f"{scheme}:// image URIs are not enabled on this server; send the image "
                    "bytes in Image.content or as a data: URI.",
                )
            return await self._fetcher.fetch(uri)
        raise InvalidImageError(
            Reason.URI_INVALID,
            f"Image URI scheme {scheme[:20]!r} is not supported; use a data: URI or Image.content.",
        )

    async def _data_uri(self, uri: str) -> bytes:
        limit = self._limits.max_image_bytes
        # Checked before anything is sliced or decoded: base64 takes 4 characters per 3 bytes.
        longest = len("data:") + DATA_HEADER_CHARS + 4 * -(-limit // 3)
        if len(uri) > longest:
            raise InvalidImageError(
                Reason.IMAGE_TOO_LARGE,
                f"The data: URI is {len(uri)} characters; an image within the limit of {limit} "
                f"bytes takes at most {longest} as base64.",
            )
        comma = uri.find(",", 5, 5 + DATA_HEADER_CHARS + 1)
        if comma < 0:
            raise InvalidImageError(
                Reason.URI_INVALID,
                "The data: URI has no comma before its payload (data:[type];base64,...).",
            )
        start = comma + 1
        if not uri[5:comma].lower().endswith(";base64"):
            data = unquote_to_bytes(uri[start:])
            if len(data) > limit:
                raise _too_large(len(data), limit)
            return data
        padding = 2 if uri.endswith("==") else 1 if uri.endswith("=") else 0
        estimated = (len(uri) - start) * 3 // 4 - padding
        if estimated > limit:
            raise _too_large(estimated, limit)
        if len(uri) - start <= _INLINE_BASE64_CHARS:
            return _decode_base64(uri, start)
        return await asyncio.to_thread(_decode_base64, uri, start)


def _decode_base64(uri: str, start: int) -> bytes:
    """Strictly decode ``uri[start:]`` as base64, a slice at a time (no copy of the whole)."""
    parts = []
    try:
        for offset in range(start, len(uri), _BASE64_SLICE_CHARS):
            piece = uri[offset : offset + _BASE64_SLICE_CHARS]
            # Padding may only end the payload, as when it is decoded in one go.
            if offset + _BASE64_SLICE_CHARS < len(uri) and "=" in piece:
                raise binascii.Error("padding before the end")
            parts.append(binascii.a2b_base64(piece, strict_mode=True))
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(
            Reason.URI_INVALID, "The data: URI payload is not valid base64."
        ) from exc
    return b"".join(parts)


def _detached(error: ClipVisionError) -> ClipVisionError:
    """``error`` with no traceback on it or on the exceptions it chains to."""
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        link.__traceback__ = None
        link = link.__cause__ or link.__context__
    return error


def _too_large(size: int, limit: int) -> InvalidImageError:
    return InvalidImageError(
        Reason.IMAGE_TOO_LARGE,
        f"The image in the data: URI is about {size} bytes; the limit is {limit} bytes.",
    )
