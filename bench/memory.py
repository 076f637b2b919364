"""Memory under the loads of issue 13: a real server's peak and after-load RSS against a limit.

    .venv/bin/python bench/memory.py --scale 0.25        # quick: a few minutes on 2 cores
    .venv/bin/python bench/memory.py                     # the issue's full-size loads
    .venv/bin/python bench/memory.py --loads a,c1 --server-env MALLOC_ARENA_MAX=2 --label arena2
    .venv/bin/python bench/memory.py --server-arg=--memory-budget=3GiB
    .venv/bin/python bench/memory.py --cost              # CPU cost of each malloc setting

It starts clipvision-server as a child process (``--model ViT-B/32 --dummy-weights``,
plus ``--memory-limit`` when the server has that flag), waits until it is idle,
then replays each load in turn, sampling the server's RSS (children included)
every 50 ms. Per load it prints the peak RSS, the RSS after a few seconds idle,
and whether the peak stayed below the limit and the after-load RSS within
300 MiB of the idle RSS at start. Loads, scaled in item count by ``--scale``:

  a   16 streams (one connection each) of 40 Mpx noise JPEGs of about 20 MB
  b   4 streams of 40 Mpx gradient RGBA PNGs (small on the wire); b8: the same
      against a second server with --preprocess-workers 8
  c1  concurrent unary calls, gzip-compressed, each 60 MB of zeros
  c2  one gzip-compressed stream of 20 MiB BMPs (gzip: about a third)
  d   one unary call with a 63 MB data: URI
  e   4 streams of 40 Mpx palette PNGs (a few KB each) on one connection, and a
      bystander on another making unary calls with a normal photo: its statuses
      and latencies
  f   a mixed legitimate load: unary, EmbedImages and a stream of tests/data photos
  g   load a with 128 streams, as many as --max-streams admits: each must wait for
      room in the memory budget's read room before its next message is read
  h   64 unary calls at once on one connection (the gate's limit per connection), each
      one such JPEG, twice over
      (g and h run only when named in --loads: they take several GB in this client)

Every load is bounded in count and time and stops by itself; only 127.0.0.1 is
used. Input images are made once and cached under bench/results/memory-inputs/.
It writes a markdown table and JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import io
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import psutil
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from clipvision.server.resources.allocator import MemoryTrimmer, configure_allocator
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from clipvision.v1.embedding_service_pb2_grpc import EmbeddingServiceAsyncStub as AsyncStub

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
INPUTS = RESULTS / "memory-inputs"
PHOTOS = ROOT / "tests" / "data"
MIB = 1024 * 1024
# 7300 x 5475 = 39,967,500 pixels: just under the default --max-image-pixels.
BIG = (7300, 5475)
MAX_IMAGE_BYTES = 20 * MIB
ALL_LOADS = ("a", "b", "b8", "c1", "c2", "d", "e", "f", "g", "h")
# g and h hold 128 streams or 64 calls of 20 MB images at once: this client alone took
# over 6 GB for g, so they run only when named. (Before messages were read within the
# budget's read room, g peaked at 10.7 GiB against 4 GiB; SECURITY.md has the figures.)
DEFAULT_LOADS = ("a", "b", "b8", "c1", "c2", "d", "e", "f")
# Where the server has a byte limit of its own this large, the gRPC client must send it.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", 64 * MIB),
    # A channel of its own per stream: separate connections, as separate callers make.
    ("grpc.use_local_subchannel_pool", 1),
]


def parse_bytes(text: str) -> int:
    """'4GiB', '512MiB', '3G', '1000000' to bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r}")
    number, unit, binary = match.groups()
    power = " KMGT".index(unit.upper() or " ")
    return int(float(number) * (1024 if binary or not unit else 1000) ** power)


# -- inputs ------------------------------------------------------------------


def cached(name: str, make: Callable[[], bytes]) -> bytes:
    path = INPUTS / name
    if not path.exists():
        INPUTS.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        data = make()
        path.write_bytes(data)
        print(f"made {name}: {len(data) / 1e6:.1f} MB in {time.perf_counter() - started:.0f} s")
    return path.read_bytes()


