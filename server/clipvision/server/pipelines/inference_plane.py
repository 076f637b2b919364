"""The Open Inference Protocol (v2) for any transport: its models, tensors and inference.

Each served model appears twice to the protocol: ``<name>`` embeds images (input
``IMAGE``, BYTES, encoded image files) and ``<name>-text`` embeds texts (input
``TEXT``, BYTES, UTF-8) where the text tower is served; both answer ``EMBEDDING``,
FP32, ``[N, D]``. gRPC (api.inference_service) and REST (http.oip) hand the plane
the protocol's own messages, so both name the same models and tensors and give the
same answers; a request goes through the same admission, pipelines, batchers and
limits as EmbedImages and EmbedTexts. The protocol has no per-item errors: one bad
element fails the request, naming its index and reason.
"""

from __future__ import annotations

import importlib.metadata
import struct
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from clipvision.inference_v2 import grpc_service_pb2 as oip
from clipvision.server.errors import (
    ClipVisionError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    Reason,
)
from clipvision.server.pipelines.gather import all_or_none
from clipvision.server.pipelines.images import ImagePipeline
from clipvision.server.pipelines.scope import CallScope, message_hold
from clipvision.server.pipelines.texts import TextPipeline
from clipvision.server.resources.admission import seconds_until
from clipvision.server.runtime.batcher import MicroBatcher
from clipvision.server.runtime.image_encoder import FloatArray
from clipvision.server.runtime.models import ModelRegistry, ServedModel
from clipvision.v1 import embedding_service_pb2 as pb

TEXT_SUFFIX = "-text"
VERSION = "1"
OUTPUT = "EMBEDDING"
PLATFORM = "clipvision"
# The request parameters we read; the protocol's others (priority, timeouts, sequence
# ids, binary_data...) are accepted and ignored.
NORMALIZE = "normalize"
TRUNCATE = "truncate"

T = TypeVar("T")


@dataclass(frozen=True)
class InferenceJob:
    """A checked inference request: its model, modality, elements and options."""

    request: oip.ModelInferRequest
    model: ServedModel
    text: bool
    elements: list[bytes]
    normalize: bool
    truncate: bool

    @property
    def batcher(self) -> MicroBatcher[Any]:
        """The batcher whose capacity the request's items take."""
        return self.model.text_tower().batcher if self.text else self.model.batcher


