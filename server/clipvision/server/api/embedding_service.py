"""The EmbeddingService handlers: protobuf in, one call into the domain, protobuf out.

Each handler checks the request against the contract's limits, finds the model,
admits the call's items, and hands each item to its modality's pipeline
(pipelines.images, pipelines.texts, pipelines.classify); streams go through
streams.answer_in_order.
Faults are domain errors: raised for the call (the interceptor maps them to
statuses) or answered in-band per item.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from clipvision.server.api.call_context import (
    Context,
    budget_deadline,
    caller_of,
    message_hold,
    patience,
)
from clipvision.server.api.item_errors import ItemErrorObserver, item_error
from clipvision.server.api.streams import StreamItem, answer_in_order, answered
from clipvision.server.errors import (
    ClipVisionError,
    InvalidRequestError,
    Reason,
)
from clipvision.server.ops.calls import take_read_hold
from clipvision.server.pipelines.classify import ClassifyPipeline, check_labels
from clipvision.server.pipelines.images import ImagePipeline
from clipvision.server.pipelines.texts import TextPipeline, TextVector
from clipvision.server.resources.admission import seconds_until
from clipvision.server.runtime.families import Score
from clipvision.server.runtime.image_encoder import FloatArray
from clipvision.server.runtime.models import ModelRegistry, ServedModel
from clipvision.server.runtime.preprocess import PreprocessConfig
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

StreamResponse = TypeVar("StreamResponse", pb.EmbedImageStreamResponse, pb.EmbedTextStreamResponse)


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    """Implements clipvision.v1.EmbeddingService on top of the registry and the pipelines.

    ``limits`` is what GetModelInfo reports, and what the handlers enforce.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        images: ImagePipeline,
        texts: TextPipeline,
        limits: pb.Limits,
        observer: ItemErrorObserver | None = None,
    ) -> None:
        self._registry = registry
        self._images = images
        self._texts = texts
        self._classify = ClassifyPipeline(images, texts)
        self._limits = limits
        self._observer = observer

    # -- images ---------------------------------------------------------------

    async def EmbedImage(
        self, request: pb.EmbedImageRequest, context: Context
    ) -> pb.EmbedImageResponse:
        """Embed one image; any fault fails the call."""
        model = await self._model(request.model)
        normalize = _flag(request, "normalize")
        caller = caller_of(context)
        with message_hold() as held:
            async with model.batcher.admit(caller, 1, seconds_until(patience(context))):
                vector = await self._images.embed(
                    model, caller, request.image, normalize, budget_deadline(context), held
                )
        return pb.EmbedImageResponse(embedding=_embedding(model, vector, normalize))

    async def EmbedImages(
        self, request: pb.EmbedImagesRequest, context: Context
    ) -> pb.EmbedImagesResponse:
        """Embed a batch; per-image faults are reported in-band, in order."""
        _check_count(len(request.images), self._limits.max_batch_images, "images")
        model = await self._model(request.model)
        normalize = _flag(request, "normalize")
        caller, wait_s = caller_of(context), seconds_until(patience(context))
        with message_hold() as held:
            async with model.batcher.admit(caller, len(request.images), wait_s):
                outcomes = await self._images.embed_many(
                    model, caller, request.images, normalize, budget_deadline(context), held
                )
        name = model.name
        return pb.EmbedImagesResponse(
            results=[
                pb.EmbedImagesResult(error=self._item_error(outcome))
                if isinstance(outcome, Exception)
                else pb.EmbedImagesResult(
                    embedding=pb.Embedding(
                        values=outcome.tolist(), model=name, normalized=normalize
                    )
                )
                for outcome in outcomes
            ]
        )

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
                model = self._registry.ready(request.model) or await self._registry.get(
                    request.model
                )
            except ClipVisionError as exc:
                if held is not None:
                    held.release()
                return self._answered(pb.EmbedImageStreamResponse(id=request.id), exc)
            image = request.image
            batcher = model.batcher
            try:
                await batcher.reserve(caller)
            except BaseException:
                if held is not None:
                    held.release()
                raise
            normalize = _flag(request, "normalize")
            future = self._images.start(model, caller, image, normalize, None, held)
            future.add_done_callback(lambda _: batcher.release(caller))
            respond = functools.partial(self._image_answer, request.id, model.name, normalize)
            return StreamItem(future, respond)

        async for response in answer_in_order(
            request_iterator, start, window=self._limits.stream_window, drain=self._registry
        ):
            yield response

    # -- texts ----------------------------------------------------------------

    async def EmbedText(
        self, request: pb.EmbedTextRequest, context: Context
    ) -> pb.EmbedTextResponse:
        """Embed one text; any fault fails the call."""
        model = await self._model(request.model)
        tower = model.text_tower()
        normalize = _flag(request, "normalize")
        caller, truncate = caller_of(context), _flag(request, "truncate")
        with message_hold() as held:
            async with tower.batcher.admit(caller, 1, seconds_until(patience(context))):
                text = await self._texts.embed(
                    model, caller, request.text, normalize, truncate, budget_deadline(context), held
                )
        return pb.EmbedTextResponse(embedding=_text_embedding(model, text, normalize))

    async def EmbedTexts(
        self, request: pb.EmbedTextsRequest, context: Context
    ) -> pb.EmbedTextsResponse:
        """Embed a batch of texts; per-text faults are reported in-band, in order."""
        _check_count(len(request.texts), self._limits.max_batch_texts, "texts")
        model = await self._model(request.model)
        tower = model.text_tower()
        normalize, truncate = _flag(request, "normalize"), _flag(request, "truncate")
        caller, wait_s = caller_of(context), seconds_until(patience(context))
        with message_hold() as held:
            async with tower.batcher.admit(caller, len(request.texts), wait_s):
                outcomes = await self._texts.embed_many(
                    model,
                    caller,
                    request.texts,
                    normalize,
                    truncate,
                    budget_deadline(context),
                    held,
                )
        name = model.name
        return pb.EmbedTextsResponse(
            results=[
                pb.EmbedTextsResult(error=self._item_error(outcome))
                if isinstance(outcome, Exception)
                else pb.EmbedTextsResult(
                    embedding=pb.Embedding(
                        values=outcome.vector.tolist(),
                        model=name,
                        normalized=normalize,
                        truncated=outcome.truncated,
                    )
                )
                for outcome in outcomes
            ]
        )

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
                model = self._registry.ready(request.model) or await self._registry.get(
                    request.model
                )
                batcher = model.text_tower().batcher
            except ClipVisionError as exc:
                if held is not None:
                    held.release()
                return self._answered(pb.EmbedTextStreamResponse(id=request.id), exc)
            try:
                await batcher.reserve(caller)
            except BaseException:
                if held is not None:
                    held.release()
                raise
            normalize = _flag(request, "normalize")
            future = self._texts.start(
                model, caller, request.text, normalize, _flag(request, "truncate"), None, held
            )
            future.add_done_callback(lambda _: batcher.release(caller))
            respond = functools.partial(self._text_answer, request.id, model.name, normalize)
            return StreamItem(future, respond)

        async for response in answer_in_order(
            request_iterator, start, window=self._limits.stream_window, drain=self._registry
        ):
            yield response

    async def Classify(self, request: pb.ClassifyRequest, context: Context) -> pb.ClassifyResponse:
        """Score one image against labels as the model's family does (softmax over the labels,
        or a sigmoid per label), in label order."""
        labels = list(request.labels)
        check_labels(
            labels,
            request.prompt_template,
            self._limits.max_classify_labels,
            self._limits.max_text_bytes,
        )
        model = await self._registry.get(request.model)
        tower = model.text_tower()
        caller, deadline = caller_of(context), budget_deadline(context)
        wait_s = seconds_until(patience(context))
        async with (
            model.batcher.admit(caller, 1, wait_s),
            tower.batcher.admit(caller, len(labels), wait_s),
        ):
            scores = await self._classify.classify(
                model,
                caller,
                request.image,
                labels,
                request.prompt_template,
                _flag(request, "truncate"),
                deadline,
            )
        return pb.ClassifyResponse(
            model=model.name,
            scores=[
                pb.LabelScore(label=label, probability=p, cosine=c, truncated=t)
                for label, p, c, t in zip(
                    labels,
                    scores.probabilities.tolist(),
                    scores.cosines.tolist(),
                    scores.truncated,
                    strict=True,
                )
            ],
            score_type=_SCORE_TYPES[scores.score],
        )

    # -- the models -----------------------------------------------------------

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: Context
    ) -> pb.GetModelInfoResponse:
        """Describe the served models and the server's limits."""
        models = []
        for index, spec in enumerate(self._registry.specs):
            info = pb.ModelInfo(name=spec.name, source=spec.source, is_default=index == 0)
            info.dummy_weights = self._registry.dummy_weights
            served = self._registry.loaded(spec.name)
            if served is not None:
                _describe(info, served)
            models.append(info)
        limits = pb.Limits()
        limits.CopyFrom(self._limits)
        limits.memory_budget_bytes = self._registry.budget.total
        limits.max_image_pixels = self._registry.pixel_limit
        return pb.GetModelInfoResponse(models=models, limits=limits)

    # -- items ----------------------------------------------------------------

    async def _model(self, name: str) -> ServedModel:
        """The model a call names, without a wait when it is loaded (the common case)."""
        return self._registry.ready(name) or await self._registry.get(name)

    def _image_answer(
        self, request_id: str, model: str, normalize: bool, outcome: FloatArray | Exception
    ) -> pb.EmbedImageStreamResponse:
        if isinstance(outcome, Exception):
            return pb.EmbedImageStreamResponse(id=request_id, error=self._item_error(outcome))
        embedding = pb.Embedding(values=outcome.tolist(), model=model, normalized=normalize)
        return pb.EmbedImageStreamResponse(id=request_id, embedding=embedding)

    def _text_answer(
        self, request_id: str, model: str, normalize: bool, outcome: TextVector | Exception
    ) -> pb.EmbedTextStreamResponse:
        if isinstance(outcome, Exception):
            return pb.EmbedTextStreamResponse(id=request_id, error=self._item_error(outcome))
        embedding = pb.Embedding(
            values=outcome.vector.tolist(),
            model=model,
            normalized=normalize,
            truncated=outcome.truncated,
        )
        return pb.EmbedTextStreamResponse(id=request_id, embedding=embedding)

    def _answered(
        self, response: StreamResponse, error: ClipVisionError
    ) -> StreamItem[StreamResponse]:
        """A stream item answered at once with its fault (an unknown model, say)."""
        response.error.CopyFrom(self._item_error(error))
        return StreamItem(answered(response), _same)

    def _item_error(self, exc: Exception) -> pb.ItemError:
        """The in-band form of a per-item fault, counted; bugs are logged without detail out."""
        error = item_error(exc)
        if self._observer is not None:
            self._observer.on_item_error(error.reason)
        return error


