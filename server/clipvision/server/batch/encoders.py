"""The server's runtime as the batch job uses it: the one module here that imports runtime.

The CPU stage prepares images exactly as the server does (header probe under the limits,
decode, EXIF, RGB, resize, crop -> uint8 pixels) without loading the model; the model
stage loads the checkpoint once per actor, on the backend the server would pick, and
embeds uint8 batches with the server's own encoders. Vectors are the server's, bit for
bit on the same backend and batch. When the serving pipeline splits preprocessing (decode
on the CPU, resize on the device), this module is where the job follows it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from clipvision.server.config.limits import ImageLimits
from clipvision.server.config.settings import ModelSpec, Settings
from clipvision.server.errors import CheckpointError
from clipvision.server.runtime.preprocess import (
    ClipPreprocessor,
    PreprocessConfig,
    UInt8Array,
    load_image,
    probe_image,
)

if TYPE_CHECKING:
    # Imported where they are used: the reader actors prepare images without torch, so
    # they start in a fraction of the time and hold none of its memory.
    from clipvision.server.runtime.checkpoint import CheckpointConfig
    from clipvision.server.runtime.image_encoder import ClipImageEncoder, FloatArray
    from clipvision.server.runtime.text_encoder import ClipTextEncoder

__all__ = [
    "CheckpointError",
    "ImagePreparer",
    "ModelOptions",
    "PreprocessConfig",
    "TextModel",
    "load_image_model",
    "load_text_model",
    "normalized_rows",
    "read_model_config",
]

logger = logging.getLogger(__name__)

# The server's default text size limit: a batch job refuses the same texts.
MAX_TEXT_BYTES = Settings().max_text_bytes


@dataclass(frozen=True)
class ModelOptions:
    """How the model stage loads its model: the server's flags of the same names."""

    model: str
    device: str = "auto"
    dtype: str = "auto"
    backend: str = "auto"
    threads: int | None = None
    dummy_weights: bool = False
    cache_dir: str | None = None

    @property
    def spec(self) -> ModelSpec:
        """The ``--model`` entry, parsed as the server parses it."""
        return ModelSpec.parse(self.model)


def read_model_config(options: ModelOptions) -> CheckpointConfig:
    """The model's preprocessing and embedding size, from its configs (no weights loaded)."""
    from clipvision.server.runtime.checkpoint import read_checkpoint_config

    return read_checkpoint_config(
        options.spec, dummy_weights=options.dummy_weights, cache_dir=options.cache_dir
    )


class ImagePreparer:
    """The CPU stage's work on one image: encoded bytes in, (3, H, W) uint8 pixels out.

    The same calls as ClipImageEncoder.probe and ClipImageEncoder.preprocess, so a bad
    image raises the server's InvalidImageError with the server's reason.
    """

    def __init__(self, preprocess: PreprocessConfig, limits: ImageLimits) -> None:
        self.limits = limits
        self._preprocessor = ClipPreprocessor(preprocess)
        self.shape = (3, preprocess.crop_height, preprocess.crop_width)

    def pixels(self, data: bytes) -> UInt8Array:
        """Probe the header under the limits, decode and preprocess; InvalidImageError if bad."""
        return self._preprocessor.pixels(load_image(probe_image(data, self.limits)))


def load_image_model(options: ModelOptions, limits: ImageLimits) -> ClipImageEncoder:
    """Load the checkpoint and its image backend as the server does at start (in an actor)."""
    from clipvision.server.runtime.backends import prepare_image_runner
    from clipvision.server.runtime.checkpoint import load_checkpoint, resolve_device, resolve_dtype
    from clipvision.server.runtime.image_encoder import ClipImageEncoder

    spec = options.spec
    device = resolve_device(options.device)
    checkpoint = load_checkpoint(
        spec,
        device=device,
        dtype=resolve_dtype(options.dtype, device),
        dummy_weights=options.dummy_weights,
        cache_dir=options.cache_dir,
    )
    runner = prepare_image_runner(
        spec.name, checkpoint, backend=options.backend, threads=options.threads, cache_dir=None
    )
    encoder = ClipImageEncoder(spec.name, spec.source, checkpoint, limits, runner)
    logger.info(
        "model %s loaded: %d-d on %s (%s)",
        spec.name,
        checkpoint.embedding_dim,
        checkpoint.device,
        encoder.backend,
    )
    return encoder


@dataclass(frozen=True)
class TextModel:
    """A loaded text tower and the size of its vectors."""

    encoder: ClipTextEncoder
    embedding_dim: int


def load_text_model(options: ModelOptions) -> TextModel:
    """Load the checkpoint's text tower as the server does; CheckpointError if it has none."""
    from clipvision.server.runtime.backends import prepare_text_runner
    from clipvision.server.runtime.checkpoint import load_checkpoint, resolve_device, resolve_dtype
    from clipvision.server.runtime.text_encoder import ClipTextEncoder

    spec = options.spec
    device = resolve_device(options.device)
    checkpoint = load_checkpoint(
        spec,
        device=device,
        dtype=resolve_dtype(options.dtype, device),
        dummy_weights=options.dummy_weights,
        cache_dir=options.cache_dir,
    )
    if checkpoint.text is None:
        raise CheckpointError(f"model {spec.name} has no text tower: {checkpoint.text_missing}")
    runner = prepare_text_runner(
        spec.name, checkpoint, backend=options.backend, threads=options.threads, cache_dir=None
    )
    encoder = ClipTextEncoder(spec.name, checkpoint.text, device, MAX_TEXT_BYTES, runner)
    return TextModel(encoder, checkpoint.embedding_dim)


def normalized_rows(features: FloatArray, normalize: bool) -> FloatArray:
    """Each row L2-normalised exactly as the server normalises one vector (or left raw)."""
    from clipvision.server.runtime.image_encoder import l2_normalize_rows

    if not normalize:
        return features.astype(np.float32, copy=False)
    return l2_normalize_rows(features) if len(features) else features