class InferencePlane:
    """The protocol's models, metadata and inference over the registry and the pipelines.

    ``limits`` are the ones EmbeddingService enforces; ``lazy`` says whether a model
    that is not loaded yet is loaded by the first call (then it counts as ready).
    """

    def __init__(
        self,
        registry: ModelRegistry,
        images: ImagePipeline,
        texts: TextPipeline,
        limits: pb.Limits,
        *,
        lazy: bool = False,
    ) -> None:
        self.registry = registry
        self._images = images
        self._texts = texts
        self.limits = limits
        self._lazy = lazy

    # -- health and metadata ---------------------------------------------------

    def model_ready(self, name: str, version: str, serving: bool) -> bool:
        """Ready when the server is ``serving``, and the model is loaded (or lazy mode will
        load it); an unknown model is not ready."""
        try:
            base, text = self.resolve(name, version)
        except ModelNotFoundError:
            return False
        if not serving or self.registry.draining:
            return False
        served = self.registry.loaded(base)
        if served is None:
            return self._lazy
        return not text or served.text is not None

    def server_metadata(self) -> oip.ServerMetadataResponse:
        """The server's name and version; it implements no protocol extensions."""
        return oip.ServerMetadataResponse(
            name="clipvision", version=importlib.metadata.version("clipvision")
        )

    async def model_metadata(self, name: str, version: str) -> oip.ModelMetadataResponse:
        """IMAGE or TEXT (BYTES, [-1]) in, EMBEDDING (FP32, [-1, D]) out."""
        model, text = await self._model(name, version)
        tensor = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=oip_name(model, text),
            versions=[VERSION],
            platform=PLATFORM,
            inputs=[tensor(name=input_name(text), datatype="BYTES", shape=[-1])],
            outputs=[tensor(name=OUTPUT, datatype="FP32", shape=[-1, dimension(model)])],
        )

    async def model_config(self, name: str, version: str) -> oip.ModelConfig:
        """Triton's form: a batch of up to max_batch_size elements, dims without the batch."""
        model, text = await self._model(name, version)
        limit = self.limits.max_batch_texts if text else self.limits.max_batch_images
        return oip.ModelConfig(
            name=oip_name(model, text),
            platform=PLATFORM,
            backend=PLATFORM,
            max_batch_size=limit,
            # One element per batch item: requests may shape it [N] or [N, 1].
            input=[oip.ModelInput(name=input_name(text), data_type=oip.TYPE_STRING, dims=[1])],
            output=[oip.ModelOutput(name=OUTPUT, data_type=oip.TYPE_FP32, dims=[dimension(model)])],
        )

    # -- inference ---------------------------------------------------------------

    async def infer(
        self, request: oip.ModelInferRequest, call: CallScope
    ) -> oip.ModelInferResponse:
        """Embed a batch; any bad element fails the call, naming its index and reason."""
        # The message's read room stays held for the whole call: the request, and the copy
        # of each element split from it, live until the answer.
        with message_hold():
            job = await self.job(request)
            wait_s = seconds_until(call.patience())
            async with job.batcher.admit(call.caller, len(job.elements), wait_s):
                return await self.run(job, call.caller, call.budget_deadline())

    async def job(self, request: oip.ModelInferRequest) -> InferenceJob:
        """Check the request against the model's tensors and the limits; find the model."""
        model, text = await self._model(request.model_name, request.model_version)
        limit = self.limits.max_batch_texts if text else self.limits.max_batch_images
        # The limit is enforced while the elements are split, not after: 64 MB of
        # zero-length elements would otherwise be millions of objects made on the loop.
        elements = _elements(request, input_name(text), limit, text)
        for output in request.outputs:
            if output.name != OUTPUT:
                raise InvalidRequestError(
                    Reason.REQUEST_MALFORMED,
                    f"The request asks for output {output.name[:64]!r}; this model has one "
                    f"output, {OUTPUT}.",
                )
        return InferenceJob(
            request,
            model,
            text,
            elements,
            _bool_parameter(request, NORMALIZE),
            _bool_parameter(request, TRUNCATE),
        )

    async def run(
        self, job: InferenceJob, caller: str, deadline: float | None
    ) -> oip.ModelInferResponse:
        """Embed every element of an admitted job; the first failure fails it all."""
        embed = self._embed_text if job.text else self._embed_image
        items: list[Awaitable[FloatArray]] = [
            embed(job, caller, index, deadline) for index in range(len(job.elements))
        ]
        vectors = await all_or_none(items)
        size = dimension(job.model)
        matrix = (
            np.stack(vectors).astype("<f4", copy=False) if vectors else np.zeros((0, size), "<f4")
        )
        output = oip.ModelInferResponse.InferOutputTensor(
            name=OUTPUT, datatype="FP32", shape=[len(vectors), size]
        )
        return oip.ModelInferResponse(
            model_name=oip_name(job.model, job.text),
            model_version=VERSION,
            id=job.request.id,
            outputs=[output],
            raw_output_contents=[matrix.tobytes()],
        )

    async def _embed_image(
        self, job: InferenceJob, caller: str, index: int, deadline: float | None
    ) -> FloatArray:
        image = job.elements[index]
        job.elements[index] = b""  # the pipeline holds it now, until it is decoded
        return await _at_index(
            self._images.embed(job.model, caller, image, job.normalize, deadline), "IMAGE", index
        )

    async def _embed_text(
        self, job: InferenceJob, caller: str, index: int, deadline: float | None
    ) -> FloatArray:
        try:
            text = job.elements[index].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequestError(
                Reason.REQUEST_MALFORMED,
                f"TEXT element {index} is not valid UTF-8 (byte {exc.start}); send UTF-8 text.",
            ) from None
        embedded = await _at_index(
            self._texts.embed(job.model, caller, text, job.normalize, job.truncate, deadline),
            "TEXT",
            index,
        )
        return embedded.vector

    # -- models --------------------------------------------------------------------

    def resolve(self, name: str, version: str) -> tuple[str, bool]:
        """The served model's name for a protocol name, and whether it is the text model."""
        names = [spec.name for spec in self.registry.specs]
        if version not in ("", VERSION):
            raise ModelNotFoundError(
                Reason.MODEL_NOT_FOUND,
                f"Model {name[:64]!r} has no version {version[:16]!r}; its one version is "
                f"{VERSION!r} (or leave it empty).",
            )
        if not name or name in names:
            return name, False  # exact names first: a model may be called "x-text" itself
        base = name.removesuffix(TEXT_SUFFIX)
        if base != name and base in names:
            return base, True
        listed = ", ".join(repr(n) for n in self.oip_names())
        raise ModelNotFoundError(
            Reason.MODEL_NOT_FOUND,
            f"Model {name[:64]!r} is not served here; the models are {listed} (names ending "
            f"in {TEXT_SUFFIX!r} embed texts).",
        )

    def oip_names(self) -> list[str]:
        """Each served model's name, and its text model's unless it is known to have none."""
        listed = []
        for spec in self.registry.specs:
            served = self.registry.loaded(spec.name)
            listed.append(spec.name)
            if served is None or served.text is not None:
                listed.append(spec.name + TEXT_SUFFIX)
        return listed

    async def _model(self, name: str, version: str) -> tuple[ServedModel, bool]:
        """The served model and whether the text model is meant (FAILED_PRECONDITION when the
        model has no text tower)."""
        served, text = self.resolve(name, version)
        model = await self.registry.get(served)
        if text:
            model.text_tower()
        return model, text


# -- tensors -------------------------------------------------------------------------


