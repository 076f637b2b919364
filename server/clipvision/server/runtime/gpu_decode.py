"""JPEG decoding on the GPU (nvJPEG, through torchvision), for ``--gpu-decode``.

Not bit-exact: nvJPEG's inverse DCT, chroma upsampling and colour conversion are
not libjpeg-turbo's, so pixels differ by a few levels (bench/gpu.sh measures how
much, and how little the embeddings move). It is off unless asked for, and needs
the model on CUDA with its images resized on the device. The CPU workers still
parse every header under the limits (size, pixel count, format), so nothing that
the CPU path would refuse before decoding gets this far; JPEGs nvJPEG does not
take (CMYK, and whatever it refuses) are decoded on the CPU as before, with the
same error reasons. One difference stays: a truncated file nvJPEG decodes anyway
is embedded, where Pillow refuses it (IMAGE_DECODE_FAILED).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from clipvision.server.errors import CheckpointError

logger = logging.getLogger(__name__)

# Pixel modes a JPEG header may declare that nvJPEG decodes to RGB as Pillow would.
_GPU_MODES = frozenset({"RGB", "L"})


class EncodedJpeg:
    """A JPEG whose header passed the limits, left encoded for the GPU to decode."""

    __slots__ = ("data", "height", "width")

    def __init__(self, data: bytes, width: int, height: int) -> None:
        self.data = data
        self.width = width
        self.height = height


class GpuJpegDecoder:
    """Decodes batches of JPEGs on one CUDA device; None in a batch's outcome means "decode
    it on the CPU instead" (nvJPEG refused it)."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise CheckpointError(
                f"--gpu-decode needs the model on a CUDA device; it runs on {device} "
                "(drop --gpu-decode, or serve on a GPU)"
            )
        try:
            from torchvision import io as tv_io
        except ImportError as exc:
            raise CheckpointError(
                "--gpu-decode decodes with nvJPEG through torchvision, which is not installed "
                f"({exc}); install torchvision built for this torch, or drop --gpu-decode"
            ) from None
        self._io: Any = tv_io
        self.device = device

    @staticmethod
    def accepts(image_format: str, mode: str) -> bool:
        """Whether a JPEG whose header says ``mode`` goes to the GPU (CMYK and others don't)."""
        return image_format in ("JPEG", "MPO") and mode in _GPU_MODES

    def decode(self, jpegs: list[EncodedJpeg]) -> list[torch.Tensor | None]:
        """(3, H, W) uint8 on the device per JPEG, EXIF orientation applied; None for those
        nvJPEG refuses. One batched call; a refusal retries the images one by one."""
        inputs = [torch.frombuffer(bytearray(jpeg.data), dtype=torch.uint8) for jpeg in jpegs]
        try:
            return list(self._decode(inputs))
        except RuntimeError:
            outcomes: list[torch.Tensor | None] = []
            for data in inputs:
                try:
                    outcomes.append(self._decode([data])[0])
                except RuntimeError as exc:
                    logger.debug("nvJPEG refused an image (%s); the CPU decodes it", exc)
                    outcomes.append(None)
            return outcomes

    def _decode(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        decoded: list[torch.Tensor] = self._io.decode_jpeg(
            inputs,
            mode=self._io.ImageReadMode.RGB,
            device=self.device,
            apply_exif_orientation=True,
        )
        return decoded