def noise_jpeg() -> bytes:
    """A 40 Mpx JPEG at quality 95 of a gradient plus noise, as close under 20 MiB as found."""
    width, height = BIG
    rng = np.random.default_rng(13)
    ramp = np.linspace(0, 200, width, dtype=np.float32)[None, :, None]
    best = b""
    for amplitude in (34, 32, 30, 28, 24):
        pixels = (ramp + rng.integers(0, amplitude, (height, width, 3))).clip(0, 255)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG", quality=95)
        best = buffer.getvalue()
        if len(best) <= MAX_IMAGE_BYTES:
            break
    return best


def gradient_rgba_png() -> bytes:
    """A 40 Mpx RGBA PNG of gradients: about 160 MB decoded, small on the wire."""
    width, height = BIG
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    pixels = np.empty((height, width, 4), np.uint8)
    pixels[..., 0] = x
    pixels[..., 1] = y
    pixels[..., 2] = 128
    pixels[..., 3] = (x + y) / 2
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, "PNG", compress_level=9)
    return buffer.getvalue()


def palette_png() -> bytes:
    """A 40 Mpx palette PNG of a few bands: a few KB on the wire, 120 MB as RGB."""
    width, height = BIG
    image = Image.new("P", BIG, 0)
    image.putpalette([value for index in range(256) for value in (index, 255 - index, 90)])
    for band in range(8):
        image.paste(band * 30, (0, band * height // 8, width, (band + 1) * height // 8))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def compressible_bmp() -> bytes:
    """A BMP just under 20 MiB that gzip takes to about a third, quickly.

    Runs of 1 KiB of noise between 2 KiB of black: low-entropy noise would
    compress alike but take gzip eight times as long on the client.
    """
    width, height = 2560, 2730
    rng = np.random.default_rng(20)
    runs = np.zeros((height * width * 3 // 1024 + 1, 1024), np.uint8)
    runs[::3] = rng.integers(0, 256, runs[::3].shape, dtype=np.uint8)
    pixels = runs.reshape(-1)[: height * width * 3].reshape(height, width, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "BMP")
    return buffer.getvalue()


def photos() -> list[bytes]:
    return [path.read_bytes() for path in sorted(PHOTOS.glob("*.jpg"))]


# -- the server and its RSS ----------------------------------------------------


class RssSampler:
    """RSS of a process and its children, sampled every 50 ms on a thread."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.latest = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        try:
            processes = [self.process, *self.process.children(recursive=True)]
            total = 0
            for process in processes:
                total += process.memory_info().rss
        except psutil.Error:
            return self.latest
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.latest = self.sample()
            self.peak = max(self.peak, self.latest)

    def start(self) -> None:
        self.latest = self.peak = self.sample()
        self._thread.start()

    def reset_peak(self) -> None:
        self.peak = self.latest

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    async def settle(self, seconds: float) -> int:
        """RSS after ``seconds`` idle: the mean of the last second's samples."""
        await asyncio.sleep(max(0.0, seconds - 1.0))
        samples = []
        for _ in range(10):
            samples.append(self.latest)
            await asyncio.sleep(0.1)
        return int(statistics.mean(samples))


class ServerProcess:
    """clipvision-server in a child process; its port read from its log, the rest kept."""

    def __init__(self, flags: list[str], env: dict[str, str]) -> None:
        self.command = [
            sys.executable,
            "-m",
            "clipvision.server.cli",
            "--address",
            "127.0.0.1:0",
            *flags,
        ]
        self.env = {**os.environ, **env}
        self.process: asyncio.subprocess.Process | None = None
        self.port = 0
        self.log: collections.deque[str] = collections.deque(maxlen=200)

    async def __aenter__(self) -> ServerProcess:
        self.process = await asyncio.create_subprocess_exec(
            *self.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        async with asyncio.timeout(300):
            while True:
                line = await self._line()
                if match := re.search(r"listening on [\d.]+:(\d+)", line):
                    self.port = int(match.group(1))
                if " serving " in f" {line}":
                    break
        asyncio.get_running_loop().create_task(self._drain())
        return self

    async def _line(self) -> str:
        assert self.process is not None
        assert self.process.stderr is not None
        raw = await self.process.stderr.readline()
        if not raw:
            raise RuntimeError("the server exited during start-up:\n" + "".join(self.log))
        line = raw.decode(errors="replace")
        self.log.append(line)
        return line

    async def _drain(self) -> None:
        assert self.process is not None
        assert self.process.stderr is not None
        while raw := await self.process.stderr.readline():
            self.log.append(raw.decode(errors="replace"))

    async def __aexit__(self, *exc: object) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), 30)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


def server_has_flag(flag: str, env: dict[str, str]) -> bool:
    """Whether the clipvision-server that ``env`` runs lists ``flag`` in its --help."""
    command = [sys.executable, "-m", "clipvision.server.cli", "--help"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, check=False, env={**os.environ, **env}
    )
    return flag in result.stdout


# -- loads ---------------------------------------------------------------------


@dataclass
class Outcome:
    """What the server answered during one load."""

    sent: int = 0
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    bystander: dict[str, object] = field(default_factory=dict)
    timed_out: bool = False

    def record(self, code: str, count: int = 1) -> None:
        self.codes[code] += count

    def summary(self) -> str:
        parts = [f"{code} {count}" for code, count in self.codes.most_common()]
        text = f"{self.sent} sent: " + ", ".join(parts)
        if self.bystander:
            b = self.bystander
            text += (
                f"; bystander {b['ok']}/{b['calls']} OK ({b['codes']}), "
                f"p50 {b['p50_ms']} ms, max {b['max_ms']} ms"
            )
        if self.timed_out:
            text += "; load cut off at its time limit"
        return text


def channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


def error_reason(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason the server attached (QUEUE_FULL, IMAGE_TOO_LARGE, ...), or ''."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


def item_code(response: pb.EmbedImageStreamResponse) -> str:
    return f"item {response.error.reason}" if response.HasField("error") else "item OK"


async def stream(
    target: str,
    images: list[bytes],
    outcome: Outcome,
    deadline_s: float,
    compression: grpc.Compression | None,
) -> None:
    """One stream on a connection of its own, every item sent as fast as flow control allows."""

    async def requests() -> AsyncIterator[pb.EmbedImageStreamRequest]:
        for index, data in enumerate(images):
            outcome.sent += 1
            yield pb.EmbedImageStreamRequest(id=str(index), image=pb.Image(content=data))

    async with channel(target) as chan:
        stub: AsyncStub = pb_grpc.EmbeddingServiceStub(chan)
        try:
            async for response in stub.EmbedImageStream(
                requests(), timeout=deadline_s, compression=compression
            ):
                outcome.record(item_code(response))
        except grpc.aio.AioRpcError as error:
            outcome.record(f"stream {error.code().name} {error_reason(error)}".rstrip())


async def unary(
    stub: AsyncStub,
    image: pb.Image,
    outcome: Outcome,
    deadline_s: float,
    compression: grpc.Compression | None = None,
) -> float:
    """One EmbedImage call; returns its latency in seconds."""
    outcome.sent += 1
    started = time.perf_counter()
    try:
        await stub.EmbedImage(
            pb.EmbedImageRequest(image=image), timeout=deadline_s, compression=compression
        )
        outcome.record("OK")
    except grpc.aio.AioRpcError as error:
        reason = error_reason(error)
        outcome.record(f"{error.code().name} {reason}" if reason else error.code().name)
    return time.perf_counter() - started


def count(full: int, scale: float, least: int = 1) -> int:
    return max(least, round(full * scale))


async def load_streams(
    target: str, data: bytes, streams: int, per_stream: int, limit: float, outcome: Outcome
) -> None:
    await asyncio.gather(
        *(stream(target, [data] * per_stream, outcome, limit, None) for _ in range(streams))
    )


async def load_a(target: str, scale: float, limit: float, outcome: Outcome) -> None:
    data = cached("noise-40mpx.jpg", noise_jpeg)
    await load_streams(target, data, 16, count(16, scale), limit, outcome)


async def load_g(target: str, scale: float, limit: float, outcome: Outcome) -> None:
    # As many streams as --max-streams lets in (128), each on a connection of its own:
    # every stream sends at once, and waits for read room before its message is read.
    data = cached("noise-40mpx.jpg", noise_jpeg)
    await load_streams(target, data, 128, count(2, scale), limit, outcome)


async def load_h(target: str, scale: float, limit: float, outcome: Outcome) -> None:
    # As many unary calls as one connection may have (64), each one 40 Mpx JPEG, all at
    # once, twice over: each waits for read room before its message is read, up to
    # --request-read-timeout. (256 at once, the server's limit, took 15 GB in this client.)
    image = pb.Image(content=cached("noise-40mpx.jpg", noise_jpeg))
    async with channel(target) as chan:
        stub: AsyncStub = pb_grpc.EmbeddingServiceStub(chan)
        for _ in range(count(2, scale)):
            await asyncio.gather(*(unary(stub, image, outcome, limit) for _ in range(64)))


async def load_b(target: str, scale: float, limit: float, outcome: Outcome) -> None:
    data = cached("gradient-40mpx-rgba.png", gradient_rgba_png)
    await load_streams(target, data, 4, count(16, scale), limit, outcome)


async def load_c1(target: str, scale: float, limit: float, outcome: Outcome) -> None:
    zeros = pb.Image(content=bytes(60_000_000))
    async with channel(target) as chan:
        stub: AsyncStub = pb_grpc.EmbeddingServiceStub(chan)
        await asyncio.gather(
            *(
                unary(stub, zeros, outcome, limit, grpc.Compression.Gzip)
                for _ in range(count(48, scale, 2))
            )
        )


async def load_c2(target: str, scale: float, limit: float, outcome: Outcome) -> None:
    data = cached("noise-20mib.bmp", compressible_bmp)
    await stream(target, [data] * count(280, scale, 4), outcome, limit, grpc.Compression.Gzip)


async def load_d(target: str, scale: float, limit: float, outcome: Outcome) -> None:
    prefix = "data:image/jpeg;base64,"
    payload = base64.b64encode(np.random.default_rng(63).bytes((63_000_000 - len(prefix)) // 4 * 3))
    image = pb.Image(uri=prefix + payload.decode())
    async with channel(target) as chan:
        await unary(pb_grpc.EmbeddingServiceStub(chan), image, outcome, limit)


async def load_e(target: str, scale: float, limit: float, outcome: Outcome) -> None:
    data = cached("bands-40mpx-palette.png", palette_png)
    photo = pb.Image(content=photos()[0])
    latencies: list[float] = []
    codes = Outcome()
    attack = asyncio.create_task(
        load_streams_one_connection(target, data, 4, count(64, scale, 4), limit, outcome)
    )
    async with channel(target) as chan:
        stub: AsyncStub = pb_grpc.EmbeddingServiceStub(chan)
        await asyncio.sleep(1.0)  # let the streams take what they can first
        while not attack.done():
            latencies.append(await unary(stub, photo, codes, 10.0))
            await asyncio.sleep(0.25)
    await attack
    outcome.bystander = {
        "calls": codes.sent,
        "ok": codes.codes["OK"],
        "codes": ", ".join(f"{code} {n}" for code, n in codes.codes.most_common()),
        "p50_ms": round(statistics.median(latencies) * 1000) if latencies else None,
        "max_ms": round(max(latencies) * 1000) if latencies else None,
    }


async def load_streams_one_connection(
    target: str, data: bytes, streams: int, per_stream: int, limit: float, outcome: Outcome
) -> None:
    """``streams`` streams multiplexed on one connection: one greedy caller."""

    async def one(stub: AsyncStub) -> None:
        async def requests() -> AsyncIterator[pb.EmbedImageStreamRequest]:
            for index in range(per_stream):
                outcome.sent += 1
                yield pb.EmbedImageStreamRequest(id=str(index), image=pb.Image(content=data))

        try:
            async for response in stub.EmbedImageStream(requests(), timeout=limit):
                outcome.record(item_code(response))
        except grpc.aio.AioRpcError as error:
            outcome.record(f"stream {error.code().name} {error_reason(error)}".rstrip())

    async with channel(target) as chan:
        stub: AsyncStub = pb_grpc.EmbeddingServiceStub(chan)
        await asyncio.gather(*(one(stub) for _ in range(streams)))


async def load_f(target: str, scale: float, limit: float, outcome: Outcome) -> None:
    images = [pb.Image(content=data) for data in photos()]
    deadline = time.monotonic() + max(10.0, 40.0 * scale)

    async def unary_caller(stub: AsyncStub, seed: int) -> None:
        index = seed
        while time.monotonic() < deadline:
            await unary(stub, images[index % len(images)], outcome, 30.0)
            index += 1

    async def batch_caller(stub: AsyncStub) -> None:
        while time.monotonic() < deadline:
            outcome.sent += 8
            try:
                reply = await stub.EmbedImages(
                    pb.EmbedImagesRequest(images=[images[i % len(images)] for i in range(8)]),
                    timeout=30.0,
                )
                for result in reply.results:
                    outcome.record("item OK" if result.HasField("embedding") else "item error")
            except grpc.aio.AioRpcError as error:
                outcome.record(f"batch {error.code().name} {error_reason(error)}".rstrip())

    async def stream_caller(stub: AsyncStub) -> None:
        async def requests() -> AsyncIterator[pb.EmbedImageStreamRequest]:
            index = 0
            while time.monotonic() < deadline:
                outcome.sent += 1
                yield pb.EmbedImageStreamRequest(id=str(index), image=images[index % len(images)])
                index += 1
                await asyncio.sleep(0.25)  # a steady 4 images/s, not a flood

        try:
            async for response in stub.EmbedImageStream(requests(), timeout=limit):
                outcome.record(item_code(response))
        except grpc.aio.AioRpcError as error:
            outcome.record(f"stream {error.code().name} {error_reason(error)}".rstrip())

    async with channel(target) as chan:
        stub: AsyncStub = pb_grpc.EmbeddingServiceStub(chan)
        await asyncio.gather(
            *(unary_caller(stub, seed) for seed in range(4)),
            batch_caller(stub),
            stream_caller(stub),
        )


LOADS: dict[str, tuple[str, Callable[[str, float, float, Outcome], Awaitable[None]]]] = {
    "a": ("16 streams of 40 Mpx JPEGs (~20 MB)", load_a),
    "b": ("4 streams of 40 Mpx RGBA PNGs", load_b),
    "b8": ("4 streams of 40 Mpx RGBA PNGs, --preprocess-workers 8", load_b),
    "c1": ("unary gzip calls of 60 MB zeros", load_c1),
    "c2": ("a gzip stream of 20 MiB BMPs", load_c2),
    "d": ("one 63 MB data: URI", load_d),
    "e": ("4 streams of 40 Mpx palette PNGs + bystander", load_e),
    "f": ("mixed legitimate load (photos)", load_f),
    "g": ("128 streams of 40 Mpx JPEGs (~20 MB)", load_g),
    "h": ("64 unary calls at once of a 40 Mpx JPEG (~20 MB)", load_h),
}


# -- the allocator's cost on normal images ---------------------------------------

COST_MODES = ("default", "mmap=1MiB", "mmap=4MiB", "trim")


def cost_child(mode: str, rounds: int) -> None:
    """In this process: set ``mode``, then time decode + preprocess + forward of photos."""
    # throughput imports torch and transformers: slow, and only this mode needs them.
    import torch
    from throughput import build_encoder, make_jpegs

    if mode.startswith("mmap="):
        configure_allocator(mmap_threshold=parse_bytes(mode.removeprefix("mmap=")))
    trimmer = MemoryTrimmer()
    if mode == "trim":
        trimmer.start()
    # One thread: idle OpenMP threads spin, and their CPU time would swamp the difference.
    torch.set_num_threads(1)
    encoder = build_encoder(argparse.Namespace(model="ViT-B/32", device="cpu", dtype="float32"))
    images = make_jpegs()[:8]

    def batch() -> None:
        encoder.to_host(encoder.forward(np.stack([encoder.preprocess(d) for d in images])))

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    batch()
    faults, started = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, cpu()
    for _ in range(rounds):
        batch()
    report = {
        "cpu_ms_per_image": (cpu() - started) / (rounds * len(images)) * 1000,
        "faults_per_image": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
        / (rounds * len(images)),
    }
    trimmer.stop()
    print(json.dumps(report))


def allocator_cost(rounds: int, repeats: int) -> str:
    """Each mode in its own child process, alternated ``repeats`` times; a markdown table.

    CPU time (user + system, page faults included) rather than wall time, so that
    other work on a shared machine moves the figures less; the best of the repeats.
    """
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in COST_MODES}
    for _ in range(repeats):
        for mode in COST_MODES:
            command = [sys.executable, __file__, "--cost-child", mode, "--cost-rounds", str(rounds)]
            done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=True)
            results[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(mode, results[mode][-1], flush=True)
    lines = [
        f"`bench/memory.py --cost --cost-rounds {rounds} --cost-repeats {repeats}`: ViT-B/32 "
        "(dummy weights), CPU, one thread, batches of 8 photos (640x480 and 1920x1080 JPEGs)",
        "",
        "| allocator | CPU ms per image (best) | vs default | page faults per image |",
        "| --- | ---: | ---: | ---: |",
    ]
    base = min(r["cpu_ms_per_image"] for r in results["default"])
    for mode, runs in results.items():
        best = min(r["cpu_ms_per_image"] for r in runs)
        faults = min(r["faults_per_image"] for r in runs)
        lines.append(f"| {mode} | {best:.1f} | {best / base - 1:+.0%} | {faults:.0f} |")
    return "\n".join(lines) + "\n"


# -- the run -------------------------------------------------------------------


@dataclass
class Row:
    """One load's figures."""

    load: str
    what: str
    server_flags: str
    idle_mib: float
    before_mib: float
    peak_mib: float
    after_mib: float
    seconds: float
    outcome: str
    limit_mib: float
    peak_below_limit: bool = field(init=False)
    after_within_300: bool = field(init=False)

    def __post_init__(self) -> None:
        self.peak_below_limit = self.peak_mib < self.limit_mib
        self.after_within_300 = self.after_mib <= self.idle_mib + 300


async def run_on(
    server: ServerProcess, loads: list[str], args: argparse.Namespace, rows: list[Row]
) -> None:
    assert server.process is not None
    target = f"127.0.0.1:{server.port}"
    sampler = RssSampler(server.process.pid)
    sampler.start()
    try:
        warm = Outcome()
        async with channel(target) as chan:
            stub: AsyncStub = pb_grpc.EmbeddingServiceStub(chan)
            for data in photos():
                await unary(stub, pb.Image(content=data), warm, 60.0)
        idle = await sampler.settle(args.settle)
        print(f"server {' '.join(server.command[5:])}: idle RSS {idle / MIB:.0f} MiB")
        for name in loads:
            what, load = LOADS[name]
            before = sampler.latest
            sampler.reset_peak()
            outcome = Outcome()
            limit = args.load_seconds
            started = time.perf_counter()
            try:
                async with asyncio.timeout(limit + 30):
                    await load(target, args.scale, limit, outcome)
            except TimeoutError:
                outcome.timed_out = True
            seconds = time.perf_counter() - started
            peak = sampler.peak
            after = await sampler.settle(args.settle)
            row = Row(
                name,
                what,
                " ".join(server.command[5:]),
                idle / MIB,
                before / MIB,
                peak / MIB,
                after / MIB,
                seconds,
                outcome.summary(),
                args.limit / MIB,
            )
            rows.append(row)
            print(
                f"  {name}: {seconds:.0f} s, peak {row.peak_mib:.0f} MiB, "
                f"after {row.after_mib:.0f} MiB; {row.outcome}",
                flush=True,
            )
            if server.process.returncode is not None:
                print("  the server exited:\n" + "".join(list(server.log)[-20:]))
                break
    finally:
        sampler.stop()


def table(rows: list[Row], args: argparse.Namespace, flags: list[str], env: dict[str, str]) -> str:
    limit = f"{args.limit / MIB:.0f} MiB"
    lines = [
        f"`bench/memory.py --scale {args.scale}`{' ' + args.label if args.label else ''}; "
        f"server: `{' '.join(flags)}`"
        + (f", env `{' '.join(f'{k}={v}' for k, v in env.items())}`" if env else "")
        + f"; limit {limit}; after-load RSS read {args.settle:.0f} s after each load",
        "",
        "| load | idle MiB | peak MiB | after MiB | peak < limit | after <= idle + 300 MiB "
        "| s | outcome |",
        "| --- | ---: | ---: | ---: | :---: | :---: | ---: | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row.load}: {row.what} | {row.idle_mib:.0f} | {row.peak_mib:.0f} "
            f"| {row.after_mib:.0f} | {'yes' if row.peak_below_limit else 'NO'} "
            f"| {'yes' if row.after_within_300 else 'NO'} | {row.seconds:.0f} | {row.outcome} |"
        )
    return "\n".join(lines) + "\n"


async def run(args: argparse.Namespace, flags: list[str], env: dict[str, str]) -> list[Row]:
    # Make the inputs before any server starts, so their making is not in a load's time.
    cached("noise-40mpx.jpg", noise_jpeg)
    cached("gradient-40mpx-rgba.png", gradient_rgba_png)
    cached("bands-40mpx-palette.png", palette_png)
    cached("noise-20mib.bmp", compressible_bmp)
    rows: list[Row] = []
    main = [name for name in args.loads if name != "b8"]
    if main:
        async with ServerProcess(flags, env) as server:
            await run_on(server, main, args, rows)
    if "b8" in args.loads:
        async with ServerProcess([*flags, "--preprocess-workers", "8"], env) as server:
            await run_on(server, ["b8"], args, rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="item counts x this (1: full)")
    parser.add_argument(
        "--loads",
        type=lambda text: text.split(","),
        default=list(DEFAULT_LOADS),
        help=f"comma-separated, from {','.join(ALL_LOADS)} (default: all but g and h)",
    )
    parser.add_argument(
        "--limit", type=parse_bytes, default=4 * 1024 * MIB, help="the container limit (4GiB)"
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="a flag for the server, e.g. --server-arg=--memory-budget=3GiB (repeatable)",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        help="KEY=VALUE in the server's environment, e.g. MALLOC_ARENA_MAX=2 (repeatable)",
    )
    parser.add_argument(
        "--no-memory-limit-flag",
        action="store_true",
        help="do not pass --limit to the server as --memory-limit even where it has the flag",
    )
    parser.add_argument("--settle", type=float, default=6.0, help="idle seconds before reading")
    parser.add_argument("--load-seconds", type=float, default=600.0, help="time limit per load")
    parser.add_argument("--label", default="", help="names the output files")
    parser.add_argument(
        "--cost",
        action="store_true",
        help="instead of the loads: the CPU cost on normal images of each malloc setting",
    )
    parser.add_argument("--cost-rounds", type=int, default=6, help=argparse.SUPPRESS)
    parser.add_argument("--cost-repeats", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--cost-child", choices=COST_MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cost_child:
        cost_child(args.cost_child, args.cost_rounds)
        return 0
    if args.cost:
        text = allocator_cost(args.cost_rounds, args.cost_repeats)
        print("\n" + text)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "memory-cost.md").write_text(text)
        return 0
    unknown = set(args.loads) - set(ALL_LOADS)
    if unknown:
        parser.error(f"unknown loads: {', '.join(sorted(unknown))}")
    env = dict(item.split("=", 1) for item in args.server_env)
    flags = ["--model", "ViT-B/32", "--dummy-weights"]
    if not args.no_memory_limit_flag and server_has_flag("--memory-limit", env):
        flags += ["--memory-limit", str(args.limit)]
    flags += args.server_arg

    rows = asyncio.run(run(args, flags, env))
    text = table(rows, args, flags, env)
    print("\n" + text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"memory{'-' + args.label if args.label else ''}"
    stem.with_suffix(".md").write_text(text)
    report = {"scale": args.scale, "flags": flags, "env": env, "rows": [asdict(r) for r in rows]}
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {stem}.md and {stem}.json")
    ok = all(row.peak_below_limit and row.after_within_300 for row in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
