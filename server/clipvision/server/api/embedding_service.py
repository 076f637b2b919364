"""The EmbeddingService handlers: each gRPC call handed to the data plane or a stream.

The unary methods are pipelines.embedding_plane's, which HTTP calls too; the
streams (EmbedImageStream, EmbedTextStream) start each message's item on its
modality's pipeline and answer in order through streams.answer_in_order.
Faults are domain errors: raised for the call (the interceptor maps them to
statuses) or answered in-band per item.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from clipvision.server.api.call_context import Context, caller_of, scope_of
from clipvision.server.api.streams import StreamItem, answer_in_order, answered
from clipvision.server.errors import ClipVisionError
from clipvision.server.ops.calls import take_read_hold
from clipvision.server.pipelines.embedding_plane import EmbeddingPlane, fill_embedding, flag
from clipvision.server.pipelines.texts import TextVector
from clipvision.server.runtime.image_encoder import FloatArray
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

StreamResponse = TypeVar("StreamResponse", pb.EmbedImageStreamResponse, pb.EmbedTextStreamResponse)


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    """Implements clipvision.v1.EmbeddingService on top of the data plane and the pipelines."""

    def __init__(self, plane: EmbeddingPlane) -> None:
        self._plane = plane
        self._registry = plane.registry
        self._images = plane.images
        self._texts = plane.texts
        self._limits = plane.limits

    # -- unary: the data plane ------------------------------------------------

    async def EmbedImage(
        self, request: pb.EmbedImageRequest, context: Context
    ) -> pb.EmbedImageResponse:
        """Embed one image; any fault fails the call."""
        return await self._plane.embed_image(request, scope_of(context))

    async def EmbedImages(
        self, request: pb.EmbedImagesRequest, context: Context
    ) -> pb.EmbedImagesResponse:
        """Embed a batch; per-image faults are reported in-band, in order."""
        return await self._plane.embed_images(request, scope_of(context))

    async def EmbedText(
        self, request: pb.EmbedTextRequest, context: Context
    ) -> pb.EmbedTextResponse:
        """Embed one text; any fault fails the call."""
        return await self._plane.embed_text(request, scope_of(context))

    async def EmbedTexts(
        self, request: pb.EmbedTextsRequest, context: Context
    ) -> pb.EmbedTextsResponse:
        """Embed a batch of texts; per-text faults are reported in-band, in order."""
        return await self._plane.embed_texts(request, scope_of(context))

    async def Classify(self, request: pb.ClassifyRequest, context: Context) -> pb.ClassifyResponse:
        """Score one image against labels as the model's family does, in label order."""
        return await self._plane.classify(request, scope_of(context))

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: Context
    ) -> pb.GetModelInfoResponse:
        """Describe the served models and the server's limits."""
        return self._plane.model_info()

    # -- streams ----------------------------------------------------------------

    async def EmbedImageStream(
        self, request_iterator: AsyncIterator[pb.EmbedImageStreamRequest], context: Context
    ) -> AsyncIterator[pb.EmbedImageStreamResponse]:
        """One response per request, in request order; the window bounds what is in flight."""
        caller = caller_of(context)

        async def start(
            request: pb.EmbedImageStreamRequest,
        ) -> StreamItem[pb.EmbedImageStreamResponse]:
            # The message's read room (the gate took it before reading), given back once the
            # image is admitted: a stream reads on without waiting for each image's header.
            held = take_read_hold()
            try:
                model = await self._plane.model(request.model)
                batcher = model.batcher
                await batcher.reserve(caller)
            except BaseException as exc:
                # Refused, or the stream cancelled while waiting (a model loading, the queue
                # full): the message's room goes back either way.
                if held is not None:
                    held.release()
                if isinstance(exc, ClipVisionError):
                    return self._answered(pb.EmbedImageStreamResponse(id=request.id), exc)
                raise
            image = request.image
            normalize = flag(request, "normalize")
            future = self._images.start(model, caller, image, normalize, None, held)
            future.add_done_callback(lambda _: batcher.release(caller))
            respond = functools.partial(self._image_answer, request.id, model.name, normalize)
            return StreamItem(future, respond)

        async for response in answer_in_order(
            request_iterator, start, window=self._limits.stream_window, drain=self._registry
        ):
            yield response

    async def EmbedTextStream(
        self, request_iterator: AsyncIterator[pb.EmbedTextStreamRequest], context: Context
    ) -> AsyncIterator[pb.EmbedTextStreamResponse]:
        """One response per request, in request order, as EmbedImageStream."""
        caller = caller_of(context)

        async def start(
            request: pb.EmbedTextStreamRequest,
        ) -> StreamItem[pb.EmbedTextStreamResponse]:
            held = take_read_hold()  # the message's read room, given back once admitted
            try:
                model = await self._plane.model(request.model)
                batcher = model.text_tower().batcher
                await batcher.reserve(caller)
            except BaseException as exc:
                if held is not None:
                    held.release()
                if isinstance(exc, ClipVisionError):
                    return self._answered(pb.EmbedTextStreamResponse(id=request.id), exc)
                raise
            normalize = flag(request, "normalize")
            future = self._texts.start(
                model, caller, request.text, normalize, flag(request, "truncate"), None, held
            )
            future.add_done_callback(lambda _: batcher.release(caller))
            respond = functools.partial(self._text_answer, request.id, model.name, normalize)
            return StreamItem(future, respond)

        async for response in answer_in_order(
            request_iterator, start, window=self._limits.stream_window, drain=self._registry
        ):
            yield response

    def _image_answer(
        self, request_id: str, model: str, normalize: bool, outcome: FloatArray | Exception
    ) -> pb.EmbedImageStreamResponse:
        if isinstance(outcome, Exception):
            return pb.EmbedImageStreamResponse(id=request_id, error=self._item_error(outcome))
        response = pb.EmbedImageStreamResponse(id=request_id)
        fill_embedding(response.embedding, outcome, model, normalize)
        return response

    def _text_answer(
        self, request_id: str, model: str, normalize: bool, outcome: TextVector | Exception
    ) -> pb.EmbedTextStreamResponse:
        if isinstance(outcome, Exception):
            return pb.EmbedTextStreamResponse(id=request_id, error=self._item_error(outcome))
        response = pb.EmbedTextStreamResponse(id=request_id)
        fill_embedding(response.embedding, outcome.vector, model, normalize, outcome.truncated)
        return response

    def _answered(
        self, response: StreamResponse, error: ClipVisionError
    ) -> StreamItem[StreamResponse]:
        """A stream item answered at once with its fault (an unknown model, say)."""
        response.error.CopyFrom(self._item_error(error))
        return StreamItem(answered(response), _same)

    def _item_error(self, exc: Exception) -> pb.ItemError:
        return self._plane.item_error(exc)


def _same(response: Any) -> Any:
    return response
