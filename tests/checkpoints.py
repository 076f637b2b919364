"""Tiny real CLIP checkpoints, saved in the standard Hugging Face layout.

They have random weights but are otherwise exactly what a hub download holds:
config.json, model.safetensors and preprocessor_config.json, and for a full CLIPModel
the tokenizer (tokenizer.json and tokenizer_config.json): a byte-level BPE in CLIP's
layout (bytes, bytes ending a word, merges, then the two special tokens last) whose
merges are trained here, offline, on a few sentences.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTokenizer,
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
    "vocab_size": 1024,
    "max_position_embeddings": 16,
    # CLIP's layout: the special tokens are the last two ids (eos doubles as padding).
    "bos_token_id": 1022,
    "eos_token_id": 1023,
    "pad_token_id": 1023,
}
CORPUS = [
    "a photo of a cat",
    "a photo of a dog sleeping on the sofa",
    "an aerial photograph of the city at night",
    "the quick brown fox jumps over the lazy dog",
    "une photo d'un château en été",
    "猫の写真",
    "a bowl of ramen with an egg 🍜",
]


def build_tokenizer(vocab_size: int = TINY_TEXT["vocab_size"]) -> CLIPTokenizer:
    """A CLIP tokenizer with merges trained on CORPUS, its special tokens the last two ids."""
    template = CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1}, merges=[])
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)
    trainer_model = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    trainer_model.normalizer = template.backend_tokenizer.normalizer
    trainer_model.pre_tokenizer = template.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    trainer_model.train_from_iterator(CORPUS * 4, trainer=trainer)
    trained = json.loads(trainer_model.to_str())["model"]["merges"]
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    vocab.update({symbol + "</w>": len(alphabet) + i for i, symbol in enumerate(alphabet)})
    merges = [(left, right) for left, right in trained[: vocab_size - 2 - len(vocab)]]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = vocab_size - 2
    vocab["<|endoftext|>"] = vocab_size - 1
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16)


def _byte_of(symbol: str) -> int:
    """The byte a ByteLevel symbol stands for (GPT-2's printable mapping)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    code = ord(symbol)
    return code if code in printable else [b for b in range(256) if b not in printable][code - 256]


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
    build_tokenizer().save_pretrained(directory)
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
