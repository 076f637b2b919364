"""Named CLIP architectures: where their weights live and what shape they have."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    """A published CLIP vision architecture, usable by name in ``--model``."""

    name: str
    hub_id: str
    embedding_dim: int
    image_size: int
    vision_config: dict[str, Any] = field(default_factory=dict)
    text_config: dict[str, Any] = field(default_factory=dict)
    """The text tower's shape, for --dummy-weights (a hub checkpoint brings its own)."""

    def mismatches(self, config: Any) -> list[str]:
        """How a transformers CLIPVisionConfig differs from this preset (empty if it matches)."""
        expected = {"projection_dim": self.embedding_dim, **self.vision_config}
        return [
            f"{key} is {getattr(config, key, None)!r}, {self.name} has {value!r}"
            for key, value in expected.items()
            if key != "hidden_act" and getattr(config, key, None) != value
        ]


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="ViT-B/32",
            hub_id="openai/clip-vit-base-patch32",
            embedding_dim=512,
            image_size=224,
            vision_config={
                "hidden_size": 768,
                "intermediate_size": 3072,
                "num_hidden_layers": 12,
                "num_attention_heads": 12,
                "image_size": 224,
                "patch_size": 32,
                "hidden_act": "quick_gelu",
            },
            text_config={
                "hidden_size": 512,
                "intermediate_size": 2048,
                "num_hidden_layers": 12,
                "num_attention_heads": 8,
                "max_position_embeddings": 77,
                "hidden_act": "quick_gelu",
            },
        ),
        Preset(
            name="ViT-L/14",
            hub_id="openai/clip-vit-large-patch14",
            embedding_dim=768,
            image_size=224,
            vision_config={
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "image_size": 224,
                "patch_size": 14,
                "hidden_act": "quick_gelu",
            },
            text_config={
                "hidden_size": 768,
                "intermediate_size": 3072,
                "num_hidden_layers": 12,
                "num_attention_heads": 12,
                "max_position_embeddings": 77,
                "hidden_act": "quick_gelu",
            },
        ),
    )
}
