"""Random weights of a preset's architecture, with a tokenizer of its family's shape.

For --dummy-weights (smoke tests and benchmarks on machines that cannot download
weights): the towers are the family's transformers classes at the preset's size,
seeded so that embeddings repeat across restarts and replicas; preprocessing is the
family's published default; the tokenizer has the family's special tokens at their
ids, and one token per byte otherwise, so a word is several tokens and texts reach
the context sooner than with the real vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer, GemmaTokenizer

from clipvision.server.config.presets import Preset
from clipvision.server.runtime.families import Family
from clipvision.server.runtime.preprocess import PreprocessConfig

# CLIP's initial temperature, exp(logit_scale) = 1 / 0.07.
CLIP_LOGIT_SCALE = 1 / 0.07
# SigLIP's initial temperature and bias (t' = log 10, b = -10 in the paper).
SIGLIP_LOGIT_SCALE = 10.0
SIGLIP_LOGIT_BIAS = -10.0
# CLIP's byte-level BPE: the special tokens sit at the end of a 49,408-token vocabulary.
CLIP_VOCAB_SIZE = 49408
# The text config keys that name special tokens; the rest of a preset's text_config is shape.
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass(frozen=True)
class RandomTowers:
    """Both towers of a preset with random weights, and what serving them needs."""

    vision: Any
    text: Any
    tokenizer: Any
    preprocess: PreprocessConfig
    context_length: int
    vocab_size: int
    logit_scale: float
    logit_bias: float | None


def random_towers(preset: Preset, family: Family) -> RandomTowers:
    """Build ``preset``'s towers with seeded random weights (seconds for the large ones)."""
    projection = {"projection_dim": preset.embedding_dim} if family.projected else {}
    vision_config = family.vision_config_class(**preset.vision_config, **projection)
    text_fields = dict(preset.text_config)
    if family.name == "clip":
        text_fields.update(
            vocab_size=CLIP_VOCAB_SIZE,
            bos_token_id=CLIP_VOCAB_SIZE - 2,
            eos_token_id=CLIP_VOCAB_SIZE - 1,
            pad_token_id=CLIP_VOCAB_SIZE - 1,
        )
    text_config = family.text_config_class(**text_fields, **projection)
    # A fixed seed keeps dummy embeddings reproducible across restarts and replicas.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vision = family.vision_class(vision_config)
        torch.manual_seed(1)
        text = family.text_class(text_config)
    context = int(text_config.max_position_embeddings)
    if family.name == "clip":
        tokenizer = byte_level_tokenizer()
    else:
        ids = {key: text_fields[key] for key in _TOKEN_IDS if key in text_fields}
        tokenizer = byte_fallback_tokenizer(ids, context, with_bos=family.name == "metaclip_2")
    preprocess = preset_preprocess(preset)
    sigmoid = family.has_logit_bias
    return RandomTowers(
        vision=vision,
        text=text,
        tokenizer=tokenizer,
        preprocess=preprocess,
        context_length=context,
        vocab_size=int(text_config.vocab_size),
        logit_scale=SIGLIP_LOGIT_SCALE if sigmoid else CLIP_LOGIT_SCALE,
        logit_bias=SIGLIP_LOGIT_BIAS if sigmoid else None,
    )


def preset_preprocess(preset: Preset) -> PreprocessConfig:
    """The preprocessing a preset's published checkpoint ships: SigLIP's straight resize, or
    CLIP's resize and centre crop (MetaCLIP 2 and CLIP alike)."""
    if preset.family == "siglip":
        return PreprocessConfig.siglip(preset.image_size)
    return PreprocessConfig.openai_clip(preset.image_size)


def byte_level_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with no merges: one token per byte, CLIP's special tokens and ids."""
    alphabet = list(pre_tokenizers.ByteLevel.alphabet())
    alphabet.sort(key=_byte_of)
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    vocab.update({symbol + "</w>": len(alphabet) + index for index, symbol in enumerate(alphabet)})
    vocab["<|startoftext|>"] = CLIP_VOCAB_SIZE - 2
    vocab["<|endoftext|>"] = CLIP_VOCAB_SIZE - 1
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def byte_fallback_tokenizer(ids: dict[str, int], context: int, *, with_bos: bool) -> Any:
    """A BPE with no merges and byte fallback (Gemma's kind): the special tokens at the ids
    the text config names, then "▁" and one token per byte; an end token closes every text
    and, ``with_bos``, a start token opens it. Padding is on the right."""
    pad, eos = ids["pad_token_id"], ids["eos_token_id"]
    specials = {"</s>": eos}
    if pad != eos:
        specials["<pad>"] = pad
    if "bos_token_id" in ids:
        specials["<s>"] = ids["bos_token_id"]
    first = max(specials.values()) + 1
    vocab = {**specials, "<unk>": first, "▁": first + 1}
    vocab.update({f"<0x{byte:02X}>": first + 2 + byte for byte in range(256)})
    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=[],
        unk_token="<unk>",  # noqa: S106 (a token, not a password)
        bos_token="<s>" if "<s>" in specials else None,
        eos_token="</s>",  # noqa: S106 (a token, not a password)
        pad_token="</s>" if pad == eos else "<pad>",
        mask_token=None,
        add_bos_token=with_bos,
        add_eos_token=True,
        padding_side="right",
        model_max_length=context,
    )
    return tokenizer


def _byte_of(symbol: str) -> int:
    """The byte a ByteLevel symbol stands for (GPT-2's printable mapping)."""
    code = ord(symbol)
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += list(range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    return [b for b in range(256) if b not in printable][code - 256]
