"""Tiny real CLIP checkpoints, saved in the standard Hugging Face layout.

They have random weights but are otherwise exactly what a hub download holds:
config.json, model.safetensors and preprocessor_config.json.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}
TINY_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 64,
    "max_position_embeddings": 16,
}


def save_processor(directory: Path, image_size: int, **overrides: object) -> None:
    """Write the preprocessor_config.json a CLIP checkpoint of this image size ships."""
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        **overrides,
    )
    processor.save_pretrained(directory)


def build_clip_model(directory: Path, projection_dim: int = 16, seed: int = 0) -> CLIPModel:
    """Save a full CLIPModel (vision and text towers), as openai/clip-vit-* ships."""
    config = CLIPConfig(
        text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=projection_dim
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(directory)
    save_processor(directory, TINY_VISION["image_size"])
    return model


def build_vision_model(
    directory: Path, projection_dim: int = 24, seed: int = 1, image_size: int = 40
) -> CLIPVisionModelWithProjection:
    """Save a CLIPVisionModelWithProjection checkpoint with its own preprocessing."""
    config = CLIPVisionConfig(
        **{**TINY_VISION, "image_size": image_size}, projection_dim=projection_dim
    )
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(config).eval()
    model.save_pretrained(directory)
    save_processor(directory, image_size, image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])
    return model
