"""Model families: what a checkpoint's ``model_type`` says about serving it exactly.

A family is a policy read from config.json, not a code path per preset: which
transformers classes hold its towers, which of their outputs is the embedding
(what ``get_image_features`` and ``get_text_features`` return), how its texts are
padded, and how Classify scores. Preprocessing is the checkpoint's own
preprocessor_config.json, and the tokenizer its own, whatever the family.

- ``clip``: OpenAI's CLIP, MetaCLIP 1 and OpenCLIP's LAION and DataComp checkpoints in
  Hugging Face format; texts padded to the longest of a batch with a mask (the tower
  pools at each text's end token, so padding changes nothing); softmax scores.
- ``siglip``: SigLIP and SigLIP 2 FixRes (their checkpoints say ``siglip``; SigLIP 2
  differs only by its Gemma tokenizer); texts always padded to the full context (64)
  with no mask, on the side the tokenizer pads, as the model was trained: it pools the
  last position, padding or not; per-label sigmoid scores with a learned bias.
- ``metaclip_2``: MetaCLIP 2 (worldwide); CLIP's towers with an XLM-R-style tokenizer,
  pooled at the first end token; padded as CLIP; softmax scores.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    MetaClip2TextConfig,
    MetaClip2TextModelWithProjection,
    MetaClip2VisionConfig,
    MetaClip2VisionModelWithProjection,
    SiglipTextConfig,
    SiglipTextModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from clipvision.server.errors import CheckpointError


class Score(enum.Enum):
    """How Classify turns ``logit_scale * cosine`` (+ ``logit_bias``) into probabilities."""

    SOFTMAX = "softmax"
    """Over the labels (they sum to one), as CLIPModel's logits_per_image.softmax(-1)."""
    SIGMOID = "sigmoid"
    """Per label, independent, as SiglipModel's sigmoid(logits_per_image)."""


class TextPadding(enum.Enum):
    """How a batch of texts is padded for the text tower."""

    LONGEST = "longest"
    """To the longest text of the batch, with an attention mask."""
    CONTEXT = "context"
    """Every text to the full context, with no mask: the tower sees the padding."""


