"""The EmbeddingService handlers: validate, call the domain, convert to messages.

Each image goes through the same stages: resolved to bytes, its header probed and
priced (admission.ItemCost), admitted against the memory budget in fair order
between callers (a caller is an authenticated identity, else a connection),
decoded in its caller's fair turn (dispatch.FairDispatcher), then batched.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import Executor

import grpc

from clipvision.server.admission import UNARY_WAIT_S, Ticket
from clipvision.server.calls import StageTimes, record_image
from clipvision.server.dispatch import FairDispatcher
from clipvision.server.encoder import ClipImageEncoder, FloatArray, l2_normalize
from clipvision.server.errors import (
    ClipVisionError,
    InternalError,
    InvalidRequestError,
    OverloadedError,
    Reason,
    ServiceUnavailableError,
)
from clipvision.server.image_sources import ImageSources
from clipvision.server.metrics import ServerMetrics
from clipvision.server.models import ModelRegistry, ServedModel
from clipvision.server.preprocess import PreprocessConfig, ProbedImage, UInt8Array
from clipvision.server.settings import Settings
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

INTERNAL_ITEM_ERROR = InternalError(
    Reason.INTERNAL, "The server failed on this image because of a bug; it has been logged."
)


class _Drained:
    """Put in a stream's queue when the server starts draining, to wake its writer."""


_DRAINED = _Drained()


