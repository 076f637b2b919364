"""The text path, stage by stage: check, tokenize, admit, batch, forward.

1. check the text (not empty, not over --max-text-bytes) before any work;
2. tokenize it with the checkpoint's tokenizer in its caller's fair turn of the
   preprocessing pool, cut to the context or refused (truncate=false);
3. admit it against the memory budget (its bytes and ids: small, but a stream of
   thousands adds up);
4. batch it with other callers' texts (batcher.MicroBatcher), padded to the
   longest text of the batch, on the device thread the images use too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from clipvision.server.ops.calls import StageTimes, record_image
from clipvision.server.resources.admission import ItemCost, MemoryBudget, seconds_left
from clipvision.server.resources.dispatch import FairDispatcher
from clipvision.server.runtime.image_encoder import FloatArray, l2_normalize
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


class TextPipeline:
    """Embeds one text at a time for any served model; texts of all callers share it."""

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
    ) -> TextVector:
        """Check, tokenize, admit and embed one text.

        ``deadline`` (loop time) bounds the wait for the memory budget; None waits as
        long as it takes. Raises ModalityNotServedError for a model without a text tower.
        """
        tower = model.text_tower()
        size = tower.encoder.check(text)
        tokenized, tokenize_s = await self._tokenizes.run(
            caller, size, lambda: _tokenize(tower, text, truncate), _nothing
        )
        # The message's copy and ours of the text, and the ids, until answered.
        cost = ItemCost(resident=2 * size + tokenized.ids.nbytes, decode=0)
        ticket = await self._budget.admit(caller, cost, seconds_left(deadline))
        try:
            embedded = await tower.batcher.submit(tokenized.ids, caller)
        finally:
            ticket.release()
        times = StageTimes(tokenize_s, embedded.queue_s, embedded.inference_s)
        record_image(times)
        if self._observer is not None:
            self._observer.on_text(model.name, times)
        raw = embedded.features
        return TextVector(l2_normalize(raw) if normalize else raw, tokenized.truncated)


def _tokenize(tower: TextModel, text: str, truncate: bool) -> tuple[TokenizedText, float]:
    """Tokenize in the preprocessing pool, timed in the worker."""
    started = time.perf_counter()
    tokenized = tower.encoder.tokenize(text, truncate)
    return tokenized, time.perf_counter() - started


def _nothing() -> None:
    """Tokenizing holds nothing that must be given back when it ends."""
