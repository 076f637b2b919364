"""The Open Inference Protocol (v2) on gRPC: each call handed to the protocol's data plane.

The models, tensors and inference are pipelines.inference_plane's, which the REST
form of the protocol (http.oip) calls too: ``<name>`` embeds images (``IMAGE``),
``<name>-text`` texts (``TEXT``), both answer ``EMBEDDING``. A request goes through
the same gate, interceptors, admission, pipelines and limits as EmbedImages and
EmbedTexts. ModelStreamInfer answers a failed request in-band and goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from clipvision.inference_v2 import grpc_service_pb2 as oip
from clipvision.inference_v2 import grpc_service_pb2_grpc as oip_grpc
from clipvision.server.api.call_context import Context, caller_of, scope_of
from clipvision.server.api.streams import StreamItem, answer_in_order, answered
from clipvision.server.errors import (
    ClipVisionError,
    InvalidRequestError,
    MethodNotFoundError,
    Reason,
)
from clipvision.server.ops.calls import take_read_hold
from clipvision.server.ops.health import HealthReporter
from clipvision.server.pipelines.inference_plane import InferencePlane
from clipvision.server.pipelines.item_errors import ItemErrorObserver

logger = logging.getLogger(__name__)

SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

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


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """Implements inference.GRPCInferenceService on top of the protocol's data plane."""

    def __init__(
        self,
        plane: InferencePlane,
        health: HealthReporter,
        *,
        observer: ItemErrorObserver | None = None,
    ) -> None:
        self._plane = plane
        self._health = health
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
        serving = await self._serving(context)
        return oip.ModelReadyResponse(
            ready=self._plane.model_ready(request.name, request.version, serving)
        )

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: Context
    ) -> oip.ServerMetadataResponse:
        """The server's name and version; it implements no protocol extensions."""
        return self._plane.server_metadata()

    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: Context
    ) -> oip.ModelMetadataResponse:
        """IMAGE or TEXT (BYTES, [-1]) in, EMBEDDING (FP32, [-1, D]) out."""
        return await self._plane.model_metadata(request.name, request.version)

    async def ModelConfig(
        self, request: oip.ModelConfigRequest, context: Context
    ) -> oip.ModelConfigResponse:
        """Triton's form: a batch of up to max_batch_size elements, dims without the batch."""
        config = await self._plane.model_config(request.name, request.version)
        return oip.ModelConfigResponse(config=config)

    # -- inference ---------------------------------------------------------------

    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: Context
    ) -> oip.ModelInferResponse:
        """Embed a batch; any bad element fails the call, naming its index and reason."""
        return await self._plane.infer(request, scope_of(context))

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
                job = await self._plane.job(request)
                batcher, count = job.batcher, len(job.elements)
                limit = batcher.capacity.limit
                if count > limit:  # it could never be admitted
                    raise InvalidRequestError(
                        Reason.REQUEST_MALFORMED,
                        f"The request has {count} elements and the model's queue holds "
                        f"{limit}; split it into several requests.",
                    )
                # Waiting here stops the reading: the stream's backpressure, as
                # EmbedImageStream. The whole request at once, so that streams holding part
                # of their requests cannot block each other.
                await batcher.reserve(caller, count)
            except BaseException as exc:
                # Refused, or the stream cancelled while waiting (a model loading, the
                # queue full): the message's room goes back either way.
                if held is not None:
                    held.release()
                if isinstance(exc, ClipVisionError):
                    return StreamItem(answered(self._stream_error(request, exc)), _same)
                raise

            async def run() -> oip.ModelStreamInferResponse:
                try:
                    return oip.ModelStreamInferResponse(
                        infer_response=await self._plane.run(job, caller, None)
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
            request_iterator,
            start,
            window=self._plane.limits.stream_window,
            drain=self._plane.registry,
        ):
            yield response

    # -- requests ------------------------------------------------------------------

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


def _same(response: Any) -> Any:
    return response
