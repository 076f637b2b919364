"""One served model: decode and preprocess, forward, and the device-to-host copy.

Each step is a plain synchronous function; the server calls them through
``loop.run_in_executor`` so the event loop never blocks. The model is shared by
every request without a lock: it runs in inference mode and mutates nothing.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from clipvision.server.checkpoint import Checkpoint
from clipvision.server.preprocess import ClipPreprocessor, ImageLimits, decode_image

FloatArray = npt.NDArray[np.float32]


class ClipImageEncoder:
    """The three stages of embedding an image with one loaded checkpoint."""

    def __init__(self, name: str, source: str, checkpoint: Checkpoint, limits: ImageLimits) -> None:
        self.name = name
        self.source = source
        self.checkpoint = checkpoint
        self.limits = limits
        self.preprocessor = ClipPreprocessor(checkpoint.preprocess)

    @property
    def embedding_dim(self) -> int:
        """Length of the vectors this model returns."""
        return self.checkpoint.embedding_dim

    def preprocess(self, data: bytes) -> FloatArray:
        """Decode one encoded image into the (3, H, W) float32 pixels the model takes."""
        return self.preprocessor(decode_image(data, self.limits))

    def forward(self, pixels: FloatArray) -> torch.Tensor:
        """Run the vision tower and projection on an (N, 3, H, W) batch; output stays on device."""
        checkpoint = self.checkpoint
        # inference_mode is per thread, so it is entered here, inside the worker.
        with torch.inference_mode():
            batch = torch.from_numpy(pixels).to(device=checkpoint.device, dtype=checkpoint.dtype)
            embeds: torch.Tensor = checkpoint.model(pixel_values=batch).image_embeds
            return embeds

    def to_host(self, features: torch.Tensor) -> FloatArray:
        """Copy projected features to host memory as float32, one row per image."""
        with torch.inference_mode():
            host: FloatArray = features.to(device="cpu", dtype=torch.float32).numpy()
            return host

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Run the model once per batch size so the first real request pays no start-up cost."""
        height, width = (
            self.checkpoint.preprocess.crop_height,
            self.checkpoint.preprocess.crop_width,
        )
        for size in batch_sizes:
            self.to_host(self.forward(np.zeros((size, 3, height, width), dtype=np.float32)))


def l2_normalize(vector: FloatArray) -> FloatArray:
    """Scale a vector to unit length, as torch.nn.functional.normalize does (eps 1e-12)."""
    norm = max(float(np.linalg.norm(vector)), 1e-12)
    normalized: FloatArray = (vector / np.float32(norm)).astype(np.float32, copy=False)
    return normalized
