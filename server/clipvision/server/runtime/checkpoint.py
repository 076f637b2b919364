"""Load CLIP's towers and their projections, from a directory, the hub or random weights.

The vision tower and projection are always loaded. A full ``CLIPModel`` checkpoint
that ships its tokenizer also gives the text tower, its projection and the learned
``logit_scale``; a ``CLIPVisionModelWithProjection`` checkpoint serves images only.
Each tower is materialised on its own (never the whole ``CLIPModel``), so a
vision-only server holds no text weights.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors import safe_open
from tokenizers import pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)
from transformers.utils import logging as transformers_logging

from clipvision.server.config.presets import PRESETS, Preset
from clipvision.server.config.settings import ModelSpec
from clipvision.server.errors import CheckpointError
from clipvision.server.runtime.preprocess import PreprocessConfig

logger = logging.getLogger(__name__)

# What a checkpoint needs; other files in a hub repository (TF, Flax, .bin) are not fetched.
CHECKPOINT_FILES = [
    "config.json",
    "preprocessor_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    # The tokenizer, in either of the forms CLIPTokenizer reads.
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
]
# CLIP's initial temperature, exp(logit_scale) = 1 / 0.07, for random weights.
DUMMY_LOGIT_SCALE = 1 / 0.07
# CLIP's byte-level BPE: the special tokens sit at the end of a 49,408-token vocabulary.
CLIP_VOCAB_SIZE = 49408
CLIP_MODEL_TYPES = {"clip", "clip_vision_model"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class TextTower:
    """A loaded, immutable text tower with its tokenizer and the model's temperature."""

    model: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    context_length: int
    """The most tokens (start and end included) the tower takes: 77 for OpenAI's."""
    vocab_size: int
    logit_scale: float
    """``CLIPModel.logit_scale.exp()``: cosines are multiplied by it before a softmax."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded, immutable vision model with the preprocessing it was trained with."""

    model: CLIPVisionModelWithProjection
    preprocess: PreprocessConfig
    embedding_dim: int
    image_size: int
    device: torch.device
    dtype: torch.dtype
    dummy_weights: bool
    text: TextTower | None = None
    """The text tower, or None when the checkpoint has none (``text_missing`` says why)."""
    text_missing: str = ""


@dataclass(frozen=True)
class CheckpointConfig:
    """What a checkpoint is, read from its configuration files without loading a weight."""

    preprocess: PreprocessConfig
    embedding_dim: int
    image_size: int


def read_checkpoint_config(
    spec: ModelSpec, *, dummy_weights: bool = False, cache_dir: str | None = None
) -> CheckpointConfig:
    """The preprocessing and shape of one ``--model`` entry, as load_checkpoint would find them.

    Only config.json and preprocessor_config.json are read (a hub id is fetched into the
    cache as load_checkpoint fetches it), for processes that prepare images for a model
    they do not run. CheckpointError says why a checkpoint cannot be used.
    """
    if dummy_weights:
        preset = PRESETS.get(spec.source)
        if preset is None:
            raise CheckpointError(f"--dummy-weights needs a preset, and {spec.source!r} is not one")
        return CheckpointConfig(
            PreprocessConfig.openai_clip(preset.image_size), preset.embedding_dim, preset.image_size
        )
    directory = _local_directory(spec.hub_or_path, cache_dir)
    vision_config = _vision_config(directory)
    if spec.preset is not None:
        mismatches = spec.preset.mismatches(vision_config)
        if mismatches:
            raise CheckpointError(
                f"{spec.source} is not a {spec.preset.name} checkpoint: " + "; ".join(mismatches)
            )
    return CheckpointConfig(
        _preprocess_config(directory),
        int(vision_config.projection_dim),
        int(vision_config.image_size),
    )


