"""JSON and binary protobuf for clipvision.v1.EmbeddingService's unary methods, Connect-style.

``POST /clipvision.v1.EmbeddingService/<Method>`` with ``application/json`` (the
proto3 JSON mapping: ``Image.content`` in base64) or ``application/proto``, answered
in the same encoding, as Connect's unary protocol does, so ``curl`` and Connect's
clients call EmbedImage, EmbedImages, EmbedText, EmbedTexts, Classify and
GetModelInfo. The methods are pipelines.embedding_plane's, as gRPC's are. Errors
are Connect's: ``{"code": "invalid_argument", "message": ..., "details": [...]}``
with the matching HTTP status; the details hold google.rpc.ErrorInfo (and RetryInfo).
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from starlette.responses import JSONResponse, Response

from clipvision.server.errors import ERROR_DOMAIN, ClipVisionError, InvalidRequestError, Reason
from clipvision.server.http.exchange import HttpCall
from clipvision.server.http.json_body import MAX_DEPTH, parse_json
from clipvision.server.http.statuses import Fault
from clipvision.server.pipelines.embedding_plane import EmbeddingPlane
from clipvision.server.pipelines.scope import CallScope
from clipvision.v1 import embedding_service_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
JSON = "application/json"
PROTO = "application/proto"


def render(fault: Fault) -> Response:
    """Connect's unary error: its code's name, the sentence, ErrorInfo and RetryInfo."""
    info = error_details_pb2.ErrorInfo(reason=fault.reason, domain=ERROR_DOMAIN)
    details = [_detail(info)]
    if fault.retry_after_s is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(fault.retry_after_s * 1e9))
        details.append(_detail(retry))
    body = {"code": fault.connect_code, "message": fault.message, "details": details}
    return JSONResponse(body, status_code=fault.status)


def _detail(message: Message) -> dict[str, Any]:
    value = base64.b64encode(message.SerializeToString()).decode("ascii").rstrip("=")
    return {"type": message.DESCRIPTOR.full_name, "value": value}


Method = Callable[[Any, CallScope], Awaitable[Message]]


class ConnectRoutes:
    """One endpoint per unary method of the service, over the data plane."""

    def __init__(self, plane: EmbeddingPlane, max_values: int) -> None:
        self._max_values = max_values

        async def model_info(request: pb.GetModelInfoRequest, call: CallScope) -> Message:
            return plane.model_info()

        self.methods: dict[str, tuple[type[Message], Method]] = {
            "EmbedImage": (pb.EmbedImageRequest, plane.embed_image),
            "EmbedImages": (pb.EmbedImagesRequest, plane.embed_images),
            "EmbedText": (pb.EmbedTextRequest, plane.embed_text),
            "EmbedTexts": (pb.EmbedTextsRequest, plane.embed_texts),
            "Classify": (pb.ClassifyRequest, plane.classify),
            "GetModelInfo": (pb.GetModelInfoRequest, model_info),
        }

    def handler(self, name: str) -> Callable[[HttpCall], Awaitable[Response]]:
        """The handler of one method."""
        request_type, method = self.methods[name]

        async def handle(call: HttpCall) -> Response:
            media = call.request.headers.get("content-type", "").split(";")[0].strip().lower()
            if media not in (JSON, PROTO):
                raise InvalidRequestError(
                    Reason.REQUEST_MALFORMED,
                    f"Send the request as {JSON} (proto3 JSON) or {PROTO} (binary protobuf).",
                )
            request = request_type()
            body = call.take_body()
            try:
                if media == JSON:
                    document = parse_json(body, self._max_values) if body else {}
                    del body
                    json_format.ParseDict(document, request, max_recursion_depth=MAX_DEPTH)
                else:
                    request.ParseFromString(body)
                    del body
            except ClipVisionError:
                raise
            except Exception:  # ParseError, DecodeError, and others for odd inputs
                raise InvalidRequestError(
                    Reason.REQUEST_MALFORMED,
                    f"The request is not a valid {request_type.DESCRIPTOR.full_name} "
                    f"({'proto3 JSON' if media == JSON else 'binary protobuf'}).",
                ) from None
            response = await method(request, call.scope)
            if media == PROTO:
                return Response(response.SerializeToString(), media_type=PROTO)
            return JSONResponse(json_format.MessageToDict(response))

        return handle