def _stream_drained() -> ServiceUnavailableError:
    return ServiceUnavailableError(
        Reason.SERVER_DRAINING,
        "The server is shutting down; every request answered so far stands, send the rest to "
        "another replica.",
    )


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    """Implements clipvision.v1.EmbeddingService on top of the model registry."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        preprocess_executor: Executor,
        sources: ImageSources,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._preprocess_executor = preprocess_executor
        self._sources = sources
        self._metrics = metrics
        self._budget = registry.budget
        # At most one decode per worker is handed to the pool; the rest wait in per-caller
        # queues, so the pool's own FIFO never holds one caller's backlog.
        self._decodes = FairDispatcher(preprocess_executor, settings.preprocess_workers)

    async def EmbedImage(
        self, request: pb.EmbedImageRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.EmbedImageResponse:
        """Embed one image; any fault fails the call."""
        model = await self._registry.get(request.model)
        normalize = _normalize(request)
        caller = caller_of(context)
        deadline = _patience(context)
        async with model.batcher.admit(caller, 1, _seconds_until(deadline)):
            vector = await self._embed(model, caller, request.image, normalize, deadline)
        return pb.EmbedImageResponse(embedding=_embedding(model, vector, normalize))

    async def EmbedImages(
        self, request: pb.EmbedImagesRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.EmbedImagesResponse:
        """Embed a batch; per-image faults are reported in-band, in order."""
        limit = self._settings.max_batch_images
        if len(request.images) > limit:
            raise InvalidRequestError(
                Reason.TOO_MANY_IMAGES,
                f"The request has {len(request.images)} images and the limit is {limit}; split "
                "it or use EmbedImageStream.",
            )
        model = await self._registry.get(request.model)
        normalize = _normalize(request)
        caller = caller_of(context)
        deadline = _patience(context)
        async with model.batcher.admit(caller, len(request.images), _seconds_until(deadline)):
            results = await _all_or_none(
                [
                    self._embed_result(model, caller, image, normalize, deadline)
                    for image in request.images
                ]
            )
        return pb.EmbedImagesResponse(results=results)

    async def EmbedImageStream(
        self,
        request_iterator: AsyncIterator[pb.EmbedImageStreamRequest],
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.EmbedImageStreamResponse]:
        """One response per request, in request order; the window bounds what is in flight.

        When the server starts draining it stops reading, answers every request
        it has admitted, and ends the stream with UNAVAILABLE (SERVER_DRAINING):
        the client re-sends what is unanswered to another replica.
        """
        loop = asyncio.get_running_loop()
        caller = caller_of(context)
        # Full queue = the reader waits = the server stops reading = HTTP/2 flow control
        # pushes back on the client. That is the stream's backpressure.
        pending: asyncio.Queue[asyncio.Task[pb.EmbedImageStreamResponse] | _Drained | None] = (
            asyncio.Queue(maxsize=self._settings.stream_window)
        )

        async def read() -> None:
            try:
                async for request in request_iterator:
                    if self._registry.draining:
                        # Unanswered, so the client sends it elsewhere. No end marker: the
                        # writer must end with UNAVAILABLE, not as if the client were done.
                        return
                    task, admitted = await self._admit_stream_item(request, caller)
                    try:
                        await pending.put(task)
                    except asyncio.CancelledError:
                        task.cancel()  # never answered, so it must not be computed
                        raise
                    # Inline bytes are read no further until the image fits the memory
                    # budget: waiting here is the stream's backpressure for memory. (URIs
                    # are fetched in parallel, and wait for the budget in their tasks.)
                    if admitted is not None:
                        await admitted
            except asyncio.CancelledError:
                raise
            except Exception:
                await pending.put(None)  # the writer answers what is admitted, then re-raises
                raise
            await pending.put(None)

        reader = loop.create_task(read(), name="stream-reader")
        drained = False

        async def watch_drain() -> None:
            # Stop reading, and wake the writer if it waits on an empty queue; when the
            # queue is not empty the writer sees `drained` before it waits again.
            nonlocal drained
            await self._registry.wait_draining()
            drained = True
            reader.cancel()
            with contextlib.suppress(asyncio.QueueFull):
                pending.put_nowait(_DRAINED)

        watcher = loop.create_task(watch_drain(), name="stream-drain")
        try:
            while True:
                if drained and pending.empty():
                    # Everything admitted is answered: send the client to another replica.
                    raise _stream_drained()
                task = await pending.get()
                if task is None:
                    break  # the client is done (a drain changes nothing then)
                if isinstance(task, _Drained):
                    continue
                yield await task
            await reader  # re-raises a read failure
        finally:
            reader.cancel()
            watcher.cancel()
            while not pending.empty():
                leftover = pending.get_nowait()
                if isinstance(leftover, asyncio.Task):
                    leftover.cancel()

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GetModelInfoResponse:
        """Describe the served models and the server's limits."""
        settings = self._settings
        models = []
        for index, spec in enumerate(self._registry.specs):
            info = pb.ModelInfo(name=spec.name, source=spec.source, is_default=index == 0)
            info.dummy_weights = settings.dummy_weights
            served = self._registry.loaded(spec.name)
            if served is not None:
                _describe(info, served.encoder)
            models.append(info)
        limits = settings.image_limits
        return pb.GetModelInfoResponse(
            models=models,
            limits=pb.Limits(
                max_batch_images=settings.max_batch_images,
                max_receive_message_bytes=settings.max_message_bytes,
                max_image_bytes=limits.max_image_bytes,
                max_image_pixels=limits.max_image_pixels,
                stream_window=settings.stream_window,
                max_queue_size=settings.max_queue_size,
                memory_budget_bytes=self._budget.total,
            ),
        )

    async def _embed(
        self,
        model: ServedModel,
        caller: str,
        image: pb.Image,
        normalize: bool,
        deadline: float | None,
        admitted: asyncio.Future[None] | None = None,
    ) -> FloatArray:
        """Resolve, price, admit, decode and embed one image.

        ``deadline`` (loop time) bounds the wait for the memory budget, None waits as long
        as it takes; ``admitted`` is resolved once the image holds its share of the budget.
        """
        data = await self._sources.resolve(image)
        probed, ticket = await self._admit(model, caller, data, deadline)
        if admitted is not None and not admitted.done():
            admitted.set_result(None)
        try:
            done = ticket.start_decode()
            pixels, preprocess_s = await self._decodes.run(
                caller,
                ticket.decode,
                functools.partial(self._prepare, model.encoder, probed),
                done,
            )
            embedded = await model.batcher.submit(pixels, caller)
        finally:
            ticket.release()
        times = StageTimes(preprocess_s, embedded.queue_s, embedded.inference_s)
        record_image(times)
        if self._metrics is not None:
            self._metrics.on_image(model.encoder.name, times)
        raw = embedded.features
        return l2_normalize(raw) if normalize else raw

    async def _admit(
        self, model: ServedModel, caller: str, data: bytes, deadline: float | None
    ) -> tuple[ProbedImage, Ticket]:
        """Probe the header (off the loop: some formats parse a lot) and take the budget."""
        probed = await asyncio.to_thread(model.encoder.probe, data)
        cost = model.encoder.cost(probed)
        self._budget.check(cost, probed.width, probed.height)
        return probed, await self._budget.admit(caller, cost, _left(deadline))

    def _prepare(self, encoder: ClipImageEncoder, probed: ProbedImage) -> tuple[UInt8Array, float]:
        """Decode and preprocess one image (runs in the preprocessing pool).

        Timed here, in the worker, so that waiting for a free worker is not counted.
        """
        started = time.perf_counter()
        pixels = encoder.preprocess(probed)
        return pixels, time.perf_counter() - started

    async def _embed_result(
        self,
        model: ServedModel,
        caller: str,
        image: pb.Image,
        normalize: bool,
        deadline: float | None,
    ) -> pb.EmbedImagesResult:
        try:
            vector = await self._embed(model, caller, image, normalize, deadline)
        except OverloadedError:
            raise  # the call as a whole is refused: retrying it later is the remedy
        except Exception as exc:
            return pb.EmbedImagesResult(error=self._item_error(exc))
        return pb.EmbedImagesResult(embedding=_embedding(model, vector, normalize))

    async def _admit_stream_item(
        self, request: pb.EmbedImageStreamRequest, caller: str
    ) -> tuple[asyncio.Task[pb.EmbedImageStreamResponse], asyncio.Future[None] | None]:
        """Start one stream item once its model has room; waiting here stops the reading.

        Also returns, for inline images, a future resolved once the item holds its share
        of the memory budget (or has failed), which the reader waits for too.
        """
        loop = asyncio.get_running_loop()
        try:
            model = await self._registry.get(request.model)
        except ClipVisionError as exc:
            failed = pb.EmbedImageStreamResponse(id=request.id, error=self._item_error(exc))
            return loop.create_task(_ready(failed)), None
        await model.batcher.reserve(caller)
        admitted: asyncio.Future[None] | None = None
        if request.image.WhichOneof("source") == "content":
            admitted = loop.create_future()
        task = loop.create_task(self._stream_item(model, caller, request, admitted))

        def finished(_: object) -> None:
            # A done-callback, not a finally: a task cancelled before it starts runs no code.
            model.batcher.release(caller)
            if admitted is not None and not admitted.done():
                admitted.set_result(None)

        task.add_done_callback(finished)
        return task, admitted

    async def _stream_item(
        self,
        model: ServedModel,
        caller: str,
        request: pb.EmbedImageStreamRequest,
        admitted: asyncio.Future[None] | None,
    ) -> pb.EmbedImageStreamResponse:
        normalize = _normalize(request)
        try:
            vector = await self._embed(model, caller, request.image, normalize, None, admitted)
        except Exception as exc:
            return pb.EmbedImageStreamResponse(id=request.id, error=self._item_error(exc))
        return pb.EmbedImageStreamResponse(
            id=request.id, embedding=_embedding(model, vector, normalize)
        )

    def _item_error(self, exc: Exception) -> pb.ItemError:
        """The in-band form of a per-image fault, counted; bugs are logged without detail out."""
        error = _item_error(exc)
        if self._metrics is not None:
            self._metrics.on_item_error(error.reason)
        return error


