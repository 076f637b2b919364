"""Throughput and latency of the server against the in-process ceiling, in one run.

    .venv/bin/python bench/throughput.py                      # ViT-B/32, fp32, this machine
    .venv/bin/python bench/throughput.py --quick              # a shorter smoke run
    .venv/bin/python bench/throughput.py --model ViT-L/14 --dtype float16   # on a GPU
    .venv/bin/python bench/throughput.py --backends torch,auto --neighbour  # a busy core beside

Every number is measured in this run, with the full-size architecture and dummy
(random) weights: the same FLOPs as the real checkpoint. Images are real
photographs (tests/data) resized to typical photo sizes and saved as JPEG.

1. ceiling: decode + preprocess + forward in-process, preprocessing overlapped
   with the forward pass as the server does it, at the best batch size;
2. naive: the server with batching off (one request, one forward, batch 1);
3. the server under concurrent unary load and through one EmbedImageStream;
4. each server figure as a ratio of the ceiling.

With several ``--backends`` (default: torch and auto, that is ONNX Runtime on a
CPU where installed), every step runs for each backend in turn, scenario by
scenario, so that both see the same machine state; the comparison gives each
backend's figures as ratios of torch's. ``--neighbour`` runs a busy process
pinned to one core throughout, as a noisy neighbour on a shared machine would.

It prints a table per backend, one side by side, and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import multiprocessing
import os
import platform
import re
import statistics
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from clipvision.server.config.cpu import available_cpus, cpu_budget
from clipvision.server.config.limits import ImageLimits
from clipvision.server.config.settings import ModelSpec
from clipvision.server.runtime.backends import prepare_image_runner
from clipvision.server.runtime.checkpoint import load_checkpoint, resolve_device, resolve_dtype
from clipvision.server.runtime.image_encoder import ClipImageEncoder
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from clipvision.v1.embedding_service_pb2_grpc import EmbeddingServiceAsyncStub as AsyncStub

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "tests" / "data"
SIZES = ((640, 480), (1920, 1080))
CALLERS_PER_CONNECTION = 32


@dataclass
class Scenario:
    """One measured configuration."""

    name: str
    images_per_s: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    mean_batch: float | None = None
    ratio: float | None = None
    extra: dict[str, float] = field(default_factory=dict)
    rounds: list[float] = field(default_factory=list)
    """images/s of each round, where the scenario ran more than once (see --rounds)."""


def median_of(runs: list[Scenario]) -> Scenario:
    """One scenario from its rounds: the median of each figure, and every round's images/s."""
    if len(runs) == 1:
        return runs[0]

    def median(values: list[float | None]) -> float | None:
        known = [value for value in values if value is not None]
        return statistics.median(known) if known else None

    rates = [run.images_per_s for run in runs]
    return Scenario(
        name=runs[0].name,
        images_per_s=statistics.median(rates),
        p50_ms=median([run.p50_ms for run in runs]),
        p99_ms=median([run.p99_ms for run in runs]),
        mean_batch=median([run.mean_batch for run in runs]),
        rounds=rates,
    )


def make_jpegs() -> list[bytes]:
    """Real photographs centre-cropped and resized to 640x480 and 1920x1080, JPEG quality 90."""
    images = []
    for path in sorted(PHOTOS.glob("*.[jp][pn]g")):
        with Image.open(path) as photo:
            rgb = photo.convert("RGB")
        for width, height in SIZES:
            scale = max(width / rgb.width, height / rgb.height)
            resized = rgb.resize(
                (round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.BICUBIC
            )
            left, top = (resized.width - width) // 2, (resized.height - height) // 2
            buffer = io.BytesIO()
            resized.crop((left, top, left + width, top + height)).save(
                buffer, format="JPEG", quality=90
            )
            images.append(buffer.getvalue())
    return images


def cycle(images: list[bytes]) -> Iterator[bytes]:
    while True:
        yield from images


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) * 1000


# -- in-process ceiling --------------------------------------------------------


