"""The text path, stage by stage: check, tokenize, admit, batch, forward.

1. check the text (not empty, not over --max-text-bytes) before any work;
2. tokenize it with the checkpoint's tokenizer in its caller's fair turn of the
   preprocessing pool, cut to the context or refused (truncate=false);
3. admit it against the memory budget (its bytes and ids: small, but a stream of
   thousands adds up), in the same worker job when the budget has room;
4. batch it with other callers' texts (batcher.MicroBatcher), padded to the
   longest text of the batch, on the device thread the images use too.

As images do (pipelines.images), a text travels as callbacks on the event loop:
tokenizing goes to the workers in chunks, and only a wait for the memory budget
starts a task.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from clipvision.server.ops.calls import CallRecord, HeldBytes, StageTimes, current_call
from clipvision.server.pipelines.gather import (
    admitted,
    give_back_read,
    outcomes_of,
    settle_failed,
)
from clipvision.server.resources.admission import ItemCost, MemoryBudget, Ticket, seconds_left
from clipvision.server.resources.dispatch import FairDispatcher, Job
from clipvision.server.runtime.batcher import Embedded
from clipvision.server.runtime.image_encoder import FloatArray
from clipvision.server.runtime.models import ServedModel, TextModel
from clipvision.server.runtime.text_encoder import TokenizedText


class TextObserver(Protocol):
    """Receives each embedded text's timings, for metrics."""

    def on_text(self, model: str, times: StageTimes) -> None:
        """One text of ``model`` was embedded; ``times`` says where its time went."""


@dataclass(frozen=True)
class TextVector:
    """One text's vector and whether the text was cut to the context."""

    vector: FloatArray
    truncated: bool
    tokens: int = 0
    """Token ids the tower read (start and end tokens included, no padding)."""


class _Item:
    """One text on its way: what it holds at each stage, and its caller's future."""

    __slots__ = (
        "caller",
        "deadline",
        "future",
        "held",
        "job",
        "model",
        "normalize",
        "read_share",
        "record",
        "size",
        "task",
        "ticket",
        "tokenize_s",
        "tokens",
        "tower",
        "truncated",
    )

    def __init__(
        self,
        model: ServedModel,
        tower: TextModel,
        caller: str,
        normalize: bool,
        deadline: float | None,
        held: HeldBytes | None,
    ) -> None:
        self.model = model
        self.tower = tower
        # The request message's read room and this text's share (None: all of it).
        self.held = held
        self.read_share: int | None = None
        self.caller = caller
        self.normalize = normalize
        self.deadline = deadline
        self.future: asyncio.Future[TextVector] = asyncio.get_running_loop().create_future()
        self.record: CallRecord | None = current_call()
        self.job: Job[Any] | None = None
        self.task: asyncio.Task[Any] | None = None
        self.ticket: Ticket | None = None
        self.size = 0
        self.tokenize_s = 0.0
        self.truncated = False
        self.tokens = 0