async def _ready(response: pb.EmbedImageStreamResponse) -> pb.EmbedImageStreamResponse:
    return response


def caller_of(context: grpc.aio.ServicerContext[object, object]) -> str:
    """Who a call counts against for fair shares: its authenticated identity (mutual TLS),
    else its connection (``peer()`` names the client's address and port, one per connection).
    """
    identities = context.peer_identities()
    if identities:
        return "identity:" + b",".join(identities).decode(errors="replace")
    return "peer:" + context.peer()


def _patience(context: grpc.aio.ServicerContext[object, object]) -> float:
    """The loop time until which a unary call may wait for room another caller gives back.

    At most UNARY_WAIT_S, and half of what is left of the call's deadline, so that a
    refusal still reaches the caller in time and an admitted image has time to run.
    """
    remaining = context.time_remaining()
    wait = UNARY_WAIT_S if remaining is None else min(UNARY_WAIT_S, remaining / 2)
    return asyncio.get_running_loop().time() + max(0.0, wait)


def _seconds_until(deadline: float) -> float:
    """Seconds from now to ``deadline`` (loop time), never negative."""
    return max(0.0, deadline - asyncio.get_running_loop().time())


def _left(deadline: float | None) -> float | None:
    """Seconds from now to ``deadline``; None (wait as long as it takes) for no deadline."""
    return None if deadline is None else _seconds_until(deadline)


