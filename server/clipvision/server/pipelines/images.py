"""The image path, stage by stage: source, probe and price, admit, decode, batch, forward.

1. resolve the source (inline bytes, data:, file://, https://) to encoded bytes;
2. probe the header off the loop and price the image (admission.ItemCost);
3. admit it against the memory budget in fair order between callers;
4. decode and preprocess it in its caller's fair turn (dispatch.FairDispatcher);
5. batch it with other callers' images (batcher.MicroBatcher) for the device thread.

An image travels through these stages as callbacks on the event loop, with no
task of its own. Steps 2 to 4 are one job of a CPU worker when the budget has room
for the image at once (the common case: the worker takes it, thread-safely, right
after parsing the header), and the jobs of many images (of one call, of calls that
arrive together, of a stream) go to the workers in chunks and come back in one
wake-up per chunk. So the server's own work per image is a few dictionary and
future operations, not thread hand-overs. Only the slow paths (a URI to fetch, a
wait for the memory budget, then a second job to decode) start a task.

It returns the raw or normalised vector and records where the time went; it
knows nothing of protobuf responses or gRPC statuses (the servicer does).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Sequence
from typing import Any, Protocol

from clipvision.server.ops.calls import CallRecord, HeldBytes, StageTimes, current_call
from clipvision.server.pipelines.gather import (
    admitted,
    give_back_read,
    outcomes_of,
    settle_failed,
)
from clipvision.server.pipelines.sources import ImageSources
from clipvision.server.resources.admission import (
    ItemCost,
    MemoryBudget,
    Ticket,
    seconds_left,
)
from clipvision.server.resources.dispatch import FairDispatcher, Job
from clipvision.server.runtime.batcher import Embedded
from clipvision.server.runtime.image_encoder import (
    ClipImageEncoder,
    FloatArray,
    ImagePayload,
)
from clipvision.server.runtime.models import ServedModel
from clipvision.server.runtime.preprocess import ProbedImage
from clipvision.v1 import embedding_service_pb2 as pb

ImageSource = pb.Image | bytes


class ImageObserver(Protocol):
    """Receives each embedded image's timings, for metrics."""

    def on_image(self, model: str, times: StageTimes) -> None:
        """One image of ``model`` was embedded; ``times`` says where its time went."""


class _Item:
    """One image on its way: what it holds at each stage, and its caller's future."""

    __slots__ = (
        "caller",
        "deadline",
        "future",
        "held",
        "job",
        "model",
        "normalize",
        "preprocess_s",
        "read_share",
        "record",
        "task",
        "ticket",
    )

    def __init__(
        self,
        model: ServedModel,
        caller: str,
        normalize: bool,
        deadline: float | None,
        held: HeldBytes | None,
    ) -> None:
        self.model = model
        self.caller = caller
        self.normalize = normalize
        self.deadline = deadline
        # The request message's read room, and this image's share of it (None: all of it),
        # given back once the image is admitted (its admission counts those bytes).
        self.held = held
        self.read_share: int | None = None
        self.future: asyncio.Future[FloatArray] = asyncio.get_running_loop().create_future()
        self.record: CallRecord | None = current_call()
        self.job: Job[Any] | None = None  # a probe or decode not yet started
        self.task: asyncio.Task[Any] | None = None  # a fetch or a wait for the budget
        self.ticket: Ticket | None = None
        self.preprocess_s = 0.0