def _same(response: Any) -> Any:
    return response


def _check_count(count: int, limit: int, what: str) -> None:
    if count > limit:
        stream = "EmbedImageStream" if what == "images" else "EmbedTextStream"
        raise InvalidRequestError(
            Reason.TOO_MANY_IMAGES if what == "images" else Reason.TOO_MANY_TEXTS,
            f"The request has {count} {what} and the limit is {limit}; split it or use {stream}.",
        )


def _flag(request: Any, name: str) -> bool:
    """An ``optional bool`` request field; unset means true (normalize, truncate)."""
    return bool(getattr(request, name)) if request.HasField(name) else True


def _embedding(model: ServedModel, vector: FloatArray, normalized: bool) -> pb.Embedding:
    return pb.Embedding(values=vector.tolist(), model=model.name, normalized=normalized)


def _text_embedding(model: ServedModel, text: TextVector, normalized: bool) -> pb.Embedding:
    return pb.Embedding(
        values=text.vector.tolist(),
        model=model.name,
        normalized=normalized,
        truncated=text.truncated,
    )


def _describe(info: pb.ModelInfo, served: ServedModel) -> None:
    checkpoint = served.encoder.checkpoint
    info.embedding_dimension = checkpoint.embedding_dim
    info.image_size = checkpoint.image_size
    info.dtype = str(checkpoint.dtype).removeprefix("torch.")
    info.device = str(checkpoint.device)
    info.dummy_weights = checkpoint.dummy_weights
    info.loaded = True
    info.preprocessing.CopyFrom(_preprocessing(checkpoint.preprocess))
    info.preprocessing.resize_device = served.encoder.preprocess_device
    info.modalities.append(pb.MODALITY_IMAGE)
    info.image_runtime = served.encoder.backend
    if served.text is not None:
        info.text_runtime = served.text.encoder.backend
        tower = served.text.encoder.tower
        info.modalities.append(pb.MODALITY_TEXT)
        info.text_context_length = tower.context_length
        info.vocab_size = tower.vocab_size
        info.logit_scale = tower.logit_scale
        info.score_type = _SCORE_TYPES[tower.family.score]
        if tower.logit_bias is not None:
            info.logit_bias = tower.logit_bias
    info.family = checkpoint.family.name