@dataclass(frozen=True)
class Family:
    """How to load, run and score one kind of checkpoint."""

    name: str
    """What GetModelInfo reports: ``clip``, ``siglip`` or ``metaclip_2``."""
    model_types: frozenset[str]
    """The config.json ``model_type`` values of this family's full checkpoints."""
    vision_only_type: str | None
    """The ``model_type`` of a checkpoint holding only its vision tower, if served."""
    vision_class: Any
    text_class: Any
    vision_config_class: Any
    text_config_class: Any
    image_output: str
    """The vision tower's output that get_image_features returns."""
    text_output: str
    """The text tower's output that get_text_features returns."""
    projected: bool
    """Whether a ``projection_dim`` (top level) sizes the embeddings; otherwise the towers'
    own heads do and the embedding is the vision tower's hidden size (SigLIP)."""
    padding: TextPadding
    score: Score

    @property
    def has_logit_bias(self) -> bool:
        """Whether Classify adds a learned bias (sigmoid scores) to the scaled cosines."""
        return self.score is Score.SIGMOID

    def vision_config(self, raw: dict[str, Any]) -> Any:
        """The vision tower's config from config.json's contents (full or vision-only)."""
        vision = dict(
            raw
            if raw.get("model_type") == self.vision_only_type
            else raw.get("vision_config") or {}
        )
        fields = {k: v for k, v in vision.items() if k not in {"model_type", "projection_dim"}}
        if self.projected:
            # projection_dim lives at the top of a full config and inside a vision-only one.
            fields["projection_dim"] = raw.get("projection_dim", vision.get("projection_dim", 512))
        return self.vision_config_class(**fields)

    def text_config(self, raw: dict[str, Any]) -> Any:
        """The text tower's config from a full checkpoint's config.json contents."""
        text = raw.get("text_config") or {}
        fields = {k: v for k, v in text.items() if k not in {"model_type", "projection_dim"}}
        if self.projected:
            fields["projection_dim"] = raw.get("projection_dim", text.get("projection_dim", 512))
        return self.text_config_class(**fields)

    def embedding_dim(self, vision_config: Any) -> int:
        """The length of the image embeddings this vision config gives."""
        if self.projected:
            return int(vision_config.projection_dim)
        return int(vision_config.hidden_size)

    def text_embedding_dim(self, text_config: Any) -> int:
        """The length of the text embeddings this text config gives."""
        if self.projected:
            return int(text_config.projection_dim)
        return int(text_config.projection_size)

    def image_features(self, model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
        """What ``get_image_features`` returns for normalised pixels."""
        features: torch.Tensor = getattr(model(pixel_values=pixel_values), self.image_output)
        return features

    def text_features(
        self, model: Any, ids: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """What ``get_text_features`` returns for padded ids (the mask where the family has
        one; a family padded to the context takes none)."""
        if self.padding is TextPadding.CONTEXT:
            output = model(input_ids=ids)
        else:
            output = model(input_ids=ids, attention_mask=mask)
        features: torch.Tensor = getattr(output, self.text_output)
        return features


CLIP = Family(
    name="clip",
    model_types=frozenset({"clip"}),
    vision_only_type="clip_vision_model",
    vision_class=CLIPVisionModelWithProjection,
    text_class=CLIPTextModelWithProjection,
    vision_config_class=CLIPVisionConfig,
    text_config_class=CLIPTextConfig,
    image_output="image_embeds",
    text_output="text_embeds",
    projected=True,
    padding=TextPadding.LONGEST,
    score=Score.SOFTMAX,
)
SIGLIP = Family(
    name="siglip",
    model_types=frozenset({"siglip"}),
    vision_only_type=None,
    vision_class=SiglipVisionModel,
    text_class=SiglipTextModel,
    vision_config_class=SiglipVisionConfig,
    text_config_class=SiglipTextConfig,
    # SiglipModel.get_*_features return the towers' pooler outputs (the heads' results).
    image_output="pooler_output",
    text_output="pooler_output",
    projected=False,
    padding=TextPadding.CONTEXT,
    score=Score.SIGMOID,
)
METACLIP_2 = Family(
    name="metaclip_2",
    model_types=frozenset({"metaclip_2"}),
    vision_only_type=None,
    vision_class=MetaClip2VisionModelWithProjection,
    text_class=MetaClip2TextModelWithProjection,
    vision_config_class=MetaClip2VisionConfig,
    text_config_class=MetaClip2TextConfig,
    image_output="image_embeds",
    text_output="text_embeds",
    projected=True,
    padding=TextPadding.LONGEST,
    score=Score.SOFTMAX,
)
FAMILIES: dict[str, Family] = {family.name: family for family in (CLIP, SIGLIP, METACLIP_2)}

SUPPORTED = (
    "clip and clip_vision_model (OpenAI CLIP, MetaCLIP, OpenCLIP's LAION and DataComp), "
    "siglip (SigLIP, SigLIP 2 FixRes) and metaclip_2 (MetaCLIP 2)"
)
# Types people try that are refused, and why, for the one line the operator reads.
_REFUSED: dict[str, str] = {
    "siglip2": "SigLIP 2 NaFlex (variable resolution and aspect ratio) is not served; "
    "its FixRes checkpoints (google/siglip2-*-patch16-224 and the like) are",
    "siglip_vision_model": "a SigLIP vision tower alone is not served; use the full checkpoint",
}


def family_of(raw: dict[str, Any], directory: Path) -> Family:
    """The family of a checkpoint from its config.json contents; CheckpointError, in one
    line naming what is served, for any other (remote code is never run)."""
    model_type = raw.get("model_type")
    if raw.get("auto_map"):
        raise CheckpointError(
            f"{directory} holds a {model_type!r} model that needs its own remote code "
            f"(auto_map), which clipvision never runs; it serves model types {SUPPORTED}"
        )
    for family in FAMILIES.values():
        if model_type in family.model_types or model_type == family.vision_only_type:
            return family
    why = f" ({_REFUSED[model_type]})" if model_type in _REFUSED else ""
    raise CheckpointError(
        f"{directory} holds a {model_type!r} model{why}; clipvision serves model types {SUPPORTED}"
    )


def is_vision_only(family: Family, raw: dict[str, Any]) -> bool:
    """Whether the checkpoint holds only the vision tower (no text tower to load)."""
    return raw.get("model_type") == family.vision_only_type
