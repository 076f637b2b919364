"""Decode + preprocessing throughput in-process, by worker count: threads against processes.

    .venv/bin/python bench/preprocess.py                  # 1 and 2 workers, 6 s each
    .venv/bin/python bench/preprocess.py --workers 1,2,4 --seconds 10

The server decodes and preprocesses in a thread pool (--preprocess-workers). That
scales with cores only as far as Pillow releases the GIL (it does while decoding and
resampling, not while it parses headers or while our Python code runs). This bench
measures it on the test photographs at ViT-B/32's preprocessing (224 px resize and
centre crop, the checkpoint's reference path: runtime.preprocess), for each worker
count, in one run:

- threads: one process, N threads each looping over the photos;
- processes: N processes each looping, the most worker processes could give (it
  leaves out handing the pixels back, which a process design must add);

and prints images/s, the speed-up over one worker, and the figure issue 20 sets a
target for: threads at 2 workers at least 1.8x one worker.

    .venv/bin/python bench/preprocess.py --sides 64,128,256,512 --crop 32

measures instead, for one photograph re-encoded as a JPEG of each width, 1 and 2
threads: images/s and CPU per image. Small images are mostly Python (header parsing,
our own code), which holds the GIL: a second thread buys them little for more CPU,
which is why the server's dispatcher runs light jobs one chunk at a time
(resources/dispatch.py).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PHOTOS = ROOT / "tests" / "data"


def photographs() -> list[bytes]:
    """The test photographs' encoded bytes (JPEG and PNG, 0.1 to 4 Mpx)."""
    return [path.read_bytes() for path in sorted(PHOTOS.iterdir()) if path.suffix != ".md"]


def _prepare_all(
    stop_at: float,
    counts: list[int],
    index: int,
    images: list[bytes] | None = None,
    crop: int = 224,
) -> None:
    """Loop over ``images`` (the photographs) until ``stop_at``, preprocessing each to a
    ``crop`` px square, counting images into ``counts[index]``."""
    from clipvision.server.config.limits import ImageLimits
    from clipvision.server.runtime.preprocess import (
        ClipPreprocessor,
        PreprocessConfig,
        load_image,
        probe_image,
    )

    limits = ImageLimits()
    preprocessor = ClipPreprocessor(PreprocessConfig.openai_clip(crop))
    images = images or photographs()
    done = 0
    while time.monotonic() < stop_at:
        for data in images:
            preprocessor.pixels(load_image(probe_image(data, limits)))
            done += 1
    counts[index] = done


def _threaded(
    workers: int, seconds: float, images: list[bytes] | None = None, crop: int = 224
) -> tuple[float, float]:
    """Images/s of ``workers`` threads in this process, and the process's CPU ms per image."""
    _prepare_all(time.monotonic() + 0.5, [0], 0, images, crop)  # warm: imports, first decode
    counts = [0] * workers
    cpu = time.process_time()
    started = time.monotonic()
    threads = [
        threading.Thread(target=_prepare_all, args=(started + seconds, counts, index, images, crop))
        for index in range(workers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done = sum(counts)
    return done / (time.monotonic() - started), (time.process_time() - cpu) * 1000 / done


def by_side(sides: list[int], crop: int, seconds: float) -> list[dict[str, float]]:
    """For a JPEG of each width (3:4, quality 90), preprocessed to a ``crop`` px square:
    images/s and CPU ms per image, 1 and 2 threads, in this process."""
    import io

    from PIL import Image

    photo = Image.open(io.BytesIO(photographs()[0])).convert("RGB")
    rows = []
    for side in sides:
        encoded = io.BytesIO()
        photo.resize((side, side * 3 // 4)).save(encoded, "JPEG", quality=90)
        row: dict[str, float] = {"side": side, "bytes": len(encoded.getvalue())}
        for workers in (1, 2):
            rate, cpu_ms = _threaded(workers, seconds, [encoded.getvalue()], crop)
            row[f"images_per_s_{workers}"] = rate
            row[f"cpu_ms_{workers}"] = cpu_ms
        rows.append(row)
    return rows


def with_threads(workers: int, seconds: float) -> float:
    """Images/s of ``workers`` threads in this process."""
    return _threaded(workers, seconds)[0]


def _process_main(stop_at: float, queue: Any) -> None:
    counts = [0]
    _prepare_all(stop_at, counts, 0)
    queue.put(counts[0])


def with_processes(workers: int, seconds: float) -> float:
    """Images/s of ``workers`` processes, each warmed before the window opens."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    start_at = time.monotonic() + 5.0  # spawn and import first, outside the window
    processes = [
        context.Process(target=_process_window, args=(start_at, seconds, queue))
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    total = sum(int(queue.get()) for _ in processes)
    for process in processes:
        process.join()
    return total / seconds


def _process_window(start_at: float, seconds: float, queue: Any) -> None:
    _prepare_all(time.monotonic() + 0.5, [0], 0)
    time.sleep(max(0.0, start_at - time.monotonic()))
    _process_main(start_at + seconds, queue)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured window per row")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--sides", default="", help="JPEG widths to compare 1 and 2 threads on (e.g. 64,128,256)"
    )
    parser.add_argument(
        "--crop", type=int, default=224, help="with --sides: the crop (32: the tests' model)"
    )
    args = parser.parse_args(argv)
    if args.sides:
        sides = [int(word) for word in args.sides.split(",")]
        sized = by_side(sides, args.crop, args.seconds)
        print(
            f"\n{platform.machine()}, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}; preprocessed to a {args.crop} px crop\n"
        )
        print("| JPEG | 1 thread images/s | CPU/image | 2 threads | CPU/image | speed-up |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for row in sized:
            print(
                f"| {row['side']:.0f} px, {row['bytes'] / 1024:.1f} KiB "
                f"| {row['images_per_s_1']:,.0f} | {row['cpu_ms_1']:.3f} ms "
                f"| {row['images_per_s_2']:,.0f} | {row['cpu_ms_2']:.3f} ms "
                f"| {row['images_per_s_2'] / row['images_per_s_1']:.2f}x |"
            )
        if args.out:
            args.out.write_text(json.dumps({"machine": platform.platform(), "rows": sized}))
        return 0
    counts = [int(word) for word in args.workers.split(",")]
    rows = []
    for workers in counts:
        rows.append(
            {
                "workers": workers,
                "threads": with_threads(workers, args.seconds),
                "processes": with_processes(workers, args.seconds),
            }
        )
    one = rows[0]
    print(
        f"\n{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"{len(photographs())} photographs, ViT-B/32 preprocessing (224 px)\n"
    )
    print("| workers | threads images/s | speed-up | processes images/s | speed-up |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['workers']} | {row['threads']:,.1f} | {row['threads'] / one['threads']:.2f}x "
            f"| {row['processes']:,.1f} | {row['processes'] / one['processes']:.2f}x |"
        )
    if args.out:
        args.out.write_text(json.dumps({"machine": platform.platform(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