class TextPipeline:
    """Embeds texts for any served model; texts of all callers share it."""

    def __init__(
        self,
        budget: MemoryBudget,
        tokenizes: FairDispatcher,
        observer: TextObserver | None = None,
    ) -> None:
        self._budget = budget
        self._tokenizes = tokenizes
        self._observer = observer

    async def embed(
        self,
        model: ServedModel,
        caller: str,
        text: str,
        normalize: bool,
        truncate: bool,
        deadline: float | None,
        held: HeldBytes | None = None,
    ) -> TextVector:
        """Check, tokenize, admit and embed one text.

        ``deadline`` (loop time) bounds the wait for the memory budget; None waits as
        long as it takes. Raises ModalityNotServedError for a model without a text tower.
        """
        return await self.start(model, caller, text, normalize, truncate, deadline, held)

    async def embed_many(
        self,
        model: ServedModel,
        caller: str,
        texts: Sequence[str],
        normalize: bool,
        truncate: bool,
        deadline: float | None,
        held: HeldBytes | None = None,
    ) -> list[TextVector | Exception]:
        """Embed every text of one call; each result is its vector or its fault, in order.

        A text refused for capacity (OverloadedError) fails the call as a whole.
        """
        futures = [
            self.start(model, caller, text, normalize, truncate, deadline, held, shared=True)
            for text in texts
        ]
        return await outcomes_of(futures)

    def start(
        self,
        model: ServedModel,
        caller: str,
        text: str,
        normalize: bool,
        truncate: bool,
        deadline: float | None,
        held: HeldBytes | None = None,
        *,
        shared: bool = False,
    ) -> asyncio.Future[TextVector]:
        """Set one text on its way now; its future gets the vector (or the fault).

        Raises ModalityNotServedError at once for a model without a text tower; a bad
        text fails its future. Cancelling the future drops the text at its next stage.
        """
        tower = model.text_tower()
        item = _Item(model, tower, caller, normalize, deadline, held)
        item.future.add_done_callback(functools.partial(self._finished, item))
        try:
            item.size = tower.encoder.check(text)
        except Exception as exc:
            settle_failed(item.future, exc)
            return item.future
        if held is not None and shared:
            item.read_share = 2 * item.size
        item.job = self._tokenizes.submit(
            caller,
            item.size,
            functools.partial(_tokenize, tower, text, truncate, self._budget, caller, item.size),
            functools.partial(self._tokenized, item),
            item.future.done,
            light=True,  # tokenizing one text holds the GIL throughout
        )
        return item.future

    # -- the stages, as callbacks on the event loop ---------------------------------------

    def _tokenized(self, item: _Item, outcome: _Tokenized | BaseException) -> None:
        item.job = None
        if item.future.done():
            if isinstance(outcome, _Tokenized) and outcome.ticket is not None:
                outcome.ticket.release()  # admitted by the worker as the caller left
            return
        if isinstance(outcome, BaseException):
            settle_failed(item.future, outcome)
            return
        tokenized = outcome.tokenized
        item.tokenize_s = outcome.seconds
        item.truncated = tokenized.truncated
        item.tokens = len(tokenized.ids)
        if outcome.ticket is not None:
            self._admitted(item, tokenized, outcome.ticket)
            return
        # The budget had no room when the worker looked: wait for it in fair order.
        wait = self._budget.admit(item.caller, outcome.cost, seconds_left(item.deadline))
        item.task = asyncio.get_running_loop().create_task(wait)
        item.task.add_done_callback(functools.partial(self._waited, item, tokenized))

    def _waited(self, item: _Item, tokenized: TokenizedText, task: asyncio.Task[Ticket]) -> None:
        item.task = None
        ticket = admitted(task, item.future)
        if ticket is None:
            return
        self._admitted(item, tokenized, ticket)

    def _admitted(self, item: _Item, tokenized: TokenizedText, ticket: Ticket) -> None:
        item.ticket = ticket
        give_back_read(item)  # its bytes are counted in the ticket now
        item.tower.batcher.put(
            tokenized.ids, item.caller, functools.partial(self._embedded, item), item.future.done
        )

    def _embedded(self, item: _Item, outcome: Embedded | BaseException) -> None:
        if item.future.done():
            return
        if isinstance(outcome, BaseException):
            settle_failed(item.future, outcome)
            return
        times = StageTimes(item.tokenize_s, outcome.queue_s, outcome.inference_s)
        if item.record is not None:
            item.record.add(times)
        if self._observer is not None:
            self._observer.on_text(item.model.name, times)
        vector = outcome.normalized if item.normalize else outcome.features
        item.future.set_result(TextVector(vector, item.truncated, item.tokens))

    def _finished(self, item: _Item, future: asyncio.Future[TextVector]) -> None:
        """However the text ended: give back what it holds."""
        if item.job is not None:
            self._tokenizes.drop(item.job)
        if item.task is not None:
            item.task.cancel()
        if item.ticket is not None:
            item.ticket.release()
            item.ticket = None
        give_back_read(item)


class _Tokenized:
    """A worker's answer: the ids, the time they took, their price in the memory budget, and
    the admission it holds when the budget had room (None: wait for it on the loop)."""

    __slots__ = ("cost", "seconds", "ticket", "tokenized")

    def __init__(
        self, tokenized: TokenizedText, seconds: float, cost: ItemCost, ticket: Ticket | None
    ) -> None:
        self.tokenized = tokenized
        self.seconds = seconds
        self.cost = cost
        self.ticket = ticket


def _tokenize(
    tower: TextModel, text: str, truncate: bool, budget: MemoryBudget, caller: str, size: int
) -> _Tokenized:
    """Tokenize in the preprocessing pool, timed in the worker, and admit the text there if
    the budget has room now and nobody waits (thread-safely, as images are), so that the
    event loop does not."""
    started = time.perf_counter()
    tokenized = tower.encoder.tokenize(text, truncate)
    seconds = time.perf_counter() - started
    # The message's copy and ours of the text, and the ids, until answered.
    cost = ItemCost(resident=2 * size + tokenized.ids.nbytes, decode=0)
    return _Tokenized(tokenized, seconds, cost, budget.try_admit(caller, cost))