class ImagePipeline:
    """Embeds images for any served model; images of all callers share it."""

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
        image: ImageSource,
        normalize: bool,
        deadline: float | None,
        held: HeldBytes | None = None,
    ) -> FloatArray:
        """Resolve, price, admit, decode and embed one image.

        ``deadline`` (loop time) bounds the wait for the memory budget, None waits as long
        as it takes; ``held`` is the read room of the message it came in, given back once
        the image is admitted.
        """
        return await self.start(model, caller, image, normalize, deadline, held)

    async def embed_many(
        self,
        model: ServedModel,
        caller: str,
        images: Sequence[ImageSource],
        normalize: bool,
        deadline: float | None,
        held: HeldBytes | None = None,
    ) -> list[FloatArray | Exception]:
        """Embed every image of one call; each result is its vector or its fault, in order.

        Each image gives back its share of ``held`` (twice its bytes) as it is admitted. An
        image refused for capacity (OverloadedError) fails the call as a whole: the others
        are cancelled and that error is raised.
        """
        futures = [
            self.start(model, caller, image, normalize, deadline, held, shared=True)
            for image in images
        ]
        return await outcomes_of(futures)

    def start(
        self,
        model: ServedModel,
        caller: str,
        image: ImageSource,
        normalize: bool,
        deadline: float | None,
        held: HeldBytes | None = None,
        *,
        shared: bool = False,
    ) -> asyncio.Future[FloatArray]:
        """Set one image on its way now; its future gets the vector (or the fault).

        ``held`` is the read room of the message the image came in: given back once the
        image is admitted (its share, twice its bytes, when ``shared`` by several images;
        else all of it). Cancelling the future drops the image at its next stage and gives
        back what it holds (a decode already running ends first, and holds its memory till
        then).
        """
        item = _Item(model, caller, normalize, deadline, held)
        item.future.add_done_callback(functools.partial(self._finished, item))
        if isinstance(image, bytes):
            data: bytes | None = image
        elif image.WhichOneof("source") == "content":
            data = image.content
        else:
            data = None
        if held is not None and shared:
            item.read_share = 2 * len(data) if data is not None else 0
        if data is not None:
            self._probe(item, data)
        else:
            assert isinstance(image, pb.Image)
            item.task = asyncio.get_running_loop().create_task(self._sources.resolve(image))
            item.task.add_done_callback(functools.partial(self._resolved, item))
        return item.future

    # -- the stages, as callbacks on the event loop ---------------------------------------

    def _resolved(self, item: _Item, task: asyncio.Task[bytes]) -> None:
        item.task = None
        if item.future.done():
            return
        if task.cancelled():
            item.future.cancel()
            return
        error = task.exception()
        if error is not None:
            settle_failed(item.future, error)
            return
        self._probe(item, task.result())

    def _probe(self, item: _Item, data: bytes) -> None:
        """Parse the header, and decode at once if the budget has room: one worker job."""
        item.job = self._decodes.submit(
            item.caller,
            len(data),
            functools.partial(
                _probe_and_decode, item.model.encoder, data, self._budget, item.caller
            ),
            functools.partial(self._probed, item),
            item.future.done,
            light=item.model.encoder.light_job(len(data)),
        )

    def _probed(self, item: _Item, outcome: _Probed | _Decoded | BaseException) -> None:
        item.job = None
        if isinstance(outcome, _Decoded):
            self._decodes.charge(item.caller, outcome.ticket.decode)
            outcome.ticket.start_decode()()  # the decode is over: its working set is free
            if item.future.done():
                outcome.ticket.release()
                return
            self._admitted(item, outcome.ticket)
            self._prepared(item, outcome.pixels, outcome.preprocess_s)
            return
        if item.future.done():
            return
        if isinstance(outcome, BaseException):
            settle_failed(item.future, outcome)
            return
        # The budget had no room when the worker looked: wait for it in fair order.
        wait = self._budget.admit(item.caller, outcome.cost, seconds_left(item.deadline))
        item.task = asyncio.get_running_loop().create_task(wait)
        item.task.add_done_callback(functools.partial(self._waited, item, outcome.probed))

    def _waited(self, item: _Item, probed: ProbedImage, task: asyncio.Task[Ticket]) -> None:
        item.task = None
        ticket = admitted(task, item.future)
        if ticket is None:
            return
        self._admitted(item, ticket)
        decoded = ticket.start_decode()
        item.job = self._decodes.submit(
            item.caller,
            ticket.decode,
            functools.partial(_prepare, item.model.encoder, probed),
            functools.partial(self._decoded, item, decoded),
            item.future.done,
        )

    def _admitted(self, item: _Item, ticket: Ticket) -> None:
        item.ticket = ticket
        give_back_read(item)  # its bytes are counted in the ticket now

    def _decoded(
        self,
        item: _Item,
        decoded: Any,
        outcome: tuple[ImagePayload, float] | BaseException,
    ) -> None:
        decoded()  # the decode's working set is free again (or was never used)
        item.job = None
        if item.future.done():
            return
        if isinstance(outcome, BaseException):
            settle_failed(item.future, outcome)
            return
        self._prepared(item, *outcome)

    def _prepared(self, item: _Item, pixels: ImagePayload, preprocess_s: float) -> None:
        item.preprocess_s = preprocess_s
        item.model.batcher.put(
            pixels, item.caller, functools.partial(self._embedded, item), item.future.done
        )

    def _embedded(self, item: _Item, outcome: Embedded | BaseException) -> None:
        if item.future.done():
            return
        if isinstance(outcome, BaseException):
            settle_failed(item.future, outcome)
            return
        times = StageTimes(item.preprocess_s, outcome.queue_s, outcome.inference_s)
        if item.record is not None:
            item.record.add(times)
        if self._observer is not None:
            self._observer.on_image(item.model.name, times)
        item.future.set_result(outcome.normalized if item.normalize else outcome.features)

    def _finished(self, item: _Item, future: asyncio.Future[FloatArray]) -> None:
        """However the image ended (answered, failed, its caller gone): give back what it holds."""
        if item.job is not None:
            self._decodes.drop(item.job)  # not started: never will be
        if item.task is not None:
            item.task.cancel()
        if item.ticket is not None:
            item.ticket.release()  # the decode's part stays held while a worker decodes
            item.ticket = None
        give_back_read(item)


class _Probed:
    """A worker's answer when the budget had no room: the parsed header and the price."""

    __slots__ = ("cost", "probed")

    def __init__(self, probed: ProbedImage, cost: ItemCost) -> None:
        self.probed = probed
        self.cost = cost


class _Decoded:
    """A worker's answer when the budget had room: the pixels, and the admission they hold."""

    __slots__ = ("pixels", "preprocess_s", "ticket")

    def __init__(self, pixels: ImagePayload, preprocess_s: float, ticket: Ticket) -> None:
        self.pixels = pixels
        self.preprocess_s = preprocess_s
        self.ticket = ticket


def _probe_and_decode(
    encoder: ClipImageEncoder, data: bytes, budget: MemoryBudget, caller: str
) -> _Probed | _Decoded:
    """Parse and check the header, price the image, and decode it if the budget has room
    now and nobody waits for it (runs in the preprocessing pool, thread-safely)."""
    started = time.perf_counter()
    probed = encoder.probe(data)
    del data  # the probe holds the bytes now
    cost = encoder.cost(probed)
    budget.check(cost, probed.width, probed.height)
    ticket = budget.try_admit(caller, cost)
    if ticket is None:
        return _Probed(probed, cost)
    try:
        pixels = encoder.prepare(probed)
    except BaseException:
        ticket.start_decode()()
        ticket.release()
        raise
    return _Decoded(pixels, time.perf_counter() - started, ticket)


def _prepare(encoder: ClipImageEncoder, probed: ProbedImage) -> tuple[ImagePayload, float]:
    """Decode and preprocess one image (runs in the preprocessing pool).

    Timed here, in the worker, so that waiting for a free worker is not counted.
    """
    started = time.perf_counter()
    pixels = encoder.prepare(probed)
    return pixels, time.perf_counter() - started
