"""Zero-shot Classify: one image against candidate labels, scored as the model's family does.

The image goes through the image pipeline and the labels missing from the model's
label cache through the text pipeline, concurrently; the scores, in the order given,
are CLIP's softmax of ``logit_scale * cosine`` over the labels, or SigLIP's sigmoid of
``logit_scale * cosine + logit_bias`` per label (runtime.families.Score).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np

from clipvision.server.errors import InvalidRequestError, Reason
from clipvision.server.pipelines.gather import all_or_none
from clipvision.server.pipelines.images import ImagePipeline
from clipvision.server.pipelines.texts import TextPipeline, TextVector
from clipvision.server.runtime.families import Score
from clipvision.server.runtime.image_encoder import FloatArray
from clipvision.server.runtime.label_cache import LabelVector
from clipvision.server.runtime.models import ServedModel, TextModel
from clipvision.v1 import embedding_service_pb2 as pb


@dataclass(frozen=True)
class LabelScores:
    """Classify's answer: per label, in the order given."""

    probabilities: FloatArray
    cosines: FloatArray
    truncated: list[bool]
    score: Score = Score.SOFTMAX
    """Which probabilities: a softmax over the labels, or a sigmoid per label."""


class ClassifyPipeline:
    """Scores images against labels for any served model with a text tower."""

    def __init__(self, images: ImagePipeline, texts: TextPipeline) -> None:
        self._images = images
        self._texts = texts

    async def classify(
        self,
        model: ServedModel,
        caller: str,
        image: pb.Image,
        labels: list[str],
        template: str,
        truncate: bool,
        deadline: float | None,
    ) -> LabelScores:
        """Score ``image`` against ``labels`` as the model does: CLIPModel's
        ``logits_per_image.softmax(-1)``, SiglipModel's ``sigmoid(logits_per_image)``.

        The image and the labels missing from the cache are embedded concurrently;
        the label vectors computed are cached for the next call.
        """
        tower = model.text_tower()
        prompts = [_prompt(template, label) for label in labels]
        cached = [tower.labels.get(prompt, truncate) for prompt in prompts]
        missing = sorted({p for p, hit in zip(prompts, cached, strict=True) if hit is None})
        results = await all_or_none(
            [
                self._images.embed(model, caller, image, True, deadline),
                *(self._texts.embed(model, caller, p, True, truncate, deadline) for p in missing),
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
    """Cosines and the family's probabilities, in float32 as the model computes them: the
    softmax of ``logit_scale * cosine`` (CLIP), or ``sigmoid(logit_scale * cosine +
    logit_bias)`` for each label on its own (SigLIP)."""
    text = tower.encoder.tower
    matrix = np.stack([label.vector for label in labels])
    cosines = (matrix @ image).astype(np.float32)
    logits = cosines * np.float32(text.logit_scale)
    kind = text.family.score
    if kind is Score.SIGMOID:
        logits = logits + np.float32(text.logit_bias or 0.0)
        # Written so that exp never overflows, whatever the sign of the logit.
        magnitude = np.exp(-np.abs(logits))
        probabilities = np.where(
            logits >= 0, 1 / (1 + magnitude), magnitude / (1 + magnitude)
        ).astype(np.float32)
    else:
        shifted = np.exp(logits - logits.max())
        probabilities = (shifted / shifted.sum()).astype(np.float32)
    return LabelScores(probabilities, cosines, [label.truncated for label in labels], kind)


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
