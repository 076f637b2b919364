"""What the device can take, and how exact the device's preprocessing is, in one run.

    python bench/gpu_feed.py --model ViT-B/32 --device cuda --dtype float16
    python bench/gpu_feed.py --device cpu --dtype float32 --batches 8 --seconds 2   # a smoke run

- model-only images/s: the tower and projection on uint8 crops already on the device,
  at each of ``--batches`` (no decoding, no copies): the most a server could feed;
- exactness of device preprocessing: every test photograph (and the bench's 640x480
  and 1920x1080 JPEGs) resized and cropped on the device against Pillow's crop
  (ClipPreprocessor.pixels, the CPU reference): bytes that differ, and the largest
  difference (0 and 0 is bit-identical);
- with ``--gpu-decode`` on CUDA: nvJPEG's decode against Pillow's for the same JPEGs
  (max and mean absolute pixel difference of the crops) and the lowest cosine between
  the two paths' embeddings.

It prints a table and writes JSON (--out). bench/gpu.sh runs it for ViT-B/32 and ViT-L/14.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "server"), str(ROOT / "client")]

from clipvision.server.config.limits import ImageLimits  # noqa: E402
from clipvision.server.config.settings import ModelSpec  # noqa: E402
from clipvision.server.runtime.checkpoint import (  # noqa: E402
    load_checkpoint,
    resolve_device,
    resolve_dtype,
)
from clipvision.server.runtime.gpu_decode import EncodedJpeg, GpuJpegDecoder  # noqa: E402
from clipvision.server.runtime.image_encoder import ClipImageEncoder  # noqa: E402

PHOTOS = ROOT / "tests" / "data"


def test_images() -> list[tuple[str, bytes]]:
    """The test photographs as they are, plus each as a 640x480 and a 1920x1080 JPEG."""
    images = []
    for path in sorted(PHOTOS.glob("*.[jp][pn]g")):
        data = path.read_bytes()
        images.append((path.name, data))
        with Image.open(io.BytesIO(data)) as photo:
            rgb = photo.convert("RGB")
        for size in ((640, 480), (1920, 1080)):
            buffer = io.BytesIO()
            rgb.resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
            images.append((f"{path.stem}-{size[0]}x{size[1]}.jpg", buffer.getvalue()))
    return images


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_only(encoder: ClipImageEncoder, batch: int, seconds: float) -> float:
    """Images/s of forward passes on uint8 crops already on the device."""
    config = encoder.checkpoint.preprocess
    device = encoder.checkpoint.device
    crops = torch.randint(
        0, 256, (batch, 3, config.crop_height, config.crop_width), dtype=torch.uint8, device=device
    )
    for _ in range(3):
        encoder.forward(crops)
    synchronize(device)
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        encoder.forward(crops)
        done += batch
    synchronize(device)
    return done / (time.perf_counter() - started)


def device_exactness(
    reference: ClipImageEncoder, on_device: ClipImageEncoder, images: list[tuple[str, bytes]]
) -> dict[str, Any]:
    """Pillow's crops against the device's, image by image."""
    differing = largest = 0
    total = 0
    worst = ""
    for name, data in images:
        cpu = reference.preprocess(data)
        rgb = on_device.preprocess(data)
        ours = on_device.resize_on_device([rgb])[0].cpu().numpy()
        diff = np.abs(cpu.astype(np.int16) - ours.astype(np.int16))
        differing += int(np.count_nonzero(diff))
        total += diff.size
        if int(diff.max()) > largest:
            largest, worst = int(diff.max()), name
    return {
        "images": len(images),
        "bytes": total,
        "bytes_differing": differing,
        "max_abs_difference": largest,
        "worst_image": worst,
    }


def gpu_decode_tolerance(
    exact: ClipImageEncoder, nvjpeg: ClipImageEncoder, images: list[tuple[str, bytes]]
) -> dict[str, Any]:
    """nvJPEG's crops and embeddings against the exact path's, for the JPEGs."""
    jpegs = [(name, data) for name, data in images if name.endswith((".jpg", ".jpeg"))]
    max_diff, mean_diffs, cosines = 0, [], []
    for _, data in jpegs:
        probed = nvjpeg.probe(data)
        payload = nvjpeg.prepare(probed)
        assert isinstance(payload, EncodedJpeg), "nvJPEG did not take a baseline JPEG"
        ours = nvjpeg.resize_on_device([payload])[0].cpu().numpy().astype(np.int16)
        theirs = exact.resize_on_device([exact.preprocess(data)])[0].cpu().numpy()
        diff = np.abs(ours - theirs.astype(np.int16))
        max_diff = max(max_diff, int(diff.max()))
        mean_diffs.append(float(diff.mean()))
        a = nvjpeg.embed_batch([payload])[0]
        b = exact.embed_batch([exact.preprocess(data)])[0]
        cosines.append(float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))))
    return {
        "jpegs": len(jpegs),
        "max_abs_pixel_difference": max_diff,
        "mean_abs_pixel_difference": float(np.mean(mean_diffs)) if mean_diffs else 0.0,
        "min_cosine": min(cosines) if cosines else 1.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B/32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batches", default="128,256", help="model-only batch sizes")
    parser.add_argument("--seconds", type=float, default=5.0, help="per model-only batch size")
    parser.add_argument("--gpu-decode", action="store_true", help="measure nvJPEG (CUDA)")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    checkpoint = load_checkpoint(
        ModelSpec.parse(args.model),
        device=device,
        dtype=resolve_dtype(args.dtype, device),
        dummy_weights=True,
    )
    limits = ImageLimits()
    reference = ClipImageEncoder(args.model, args.model, checkpoint, limits)
    on_device = ClipImageEncoder(args.model, args.model, checkpoint, limits, None, True)
    images = test_images()
    results: dict[str, Any] = {
        "model": args.model,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(checkpoint.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "model_only_images_per_s": {},
    }
    for batch in (int(b) for b in args.batches.split(",")):
        rate = model_only(reference, batch, args.seconds)
        results["model_only_images_per_s"][str(batch)] = rate
        print(f"{args.model} model only, batch {batch}: {rate:,.0f} images/s", flush=True)
    results["device_preprocessing"] = device_exactness(reference, on_device, images)
    print(f"device preprocessing against Pillow: {results['device_preprocessing']}", flush=True)
    if args.gpu_decode:
        nvjpeg = ClipImageEncoder(
            args.model, args.model, checkpoint, limits, None, True, GpuJpegDecoder(device)
        )
        results["gpu_decode"] = gpu_decode_tolerance(on_device, nvjpeg, images)
        print(f"--gpu-decode against the exact path: {results['gpu_decode']}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