def _preprocessing(config: PreprocessConfig) -> pb.Preprocessing:
    crop = config.do_center_crop
    return pb.Preprocessing(
        exif_transpose=True,
        resize_shortest_edge=config.shortest_edge,
        resize_height=config.resize_height,
        resize_width=config.resize_width,
        interpolation=_INTERPOLATIONS.get(config.resample, pb.INTERPOLATION_UNSPECIFIED),
        crop_height=config.crop_height if crop else 0,
        crop_width=config.crop_width if crop else 0,
        rescale_factor=config.rescale_factor,
        mean=list(config.mean),
        std=list(config.std),
    )


_SCORE_TYPES: dict[Score, pb.ScoreType.ValueType] = {
    Score.SOFTMAX: pb.SCORE_TYPE_SOFTMAX,
    Score.SIGMOID: pb.SCORE_TYPE_SIGMOID,
}

# PIL.Image.Resampling values, as preprocessor_config.json stores them.
_INTERPOLATIONS: dict[int, pb.Interpolation.ValueType] = {
    0: pb.INTERPOLATION_NEAREST,
    1: pb.INTERPOLATION_LANCZOS,
    2: pb.INTERPOLATION_BILINEAR,
    3: pb.INTERPOLATION_BICUBIC,
    4: pb.INTERPOLATION_BOX,
    5: pb.INTERPOLATION_HAMMING,
}
