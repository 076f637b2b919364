"""Load a checkpoint's towers, from a directory, the hub or random weights.

The family (runtime.families) is read from config.json: it names the towers'
classes and how texts are padded and scored. The vision tower is always loaded; a
full checkpoint that ships its tokenizer also gives the text tower, the tokenizer
and the learned ``logit_scale`` (and SigLIP's ``logit_bias``); a vision-only one
serves images only. Each tower is materialised on its own (never the whole model),
so a vision-only server holds no text weights. The preprocessing is the
checkpoint's preprocessor_config.json, read by the processor class it names.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors import safe_open
from transformers import AutoImageProcessor, AutoTokenizer
from transformers.utils import logging as transformers_logging

from clipvision.server.config.presets import PRESETS, Preset
from clipvision.server.config.settings import ModelSpec
from clipvision.server.errors import CheckpointError
from clipvision.server.runtime.dummy import preset_preprocess, random_towers
from clipvision.server.runtime.families import (
    CLIP,
    FAMILIES,
    Family,
    family_of,
    is_vision_only,
)
from clipvision.server.runtime.preprocess import PreprocessConfig

logger = logging.getLogger(__name__)

# What a checkpoint needs; other files in a hub repository (TF, Flax, .bin, OpenCLIP's own
# copy of the weights) are not fetched.
CHECKPOINT_FILES = [
    "config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    # The tokenizer, in any of the forms the families' tokenizers read.
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
]
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
# The image processors whose steps PreprocessConfig reproduces (their Pillow-backed form).
IMAGE_PROCESSORS = ("CLIPImageProcessor", "SiglipImageProcessor")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class TextTower:
    """A loaded, immutable text tower with its tokenizer and the model's temperature."""

    model: Any
    """The family's text tower (transformers), with its projection or head."""
    tokenizer: Any
    """The checkpoint's own tokenizer (transformers), as AutoTokenizer loads it."""
    context_length: int
    """The most tokens (start and end included) the tower takes: 77 for OpenAI's."""
    vocab_size: int
    logit_scale: float
    """``logit_scale.exp()``: cosines are multiplied by it before the softmax or sigmoid."""
    family: Family = CLIP
    logit_bias: float | None = None
    """SigLIP's learned bias, added to the scaled cosines before the sigmoid; None for CLIP."""

    def features(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """What the model's get_text_features returns for a padded batch of ids."""
        return self.family.text_features(self.model, ids, mask)


@dataclass(frozen=True)
class Checkpoint:
    """A loaded, immutable vision model with the preprocessing it was trained with."""

    model: Any
    """The family's vision tower (transformers), with its projection or head."""
    preprocess: PreprocessConfig
    embedding_dim: int
    image_size: int
    device: torch.device
    dtype: torch.dtype
    dummy_weights: bool
    text: TextTower | None = None
    """The text tower, or None when the checkpoint has none (``text_missing`` says why)."""
    text_missing: str = ""
    family: Family = CLIP

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the model's get_image_features returns for normalised pixels."""
        return self.family.image_features(self.model, pixel_values)


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
        return CheckpointConfig(preset_preprocess(preset), preset.embedding_dim, preset.image_size)
    directory = _local_directory(spec.hub_or_path, cache_dir)
    raw = _config(directory)
    family = family_of(raw, directory)
    vision_config = _checked_vision_config(spec, family, raw, directory)
    return CheckpointConfig(
        _preprocess_config(directory),
        family.embedding_dim(vision_config),
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
    text: TextTower | None
    if dummy_weights:
        preset = PRESETS.get(spec.source)
        if preset is None:
            raise CheckpointError(f"--dummy-weights needs a preset, and {spec.source!r} is not one")
        family, model, preprocess, text = _random_checkpoint(preset)
        text_missing = ""
    else:
        directory = _local_directory(spec.hub_or_path, cache_dir)
        raw = _config(directory)
        family = family_of(raw, directory)
        vision_config = _checked_vision_config(spec, family, raw, directory)
        model = _pretrained_model(directory, family, vision_config)
        preprocess = _preprocess_config(directory)
        text, text_missing = _pretrained_text_tower(
            directory, family, raw, family.embedding_dim(vision_config)
        )
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if text is not None:
        text_model = text.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        text = dataclasses.replace(text, model=text_model)
    config = model.config
    return Checkpoint(
        model=model,
        preprocess=preprocess,
        embedding_dim=family.embedding_dim(config),
        image_size=int(config.image_size),
        device=device,
        dtype=dtype,
        dummy_weights=dummy_weights,
        text=text,
        text_missing=text_missing,
        family=family,
    )


def _random_checkpoint(preset: Preset) -> tuple[Family, Any, PreprocessConfig, TextTower]:
    """A preset's towers with random weights, its family's preprocessing and tokenizer."""
    family = FAMILIES[preset.family]
    towers = random_towers(preset, family)
    text = TextTower(
        towers.text,
        towers.tokenizer,
        towers.context_length,
        towers.vocab_size,
        towers.logit_scale,
        family,
        towers.logit_bias,
    )
    return family, towers.vision, towers.preprocess, text


def _pretrained_text_tower(
    directory: Path, family: Family, raw: dict[str, Any], embedding_dim: int
) -> tuple[TextTower | None, str]:
    """The text tower of a full checkpoint, or None and why there is none."""
    if is_vision_only(family, raw):
        return None, f"{directory} is a vision-only checkpoint ({raw.get('model_type')})"
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        return None, (
            f"{directory} has no tokenizer ({', '.join(_TOKENIZER_FILES)}: none is there)"
        )
    config = family.text_config(raw)
    text_dim = family.text_embedding_dim(config)
    if text_dim != embedding_dim:
        raise CheckpointError(
            f"{directory}'s text embeddings have {text_dim} dimensions and its image "
            f"embeddings {embedding_dim}: they cannot be compared"
        )
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the vision weights are "unexpected" here
    try:
        model, info = family.text_class.from_pretrained(
            directory, config=config, use_safetensors=True, output_loading_info=True
        )
        # The checkpoint's own tokenizer class (tokenizer_config.json, else its model type),
        # exactly what its model card's AutoProcessor or AutoTokenizer gives.
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError, ImportError) as exc:
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
    scalars = _scalar_weights(directory, ("logit_scale", "logit_bias"))
    if "logit_scale" not in scalars:
        raise CheckpointError(f"{directory} has a text tower but no logit_scale weight")
    if family.has_logit_bias and "logit_bias" not in scalars:
        raise CheckpointError(f"{directory} is a {family.name} checkpoint without a logit_bias")
    return (
        TextTower(
            model,
            tokenizer,
            int(config.max_position_embeddings),
            len(tokenizer),
            float(torch.tensor(scalars["logit_scale"]).exp()),
            family,
            scalars["logit_bias"] if family.has_logit_bias else None,
        ),
        "",
    )


# Any one of these makes a tokenizer AutoTokenizer can load (with tokenizer_config.json).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


def _scalar_weights(directory: Path, names: tuple[str, ...]) -> dict[str, float]:
    """The named one-element weights (``logit_scale``, ``logit_bias``) that the checkpoint's
    safetensors hold, sharded or not, as stored (no exp)."""
    files = sorted(directory.glob("*.safetensors"))
    index = next(directory.glob("*.safetensors.index.json"), None)
    if index is not None:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        shards = {weight_map[name] for name in names if name in weight_map}
        files = [directory / shard for shard in sorted(shards)] or files
    found: dict[str, float] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as weights:
            keys = set(weights.keys())
            for name in names:
                if name in keys and name not in found:
                    found[name] = float(weights.get_tensor(name).float().reshape(-1)[0])
    return found


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


def _config(directory: Path) -> dict[str, Any]:
    config_path = directory / "config.json"
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_path} is missing or is not valid JSON") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path} is not a JSON object")
    return raw


