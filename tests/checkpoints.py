"""Tiny real checkpoints of every family, saved in the standard Hugging Face layout.

They have random weights but are otherwise exactly what a hub download holds:
config.json, model.safetensors and preprocessor_config.json, and for a full model
the tokenizer, trained here, offline, on a few sentences:

- CLIP: a byte-level BPE in CLIP's layout (bytes, bytes ending a word, merges, then
  the two special tokens last), as tokenizer.json and tokenizer_config.json;
- SigLIP: a SentencePiece model (spiece.model) read by SiglipTokenizer, which
  lowercases and drops punctuation, its end token doubling as padding;
- SigLIP 2 (FixRes, model type siglip too): a Gemma tokenizer (BPE with byte fallback,
  pad id 0), adding an end token and no start token, as google/siglip2-* ship it;
- MetaCLIP 2: an XLM-R tokenizer (Unigram; <s> 0, <pad> 1, </s> 2).

The SigLIP-family tokenizers say model_input_names ["input_ids"], as the published
ones do, so that their processors return no attention mask.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import sentencepiece
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    GemmaTokenizer,
    MetaClip2Config,
    MetaClip2Model,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipProcessor,
    SiglipTokenizer,
    XLMRobertaTokenizer,
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


# -- other families ----------------------------------------------------------------------

# SigLIP's context is 64 tokens in every published checkpoint; the tiny ones keep it.
SIGLIP_CONTEXT = 64
TINY_SIGLIP_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 512,
    "max_position_embeddings": SIGLIP_CONTEXT,
}
TINY_SIGLIP_VISION = {**TINY_VISION, "image_size": 32, "patch_size": 8}
# Scale and bias that put the sigmoid's results mid-range for random towers (the
# published ones, about 110 and -16, would make every probability near 0).
SIGLIP_LOGIT_SCALE = math.log(20.0)
SIGLIP_LOGIT_BIAS = -0.3
METACLIP_2_CONTEXT = 16


def build_sentencepiece_tokenizer(directory: Path) -> SiglipTokenizer:
    """SigLIP's tokenizer: a unigram SentencePiece model trained on CORPUS (<pad> 0, </s> 1,
    <unk> 2), saved as spiece.model beside tokenizer_config.json."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4),
        model_writer=model,
        vocab_size=120,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file = directory / "spiece.model"
    vocab_file.write_bytes(model.getvalue())
    return SiglipTokenizer(
        vocab_file=str(vocab_file),
        model_input_names=["input_ids"],
        model_max_length=SIGLIP_CONTEXT,
    )


def build_gemma_tokenizer() -> GemmaTokenizer:
    """SigLIP 2's tokenizer: Gemma's BPE with byte fallback (<pad> 0, <eos> 1, <bos> 2,
    <unk> 3, <mask> 4, then the 256 byte tokens), merges trained on CORPUS."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    specials += [f"<0x{byte:02X}>" for byte in range(256)]
    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    bpe.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    bpe.train_from_iterator(CORPUS * 4, trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(merge) for merge in trained["merges"]]
    return GemmaTokenizer(
        vocab=trained["vocab"],
        merges=merges,
        add_bos_token=False,
        add_eos_token=True,
        padding_side="right",
        model_input_names=["input_ids"],
        model_max_length=SIGLIP_CONTEXT,
    )


def build_xlm_roberta_tokenizer() -> XLMRobertaTokenizer:
    """MetaCLIP 2's kind of tokenizer: XLM-R's Unigram (<s> 0, <pad> 1, </s> 2, <unk> 3),
    pieces trained on CORPUS."""
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always"),
        ]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=200,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        unk_token="<unk>",
        show_progress=False,
    )
    unigram.train_from_iterator(CORPUS * 4, trainer=trainer)
    vocab = [(piece, score) for piece, score in json.loads(unigram.to_str())["model"]["vocab"]]
    return XLMRobertaTokenizer(vocab=vocab, model_max_length=METACLIP_2_CONTEXT)


def build_siglip_model(
    directory: Path, *, gemma: bool = False, seed: int = 2, image_size: int = 32
) -> SiglipModel:
    """Save a full SiglipModel: SigLIP's (SentencePiece) or, ``gemma``, SigLIP 2 FixRes's
    (Gemma tokenizer, pad id 0), with SiglipImageProcessor's preprocessing."""
    tokenizer: Any = build_gemma_tokenizer() if gemma else build_sentencepiece_tokenizer(directory)
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = SiglipConfig(
        text_config={**TINY_SIGLIP_TEXT, **ids},
        vision_config={**TINY_SIGLIP_VISION, "image_size": image_size},
    )
    torch.manual_seed(seed)
    model = SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(SIGLIP_LOGIT_SCALE)
        model.logit_bias.fill_(SIGLIP_LOGIT_BIAS)
    model.save_pretrained(directory)
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    if gemma:
        # As transformers 5 saves a processor: processor_config.json holds the image part.
        processor = SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
        processor.save_pretrained(directory)
    else:
        # As the hub's google/siglip-* hold it: preprocessor_config.json and the tokenizer.
        image_processor.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return model


def build_metaclip_2_model(directory: Path, projection_dim: int = 16, seed: int = 3) -> Any:
    """Save a full MetaClip2Model with an XLM-R tokenizer and CLIP's preprocessing."""
    tokenizer = build_xlm_roberta_tokenizer()
    text = {
        **TINY_TEXT,
        "vocab_size": 128,
        "max_position_embeddings": METACLIP_2_CONTEXT,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = MetaClip2Config(
        text_config=text, vision_config=TINY_VISION, projection_dim=projection_dim
    )
    torch.manual_seed(seed)
    model = MetaClip2Model(config).eval()
    model.save_pretrained(directory)
    save_processor(directory, TINY_VISION["image_size"])
    tokenizer.save_pretrained(directory)
    return model
