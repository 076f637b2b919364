"""The image path, stage by stage: source, probe and price, admit, decode, batch, forward.

1. resolve the source (inline bytes, data:, file://, https://) to encoded bytes;
2. probe the header off the loop and price the image (admission.ItemCost);
3. admit it against the memory budget in fair order between callers;
4. decode and preprocess it in its caller's fair turn (dispatch.FairDispatcher);
5. batch it with other callers' images (batcher.MicroBatcher) for the device thread.

It returns the raw or normalised vector and records where the time went; it
knows nothing of protobuf responses or gRPC statuses (the servicer does).
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Protocol

from clipvision.server.ops.calls import StageTimes, record_image
from clipvision.server.pipelines.sources import ImageSources
from clipvision.server.resources.admission import MemoryBudget, Ticket, seconds_left
from clipvision.server.resources.dispatch import FairDispatcher
from clipvision.server.runtime.image_encoder import ClipImageEncoder, FloatArray, l2_normalize
from clipvision.server.runtime.models import ServedModel
from clipvision.server.runtime.preprocess import ProbedImage, UInt8Array
from clipvision.v1 import embedding_service_pb2 as pb


class ImageObserver(Protocol):
    """Receives each embedded image's timings, for metrics."""

    def on_image(self, model: str, times: StageTimes) -> None:
        """One image of ``model`` was embedded; ``times`` says where its time went."""


class ImagePipeline:
    """Embeds one image at a time for any served model; images of all callers share it."""

    def __init__(
        self,
        sources: ImageSources,
        budget: MemoryBudget,
        decodes: FairDispatcher,
        observer: ImageObserver | None = None,
    ) -> None:
        self._sources = sources
        self._budget = budget
        self._decodes = decodes
        self._observer = observer

    async def embed(
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
        probed, ticket = await self._admit(model.encoder, caller, data, seconds_left(deadline))
        del data  # the probe holds the bytes now
        if admitted is not None and not admitted.done():
            admitted.set_result(None)
        try:
            done = ticket.start_decode()
            pixels, preprocess_s = await self._decodes.run(
                caller, ticket.decode, functools.partial(_prepare, model.encoder, probed), done
            )
            embedded = await model.batcher.submit(pixels, caller)
        finally:
            ticket.release()
        times = StageTimes(preprocess_s, embedded.queue_s, embedded.inference_s)
        record_image(times)
        if self._observer is not None:
            self._observer.on_image(model.name, times)
        raw = embedded.features
        return l2_normalize(raw) if normalize else raw

    async def _admit(
        self, encoder: ClipImageEncoder, caller: str, data: bytes, wait_s: float | None
    ) -> tuple[ProbedImage, Ticket]:
        """Probe the header (off the loop: some formats parse a lot) and take the budget."""
        probed = await asyncio.to_thread(encoder.probe, data)
        cost = encoder.cost(probed)
        self._budget.check(cost, probed.width, probed.height)
        return probed, await self._budget.admit(caller, cost, wait_s)


def _prepare(encoder: ClipImageEncoder, probed: ProbedImage) -> tuple[UInt8Array, float]:
    """Decode and preprocess one image (runs in the preprocessing pool).

    Timed here, in the worker, so that waiting for a free worker is not counted.
    """
    started = time.perf_counter()
    pixels = encoder.preprocess(probed)
    return pixels, time.perf_counter() - started