def _elements(request: oip.ModelInferRequest, expected: str, limit: int, text: bool) -> list[bytes]:
    """The BYTES elements of the request's one input, from either of the protocol's forms.

    More than ``limit`` elements (by the shape, or found while splitting) is refused
    before the rest is split.
    """
    if len(request.inputs) != 1 or request.inputs[0].name != expected:
        given = ", ".join(repr(tensor.name[:64]) for tensor in request.inputs) or "none"
        raise InvalidRequestError(
            Reason.REQUEST_MALFORMED,
            f"This model takes one input, {expected} (BYTES); the request has {given}.",
        )
    tensor = request.inputs[0]
    if tensor.datatype != "BYTES":
        raise InvalidRequestError(
            Reason.REQUEST_MALFORMED,
            f"Input {expected} must have datatype BYTES, not {tensor.datatype[:16]!r}.",
        )
    shape = list(tensor.shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 0:
        raise InvalidRequestError(
            Reason.REQUEST_MALFORMED,
            f"Input {expected} must have shape [N] or [N, 1]; the request says {shape[:8]}.",
        )
    if shape[0] > limit:
        raise _too_many(shape[0], limit, text)
    raw = request.raw_input_contents
    if raw:
        if len(raw) != 1 or tensor.HasField("contents"):
            raise InvalidRequestError(
                Reason.REQUEST_MALFORMED,
                "Send the input's elements either in raw_input_contents (one entry per input) "
                "or in contents.bytes_contents, not both.",
            )
        elements = split_bytes(raw[0], expected, limit)
        if elements is None:  # shape[0] <= limit here, so the shape is wrong
            raise InvalidRequestError(
                Reason.REQUEST_MALFORMED,
                f"Input {expected} has shape {shape} but more than {limit} elements.",
            )
        del raw[:]  # the elements hold the bytes now
    else:
        if len(tensor.contents.bytes_contents) > limit:
            raise _too_many(len(tensor.contents.bytes_contents), limit, text)
        elements = list(tensor.contents.bytes_contents)
        tensor.contents.ClearField("bytes_contents")
    if len(elements) != shape[0]:
        raise InvalidRequestError(
            Reason.REQUEST_MALFORMED,
            f"Input {expected} has shape {shape} but {len(elements)} elements.",
        )
    return elements


def _too_many(count: int, limit: int, text: bool) -> InvalidRequestError:
    return InvalidRequestError(
        Reason.TOO_MANY_TEXTS if text else Reason.TOO_MANY_IMAGES,
        f"The request has {count} elements and the limit is {limit} "
        "(ModelConfig's max_batch_size); split it into several requests.",
    )


def split_bytes(raw: bytes, name: str, limit: int | None = None) -> list[bytes] | None:
    """A BYTES tensor's elements: each a 4-byte little-endian length, then that many bytes.

    None as soon as there are more than ``limit`` elements (the rest is not split).
    """
    elements: list[bytes] = []
    offset, size = 0, len(raw)
    while offset < size:
        if limit is not None and len(elements) == limit:
            return None
        if size - offset < 4:
            raise InvalidRequestError(
                Reason.REQUEST_MALFORMED,
                f"raw_input_contents of {name}: the length prefix at byte offset {offset} is "
                f"cut short ({size - offset} of 4 bytes); each element is a 4-byte "
                "little-endian length followed by its bytes.",
            )
        (length,) = struct.unpack_from("<I", raw, offset)
        if length > size - offset - 4:
            raise InvalidRequestError(
                Reason.REQUEST_MALFORMED,
                f"raw_input_contents of {name}: the element at byte offset {offset} claims "
                f"{length} bytes but only {size - offset - 4} follow its length prefix.",
            )
        elements.append(raw[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return elements


def _bool_parameter(request: oip.ModelInferRequest, name: str) -> bool:
    """A bool request parameter; absent means true (normalize, truncate)."""
    if name not in request.parameters:
        return True
    parameter = request.parameters[name]
    if parameter.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidRequestError(
            Reason.REQUEST_MALFORMED, f"Parameter {name!r} must be a bool (bool_param)."
        )
    return parameter.bool_param


async def _at_index(work: Coroutine[Any, Any, T], tensor: str, index: int) -> T:
    """The item's result; its fault names the element (overload stays the call's)."""
    try:
        return await work
    except OverloadedError:
        raise
    except ClipVisionError as exc:
        error = type(exc)(
            exc.reason, f"{tensor} element {index} failed ({exc.reason.value}): {exc.message}"
        )
        raise error from None


def input_name(text: bool) -> str:
    """The one input of the image model (IMAGE) or the text model (TEXT)."""
    return "TEXT" if text else "IMAGE"


def oip_name(model: ServedModel, text: bool) -> str:
    """The protocol's name of a served model's image or text model."""
    return model.name + TEXT_SUFFIX if text else model.name


def dimension(model: ServedModel) -> int:
    """The size of the model's embeddings (D of EMBEDDING's [N, D])."""
    return model.encoder.checkpoint.embedding_dim
