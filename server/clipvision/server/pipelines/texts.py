"""The text path, stage by stage: check, tokenize, admit, batch, forward; and Classify.

1. check the text (not empty, not over --max-text-bytes) before any work;
2. tokenize it with the checkpoint's tokenizer in its caller's fair turn of the
   preprocessing pool, cut to the context or refused (truncate=false);
3. admit it against the memory budget (its bytes and ids: small, but a stream of
   thousands adds up);
4. batch it with other callers' texts (batcher.MicroBatcher), padded to the
   longest text of the batch, on the device thread the images use too.

Classify embeds one image through the image pipeline and its labels through this
one (or the model's label cache), then scores them as CLIPModel does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np

from clipvision.server.api.streams import all_or_none
from clipvision.server.errors import InvalidRequestError, Reason
from clipvision.server.ops.calls import StageTimes, record_image
from clipvision.server.pipelines.images import ImagePipeline
from clipvision.server.resources.admission import ItemCost, MemoryBudget, seconds_left
from clipvision.server.resources.dispatch import FairDispatcher
from clipvision.server.runtime.image_encoder import FloatArray, l2_normalize
from clipvision.server.runtime.label_cache import LabelVector
from clipvision.server.runtime.models import ServedModel, TextModel
from clipvision.server.runtime.text_encoder import TokenizedText
from clipvision.v1 import embedding_service_pb2 as pb


class TextObserver(Protocol):
    """Receives each embedded text's timings, for metrics."""

    def on_text(self, model: str, times: StageTimes) -> None:
        """One text of ``model`` was embedded; ``times`` says where its time went."""


@dataclass(frozen=True)
class TextVector:
    """One text's vector and whether the text was cut to the context."""

    vector: FloatArray
    truncated: bool


@dataclass(frozen=True)
class LabelScores:
    """Classify's answer: per label, in the order given."""

    probabilities: FloatArray
    cosines: FloatArray
    truncated: list[bool]


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

    async def classify(
        self,
        images: ImagePipeline,
        model: ServedModel,
        caller: str,
        image: pb.Image,
        labels: list[str],
        template: str,
        truncate: bool,
        deadline: float | None,
    ) -> LabelScores:
        """Score ``image`` against ``labels`` as ``CLIPModel(...).logits_per_image.softmax(-1)``.

        The image and the labels missing from the cache are embedded concurrently;
        the label vectors computed are cached for the next call.
        """
        tower = model.text_tower()
        prompts = [_prompt(template, label) for label in labels]
        cached = [tower.labels.get(prompt, truncate) for prompt in prompts]
        missing = sorted({p for p, hit in zip(prompts, cached, strict=True) if hit is None})
        results = await all_or_none(
            [
                images.embed(model, caller, image, True, deadline),
                *(self.embed(model, caller, p, True, truncate, deadline) for p in missing),
            ]
        )
        image_vector = cast(FloatArray, results[0])
        fresh: dict[str, LabelVector] = {}
        for prompt, text in zip(missing, cast(list[TextVector], results[1:]), strict=True):
            fresh[prompt] = LabelVector(text.vector, text.truncated)
            tower.labels.put(prompt, truncate, fresh[prompt])
        vectors = [fresh[p] if hit is None else hit for p, hit in zip(prompts, cached, strict=True)]
        return score(tower, image_vector, vectors)


def score(tower: TextModel, image: FloatArray, labels: list[LabelVector]) -> LabelScores:
    """Cosines and the softmax of ``logit_scale * cosine``, in float32 as CLIPModel does."""
    matrix = np.stack([label.vector for label in labels])
    cosines = (matrix @ image).astype(np.float32)
    logits = cosines * np.float32(tower.encoder.tower.logit_scale)
    shifted = np.exp(logits - logits.max())
    probabilities = (shifted / shifted.sum()).astype(np.float32)
    return LabelScores(probabilities, cosines, [label.truncated for label in labels])


def check_labels(labels: list[str], template: str, limit: int, max_text_bytes: int) -> None:
    """Refuse a Classify request whose labels or template cannot be scored.

    Sizes are checked here, before any prompt is built: every prompt is a copy of the
    template, so an oversized template would otherwise be copied once per label.
    """
    if not labels:
        raise InvalidRequestError(
            Reason.LABELS_MISSING, "The request has no labels; send at least one candidate label."
        )
    if len(labels) > limit:
        raise InvalidRequestError(
            Reason.TOO_MANY_LABELS,
            f"The request has {len(labels)} labels and the limit is {limit}; score the rest in "
            "another call.",
        )
    empty = [index for index, label in enumerate(labels) if not label]
    if empty:
        raise InvalidRequestError(
            Reason.TEXT_EMPTY,
            f"Label {empty[0]} is empty; every label needs at least one character.",
        )
    template_bytes = len(template.encode("utf-8", errors="surrogatepass"))
    longest = max(len(label.encode("utf-8", errors="surrogatepass")) for label in labels)
    if template_bytes + longest > max_text_bytes:
        raise InvalidRequestError(
            Reason.TEXT_TOO_LARGE,
            f"The template ({template_bytes} bytes) with the longest label ({longest} bytes) "
            f"exceeds the limit of {max_text_bytes} bytes per prompt.",
        )
    rest = template.replace("{}", "", 1)
    if template and (template.count("{}") != 1 or "{" in rest or "}" in rest):
        raise InvalidRequestError(
            Reason.PROMPT_TEMPLATE_INVALID,
            f"The prompt template {template[:80]!r} must hold exactly one {{}} where the label "
            "goes and no other braces, for example 'a photo of a {}'.",
        )


def _prompt(template: str, label: str) -> str:
    return template.replace("{}", label) if template else label


def _tokenize(tower: TextModel, text: str, truncate: bool) -> tuple[TokenizedText, float]:
    """Tokenize in the preprocessing pool, timed in the worker."""
    started = time.perf_counter()
    tokenized = tower.encoder.tokenize(text, truncate)
    return tokenized, time.perf_counter() - started


def _nothing() -> None:
    """Tokenizing holds nothing that must be given back when it ends."""
