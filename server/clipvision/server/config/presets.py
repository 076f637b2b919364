"""Named checkpoints: where their weights live, which family they are and what shape they have."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    """A published checkpoint's architecture, usable by name in ``--model``."""

    name: str
    hub_id: str
    embedding_dim: int
    image_size: int
    vision_config: dict[str, Any] = field(default_factory=dict)
    text_config: dict[str, Any] = field(default_factory=dict)
    """The text tower's shape, for --dummy-weights (a hub checkpoint brings its own)."""
    family: str = "clip"
    """The model family (runtime.families): clip, siglip or metaclip_2."""

    def mismatches(self, family: str, config: Any, embedding_dim: int) -> list[str]:
        """How a checkpoint (its family, vision tower config and embedding length) differs
        from this preset (empty if it matches)."""
        found = [] if family == self.family else [f"it is a {family} model, {self.name} is not"]
        if embedding_dim != self.embedding_dim:
            found.append(
                f"its embeddings have {embedding_dim} dimensions, {self.name}'s "
                f"{self.embedding_dim}"
            )
        return found + [
            f"{key} is {getattr(config, key, None)!r}, {self.name} has {value!r}"
            for key, value in self.vision_config.items()
            if key != "hidden_act" and getattr(config, key, None) != value
        ]


def _vit(
    hidden: int, layers: int, heads: int, image: int, patch: int, **extra: Any
) -> dict[str, Any]:
    """A vision tower's shape: the MLP is four times the width, as in every ViT below."""
    return {
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "image_size": image,
        "patch_size": patch,
        **extra,
    }


def _text(hidden: int, layers: int, heads: int, context: int, **extra: Any) -> dict[str, Any]:
    """A text tower's shape, for random weights."""
    return {
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": context,
        **extra,
    }


# SigLIP's so400m shape: 1152 wide, an MLP of 4304 (not four times), 27 layers.
_SO400M = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
}
# SigLIP's tokenizers: T5's SentencePiece (padding with its end token) and Gemma's.
_SIGLIP_TOKENS = {"vocab_size": 32000, "pad_token_id": 1, "eos_token_id": 1}
_GEMMA_TOKENS = {"vocab_size": 256000, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
# MetaCLIP 2 worldwide: XLM-V's vocabulary, XLM-R's special tokens.
_XLMV_TOKENS = {"vocab_size": 901629, "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2}
_QUICK = {"hidden_act": "quick_gelu"}
_TANH = {"hidden_act": "gelu_pytorch_tanh"}

PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="ViT-B/32",
            hub_id="openai/clip-vit-base-patch32",
            embedding_dim=512,
            image_size=224,
            vision_config=_vit(768, 12, 12, 224, 32, **_QUICK),
            text_config=_text(512, 12, 8, 77, **_QUICK),
        ),
        Preset(
            name="ViT-B/16",
            hub_id="openai/clip-vit-base-patch16",
            embedding_dim=512,
            image_size=224,
            vision_config=_vit(768, 12, 12, 224, 16, **_QUICK),
            text_config=_text(512, 12, 8, 77, **_QUICK),
        ),
        Preset(
            name="ViT-L/14",
            hub_id="openai/clip-vit-large-patch14",
            embedding_dim=768,
            image_size=224,
            vision_config=_vit(1024, 24, 16, 224, 14, **_QUICK),
            text_config=_text(768, 12, 12, 77, **_QUICK),
        ),
        Preset(
            name="MetaCLIP-B/32",
            hub_id="facebook/metaclip-b32-400m",
            embedding_dim=512,
            image_size=224,
            vision_config=_vit(768, 12, 12, 224, 32, **_QUICK),
            text_config=_text(512, 12, 8, 77, **_QUICK),
        ),
        Preset(
            name="LAION-ViT-B/32",
            hub_id="laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
            embedding_dim=512,
            image_size=224,
            vision_config=_vit(768, 12, 12, 224, 32),
            text_config=_text(512, 12, 8, 77),
        ),
        Preset(
            name="DataComp-ViT-L/14",
            hub_id="laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K",
            embedding_dim=768,
            image_size=224,
            vision_config=_vit(1024, 24, 16, 224, 14),
            text_config=_text(768, 12, 12, 77),
        ),
        Preset(
            name="SigLIP-B/16",
            hub_id="google/siglip-base-patch16-224",
            family="siglip",
            embedding_dim=768,
            image_size=224,
            vision_config=_vit(768, 12, 12, 224, 16, **_TANH),
            text_config=_text(768, 12, 12, 64, **_TANH, **_SIGLIP_TOKENS),
        ),
        Preset(
            name="SigLIP-SO400M/14-384",
            hub_id="google/siglip-so400m-patch14-384",
            family="siglip",
            embedding_dim=1152,
            image_size=384,
            vision_config={**_SO400M, "image_size": 384, "patch_size": 14, **_TANH},
            text_config={**_SO400M, "max_position_embeddings": 64, **_TANH, **_SIGLIP_TOKENS},
        ),
        Preset(
            name="SigLIP2-B/16",
            hub_id="google/siglip2-base-patch16-224",
            family="siglip",
            embedding_dim=768,
            image_size=224,
            vision_config=_vit(768, 12, 12, 224, 16, **_TANH),
            text_config=_text(768, 12, 12, 64, **_TANH, **_GEMMA_TOKENS),
        ),
        Preset(
            name="SigLIP2-SO400M/14-384",
            hub_id="google/siglip2-so400m-patch14-384",
            family="siglip",
            embedding_dim=1152,
            image_size=384,
            vision_config={**_SO400M, "image_size": 384, "patch_size": 14, **_TANH},
            text_config={**_SO400M, "max_position_embeddings": 64, **_TANH, **_GEMMA_TOKENS},
        ),
        Preset(
            name="MetaCLIP2-B/32",
            hub_id="facebook/metaclip-2-worldwide-b32",
            family="metaclip_2",
            embedding_dim=512,
            image_size=224,
            vision_config=_vit(768, 12, 12, 224, 32),
            text_config=_text(512, 12, 8, 77, **_XLMV_TOKENS),
        ),
        Preset(
            name="MetaCLIP2-H/14",
            hub_id="facebook/metaclip-2-worldwide-huge-quickgelu",
            family="metaclip_2",
            embedding_dim=1024,
            image_size=224,
            vision_config=_vit(1280, 32, 16, 224, 14, **_QUICK),
            text_config=_text(1024, 24, 16, 77, **_QUICK, **_XLMV_TOKENS),
        ),
    )
}
