"""Peak memory of decoding and preprocessing one image, against the server's estimate.

Each case runs in a fresh process and reports its resident high-water mark over the
resident size before decoding (``ru_maxrss``, so no peak is missed between samples),
next to ``decode_working_set``'s estimate, which admission counts against the budget:
the estimate must stay above the measured peak.

    .venv/bin/python bench/decode_peak.py [--side 6324]
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CASES: dict[str, tuple[str, str, dict[str, object]]] = {
    "rgba.png": ("RGBA", "PNG", {}),
    "rgb.jpg": ("RGB", "JPEG", {"quality": 80}),
    "rgb-rotated.jpg": ("RGB", "JPEG", {"quality": 80, "orientation": 6}),
    "cmyk.jpg": ("CMYK", "JPEG", {"quality": 80}),
    "palette-transparent.png": ("P", "PNG", {"transparency": 0}),
    "la.png": ("LA", "PNG", {}),
    "grey16.png": ("I;16", "PNG", {}),
    "rgb.webp": ("RGB", "WEBP", {"quality": 50}),
    "rgba.webp": ("RGBA", "WEBP", {"quality": 50}),
    "rgb-deflate.tiff": ("RGB", "TIFF", {"compression": "tiff_adobe_deflate"}),
    "rgba-lzw.tiff": ("RGBA", "TIFF", {"compression": "tiff_lzw"}),
    "palette-transparent.gif": ("P", "GIF", {"transparency": 0}),
    "bilevel.bmp": ("1", "BMP", {}),
}


def make(path: Path, side: int, mode: str, fmt: str, params: dict[str, object]) -> None:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (side // 8, side // 8, 4), dtype=np.uint8)
    image = Image.fromarray(small, "RGBA").resize((side, side), Image.Resampling.NEAREST)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257)
    elif mode == "P":
        image = image.convert("RGB").convert("P")
    else:
        image = image.convert(mode)
    extra = dict(params)
    orientation = extra.pop("orientation", None)
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        extra["exif"] = exif
    image.save(path, format=fmt, **extra)


def measure(path: str) -> None:
    from clipvision.server.config.limits import ImageLimits
    from clipvision.server.runtime.preprocess import (
        ClipPreprocessor,
        PreprocessConfig,
        decode_working_set,
        load_image,
        probe_image,
    )

    data = Path(path).read_bytes()
    config = PreprocessConfig.openai_clip(224)
    preprocessor = ClipPreprocessor(config)
    limits = ImageLimits(max_image_bytes=1 << 30, max_image_pixels=1 << 30)
    # A first small image of the same format loads the codec's library and tables, which the
    # server does once in its life, so that they are not counted as this image's.
    warm = Image.open(path)
    small = Image.new(warm.mode, (64, 64))
    buffer = io.BytesIO()
    small.save(buffer, format=warm.format)
    preprocessor.pixels(load_image(probe_image(buffer.getvalue(), limits)))
    with open("/proc/self/statm") as statm:
        before = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    probed = probe_image(data, limits)
    estimate = decode_working_set(probed, config)
    preprocessor.pixels(load_image(probed))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    mib = 1 << 20
    print(
        f"{Path(path).name:26s} {probed.mode:5s} {probed.width}x{probed.height}  "
        f"peak {peak / mib:7.1f} MiB  estimate {estimate / mib:7.1f} MiB  "
        f"({peak / probed.pixels:5.2f} B/px)  {'OK' if estimate >= peak else 'UNDER'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=6324, help="square side; 6324 is 40 Mpx")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--make", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure)
        return
    if args.make:
        mode, fmt, params = CASES[Path(args.make).name]
        make(Path(args.make), args.side, mode, fmt, params)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            path = Path(tmp) / name
            # Each step in its own process: a child inherits its parent's high-water mark.
            run = [sys.executable, __file__, "--side", str(args.side)]
            subprocess.run([*run, "--make", str(path)], check=True)
            subprocess.run([*run, "--measure", str(path)], check=True)
            path.unlink()


if __name__ == "__main__":
    main()
