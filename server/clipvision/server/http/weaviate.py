"""Weaviate's ``multi2vec-clip`` module API: the inference container it calls over HTTP.

With ``CLIP_INFERENCE_API=http://HOST:PORT`` Weaviate asks ``/.well-known/ready`` (2xx
once serving, 503 before), ``/meta`` for a description of the model, and
``POST /vectorize`` with ``{"texts": [...], "images": [base64, ...]}``, expecting
``{"textVectors": [...], "imageVectors": [...]}`` in order and L2-normalised. The
server's default model answers, through EmbedTexts' and EmbedImages' work; one bad
item fails the request (``{"error": "..."}``, a status of 400 or more), naming it.
"""

from __future__ import annotations

import binascii
from collections.abc import Awaitable
from typing import Any

from google.protobuf import json_format
from starlette.responses import JSONResponse, Response

from clipvision.server.errors import InvalidImageError, Reason
from clipvision.server.http.exchange import HttpCall
from clipvision.server.http.json_body import field, json_object, parse_json
from clipvision.server.http.statuses import Fault, item_result
from clipvision.server.ops.health import HealthReporter
from clipvision.server.pipelines.embedding_plane import EmbeddingPlane
from clipvision.server.pipelines.gather import all_or_none
from clipvision.v1 import embedding_service_pb2 as pb


def render(fault: Fault) -> Response:
    """Weaviate's error shape: ``{"error": "..."}``."""
    return JSONResponse({"error": f"{fault.reason}: {fault.message}"}, status_code=fault.status)


class WeaviateRoutes:
    """The module API's handlers over the EmbeddingService data plane."""

    def __init__(self, plane: EmbeddingPlane, health: HealthReporter, max_values: int) -> None:
        self._plane = plane
        self._health = health
        self._max_values = max_values

    async def live(self, call: HttpCall) -> Response:
        """204 whenever the process answers."""
        return Response(status_code=204)

    async def ready(self, call: HttpCall) -> Response:
        """204 when serving, 503 before (loading) and after (draining)."""
        return Response(status_code=204 if self._health.serving else 503)

    async def meta(self, call: HttpCall) -> Response:
        """The default model as GetModelInfo describes it."""
        info = self._plane.model_info().models[0]
        described: dict[str, Any] = json_format.MessageToDict(info)
        return JSONResponse({"model": described})

    async def vectorize(self, call: HttpCall) -> Response:
        """Embed the texts and the base64 images, each list in its order."""
        body = json_object(parse_json(call.take_body(), self._max_values))
        texts = field(body, "texts", list, [])
        images = field(body, "images", list, [])
        if not all(isinstance(item, str) for item in [*texts, *images]):
            raise InvalidImageError(
                Reason.REQUEST_MALFORMED, "texts and images must be arrays of strings."
            )
        sources = [pb.Image(content=_base64(image, index)) for index, image in enumerate(images)]
        del images
        work: list[Awaitable[Any]] = []
        if texts:
            work.append(self._plane.text_outcomes("", texts, True, True, call.scope))
        if sources:
            work.append(self._plane.image_outcomes("", sources, True, call.scope))
        results = await all_or_none(work)
        text_vectors = [
            item_result(outcome, index, "texts").vector.tolist()
            for index, outcome in enumerate(results[0][1] if texts else [])
        ]
        image_vectors = [
            item_result(outcome, index, "images").tolist()
            for index, outcome in enumerate(results[-1][1] if sources else [])
        ]
        return JSONResponse({"textVectors": text_vectors, "imageVectors": image_vectors})


def _base64(text: str, index: int) -> bytes:
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise InvalidImageError(
            Reason.IMAGE_DECODE_FAILED,
            f"images[{index}] is not valid base64; send each image file's bytes base64-encoded.",
        ) from None