async def _all_or_none(
    coroutines: list[Awaitable[pb.EmbedImagesResult]],
) -> list[pb.EmbedImagesResult]:
    """Await every item; if one raises, cancel the rest and raise that."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        # Collected, so that a second failure is not reported as never retrieved.
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _normalize(
    request: pb.EmbedImageRequest | pb.EmbedImagesRequest | pb.EmbedImageStreamRequest,
) -> bool:
    return request.normalize if request.HasField("normalize") else True


def _embedding(model: ServedModel, vector: FloatArray, normalized: bool) -> pb.Embedding:
    return pb.Embedding(values=vector.tolist(), model=model.encoder.name, normalized=normalized)


def _item_error(exc: Exception) -> pb.ItemError:
    """The in-band form of a per-image fault; bugs are logged and reported without detail."""
    if not isinstance(exc, ClipVisionError):
        logger.error("unexpected failure on one image", exc_info=exc)
        exc = INTERNAL_ITEM_ERROR
    return pb.ItemError(code=int(exc.code), reason=exc.reason.value, message=exc.message)


def _describe(info: pb.ModelInfo, encoder: ClipImageEncoder) -> None:
    checkpoint = encoder.checkpoint
    info.embedding_dimension = checkpoint.embedding_dim
    info.image_size = checkpoint.image_size
    info.dtype = str(checkpoint.dtype).removeprefix("torch.")
    info.device = str(checkpoint.device)
    info.dummy_weights = checkpoint.dummy_weights
    info.loaded = True
    info.preprocessing.CopyFrom(_preprocessing(checkpoint.preprocess))


def _preprocessing(config: PreprocessConfig) -> pb.Preprocessing:
    return pb.Preprocessing(
        exif_transpose=True,
        resize_shortest_edge=config.shortest_edge,
        interpolation=_INTERPOLATIONS.get(config.resample, pb.INTERPOLATION_UNSPECIFIED),
        crop_height=config.crop_height,
        crop_width=config.crop_width,
        rescale_factor=config.rescale_factor,
        mean=list(config.mean),
        std=list(config.std),
    )


# PIL.Image.Resampling values, as preprocessor_config.json stores them.
_INTERPOLATIONS: dict[int, pb.Interpolation.ValueType] = {
    0: pb.INTERPOLATION_NEAREST,
    1: pb.INTERPOLATION_LANCZOS,
    2: pb.INTERPOLATION_BILINEAR,
    3: pb.INTERPOLATION_BICUBIC,
    4: pb.INTERPOLATION_BOX,
    5: pb.INTERPOLATION_HAMMING,
}