def build_encoder(args: argparse.Namespace, backend: str = "torch") -> ClipImageEncoder:
    """The in-process encoder, with the backend the server would pick for ``backend``."""
    device = resolve_device(args.device)
    checkpoint = load_checkpoint(
        ModelSpec.parse(args.model),
        device=device,
        dtype=resolve_dtype(args.dtype, device),
        dummy_weights=True,
    )
    runner = prepare_image_runner(
        args.model,
        checkpoint,
        backend=backend,
        threads=getattr(args, "threads", None),
        cache_dir=None,
    )
    # As the server resolves --device-preprocess (auto: on the model's device when a GPU).
    mode = getattr(args, "device_preprocess", "off")
    on_device = mode == "on" or (mode == "auto" and device.type == "cuda")
    decoder = None
    if getattr(args, "gpu_decode", False):
        from clipvision.server.runtime.gpu_decode import GpuJpegDecoder

        decoder = GpuJpegDecoder(device)
    return ClipImageEncoder(
        args.model, args.model, checkpoint, ImageLimits(), runner, on_device, decoder
    )


def busy_core() -> None:
    """A noisy neighbour: one process spinning on core 0 (the first CPU it may use)."""
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    while True:
        pass


def ceiling(
    encoder: ClipImageEncoder, images: list[bytes], batch_size: int, seconds: float, workers: int
) -> float:
    """Images/s of decode+preprocess (a pool, ahead of the device) overlapped with forward.

    The workers do what the server's do (probe, then decode and preprocess, or only decode
    with device preprocessing, or nothing but the header with GPU decoding), and the batch
    goes through the device thread's one call (embed_batch), as in the server.
    """
    source = cycle(images)
    done = 0

    def prepare(data: bytes) -> Any:
        return encoder.prepare(encoder.probe(data))

    with ThreadPoolExecutor(workers) as pool:
        ahead = [pool.submit(prepare, next(source)) for _ in range(2 * batch_size)]
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            batch = [future.result() for future in ahead[:batch_size]]
            ahead = ahead[batch_size:] + [
                pool.submit(prepare, next(source)) for _ in range(batch_size)
            ]
            encoder.embed_batch(batch)
            done += batch_size
        elapsed = time.perf_counter() - started
    return done / elapsed


def single_image_seconds(encoder: ClipImageEncoder, data: bytes) -> float:
    """Time of decode + preprocess + forward + copy of one image, alone, in-process."""
    started = time.perf_counter()
    encoder.embed_batch([encoder.prepare(encoder.probe(data))])
    return time.perf_counter() - started


async def interleaved_latency(
    server: ServerProcess, encoder: ClipImageEncoder, images: list[bytes], count: int
) -> dict[str, float]:
    """One image at a time, alternately in-process and through the idle server.

    Alternating pairs see the same machine state (clock speed, caches, neighbours),
    which separate runs minutes apart do not. The server's trailing metadata says
    how much of its time went to preprocessing, queueing and inference; the rest
    is gRPC, protobuf and hand-offs.
    """
    local: list[float] = []
    remote: list[float] = []
    overhead: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        await stub.EmbedImage(pb.EmbedImageRequest(image=pb.Image(content=images[0])))
        for index in range(count):
            data = images[index % len(images)]
            local.append(single_image_seconds(encoder, data) * 1000)
            started = time.perf_counter()
            call = stub.EmbedImage(pb.EmbedImageRequest(image=pb.Image(content=data)))
            await call
            elapsed = (time.perf_counter() - started) * 1000
            remote.append(elapsed)
            stages = dict(await call.trailing_metadata() or ())
            overhead.append(
                elapsed
                - sum(
                    float(stages[key])
                    for key in (
                        "clipvision-preprocess-ms",
                        "clipvision-queue-ms",
                        "clipvision-inference-ms",
                    )
                )
            )
    return {
        "in_process_ms": statistics.median(local),
        "server_ms": statistics.median(remote),
        "server_overhead_ms": statistics.median(overhead),
    }


# -- the server ----------------------------------------------------------------


