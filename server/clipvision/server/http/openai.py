"""OpenAI's embeddings API: ``POST /v1/embeddings`` and ``GET /v1/models``, as its SDKs call them.

``input`` is a text, a list of texts, or a list of ``{"text": ...}`` / ``{"image": ...}``
objects; ``"modality": "image"`` (as Infinity has it) makes plain strings images,
given as ``data:`` URIs or URLs under the server's URI rules. ``encoding_format``
``base64`` (the SDKs' default) answers little-endian float32. Token-id arrays, which
LangChain sends unless ``check_embedding_ctx_length=False``, are refused with a 400
that says so; ``dimensions`` only when it is the model's. Items go through EmbedTexts'
and EmbedImages' work (pipelines.embedding_plane); one bad item fails the request,
naming it, as OpenAI has no per-item errors.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable
from typing import Any

from starlette.responses import JSONResponse, Response

from clipvision.server.errors import InvalidRequestError, Reason
from clipvision.server.http.exchange import HttpCall
from clipvision.server.http.json_body import field, json_object, parse_json
from clipvision.server.http.statuses import Fault, item_result
from clipvision.server.pipelines.embedding_plane import EmbeddingPlane
from clipvision.server.pipelines.gather import all_or_none
from clipvision.server.runtime.image_encoder import FloatArray
from clipvision.v1 import embedding_service_pb2 as pb

FORMATS = ("float", "base64")
_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


def render(fault: Fault) -> Response:
    """OpenAI's error shape, with our stable reason as ``code``."""
    status = fault.status
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    error = {"message": fault.message, "type": kind, "param": None, "code": fault.reason}
    return JSONResponse({"error": error}, status_code=status)


class OpenAIRoutes:
    """The handlers of /v1/embeddings and /v1/models over the EmbeddingService data plane."""

    def __init__(self, plane: EmbeddingPlane, max_values: int) -> None:
        self._plane = plane
        self._max_values = max_values

    async def models(self, call: HttpCall) -> Response:
        """The served models, OpenAI's list shape, with each one's dimension once loaded."""
        data = []
        for info in self._plane.model_info().models:
            entry: dict[str, Any] = {
                "id": info.name,
                "object": "model",
                "created": 0,
                "owned_by": "clipvision",
            }
            if info.loaded:
                entry["embedding_dimension"] = info.embedding_dimension
            data.append(entry)
        return JSONResponse({"object": "list", "data": data})

    async def embeddings(self, call: HttpCall) -> Response:
        """Embed texts and images; float lists or base64 float32, in input order."""
        body = json_object(parse_json(call.take_body(), self._max_values))
        name = field(body, "model", str, "")
        encoding = field(body, "encoding_format", str, "float")
        if encoding not in FORMATS:
            raise InvalidRequestError(
                Reason.REQUEST_MALFORMED,
                f"encoding_format must be 'float' or 'base64', not {encoding[:16]!r}.",
            )
        modality = field(body, "modality", str, "text")
        if modality not in ("text", "image"):
            raise InvalidRequestError(
                Reason.REQUEST_MALFORMED, "modality must be 'text' or 'image'."
            )
        normalize = field(body, "normalize", bool, True)
        items = _items(body.get("input"), modality)
        model = await self._plane.model(name)
        size = model.encoder.checkpoint.embedding_dim
        dimensions = field(body, "dimensions", int)
        if dimensions is not None and dimensions != size:
            raise InvalidRequestError(
                Reason.DIMENSIONS_UNSUPPORTED,
                f"Model {model.name!r} answers {size}-dimensional embeddings and cannot "
                f"shorten them; leave dimensions unset or send {size}.",
            )
        texts = [(index, value) for index, (kind, value) in enumerate(items) if kind == "text"]
        images = [(index, value) for index, (kind, value) in enumerate(items) if kind == "image"]
        vectors: list[FloatArray | None] = [None] * len(items)
        tokens = 0
        work: list[Awaitable[Any]] = []
        if texts:
            work.append(
                self._plane.text_outcomes(
                    name, [text for _, text in texts], normalize, True, call.scope
                )
            )
        if images:
            sources = [pb.Image(uri=uri) for _, uri in images]
            work.append(self._plane.image_outcomes(name, sources, normalize, call.scope))
        results = await all_or_none(work)
        if texts:
            for (index, _), outcome in zip(texts, results[0][1], strict=True):
                text = item_result(outcome, index)
                vectors[index], tokens = text.vector, tokens + text.tokens
        if images:
            for (index, _), outcome in zip(images, results[-1][1], strict=True):
                vectors[index] = item_result(outcome, index)
        data = [
            {"object": "embedding", "index": index, "embedding": _encoded(vector, encoding)}
            for index, vector in enumerate(vectors)
            if vector is not None
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": model.name, "usage": usage})


def _items(value: Any, modality: str) -> list[tuple[str, str]]:
    """Each input item as (modality, text or URI), in order."""
    if isinstance(value, str):
        return [(modality, value)]
    if not isinstance(value, list) or not value:
        raise InvalidRequestError(
            Reason.REQUEST_MALFORMED,
            "input must be a string or a non-empty array of strings or of "
            '{"text": ...} / {"image": ...} objects.',
        )
    if all(isinstance(item, int) and not isinstance(item, bool) for item in value) or all(
        isinstance(item, list) for item in value
    ):
        raise InvalidRequestError(
            Reason.INPUT_TOKENS_UNSUPPORTED,
            "input holds token ids, which this server cannot read (its models have their own "
            "tokenizers): send the texts themselves. LangChain's OpenAIEmbeddings sends ids "
            "unless it is built with check_embedding_ctx_length=False.",
        )
    items = []
    for index, item in enumerate(value):
        if isinstance(item, str):
            items.append((modality, item))
            continue
        kinds = [kind for kind in ("text", "image") if isinstance(item, dict) and kind in item]
        if len(kinds) != 1 or len(item) != 1 or not isinstance(item[kinds[0]], str):
            raise InvalidRequestError(
                Reason.REQUEST_MALFORMED,
                f'input[{index}] must be a string, {{"text": "..."}} or {{"image": "..."}} '
                "(a data: URI or a URL).",
            )
        items.append((kinds[0], item[kinds[0]]))
    return items


def _encoded(vector: FloatArray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    values: list[float] = vector.tolist()
    return values
