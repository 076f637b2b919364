"""One served model: decode and preprocess, forward, and the device-to-host copy.

Each step is a plain synchronous function; the server calls them through
``loop.run_in_executor`` so the event loop never blocks. The model is shared by
every request without a lock: it runs in inference mode and mutates nothing.

With ``device_preprocess`` the CPU workers only decode (EXIF, RGB) and the device
thread resizes and crops each batch on the model's device, bit for bit as Pillow
does (runtime.device_resize): a large photograph's resize is most of its CPU cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import torch

from clipvision.server.config.limits import ImageLimits
from clipvision.server.resources.admission import ItemCost
from clipvision.server.runtime.checkpoint import Checkpoint
from clipvision.server.runtime.device_resize import DeviceGeometry
from clipvision.server.runtime.gpu_decode import EncodedJpeg, GpuJpegDecoder
from clipvision.server.runtime.preprocess import (
    ClipPreprocessor,
    ProbedImage,
    UInt8Array,
    decode_image,
    decode_working_set,
    load_image,
    output_bytes,
    probe_image,
)

FloatArray = npt.NDArray[np.float32]
# What the workers hand the device thread for one image: pixels, or a JPEG for the GPU.
ImagePayload = UInt8Array | EncodedJpeg


class ClipImageEncoder:
    """The three stages of embedding an image with one loaded checkpoint."""

    def __init__(
        self,
        name: str,
        source: str,
        checkpoint: Checkpoint,
        limits: ImageLimits,
        runner: Callable[[UInt8Array], FloatArray] | None = None,
        device_preprocess: bool = False,
        gpu_decoder: GpuJpegDecoder | None = None,
    ) -> None:
        self.name = name
        self.source = source
        self.checkpoint = checkpoint
        self.limits = limits
        # Another runtime's forward pass (ONNX Runtime, see image_backend), or None for torch.
        self.runner = runner
        self.backend = "torch" if runner is None else "onnxruntime"
        self.preprocessor = ClipPreprocessor(checkpoint.preprocess)
        # Rescale and normalise happen on the device, by table lookup, so that only
        # uint8 pixels cross the host-device link; the table holds the exact float32
        # values transformers computes for each byte, so the result is unchanged.
        self._table = torch.from_numpy(self.preprocessor.lookup_table).to(checkpoint.device)
        self._channels = torch.arange(3, device=checkpoint.device).view(1, 3, 1, 1)
        self._pin_memory = checkpoint.device.type == "cuda"
        self.geometry = DeviceGeometry(checkpoint.preprocess) if device_preprocess else None
        if gpu_decoder is not None and self.geometry is None:
            raise ValueError("decoding on the GPU needs the images resized on the device")
        self.gpu_decoder = gpu_decoder

    @property
    def preprocess_device(self) -> str:
        """Where resizing and cropping run: "pillow" (the CPU workers) or the model's device."""
        return "pillow" if self.geometry is None else str(self.checkpoint.device)

    def prepare(self, probed: ProbedImage) -> ImagePayload:
        """What the device thread gets for a probed image: ``preprocess``'s pixels, or with
        GPU decoding a JPEG still encoded (its header already checked)."""
        if self._to_gpu(probed):
            encoded: bytes = probed.image.fp.getvalue()  # type: ignore[union-attr]
            return EncodedJpeg(encoded, probed.width, probed.height)
        return self.preprocess(probed)

    def preprocess(self, data: bytes | ProbedImage) -> UInt8Array:
        """Decode one encoded (or already probed) image into resized, cropped (3, H, W) uint8;
        with device preprocessing, into its full-size (H, W, 3) RGB for the device to resize."""
        image = (
            load_image(data) if isinstance(data, ProbedImage) else decode_image(data, self.limits)
        )
        if self.geometry is not None:
            return self.preprocessor.rgb(image)
        return self.preprocessor.pixels(image)

    def light_job(self, encoded_bytes: int) -> bool:
        """Whether decoding and preprocessing an image of ``encoded_bytes`` is mostly Python
        work, which holds the GIL: a small JPEG for a small crop (the tests' 32 px model).
        Pillow's decode and resize let go of the GIL, and from a few KiB in (or a 224 px
        crop out) they are most of the time: two threads then give 1.4-2x one's images/s;
        for a 2.4 KiB JPEG to a 32 px crop, 0.67x for twice the CPU per image
        (bench/preprocess.py --sides 64,128,256 --crop 32, docs/PERFORMANCE.md)."""
        if encoded_bytes >= _LIGHT_ENCODED_BYTES:
            return False
        if self.geometry is not None:
            return True  # the device resizes: the CPU only decodes
        config = self.checkpoint.preprocess
        return config.crop_width * config.crop_height <= _LIGHT_OUTPUT_PIXELS

    def probe(self, data: bytes) -> ProbedImage:
        """Parse and check one encoded image's header under the limits, decoding nothing."""
        return probe_image(data, self.limits)

    def cost(self, probed: ProbedImage) -> ItemCost:
        """What a probed image holds: bytes and pixels until answered, more while decoded."""
        config = self.checkpoint.preprocess
        if self._to_gpu(probed):
            # Decoded in the GPU's memory, not the host's: only the bytes are held here.
            return ItemCost(resident=2 * probed.encoded_bytes, decode=0)
        # What waits for the device: the crop, or the full-size RGB image the device resizes.
        held = 3 * probed.pixels if self.geometry is not None else output_bytes(probed, config)
        return ItemCost(
            # Twice: the request message holds the bytes, and so does the copy protobuf
            # makes when Image.content is read (upb copies bytes fields on access).
            resident=2 * probed.encoded_bytes + held,
            decode=decode_working_set(probed, config),
        )

    def _to_gpu(self, probed: ProbedImage) -> bool:
        return self.gpu_decoder is not None and self.gpu_decoder.accepts(probed.format, probed.mode)

    def forward(self, pixels: UInt8Array | torch.Tensor) -> torch.Tensor:
        """Run the tower and projection on an (N, 3, H, W) uint8 batch (on the host, or on the
        device already); the output stays on the device."""
        checkpoint = self.checkpoint
        if self.runner is not None:
            # uint8 in, features out on the host; to_host's copy is then a no-op.
            host = pixels.cpu().numpy() if isinstance(pixels, torch.Tensor) else pixels
            return torch.from_numpy(self.runner(host))
        # inference_mode is per thread, so it is entered here, inside the worker.
        with torch.inference_mode():
            batch = pixels if isinstance(pixels, torch.Tensor) else self._upload(pixels)
            values = self._table[self._channels, batch.long()].to(checkpoint.dtype)
            return checkpoint.image_features(values)

    def _upload(self, array: UInt8Array) -> torch.Tensor:
        """Host uint8 to the device: through pinned memory on CUDA, so that the copy overlaps.

        Pillow's arrays are read-only (they wrap its bytes), which torch will not wrap: they
        are copied once, into the pinned buffer on CUDA.
        """
        if self._pin_memory:
            host = torch.empty(array.shape, dtype=torch.uint8, pin_memory=True)
            host.numpy()[...] = array
        elif array.flags.writeable:
            host = torch.from_numpy(array)
        else:
            host = torch.tensor(array)
        return host.to(self.checkpoint.device, non_blocking=True)

    def resize_on_device(self, images: Sequence[ImagePayload]) -> torch.Tensor:
        """Full-size (H, W, 3) RGB images (or JPEGs to decode on the GPU) -> an (N, 3, h, w)
        uint8 batch on the device, resized and cropped as Pillow does; images of one size
        are resized together."""
        assert self.geometry is not None
        config = self.checkpoint.preprocess
        parts: list[torch.Tensor | None] = [None] * len(images)
        with torch.inference_mode():
            full = self._full_size_on_device(images)
            by_size: dict[tuple[int, ...], list[int]] = {}
            for index, image in enumerate(full):
                by_size.setdefault(tuple(image.shape), []).append(index)
            for indices in by_size.values():
                group = torch.stack([full[i] for i in indices])
                resized = self.geometry.pixels(group)
                for position, index in enumerate(indices):
                    parts[index] = resized[position]
            batch = torch.stack([part for part in parts if part is not None])
        expected = (config.crop_height, config.crop_width) if config.do_center_crop else None
        if expected is not None and tuple(batch.shape[-2:]) != expected:
            raise RuntimeError(f"device preprocessing gave {tuple(batch.shape)}")
        return batch

    def _full_size_on_device(self, images: Sequence[ImagePayload]) -> list[torch.Tensor]:
        """Each image as (3, H, W) uint8 on the device: uploaded, or decoded there (nvJPEG),
        or, where nvJPEG refuses one, decoded on the CPU here and uploaded."""
        decoded: dict[int, torch.Tensor | None] = {}
        jpegs = [(i, image) for i, image in enumerate(images) if isinstance(image, EncodedJpeg)]
        if jpegs:
            assert self.gpu_decoder is not None
            outcomes = self.gpu_decoder.decode([jpeg for _, jpeg in jpegs])
            decoded = {index: outcome for (index, _), outcome in zip(jpegs, outcomes, strict=True)}
        full: list[torch.Tensor] = []
        for index, image in enumerate(images):
            on_gpu = decoded.get(index)
            if on_gpu is not None:
                full.append(on_gpu)
                continue
            if isinstance(image, EncodedJpeg):  # refused by nvJPEG: Pillow decodes it
                image = self.preprocessor.rgb(decode_image(image.data, self.limits))
            full.append(self._upload(np.ascontiguousarray(image)).permute(2, 0, 1))
        return full

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
            self.to_host(self.forward(np.zeros((size, 3, height, width), dtype=np.uint8)))
        if self.geometry is not None:
            self.embed_batch([np.zeros((480, 640, 3), dtype=np.uint8)])

    def embed_batch(self, pixels: Sequence[ImagePayload]) -> FloatArray:
        """Forward a batch of preprocessed images and copy the features to the host.

        The batcher's batch function: one call, one hop of the device thread.
        """
        if self.geometry is not None:
            return self.to_host(self.forward(self.resize_on_device(pixels)))
        arrays = [image for image in pixels if not isinstance(image, EncodedJpeg)]
        assert len(arrays) == len(pixels), "JPEGs to decode on the GPU need device resizing"
        return self.to_host(self.forward(np.stack(arrays)))


# Below both, a decode and preprocess is mostly Python (resources/dispatch.py: light jobs).
_LIGHT_ENCODED_BYTES = 4 << 10
_LIGHT_OUTPUT_PIXELS = 64 * 64


def l2_normalize_rows(rows: FloatArray) -> FloatArray:
    """Scale each row to unit length, as torch.nn.functional.normalize does (eps 1e-12).

    One numpy pass for a whole batch (the batcher does it on the device thread, once per
    batch): the same arithmetic for every row whatever the batch, so a vector does not
    depend on the images it was batched with.
    """
    norms = np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), np.float32(1e-12))
    normalized: FloatArray = (rows / norms).astype(np.float32, copy=False)
    return normalized
