"""The Open Inference Protocol (v2) on gRPC: tensors in, one call into the pipelines, tensors out.

Each served model appears twice to the protocol: ``<name>`` embeds images (input
``IMAGE``, BYTES, encoded image files) and ``<name>-text`` embeds texts (input
``TEXT``, BYTES, UTF-8) where the text tower is served; both answer ``EMBEDDING``,
FP32, ``[N, D]``. A request goes through the same admission, pipelines, batchers,
limits, metrics and interceptors as EmbedImages and EmbedTexts; only the tensor
framing is the protocol's. The protocol has no per-item errors: one bad element
fails the request, naming its index and reason.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import struct
from collections.abc import AsyncIterator, Awaitable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from clipvision.inference_v2 import grpc_service_pb2 as oip
from clipvision.inference_v2 import grpc_service_pb2_grpc as oip_grpc
from clipvision.server.api.call_context import (
    Context,
    budget_deadline,
    caller_of,
    message_hold,
    patience,
)
from clipvision.server.api.item_errors import ItemErrorObserver
from clipvision.server.api.streams import StreamItem, answer_in_order, answered
from clipvision.server.errors import (
    ClipVisionError,
    InvalidRequestError,
    MethodNotFoundError,
    ModelNotFoundError,
    OverloadedError,
    Reason,
)
from clipvision.server.ops.calls import take_read_hold
from clipvision.server.ops.health import HealthReporter
from clipvision.server.pipelines.gather import all_or_none
from clipvision.server.pipelines.images import ImagePipeline
from clipvision.server.pipelines.texts import TextPipeline
from clipvision.server.resources.admission import seconds_until
from clipvision.server.runtime.batcher import MicroBatcher
from clipvision.server.runtime.image_encoder import FloatArray
from clipvision.server.runtime.models import ModelRegistry, ServedModel
from clipvision.v1 import embedding_service_pb2 as pb

logger = logging.getLogger(__name__)

SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
TEXT_SUFFIX = "-text"
VERSION = "1"
OUTPUT = "EMBEDDING"
PLATFORM = "clipvision"
# The request parameters we read; the protocol's others (priority, timeouts, sequence
# ids, binary_data...) are accepted and ignored.
NORMALIZE = "normalize"
TRUNCATE = "truncate"

T = TypeVar("T")

# The protocol's RPCs clipvision does not implement (Triton's grpc_service.proto).
OTHER_RPCS = frozenset(
    {
        "ModelStatistics",
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
        "SystemSharedMemoryStatus",
        "SystemSharedMemoryRegister",
        "SystemSharedMemoryUnregister",
        "CudaSharedMemoryStatus",
        "CudaSharedMemoryRegister",
        "CudaSharedMemoryUnregister",
        "TraceSetting",
        "LogSettings",
    }
)

INTERNAL_MESSAGE = "The server failed on this request because of a bug; it has been logged."


@dataclass(frozen=True)
class _Job:
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


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """Implements inference.GRPCInferenceService on top of the registry and the pipelines.

    ``limits`` are the ones EmbeddingServicer enforces; ``lazy`` says whether a
    model that is not loaded yet is loaded by the first call (then it counts as ready).
    """

    def __init__(
        self,
        registry: ModelRegistry,
        images: ImagePipeline,
        texts: TextPipeline,
        health: HealthReporter,
        limits: pb.Limits,
        *,
        lazy: bool = False,
        observer: ItemErrorObserver | None = None,
    ) -> None:
        self._registry = registry
        self._images = images
        self._texts = texts
        self._health = health
        self._limits = limits
        self._lazy = lazy
        self._observer = observer

    # -- health and metadata ---------------------------------------------------

    async def ServerLive(
        self, request: oip.ServerLiveRequest, context: Context
    ) -> oip.ServerLiveResponse:
        """Live whenever the process answers."""
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: oip.ServerReadyRequest, context: Context
    ) -> oip.ServerReadyResponse:
        """Ready exactly when grpc.health.v1 reports the server SERVING."""
        return oip.ServerReadyResponse(ready=await self._serving(context))

    async def ModelReady(
        self, request: oip.ModelReadyRequest, context: Context
    ) -> oip.ModelReadyResponse:
        """Ready when the server is, and the model is loaded (or lazy mode will load it)."""
        try:
            name, text = self._resolve(request.name, request.version)
        except ModelNotFoundError:
            return oip.ModelReadyResponse(ready=False)
        if not await self._serving(context) or self._registry.draining:
            return oip.ModelReadyResponse(ready=False)
        served = self._registry.loaded(name)
        if served is None:
            return oip.ModelReadyResponse(ready=self._lazy)
        return oip.ModelReadyResponse(ready=not text or served.text is not None)

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: Context
    ) -> oip.ServerMetadataResponse:
        """The server's name and version; it implements no protocol extensions."""
        return oip.ServerMetadataResponse(
            name="clipvision", version=importlib.metadata.version("clipvision")
        )

    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: Context
    ) -> oip.ModelMetadataResponse:
        """IMAGE or TEXT (BYTES, [-1]) in, EMBEDDING (FP32, [-1, D]) out."""
        model, text = await self._model(request.name, request.version)
        if text:
            model.text_tower()  # FAILED_PRECONDITION without one
        tensor = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=_oip_name(model, text),
            versions=[VERSION],
            platform=PLATFORM,
            inputs=[tensor(name=_input_name(text), datatype="BYTES", shape=[-1])],
            outputs=[tensor(name=OUTPUT, datatype="FP32", shape=[-1, _dimension(model)])],
        )

    async def ModelConfig(
        self, request: oip.ModelConfigRequest, context: Context
    ) -> oip.ModelConfigResponse:
        """Triton's form: a batch of up to max_batch_size elements, dims without the batch."""
        model, text = await self._model(request.name, request.version)
        if text:
            model.text_tower()
        limit = self._limits.max_batch_texts if text else self._limits.max_batch_images
        config = oip.ModelConfig(
            name=_oip_name(model, text),
            platform=PLATFORM,
            backend=PLATFORM,
            max_batch_size=limit,
            # One element per batch item: requests may shape it [N] or [N, 1].
            input=[oip.ModelInput(name=_input_name(text), data_type=oip.TYPE_STRING, dims=[1])],
            output=[
                oip.ModelOutput(name=OUTPUT, data_type=oip.TYPE_FP32, dims=[_dimension(model)])
            ],
        )
        return oip.ModelConfigResponse(config=config)

    # -- inference ---------------------------------------------------------------

    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: Context
    ) -> oip.ModelInferResponse:
        """Embed a batch; any bad element fails the call, naming its index and reason."""
        # The message's read room stays held for the whole call: the request, and the copy
        # of each element split from it, live until the answer.
        with message_hold():
            job = await self._job(request)
            caller, wait_s = caller_of(context), seconds_until(patience(context))
            async with job.batcher.admit(caller, len(job.elements), wait_s):
                return await self._run(job, caller, budget_deadline(context))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[oip.ModelInferRequest], context: Context
    ) -> AsyncIterator[oip.ModelStreamInferResponse]:
        """One response per request, in order; a failed request is answered in error_message."""
        caller = caller_of(context)

        async def start(
            request: oip.ModelInferRequest,
        ) -> StreamItem[oip.ModelStreamInferResponse]:
            held = take_read_hold()  # kept until this request is answered, as ModelInfer's
            try:
                job = await self._job(request)
                batcher, count = job.batcher, len(job.elements)
                limit = batcher.capacity.limit
                if count > limit:  # it could never be admitted
                    raise InvalidRequestError(
                        Reason.REQUEST_MALFORMED,
                        f"The request has {count} elements and the model's queue holds "
                        f"{limit}; split it into several requests.",
                    )
            except ClipVisionError as exc:
                if held is not None:
                    held.release()
                return StreamItem(answered(self._stream_error(request, exc)), _same)
            # Waiting here stops the reading: the stream's backpressure, as EmbedImageStream.
            # The whole request at once, so that streams holding part of their requests
            # cannot block each other.
            try:
                await batcher.reserve(caller, count)
            except BaseException:
                if held is not None:
                    held.release()
                raise

            async def run() -> oip.ModelStreamInferResponse:
                try:
                    return oip.ModelStreamInferResponse(
                        infer_response=await self._run(job, caller, None)
                    )
                except Exception as exc:
                    return self._stream_error(request, exc)

            task = asyncio.get_running_loop().create_task(run())

            def finished(_: object) -> None:
                # A done-callback, not a finally: a task cancelled before it starts runs no code.
                batcher.release(caller, count)
                if held is not None:
                    held.release()

            task.add_done_callback(finished)
            return StreamItem(task, _same)

        async for response in answer_in_order(
            request_iterator, start, window=self._limits.stream_window, drain=self._registry
        ):
            yield response

    # -- requests ------------------------------------------------------------------

    async def _job(self, request: oip.ModelInferRequest) -> _Job:
        """Check the request against the model's tensors and the limits; find the model."""
        model, text = await self._model(request.model_name, request.model_version)
        if text:
            model.text_tower()
        limit = self._limits.max_batch_texts if text else self._limits.max_batch_images
        # The limit is enforced while the elements are split, not after: 64 MB of
        # zero-length elements would otherwise be millions of objects made on the loop.
        elements = _elements(request, _input_name(text), limit, text)
        for output in request.outputs:
            if output.name != OUTPUT:
                raise InvalidRequestError(
                    Reason.REQUEST_MALFORMED,
                    f"The request asks for output {output.name[:64]!r}; this model has one "
                    f"output, {OUTPUT}.",
                )
        return _Job(
            request,
            model,
            text,
            elements,
            _bool_parameter(request, NORMALIZE),
            _bool_parameter(request, TRUNCATE),
        )

    async def _run(self, job: _Job, caller: str, deadline: float | None) -> oip.ModelInferResponse:
        """Embed every element of an admitted job; the first failure fails it all."""
        embed = self._embed_text if job.text else self._embed_image
        items: list[Awaitable[FloatArray]] = [
            embed(job, caller, index, deadline) for index in range(len(job.elements))
        ]
        vectors = await all_or_none(items)
        dimension = _dimension(job.model)
        matrix = (
            np.stack(vectors).astype("<f4", copy=False)
            if vectors
            else np.zeros((0, dimension), "<f4")
        )
        output = oip.ModelInferResponse.InferOutputTensor(
            name=OUTPUT, datatype="FP32", shape=[len(vectors), dimension]
        )
        return oip.ModelInferResponse(
            model_name=_oip_name(job.model, job.text),
            model_version=VERSION,
            id=job.request.id,
            outputs=[output],
            raw_output_contents=[matrix.tobytes()],
        )

    async def _embed_image(
        self, job: _Job, caller: str, index: int, deadline: float | None
    ) -> FloatArray:
        image = job.elements[index]
        job.elements[index] = b""  # the pipeline holds it now, until it is decoded
        return await _at_index(
            self._images.embed(job.model, caller, image, job.normalize, deadline), "IMAGE", index
        )

    async def _embed_text(
        self, job: _Job, caller: str, index: int, deadline: float | None
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

    def _stream_error(
        self, request: oip.ModelInferRequest, exc: Exception
    ) -> oip.ModelStreamInferResponse:
        """A failed stream request, answered in-band; bugs are logged, not shown."""
        if isinstance(exc, ClipVisionError):
            reason = exc.reason.value
            # Item faults name their reason already (see _at_index).
            named = f" ({reason})" if reason not in exc.message else ""
            message = f"{exc.code.name}{named}: {exc.message}"
        else:
            logger.error("unexpected failure on one ModelStreamInfer request", exc_info=exc)
            message, reason = f"INTERNAL {Reason.INTERNAL.value}: {INTERNAL_MESSAGE}", "INTERNAL"
        if self._observer is not None:
            self._observer.on_item_error(reason)
        response = oip.ModelInferResponse(model_name=request.model_name, id=request.id)
        return oip.ModelStreamInferResponse(error_message=message, infer_response=response)

    # -- models --------------------------------------------------------------------

    def _resolve(self, name: str, version: str) -> tuple[str, bool]:
        """The served model's name for a protocol name, and whether it is the text model."""
        names = [spec.name for spec in self._registry.specs]
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
        listed = ", ".join(repr(n) for n in self._oip_names(names))
        raise ModelNotFoundError(
            Reason.MODEL_NOT_FOUND,
            f"Model {name[:64]!r} is not served here; the models are {listed} (names ending "
            f"in {TEXT_SUFFIX!r} embed texts).",
        )

    def _oip_names(self, names: list[str]) -> list[str]:
        """Each served model's name, and its text model's unless it is known to have none."""
        listed = []
        for name in names:
            served = self._registry.loaded(name)
            listed.append(name)
            if served is None or served.text is not None:
                listed.append(name + TEXT_SUFFIX)
        return listed

    async def _model(self, name: str, version: str) -> tuple[ServedModel, bool]:
        served, text = self._resolve(name, version)
        return await self._registry.get(served), text

    async def _serving(self, context: Context) -> bool:
        """What grpc.health.v1 reports for the whole server (loading, draining, watchdog)."""
        request = health_pb2.HealthCheckRequest(service="")
        response = await self._health.servicer.Check(request, context)
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def add_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Register the protocol's service, and UNIMPLEMENTED for its RPCs clipvision lacks.

    Those are registered methods too: a path no service registers is refused before
    grpc reads it (wire.listener), and Triton's clients deserve the sentence below.
    """
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    server.add_registered_method_handlers(  # type: ignore[attr-defined]  # grpc-stubs lacks it
        SERVICE_NAME, {name: _unimplemented(name) for name in sorted(OTHER_RPCS)}
    )


def _unimplemented(name: str) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler answering one of the protocol's other RPCs (repository, statistics, shared
    memory, trace, logging) with UNIMPLEMENTED and a sentence, through the interceptors."""

    async def refuse(request: bytes, context: Context) -> bytes:
        raise MethodNotFoundError(
            Reason.METHOD_NOT_FOUND,
            f"clipvision does not implement {name} of the Open Inference Protocol; it "
            "serves health, metadata, ModelInfer and ModelStreamInfer.",
        )

    handler: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(refuse)
    return handler


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


def _input_name(text: bool) -> str:
    return "TEXT" if text else "IMAGE"


def _oip_name(model: ServedModel, text: bool) -> str:
    return model.name + TEXT_SUFFIX if text else model.name


def _dimension(model: ServedModel) -> int:
    return model.encoder.checkpoint.embedding_dim


def _same(response: Any) -> Any:
    return response