class ServerProcess:
    """clipvision-server with dummy weights in a child process, its ports read from its log."""

    def __init__(self, *flags: str) -> None:
        self.command = [
            sys.executable,
            "-m",
            "clipvision.server.cli",
            "--dummy-weights",
            "--address",
            "127.0.0.1:0",
            "--metrics-address",
            "127.0.0.1:0",
            *flags,
        ]
        self.process: asyncio.subprocess.Process | None = None
        self.startup_log: list[str] = []
        self.port = 0
        self.metrics_port = 0
        self.pid = 0

    async def __aenter__(self) -> ServerProcess:
        self.process = await asyncio.create_subprocess_exec(
            *self.command, stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        assert self.process.stderr is not None
        self.pid = self.process.pid
        async with asyncio.timeout(600):
            while not (self.port and self.metrics_port):
                line = (await self.process.stderr.readline()).decode()
                self.startup_log.append(line)
                if not line:
                    raise RuntimeError("the server exited during start-up")
                if match := re.search(r"listening on [\d.]+:(\d+)", line):
                    self.port = int(match.group(1))
                if match := re.search(r"metrics on http://[\d.]+:(\d+)/", line):
                    self.metrics_port = int(match.group(1))
            while "serving" not in line:
                line = (await self.process.stderr.readline()).decode()
                self.startup_log.append(line)
                if not line:
                    raise RuntimeError("the server exited while loading")
        asyncio.get_running_loop().create_task(self._drain_log())
        return self

    @property
    def image_backend(self) -> str:
        """The image tower's runtime, as the server's start-up log names it."""
        log = "".join(self.startup_log)
        return "onnxruntime" if "image tower on ONNX Runtime" in log else "torch"

    async def _drain_log(self) -> None:
        assert self.process is not None
        assert self.process.stderr is not None
        while await self.process.stderr.readline():
            pass

    async def __aexit__(self, *exc: object) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await asyncio.wait_for(self.process.wait(), 60)

    def batch_totals(self) -> tuple[float, float]:
        """(sum, count) of the batch size histogram, from /metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        total = count = 0.0
        for family in text_string_to_metric_families(text):
            if family.name == "clipvision_batch_size":
                for sample in family.samples:
                    if sample.name.endswith("_sum"):
                        total += sample.value
                    elif sample.name.endswith("_count"):
                        count += sample.value
        return total, count


def server_flags(
    args: argparse.Namespace, max_batch_size: int, backend: str | None = None
) -> list[str]:
    """The server's flags for this run's model, device, batch size and backend."""
    extra = ["--backend", backend] if backend else []
    if getattr(args, "threads", None):
        extra += ["--threads", str(args.threads)]
    extra += ["--device-preprocess", getattr(args, "device_preprocess", "auto")]
    if getattr(args, "gpu_decode", False):
        extra.append("--gpu-decode")
    return [
        *extra,
        "--model",
        args.model,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--max-batch-size",
        str(max_batch_size),
        "--max-queue-size",
        "1024",
        "--preprocess-workers",
        str(args.preprocess_workers),
    ]


class Window:
    """The measured part of a load: from ``warmup`` seconds after its start, for ``seconds``.

    The load runs before and after it, so that what is counted is the server's steady
    state, as the in-process ceiling's is (it starts timing with its queue full): not
    the ramp-up (the first batches start with one image each, before the others are
    decoded) nor the drain (the last batches shrink as the callers stop).
    """

    def __init__(
        self,
        server: ServerProcess,
        warmup: float,
        seconds: float,
        probes: dict[str, Callable[[], float]] | None = None,
    ) -> None:
        self.server = server
        self.opens = time.perf_counter() + warmup
        self.closes = self.opens + seconds
        self.latencies: list[float] = []
        self.answered: list[float] = []
        self.batches: list[tuple[float, float]] = []
        # Readings taken when the window opens and closes (CPU times, say): see ``changes``.
        self._probes = probes or {}
        self._readings: list[dict[str, float]] = []

    def record(self, sent: float, done: float, images: int = 1) -> None:
        """One answer of ``images`` images, sent at ``sent``, received at ``done``."""
        if self.opens <= done < self.closes:
            self.latencies.append(done - sent)
            self.answered.extend([done] * images)

    @property
    def changes(self) -> dict[str, float]:
        """How much each probe's reading moved between the window's opening and its close."""
        before, after = self._readings
        return {name: after[name] - before[name] for name in self._probes}

    def rate(self) -> float:
        """Answers per second: the least-squares slope of the answers' count over time.

        Answers arrive in bursts, a batch at a time, so counting those inside the window
        is off by up to a batch (8 to 32 images: 5 to 25 % of a 12 s window on a CPU);
        the slope of the staircase is the rate whatever the window's phase.
        """
        if len(self.answered) < 2:
            return len(self.answered) / (self.closes - self.opens)
        times = np.asarray(sorted(self.answered)) - self.opens
        slope = np.polyfit(times, np.arange(len(times), dtype=np.float64), 1)[0]
        return float(slope)

    @property
    def open(self) -> bool:
        """Whether the load must go on: the window has not closed yet."""
        return time.perf_counter() < self.closes

    async def sample_batches(self) -> None:
        """Read the batch-size histogram (and the probes) when the window opens and closes."""
        for moment in (self.opens, self.closes):
            await asyncio.sleep(max(0.0, moment - time.perf_counter()))
            self._readings.append({name: probe() for name, probe in self._probes.items()})
            self.batches.append(await asyncio.to_thread(self.server.batch_totals))

    def scenario(self, name: str) -> Scenario:
        (sum_before, count_before), (sum_after, count_after) = self.batches
        return Scenario(
            name=name,
            images_per_s=self.rate(),
            p50_ms=percentile(self.latencies, 50),
            p99_ms=percentile(self.latencies, 99),
            mean_batch=(sum_after - sum_before) / max(1.0, count_after - count_before),
        )


async def unary_load(
    server: ServerProcess,
    images: list[bytes],
    callers: int,
    seconds: float,
    name: str,
    warmup: float = 3.0,
) -> Scenario:
    """``callers`` loops of EmbedImage; the images answered within the window, per second."""
    source = cycle(images)
    # One connection per CALLERS_PER_CONNECTION callers, as separate client
    # processes would have: the server caps unary calls per connection (64).
    connections = -(-callers // CALLERS_PER_CONNECTION)
    async with contextlib.AsyncExitStack() as stack:
        stubs = [
            pb_grpc.EmbeddingServiceStub(
                await stack.enter_async_context(
                    grpc.aio.insecure_channel(
                        f"127.0.0.1:{server.port}",
                        options=[("grpc.use_local_subchannel_pool", 1)],
                    )
                )
            )
            for _ in range(connections)
        ]
        for index in range(max(connections, min(callers, 4))):  # warm connections and model
            await stubs[index % connections].EmbedImage(
                pb.EmbedImageRequest(image=pb.Image(content=images[0]))
            )
        window = Window(server, warmup, seconds)

        async def caller(stub: AsyncStub) -> None:
            while window.open:
                request = pb.EmbedImageRequest(image=pb.Image(content=next(source)))
                sent = time.perf_counter()
                await stub.EmbedImage(request, timeout=120)
                window.record(sent, time.perf_counter())

        await asyncio.gather(
            window.sample_batches(),
            *(caller(stubs[index % connections]) for index in range(callers)),
        )
    return window.scenario(name)


async def stream_load(
    server: ServerProcess, images: list[bytes], seconds: float, name: str, warmup: float = 3.0
) -> Scenario:
    """One EmbedImageStream sent as fast as the server reads it; the window's answers per s."""
    source = cycle(images)
    sent_at: dict[str, float] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        await stub.EmbedImage(pb.EmbedImageRequest(image=pb.Image(content=images[0])))
        window = Window(server, warmup, seconds)

        async def requests() -> AsyncIterator[pb.EmbedImageStreamRequest]:
            index = 0
            while window.open:
                sent_at[str(index)] = time.perf_counter()
                yield pb.EmbedImageStreamRequest(
                    id=str(index), image=pb.Image(content=next(source))
                )
                index += 1

        async def answers() -> None:
            async for response in stub.EmbedImageStream(requests()):
                if response.HasField("error"):
                    raise RuntimeError(f"stream item failed: {response.error.message}")
                window.record(sent_at.pop(response.id), time.perf_counter())

        await asyncio.gather(window.sample_batches(), answers())
    return window.scenario(name)


# -- the run -------------------------------------------------------------------


def backend_checks(scenarios: list[Scenario], latency: dict[str, float]) -> dict[str, float | None]:
    """The server's targets against its own backend's ceiling."""
    by_name = {s.name: s for s in scenarios}
    thirty_two = by_name.get("unary, 32 callers")
    return {
        "stream / ceiling >= 0.9": by_name["one EmbedImageStream"].ratio,
        "32 callers / ceiling >= 0.9": thirty_two.ratio if thirty_two else None,
        "32 callers / naive >= 1.5": (
            thirty_two.images_per_s / by_name["naive, batch 1, 32 callers"].images_per_s
            if thirty_two and "naive, batch 1, 32 callers" in by_name
            else None
        ),
        "1 caller p50 - single image ms <= 5": latency["server_ms"] - latency["in_process_ms"],
    }


def comparison_checks(
    baseline: dict[str, Any], other: dict[str, Any], name: str
) -> dict[str, float | None]:
    """Issue 14's targets: ``name``'s server against torch's in-process ceiling and p50."""
    torch_ceiling = baseline["scenarios"][0]["images_per_s"]
    torch_rows = {s["name"]: s for s in baseline["scenarios"]}
    rows = {s["name"]: s for s in other["scenarios"]}

    def over_ceiling(row: str) -> float | None:
        return rows[row]["images_per_s"] / torch_ceiling if row in rows else None

    one, torch_one = rows.get("unary, 1 caller"), torch_rows.get("unary, 1 caller")
    return {
        f"{name} stream / torch ceiling >= 1.15": over_ceiling("one EmbedImageStream"),
        f"{name} 32 callers / torch ceiling >= 1.15": over_ceiling("unary, 32 callers"),
        f"{name} 1 caller p50 / torch's <= 0.75": (
            one["p50_ms"] / torch_one["p50_ms"] if one and torch_one else None
        ),
    }


async def run(args: argparse.Namespace) -> dict[str, object]:
    images = make_jpegs()
    workers = args.preprocess_workers
    seconds = args.seconds
    backends: list[str] = args.backends
    # Other processes on a shared machine move every figure: the load says how busy it was.
    load_before = os.getloadavg()[0]
    print(f"{len(images)} JPEGs ({', '.join(f'{w}x{h}' for w, h in SIZES)}); {workers} workers")

    encoders = {backend: build_encoder(args, backend) for backend in backends}
    for encoder in encoders.values():
        encoder.warm_up((1, 8))
    served_by = {backend: encoder.backend for backend, encoder in encoders.items()}
    print("in-process backends: " + ", ".join(f"{b} -> {e}" for b, e in served_by.items()))

    # Every step runs for each backend in turn, so that they see the same machine state;
    # with --rounds, every step is repeated, the backends' order reversed each round, and
    # each figure is the median of its rounds (a shared machine's speed drifts by 20 %).
    rounds: int = args.rounds

    def in_turn(round_: int) -> list[str]:
        return backends if round_ % 2 == 0 else backends[::-1]

    rates: dict[tuple[str, int], list[float]] = {}
    for round_ in range(rounds):
        for batch_size in args.ceiling_batches:
            for backend in in_turn(round_):
                rate = ceiling(encoders[backend], images, batch_size, seconds, workers)
                rates.setdefault((backend, batch_size), []).append(rate)
                print(f"{backend}: ceiling at batch {batch_size}: {rate:.2f} images/s")
    results: dict[str, list[Scenario]] = {}
    best: dict[str, tuple[float, int]] = {}
    for backend in backends:
        batch_size = max(args.ceiling_batches, key=lambda b: statistics.median(rates[(backend, b)]))
        ceiling_rounds = rates[(backend, batch_size)]
        best[backend] = (statistics.median(ceiling_rounds), batch_size)
        results[backend] = [
            Scenario(
                "ceiling (in-process)",
                best[backend][0],
                mean_batch=float(batch_size),
                rounds=ceiling_rounds if rounds > 1 else [],
            )
        ]
    for backend in backends if not args.no_naive else []:
        async with ServerProcess(*server_flags(args, 1, backend)) as naive:
            scenario = await unary_load(
                naive, images, 32, seconds, "naive, batch 1, 32 callers", args.warmup
            )
            results[backend].append(scenario)
    latency: dict[str, dict[str, float]] = {}
    async with contextlib.AsyncExitStack() as stack:
        servers = {
            backend: await stack.enter_async_context(
                ServerProcess(*server_flags(args, best[backend][1], backend))
            )
            for backend in backends
        }
        names = [f"unary, {c} caller{'s' if c > 1 else ''}" for c in args.callers]
        names.append("one EmbedImageStream")
        runs: dict[tuple[str, str], list[Scenario]] = {}
        for round_ in range(rounds):
            for callers, name in zip([*args.callers, 0], names, strict=True):
                for backend in in_turn(round_):
                    server = servers[backend]
                    scenario = await (
                        unary_load(server, images, callers, seconds, name, args.warmup)
                        if callers
                        else stream_load(server, images, seconds, name, args.warmup)
                    )
                    runs.setdefault((backend, name), []).append(scenario)
                    print(f"{backend}: {name}: {scenario.images_per_s:.2f} images/s")
        for backend in backends:
            results[backend].extend(median_of(runs[(backend, name)]) for name in names)
        for backend, server in servers.items():
            latency[backend] = await interleaved_latency(
                server, encoders[backend], images, 16 if args.quick else 48
            )
            print(
                f"{backend}: one image, interleaved: in-process "
                f"{latency[backend]['in_process_ms']:.1f} ms, server "
                f"{latency[backend]['server_ms']:.1f} ms, of which outside the model's stages "
                f"{latency[backend]['server_overhead_ms']:.1f} ms"
            )
        server_backend = {backend: server.image_backend for backend, server in servers.items()}

    reports: dict[str, dict[str, Any]] = {}
    for backend in backends:
        rate = best[backend][0]
        for scenario in results[backend]:
            scenario.ratio = scenario.images_per_s / rate
        reports[backend] = {
            "served_by": server_backend[backend],
            "best_batch_size": best[backend][1],
            "scenarios": [asdict(s) for s in results[backend]],
            "one_image_latency_ms": latency[backend],
            "checks": backend_checks(results[backend], latency[backend]),
        }
    first = reports[backends[0]]
    comparison: dict[str, float | None] = {}
    if "torch" in reports:
        for backend in backends:
            if backend != "torch":
                comparison.update(comparison_checks(reports["torch"], reports[backend], backend))
    encoder = encoders[backends[0]]
    device, dtype = str(encoder.checkpoint.device), str(encoder.checkpoint.dtype)
    return {
        "model": args.model,
        "device": device,
        "dtype": dtype.removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "cpu_budget": cpu_budget().describe(),
        "preprocess_workers": workers,
        "machine": platform.processor() or platform.machine(),
        "seconds_per_scenario": seconds,
        "rounds": rounds,
        "neighbour": args.neighbour,
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        # The first backend's figures, where single-backend runs have always put them.
        **first,
        "backends": reports,
        "comparison": comparison,
    }


def print_backend(report: dict[str, Any], title: str) -> None:
    print(f"\n{title}")
    print(f"| {'scenario':<30} | images/s | p50 ms | p99 ms | mean batch | / ceiling |")
    print(f"| {'-' * 30} | -------: | -----: | -----: | ---------: | --------: |")
    for s in report["scenarios"]:
        p50 = f"{s['p50_ms']:.1f}" if s["p50_ms"] is not None else "-"
        p99 = f"{s['p99_ms']:.1f}" if s["p99_ms"] is not None else "-"
        batch = f"{s['mean_batch']:.1f}" if s["mean_batch"] is not None else "-"
        print(
            f"| {s['name']:<30} | {s['images_per_s']:8.2f} | {p50:>6} | {p99:>6} "
            f"| {batch:>10} | {s['ratio']:9.2f} |"
        )
    for s in report["scenarios"]:
        if s.get("rounds"):
            rounds = ", ".join(f"{rate:.2f}" for rate in s["rounds"])
            print(f"{s['name']}: images/s by round {rounds} (median above)")
    latency = report["one_image_latency_ms"]
    print(
        f"\none image at a time, interleaved: in-process (decode + preprocess + forward) "
        f"{latency['in_process_ms']:.1f} ms, through the server {latency['server_ms']:.1f} ms "
        f"(server time outside its measured stages: {latency['server_overhead_ms']:.1f} ms)"
    )
    for check, value in report["checks"].items():
        print(f"{check}: {'n/a' if value is None else f'{value:.2f}'}")


def print_table(report: dict[str, Any]) -> None:
    heading = (
        f"{report['model']} {report['dtype']} on {report['device']} "
        f"({report['cores']} cores, CPUs {report['cpu_budget']}, torch threads "
        f"{report['torch_threads']}{', busy neighbour on one core' if report['neighbour'] else ''}"
        f"; load average {report['load_average_1min']['before']:.1f} before, "
        f"{report['load_average_1min']['after']:.1f} after)"
    )
    backends: dict[str, dict[str, Any]] = report["backends"]
    for name, backend in backends.items():
        print_backend(backend, f"{heading}: --backend {name} (served by {backend['served_by']})")
    if len(backends) < 2:
        return
    names = list(backends)
    base = names[0]
    print(f"\nside by side (ratios: each backend's images/s over {base}'s in the same row)")
    header = f"| {'scenario':<30} |" + "".join(
        f" {name} images/s | {name} p50 ms |" for name in names
    )
    print(header + "".join(f" {name} / {base} |" for name in names[1:]))
    print("| " + "-" * 30 + " |" + " ---: | ---: |" * len(names) + " ---: |" * (len(names) - 1))
    rows = [s["name"] for s in backends[base]["scenarios"]]
    for row in rows:
        cells = {
            name: next(s for s in backends[name]["scenarios"] if s["name"] == row) for name in names
        }
        line = f"| {row:<30} |"
        for name in names:
            p50 = cells[name]["p50_ms"]
            line += f" {cells[name]['images_per_s']:.2f} | {'-' if p50 is None else f'{p50:.1f}'} |"
        for name in names[1:]:
            line += f" {cells[name]['images_per_s'] / cells[base]['images_per_s']:.2f} |"
        print(line)
    for check, value in report["comparison"].items():
        print(f"{check}: {'n/a' if value is None else f'{value:.2f}'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B/32", help="a preset: ViT-B/32 or ViT-L/14")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--backends",
        type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
        default=["torch", "auto"],
        help="the servers' --backend values, measured side by side (auto on a GPU is torch, "
        "so there only the first runs)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="forward-pass threads (default: the server's)"
    )
    parser.add_argument(
        "--seconds", type=float, default=12.0, help="per scenario (the measured window)"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=3.0,
        help="seconds of load before each server scenario's window opens (steady state)",
    )
    parser.add_argument(
        "--callers", type=lambda t: [int(x) for x in t.split(",")], default=[1, 8, 32, 128]
    )
    parser.add_argument(
        "--ceiling-batches", type=lambda t: [int(x) for x in t.split(",")], default=[8, 16, 32]
    )
    parser.add_argument(
        "--preprocess-workers",
        type=int,
        default=available_cpus(),
        help="decode threads, in-process and in the server (the server's default: the CPUs "
        "this process may use)",
    )
    parser.add_argument(
        "--neighbour",
        action="store_true",
        help="run a busy process on one core throughout (a noisy neighbour)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat the ceiling and the server scenarios, alternating the backends' order; "
        "each figure is the median of its rounds",
    )
    parser.add_argument(
        "--device-preprocess",
        default="auto",
        choices=("auto", "on", "off"),
        help="the server's --device-preprocess, and the same for the in-process ceiling",
    )
    parser.add_argument(
        "--gpu-decode",
        action="store_true",
        help="the server's --gpu-decode, and nvJPEG in the in-process ceiling (CUDA only)",
    )
    parser.add_argument(
        "--no-naive", action="store_true", help="skip the batch-1 server (saves a server start)"
    )
    parser.add_argument("--quick", action="store_true", help="3 s per scenario, fewer batches")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "throughput.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 3.0
        args.ceiling_batches = args.ceiling_batches[:2]
    if resolve_device(args.device).type != "cpu" and len(args.backends) > 1:
        print(f"not on a CPU: only --backend {args.backends[0]} runs (auto is torch here)")
        args.backends = args.backends[:1]
    neighbour = None
    if args.neighbour:
        neighbour = multiprocessing.get_context("spawn").Process(target=busy_core, daemon=True)
        neighbour.start()
    try:
        report = asyncio.run(run(args))
    finally:
        if neighbour is not None:
            neighbour.terminate()
            neighbour.join()
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
