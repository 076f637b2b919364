"""clipvision.v1.EmbeddingService's unary methods for any protocol: messages in, messages out.

Each method checks the request against the contract's limits, finds the model,
admits the call's items, and hands each item to its modality's pipeline (images,
texts, classify). gRPC (api.embedding_service) and HTTP (http.connect, and the
OpenAI and Weaviate routes) call the same methods, so every protocol gives the
same answer under the same limits. Faults are domain errors: raised for the call,
or answered in-band per item (EmbedImages, EmbedTexts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from clipvision.server.errors import InvalidRequestError, Reason
from clipvision.server.pipelines.classify import ClassifyPipeline, check_labels
from clipvision.server.pipelines.images import ImagePipeline, ImageSource
from clipvision.server.pipelines.item_errors import ItemErrorObserver, item_error
from clipvision.server.pipelines.scope import CallScope, message_hold
from clipvision.server.pipelines.texts import TextPipeline, TextVector
from clipvision.server.resources.admission import seconds_until
from clipvision.server.runtime.families import Score
from clipvision.server.runtime.image_encoder import FloatArray
from clipvision.server.runtime.models import ModelRegistry, ServedModel
from clipvision.server.runtime.preprocess import PreprocessConfig
from clipvision.v1 import embedding_service_pb2 as pb


class EmbeddingPlane:
    """EmbedImage(s), EmbedText(s), Classify and GetModelInfo over the registry and pipelines.

    ``limits`` is what GetModelInfo reports, and what the methods enforce.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        images: ImagePipeline,
        texts: TextPipeline,
        limits: pb.Limits,
        observer: ItemErrorObserver | None = None,
    ) -> None:
        self.registry = registry
        self.images = images
        self.texts = texts
        self.limits = limits
        self._classify = ClassifyPipeline(images, texts)
        self._observer = observer

    # -- images ---------------------------------------------------------------

    async def embed_image(
        self, request: pb.EmbedImageRequest, call: CallScope
    ) -> pb.EmbedImageResponse:
        """Embed one image; any fault fails the call."""
        model = await self.model(request.model)
        normalize = flag(request, "normalize")
        with message_hold() as held:
            async with model.batcher.admit(call.caller, 1, seconds_until(call.patience())):
                vector = await self.images.embed(
                    model, call.caller, request.image, normalize, call.budget_deadline(), held
                )
        response = pb.EmbedImageResponse()
        fill_embedding(response.embedding, vector, model.name, normalize)
        return response

    async def embed_images(
        self, request: pb.EmbedImagesRequest, call: CallScope
    ) -> pb.EmbedImagesResponse:
        """Embed a batch; per-image faults are reported in-band, in order."""
        normalize = flag(request, "normalize")
        model, outcomes = await self.image_outcomes(request.model, request.images, normalize, call)
        name = model.name
        response = pb.EmbedImagesResponse()
        add = response.results.add
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                add().error.CopyFrom(self.item_error(outcome))
            else:
                fill_embedding(add().embedding, outcome, name, normalize)
        return response

    async def image_outcomes(
        self, model_name: str, images: Sequence[ImageSource], normalize: bool, call: CallScope
    ) -> tuple[ServedModel, list[FloatArray | Exception]]:
        """EmbedImages' work for any protocol: the model, and each image's vector or fault."""
        check_count(len(images), self.limits.max_batch_images, "images")
        model = await self.model(model_name)
        wait_s = seconds_until(call.patience())
        with message_hold() as held:
            async with model.batcher.admit(call.caller, len(images), wait_s):
                outcomes = await self.images.embed_many(
                    model, call.caller, images, normalize, call.budget_deadline(), held
                )
        return model, outcomes

    # -- texts ----------------------------------------------------------------

    async def embed_text(
        self, request: pb.EmbedTextRequest, call: CallScope
    ) -> pb.EmbedTextResponse:
        """Embed one text; any fault fails the call."""
        model = await self.model(request.model)
        tower = model.text_tower()
        normalize, truncate = flag(request, "normalize"), flag(request, "truncate")
        with message_hold() as held:
            async with tower.batcher.admit(call.caller, 1, seconds_until(call.patience())):
                text = await self.texts.embed(
                    model,
                    call.caller,
                    request.text,
                    normalize,
                    truncate,
                    call.budget_deadline(),
                    held,
                )
        response = pb.EmbedTextResponse()
        fill_embedding(response.embedding, text.vector, model.name, normalize, text.truncated)
        return response

    async def embed_texts(
        self, request: pb.EmbedTextsRequest, call: CallScope
    ) -> pb.EmbedTextsResponse:
        """Embed a batch of texts; per-text faults are reported in-band, in order."""
        normalize, truncate = flag(request, "normalize"), flag(request, "truncate")
        model, outcomes = await self.text_outcomes(
            request.model, request.texts, normalize, truncate, call
        )
        name = model.name
        response = pb.EmbedTextsResponse()
        add = response.results.add
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                add().error.CopyFrom(self.item_error(outcome))
            else:
                fill_embedding(add().embedding, outcome.vector, name, normalize, outcome.truncated)
        return response

    async def text_outcomes(
        self,
        model_name: str,
        texts: Sequence[str],
        normalize: bool,
        truncate: bool,
        call: CallScope,
    ) -> tuple[ServedModel, list[TextVector | Exception]]:
        """EmbedTexts' work for any protocol: the model, and each text's vector or fault."""
        check_count(len(texts), self.limits.max_batch_texts, "texts")
        model = await self.model(model_name)
        tower = model.text_tower()
        wait_s = seconds_until(call.patience())
        with message_hold() as held:
            async with tower.batcher.admit(call.caller, len(texts), wait_s):
                outcomes = await self.texts.embed_many(
                    model, call.caller, texts, normalize, truncate, call.budget_deadline(), held
                )
        return model, outcomes

    async def classify(self, request: pb.ClassifyRequest, call: CallScope) -> pb.ClassifyResponse:
        """Score one image against labels as the model's family does (softmax over the labels,
        or a sigmoid per label), in label order."""
        labels = list(request.labels)
        check_labels(
            labels,
            request.prompt_template,
            self.limits.max_classify_labels,
            self.limits.max_text_bytes,
        )
        model = await self.registry.get(request.model)
        tower = model.text_tower()
        caller, deadline = call.caller, call.budget_deadline()
        wait_s = seconds_until(call.patience())
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
                flag(request, "truncate"),
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

    def model_info(self) -> pb.GetModelInfoResponse:
        """Describe the served models and the server's limits."""
        models = []
        for index, spec in enumerate(self.registry.specs):
            info = pb.ModelInfo(name=spec.name, source=spec.source, is_default=index == 0)
            info.dummy_weights = self.registry.dummy_weights
            served = self.registry.loaded(spec.name)
            if served is not None:
                _describe(info, served)
            models.append(info)
        limits = pb.Limits()
        limits.CopyFrom(self.limits)
        limits.memory_budget_bytes = self.registry.budget.total
        limits.max_image_pixels = self.registry.pixel_limit
        return pb.GetModelInfoResponse(models=models, limits=limits)

    async def model(self, name: str) -> ServedModel:
        """The model a call names, without a wait when it is loaded (the common case)."""
        return self.registry.ready(name) or await self.registry.get(name)

    def item_error(self, exc: Exception) -> pb.ItemError:
        """The in-band form of a per-item fault, counted; bugs are logged without detail out."""
        error = item_error(exc)
        if self._observer is not None:
            self._observer.on_item_error(error.reason)
        return error


def check_count(count: int, limit: int, what: str) -> None:
    """Refuse a batch of more than ``limit`` images or texts (``what``), naming the stream."""
    if count > limit:
        stream = "EmbedImageStream" if what == "images" else "EmbedTextStream"
        raise InvalidRequestError(
            Reason.TOO_MANY_IMAGES if what == "images" else Reason.TOO_MANY_TEXTS,
            f"The request has {count} {what} and the limit is {limit}; split it or use {stream}.",
        )


def flag(request: Any, name: str) -> bool:
    """An ``optional bool`` request field; unset means true (normalize, truncate)."""
    return bool(getattr(request, name)) if request.HasField(name) else True


def fill_embedding(
    embedding: pb.Embedding,
    vector: FloatArray,
    model: str,
    normalized: bool,
    truncated: bool = False,
) -> None:
    """Write one vector into a response's Embedding in place: an Embedding built on its own
    and handed to its parent is copied into it (0.5-0.9 us an item, measured)."""
    embedding.values.extend(vector.tolist())
    embedding.model = model
    embedding.normalized = normalized
    embedding.truncated = truncated


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
