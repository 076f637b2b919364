"""The batch job's throughput on this machine, against `clipvision embed` and the ceiling.

    .venv/bin/python bench/batch.py                 # ViT-B/32, 256 images, about 4 minutes
    .venv/bin/python bench/batch.py --images 64     # a shorter smoke run

Every figure comes from this run, on this machine, with the full-size architecture and
dummy (random) weights (the same FLOPs as the published checkpoint) on a folder of real
photographs (tests/data) resized to 640x480 and saved as JPEG:

1. the ceiling: the forward pass alone (ClipImageEncoder.embed_batch, the backend the
   server picks) on pixels prepared beforehand, every core busy: nothing that embeds
   these images here can be faster;
2. one model actor's bound: the same on the one CPU a model actor reserves
   (``--cpus-per-actor``, 1);
3. ``clipvision embed FOLDER`` against a ``clipvision-server`` on 127.0.0.1 (the
   server's start and model load not counted);
4. ``clipvision batch run`` in its default mode (the model in a Ray actor) and with
   ``--endpoint`` (the same server), on a local Ray cluster started once, each on one
   batch and on all the images: the difference of the two wall times is the cost of
   the other images without the start-up (driver, Ray workers, model load), which is
   reported apart. The engine's per-image overhead is the job's time per image less
   that of what bounds it: one model actor's forward pass (default mode), or the same
   server through ``clipvision embed`` (``--endpoint``).

On a shared machine the figures move from run to run (another process on a core
changes all of them); compare figures of one run only.

It prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"


@dataclass
class Figure:
    """One way of embedding the folder."""

    name: str
    images: int
    images_per_s: float
    """Steady images/s (start-up excluded where there is one)."""
    startup_s: float | None = None
    overhead_ms: float | None = None
    """Milliseconds per image beyond what bounds this way (see the module's docstring)."""


def make_folder(root: Path, count: int) -> None:
    """``count`` JPEGs (640x480, quality 90) cut from the test photographs."""
    from PIL import Image

    photos = sorted(DATA.glob("*.*g"))
    encoded = []
    for photo in photos:
        with Image.open(photo) as image:
            rgb = image.convert("RGB")
        scale = max(640 / rgb.width, 480 / rgb.height)
        resized = rgb.resize((round(rgb.width * scale) + 1, round(rgb.height * scale) + 1))
        left, top = (resized.width - 640) // 2, (resized.height - 480) // 2
        buffer = io.BytesIO()
        resized.crop((left, top, left + 640, top + 480)).save(buffer, "JPEG", quality=90)
        encoded.append(buffer.getvalue())
    root.mkdir(parents=True)
    for number in range(count):
        (root / f"{number:05d}.jpg").write_bytes(encoded[number % len(encoded)])


def ceilings(folder: Path, model: str, batch_size: int) -> tuple[Figure, Figure]:
    """The forward pass alone, on pixels prepared beforehand: on every core (nothing that
    embeds these images here can be faster), and on one (one model actor of one CPU)."""
    import torch

    from clipvision.server.batch.encoders import (
        ImagePreparer,
        ModelOptions,
        load_image_model,
        read_model_config,
    )
    from clipvision.server.config.limits import ImageLimits

    options = ModelOptions(model, dummy_weights=True)
    limits = ImageLimits()
    preparer = ImagePreparer(read_model_config(options).preprocess, limits)
    files = sorted(folder.iterdir())
    prepared = [
        [preparer.pixels(path.read_bytes()) for path in files[start : start + batch_size]]
        for start in range(0, len(files), batch_size)
    ]
    figures = []
    for name, threads in (("every core", None), ("1 CPU (one model actor)", 1)):
        encoder = load_image_model(dataclasses.replace(options, threads=threads), limits)
        if threads is not None:
            torch.set_num_threads(threads)
        encoder.warm_up((batch_size,))
        # The best of three rounds: a ceiling is what the machine can do, and a shared
        # machine's neighbours only ever slow a round down.
        rounds = []
        for _ in range(3):
            started = time.perf_counter()
            for pixels in prepared:
                encoder.embed_batch(pixels)
            rounds.append(time.perf_counter() - started)
        figures.append(Figure(f"forward only, {name}", len(files), len(files) / min(rounds)))
    return figures[0], figures[1]


def start_server(model: str) -> tuple[subprocess.Popen[str], str]:
    """A clipvision-server child with the model loaded; returns it and its address."""
    server = subprocess.Popen(
        [sys.executable, "-m", "clipvision.server.cli", "--address", "127.0.0.1:0",
         "--model", model, "--dummy-weights"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert server.stderr is not None
    address = None
    for line in server.stderr:
        if match := re.search(r"listening on (\S+:\d+)$", line.strip()):
            address = match[1]
        if "ready in" in line and address is not None:
            return server, address
    raise RuntimeError("clipvision-server did not start")


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    """Seconds a command takes; it must succeed."""
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed:\n{done.stderr[-2000:]}")
    return seconds


def clipvision(*args: str) -> list[str]:
    return [sys.executable, "-m", "clipvision.client.cli", *args]


def job_seconds(folder: Path, work: Path, address: str, extra: list[str]) -> float:
    """Wall seconds of one ``clipvision batch run``, from the command's start to its end."""
    out = work / f"out-{time.monotonic_ns()}"
    return timed(clipvision("batch", "run", str(folder), "--output", str(out),
                            "--ray-address", address, "--no-progress", *extra))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B/32", help="a preset (dummy weights)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "batch.json")
    args = parser.parse_args(argv)
    # A one-machine Ray cluster on 127.0.0.1 (read by Ray when it is imported).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    work = Path(tempfile.mkdtemp(prefix="clipvision-bench-batch-"))
    server: subprocess.Popen[str] | None = None
    try:
        folder, one_batch = work / "photos", work / "one-batch"
        make_folder(folder, args.images)
        make_folder(one_batch, args.batch_size)
        print(f"ceilings on {args.images} images ...", flush=True)
        top, actor = ceilings(folder, args.model, args.batch_size)
        figures = [top, actor]
        server, endpoint = start_server(args.model)
        print(f"clipvision embed on {args.images} images ...", flush=True)
        seconds = timed(clipvision("embed", str(folder), "--out", str(work / "embed.npy"),
                                   "--server", endpoint, "--no-progress"))  # fmt: skip
        embed = Figure("clipvision embed (one server)", args.images, args.images / seconds)
        figures.append(embed)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False,
                 log_to_driver=False)  # fmt: skip
        address = ray.get_runtime_context().gcs_address
        common = ["--batch-size", str(args.batch_size), "--shard-size", str(args.batch_size)]
        modes = {
            "batch run, model in a Ray actor": (["--model", args.model, "--dummy-weights"], actor),
            "batch run --endpoint (same server)": (["--endpoint", endpoint], embed),
        }
        for name, (flags, bound) in modes.items():
            print(f"{name} on {args.batch_size} and on {args.images} images ...", flush=True)
            short = job_seconds(one_batch, work, address, [*common, *flags])
            full = job_seconds(folder, work, address, [*common, *flags])
            rate = (args.images - args.batch_size) / (full - short)
            startup = short - args.batch_size / rate
            overhead = 1000 / rate - 1000 / bound.images_per_s
            figures.append(Figure(name, args.images, rate, startup, overhead))
        ray.shutdown()
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": args.model,
        "batch_size": args.batch_size,
        "figures": [asdict(figure) for figure in figures],
    }
    print(f"\n{args.model}, dummy weights, {os.cpu_count()} CPUs, batch {args.batch_size}, "
          f"{args.images} JPEGs of 640x480")  # fmt: skip
    print(f"{'':38} {'images/s':>9} {'x ceiling':>9} {'start-up':>9} {'overhead':>12}")
    for figure in figures:
        start = f"{figure.startup_s:8.1f}s" if figure.startup_s is not None else " " * 9
        beyond = f"{figure.overhead_ms:+7.1f} ms/img" if figure.overhead_ms is not None else ""
        print(f"{figure.name:38} {figure.images_per_s:9.1f} "
              f"{figure.images_per_s / top.images_per_s:9.2f} {start} {beyond}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