def _checked_vision_config(
    spec: ModelSpec, family: Family, raw: dict[str, Any], directory: Path
) -> Any:
    """The vision tower's config; CheckpointError if it is not the preset ``spec`` names."""
    vision_config = _vision_config(family, raw, directory)
    if spec.preset is not None:
        mismatches = spec.preset.mismatches(
            family.name, vision_config, family.embedding_dim(vision_config)
        )
        if mismatches:
            raise CheckpointError(
                f"{spec.source} is not a {spec.preset.name} checkpoint: " + "; ".join(mismatches)
            )
    return vision_config


def _vision_config(family: Family, raw: dict[str, Any], directory: Path) -> Any:
    try:
        return family.vision_config(raw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{directory}/config.json's vision tower cannot be used: {exc}"
        ) from exc


def _pretrained_model(directory: Path, family: Family, config: Any) -> Any:
    if not any(directory.glob("*.safetensors")):
        raise CheckpointError(
            f"{directory} has no *.safetensors weights; convert the checkpoint to safetensors "
            "(clipvision does not unpickle .bin files)"
        )
    if family.name == "siglip" and not getattr(config, "vision_use_head", True):
        raise CheckpointError(
            f"{directory}'s SigLIP vision tower has no pooling head (vision_use_head false), "
            "so it gives no image embedding"
        )
    verbosity = transformers_logging.get_verbosity()
    # A full checkpoint also holds the text tower, which we skip on purpose; its
    # "unexpected keys" report would only alarm operators.
    transformers_logging.set_verbosity_error()
    try:
        model, info = family.vision_class.from_pretrained(
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
            f"it must be a full {family.name} checkpoint or its vision tower"
        )
    return model


def _preprocess_config(directory: Path) -> PreprocessConfig:
    # Hub checkpoints ship preprocessor_config.json; a processor saved by transformers 5
    # writes processor_config.json, with the image processor's settings inside.
    if not any((directory / name).is_file() for name in PROCESSOR_FILES):
        raise CheckpointError(
            f"{directory} has no preprocessor_config.json; clipvision preprocesses exactly as the "
            "checkpoint says and will not guess"
        )
    try:
        # The Pillow-backed form of the class the checkpoint names (or its model type
        # implies): its defaults (SigLIP crops nothing, CLIP crops the centre) fill what
        # the file leaves out.
        processor = AutoImageProcessor.from_pretrained(directory, backend="pil")
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{directory}'s preprocessor config cannot be used: {exc}") from exc
    kind = type(processor).__name__.removesuffix("Pil")
    if kind not in IMAGE_PROCESSORS:
        raise CheckpointError(
            f"{directory}'s preprocessor config names the image processor {kind}; "
            f"clipvision reproduces {' and '.join(IMAGE_PROCESSORS)} exactly, and no other"
        )
    try:
        return PreprocessConfig.from_image_processor(processor)
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{directory}'s preprocessor config cannot be used: {exc}") from exc