def resolve_device(requested: str) -> torch.device:
    """Pick CUDA, then MPS, then CPU for ``auto``; an explicit device must exist."""
    if requested != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CheckpointError(f"--device {requested} was asked for, but CUDA is not available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise CheckpointError(f"--device {requested} was asked for, but MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    logger.warning("no CUDA or MPS device found; running on the CPU, which is much slower")
    return torch.device("cpu")


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """float16 on CUDA and float32 elsewhere for ``auto``; otherwise the named dtype."""
    if requested == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[requested]


def load_checkpoint(
    spec: ModelSpec,
    *,
    device: torch.device,
    dtype: torch.dtype,
    dummy_weights: bool = False,
    cache_dir: str | None = None,
) -> Checkpoint:
    """Load one ``--model`` entry onto ``device`` in eval mode; CheckpointError says why not."""
    if dummy_weights:
        preset = PRESETS.get(spec.source)
        if preset is None:
            raise CheckpointError(f"--dummy-weights needs a preset, and {spec.source!r} is not one")
        model = _random_model(preset)
        preprocess = PreprocessConfig.openai_clip(preset.image_size)
        text: TextTower | None = _random_text_tower(preset)
        text_missing = ""
    else:
        directory = _local_directory(spec.hub_or_path, cache_dir)
        vision_config = _vision_config(directory)
        if spec.preset is not None:
            mismatches = spec.preset.mismatches(vision_config)
            if mismatches:
                raise CheckpointError(
                    f"{spec.source} is not a {spec.preset.name} checkpoint: "
                    + "; ".join(mismatches)
                )
        model = _pretrained_model(directory, vision_config)
        preprocess = _preprocess_config(directory)
        text, text_missing = _pretrained_text_tower(directory, int(vision_config.projection_dim))
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if text is not None:
        text_model = text.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        text = TextTower(
            text_model, text.tokenizer, text.context_length, text.vocab_size, text.logit_scale
        )
    config = model.config
    return Checkpoint(
        model=model,
        preprocess=preprocess,
        embedding_dim=int(config.projection_dim),
        image_size=int(config.image_size),
        device=device,
        dtype=dtype,
        dummy_weights=dummy_weights,
        text=text,
        text_missing=text_missing,
    )


def _random_model(preset: Preset) -> CLIPVisionModelWithProjection:
    config = CLIPVisionConfig(projection_dim=preset.embedding_dim, **preset.vision_config)
    # A fixed seed keeps dummy embeddings reproducible across restarts and replicas.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CLIPVisionModelWithProjection(config)


def _random_text_tower(preset: Preset) -> TextTower:
    config = CLIPTextConfig(
        projection_dim=preset.embedding_dim,
        vocab_size=CLIP_VOCAB_SIZE,
        bos_token_id=CLIP_VOCAB_SIZE - 2,
        eos_token_id=CLIP_VOCAB_SIZE - 1,
        pad_token_id=CLIP_VOCAB_SIZE - 1,
        **preset.text_config,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = CLIPTextModelWithProjection(config)
    return TextTower(
        model,
        byte_level_tokenizer(),
        int(config.max_position_embeddings),
        CLIP_VOCAB_SIZE,
        DUMMY_LOGIT_SCALE,
    )


def byte_level_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with no merges: one token per byte, CLIP's special tokens and ids.

    For random weights only: its tokens are not CLIP's (a word is several tokens), so
    texts reach the context sooner than with the real vocabulary.
    """
    alphabet = list(pre_tokenizers.ByteLevel.alphabet())
    alphabet.sort(key=_byte_of)
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    vocab.update({symbol + "</w>": len(alphabet) + index for index, symbol in enumerate(alphabet)})
    vocab["<|startoftext|>"] = CLIP_VOCAB_SIZE - 2
    vocab["<|endoftext|>"] = CLIP_VOCAB_SIZE - 1
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _byte_of(symbol: str) -> int:
    """The byte a ByteLevel symbol stands for (GPT-2's printable mapping)."""
    code = ord(symbol)
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += list(range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    return [b for b in range(256) if b not in printable][code - 256]


def _pretrained_text_tower(directory: Path, projection_dim: int) -> tuple[TextTower | None, str]:
    """The text tower of a full CLIPModel checkpoint, or None and why there is none."""
    config_path = directory / "config.json"
    raw = json.loads(config_path.read_text())
    if raw.get("model_type") != "clip":
        return None, f"{directory} is a vision-only checkpoint ({raw.get('model_type')})"
    if not any((directory / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        return None, (
            f"{directory} has no tokenizer (tokenizer.json, or vocab.json and merges.txt)"
        )
    fields = {k: v for k, v in raw.get("text_config", {}).items() if k != "model_type"}
    fields["projection_dim"] = raw.get("projection_dim", projection_dim)
    config = CLIPTextConfig(**fields)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the vision weights are "unexpected" here
    try:
        model, info = CLIPTextModelWithProjection.from_pretrained(
            directory, config=config, use_safetensors=True, output_loading_info=True
        )
        tokenizer = CLIPTokenizer.from_pretrained(directory)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:
        raise CheckpointError(f"could not load the text tower in {directory}: {exc}") from exc
    finally:
        transformers_logging.set_verbosity(verbosity)
    missing = [key for key in info.get("missing_keys", []) if not key.endswith("position_ids")]
    if missing or info.get("mismatched_keys"):
        shown = ", ".join(map(str, (missing + list(info.get("mismatched_keys", [])))[:5]))
        raise CheckpointError(
            f"{directory} lacks text weights or has them in another shape ({shown})"
        )
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(
            f"{directory}'s tokenizer has {len(tokenizer)} tokens and its text tower "
            f"{config.vocab_size}: they do not belong together"
        )
    return (
        TextTower(
            model,
            tokenizer,
            int(config.max_position_embeddings),
            len(tokenizer),
            _logit_scale(directory),
        ),
        "",
    )


def _logit_scale(directory: Path) -> float:
    """``exp(logit_scale)`` read from the checkpoint's weights (sharded or not)."""
    files = sorted(directory.glob("*.safetensors"))
    index = next(directory.glob("*.safetensors.index.json"), None)
    if index is not None:
        shard = json.loads(index.read_text()).get("weight_map", {}).get("logit_scale")
        files = [directory / shard] if shard else files
    for path in files:
        with safe_open(str(path), framework="pt") as weights:
            if "logit_scale" in weights.keys():  # noqa: SIM118 (safe_open has no __contains__)
                return float(weights.get_tensor("logit_scale").float().exp())
    raise CheckpointError(f"{directory} has a text tower but no logit_scale weight")


def _local_directory(source: str, cache_dir: str | None) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1:
        raise CheckpointError(f"checkpoint directory {source} does not exist")
    try:
        return Path(snapshot_download(source, allow_patterns=CHECKPOINT_FILES, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"could not fetch {source!r} from the Hugging Face Hub or its cache "
            f"({exc.__class__.__name__}). "
            "Either point --model at a local checkpoint directory (config.json, model.safetensors, "
            "preprocessor_config.json), or run a smoke test with random weights: "
            "--model ViT-B/32 --dummy-weights"
        ) from exc


def _vision_config(directory: Path) -> Any:
    config_path = directory / "config.json"
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_path} is missing or is not valid JSON") from exc
    model_type = raw.get("model_type")
    if model_type not in CLIP_MODEL_TYPES:
        raise CheckpointError(
            f"{directory} holds a {model_type!r} model; clipvision serves CLIP checkpoints "
            f"(model_type {' or '.join(sorted(CLIP_MODEL_TYPES))})"
        )
    vision = raw.get("vision_config", {}) if model_type == "clip" else raw
    # projection_dim lives at the top of a CLIPModel config and inside a vision-only one.
    projection_dim = raw.get("projection_dim", vision.get("projection_dim", 512))
    fields = {k: v for k, v in vision.items() if k not in {"model_type", "projection_dim"}}
    return CLIPVisionConfig(**fields, projection_dim=projection_dim)


def _pretrained_model(directory: Path, config: Any) -> CLIPVisionModelWithProjection:
    if not any(directory.glob("*.safetensors")):
        raise CheckpointError(
            f"{directory} has no *.safetensors weights; convert the checkpoint to safetensors "
            "(clipvision does not unpickle .bin files)"
        )
    verbosity = transformers_logging.get_verbosity()
    # A CLIPModel checkpoint also holds the text tower, which we skip on purpose; its
    # "unexpected keys" report would only alarm operators.
    transformers_logging.set_verbosity_error()
    try:
        model, info = CLIPVisionModelWithProjection.from_pretrained(
            directory, config=config, use_safetensors=True, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"could not load the weights in {directory}: {exc}") from exc
    finally:
        transformers_logging.set_verbosity(verbosity)
    missing = [key for key in info.get("missing_keys", []) if not key.endswith("position_ids")]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        shown = ", ".join(map(str, (missing + list(mismatched))[:5]))
        raise CheckpointError(
            f"{directory} lacks vision weights or has them in another shape ({shown}); "
            "it must be a CLIPModel or CLIPVisionModelWithProjection checkpoint"
        )
    return model


def _preprocess_config(directory: Path) -> PreprocessConfig:
    if not (directory / "preprocessor_config.json").is_file():
        raise CheckpointError(
            f"{directory} has no preprocessor_config.json; clipvision preprocesses exactly as the "
            "checkpoint says and will not guess"
        )
    try:
        processor = CLIPImageProcessorPil.from_pretrained(directory)
        return PreprocessConfig.from_image_processor(processor)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(
            f"{directory}/preprocessor_config.json cannot be used: {exc}"
        ) from exc
