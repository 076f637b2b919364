"""The server's own work per item, against a bare grpc.aio server's, in one run.

    .venv/bin/python bench/overhead.py                   # every row, 8 s windows
    .venv/bin/python bench/overhead.py --seconds 4       # shorter
    .venv/bin/python bench/overhead.py --rows stream --profile /tmp/prof   # py-spy the server
    .venv/bin/python bench/overhead.py --protocol grpc --rounds 5   # medians of five rounds
    .venv/bin/python bench/overhead.py --protocol grpc --rounds 4 --before /tmp/prev
        # /tmp/prev: `git worktree add /tmp/prev <commit>`; both servers in every round

A near-free model (the tests' tiny 16-d CLIP, 32 px crops) makes the server's own
work visible: what it spends per item beyond decoding, preprocessing and the forward
pass. For each row, in one run on one machine:

- the server (clipvision-server, torch backend, default settings) in its own
  process, and a load generator in another, for a warm-up and a measured window;
- server CPU per item: the server process's CPU time (every thread) over the
  window, divided by the items answered in it;
- the pipeline's CPU per item in-process: decode + preprocess of the same 64x64
  JPEGs, and the tiny forward at batch 32 (for texts: tokenize + forward);
- the server's own work = the two subtracted;
- beside it (not the issue's measure), the same reference with its two parts looping at
  once in two threads, as the server's preprocessing pool and device thread run them,
  sharing the cores and the GIL: the server's work beyond that leaves out what those two
  threads cost each other (not what the loop, gRPC or the load generator cost them);
- the floor: a bare grpc.aio server in the same venv, whose handlers receive the
  same request messages (parsed by grpc) and answer a 16-float embedding, under
  the same load: its CPU per message (per item for the batch rows), on the same
  event loop as the server (``--loop``: uvloop where installed, as the server's default);
- own work / floor, the figure issue 20 sets targets for (at most 2x for the
  stream and unary rows, 8x for the 32-item batch rows);
- the same patterns over HTTP (`POST /v1/embeddings`, OpenAI's shape, base64 vectors
  as the SDKs ask; images as data: URIs with ``"modality": "image"``; HTTP/1.1, so one
  connection per caller): the HTTP layer's cost is their own work less the gRPC row's
  of the same pattern, in the same run (no bare floor: the gRPC one does not apply).

With ``--preset ViT-B/32`` (served with --dummy-weights) the same rows run on a real
model's compute: the protocol layers' share beside it (the own-work column is then
within the noise of the in-process forward pass).

It prints one table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import io
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clipvision.v1 import embedding_service_pb2 as pb  # noqa: E402
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc  # noqa: E402

PHOTOS = ROOT / "tests" / "data"
FORWARD_SIZES = (1, 2, 4, 8, 16)
DIMENSION = 16
BATCH = 32
TEXTS = [
    "a photo of a cat",
    "a photo of a dog sleeping on the sofa",
    "an aerial photograph of the city at night",
    "the quick brown fox jumps over the lazy dog",
    "a bowl of ramen with an egg",
    "a red bicycle leaning on a wall",
]


@dataclass(frozen=True)
class Row:
    """One load pattern: which RPC, how many callers on how many connections, items per call."""

    name: str
    modality: str  # image or text
    kind: str  # stream, unary or batch
    callers: int
    connections: int
    per_call: int = 1
    protocol: str = "grpc"  # or http: POST /v1/embeddings


ROWS = (
    Row("one EmbedImageStream", "image", "stream", 1, 1),
    Row("64 EmbedImage callers, 4 connections", "image", "unary", 64, 4),
    Row("4 callers x 32-image EmbedImages", "image", "batch", 4, 4, BATCH),
    Row("one EmbedTextStream", "text", "stream", 1, 1),
    Row("64 EmbedText callers, 4 connections", "text", "unary", 64, 4),
    Row("4 callers x 32-text EmbedTexts", "text", "batch", 4, 4, BATCH),
    Row("64 /v1/embeddings image callers", "image", "unary", 64, 64, 1, "http"),
    Row("4 callers x 32-image /v1/embeddings", "image", "batch", 4, 4, BATCH, "http"),
    Row("64 /v1/embeddings text callers", "text", "unary", 64, 64, 1, "http"),
    Row("4 callers x 32-text /v1/embeddings", "text", "batch", 4, 4, BATCH, "http"),
)
# The gRPC row each HTTP row is set against (same items per call, same callers).
GRPC_TWIN = {
    "64 /v1/embeddings image callers": "64 EmbedImage callers, 4 connections",
    "4 callers x 32-image /v1/embeddings": "4 callers x 32-image EmbedImages",
    "64 /v1/embeddings text callers": "64 EmbedText callers, 4 connections",
    "4 callers x 32-text /v1/embeddings": "4 callers x 32-text EmbedTexts",
}


def make_jpegs(count: int = 12) -> list[bytes]:
    """64x64 JPEGs cut from the test photographs, so that decoding costs what small images do."""
    images = []
    photos = sorted(PHOTOS.glob("*.[jp][pn]g"))
    for index in range(count):
        with Image.open(photos[index % len(photos)]) as photo:
            rgb = photo.convert("RGB")
        side = min(rgb.size)
        shift = (index // len(photos)) * side // 8
        box = (shift, 0, shift + side * 3 // 4, side * 3 // 4)
        buffer = io.BytesIO()
        rgb.crop(box).resize((64, 64), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


# -- the floor: a bare grpc.aio server ----------------------------------------------------------


class BareServicer(pb_grpc.EmbeddingServiceServicer):
    """Receives the same messages (grpc parses them) and answers a constant 16-float embedding."""

    def __init__(self) -> None:
        self.values = [0.25] * DIMENSION

    def _embedding(self) -> pb.Embedding:
        return pb.Embedding(values=self.values, model="bare", normalized=True)

    async def EmbedImage(self, request: pb.EmbedImageRequest, context: Any) -> Any:  # noqa: N802
        return pb.EmbedImageResponse(embedding=self._embedding())

    async def EmbedImages(self, request: pb.EmbedImagesRequest, context: Any) -> Any:  # noqa: N802
        results = [pb.EmbedImagesResult(embedding=self._embedding()) for _ in request.images]
        return pb.EmbedImagesResponse(results=results)

    async def EmbedImageStream(self, request_iterator: Any, context: Any) -> Any:  # noqa: N802
        async for request in request_iterator:
            yield pb.EmbedImageStreamResponse(id=request.id, embedding=self._embedding())

    async def EmbedText(self, request: pb.EmbedTextRequest, context: Any) -> Any:  # noqa: N802
        return pb.EmbedTextResponse(embedding=self._embedding())

    async def EmbedTexts(self, request: pb.EmbedTextsRequest, context: Any) -> Any:  # noqa: N802
        results = [pb.EmbedTextsResult(embedding=self._embedding()) for _ in request.texts]
        return pb.EmbedTextsResponse(results=results)

    async def EmbedTextStream(self, request_iterator: Any, context: Any) -> Any:  # noqa: N802
        async for request in request_iterator:
            yield pb.EmbedTextStreamResponse(id=request.id, embedding=self._embedding())

    async def Classify(self, request: pb.ClassifyRequest, context: Any) -> Any:  # noqa: N802
        return pb.ClassifyResponse()

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Any) -> Any:  # noqa: N802
        return pb.GetModelInfoResponse()


async def run_bare_server() -> None:
    """The floor's process: listen on 127.0.0.1:0, print the port, serve until killed."""
    server = grpc.aio.server()
    pb_grpc.add_EmbeddingServiceServicer_to_server(BareServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await server.wait_for_termination()


class ServerUnderTest:
    """A server process (clipvision or the bare floor), its port read from its log."""

    def __init__(self, command: list[str], ready: str, env: dict[str, str] | None = None) -> None:
        self.command = command
        self.ready = ready
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.metrics_port = 0
        self.http_port = 0
        self.log: list[str] = []

    def __enter__(self) -> ServerUnderTest:
        self.process = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=self.env
        )
        assert self.process.stderr is not None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = self.process.stderr.readline().decode()
            if not line:
                raise RuntimeError("the server exited during start-up:\n" + "".join(self.log))
            self.log.append(line)
            if match := re.search(r"listening on [\d.]+:(\d+)", line):
                self.port = int(match.group(1))
            if match := re.search(r"metrics on http://[\d.]+:(\d+)/", line):
                self.metrics_port = int(match.group(1))
            if match := re.search(r"http on http://[\d.]+:(\d+)", line):
                self.http_port = int(match.group(1))
            if self.port and self.ready in line:
                break
        else:
            raise RuntimeError("the server did not start in time")
        # Keep reading its log, so that it never blocks on a full pipe.
        stderr, log = self.process.stderr, self.log

        def drain() -> None:
            for raw in stderr:
                log.append(raw.decode())

        threading.Thread(target=drain, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def cpu_seconds(self) -> float:
        """The process's CPU time so far, every thread, user and system."""
        assert self.process is not None
        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)

    def batches(self) -> tuple[float, float]:
        """(items, batches) the server's device has run so far, both modalities, from /metrics;
        (0, 0) for the bare server, which has no metrics."""
        if not self.metrics_port:
            return 0.0, 0.0
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        items = count = 0.0
        for line in text.splitlines():
            if line.startswith(("clipvision_batch_size_sum", "clipvision_text_batch_size_sum")):
                items += float(line.rsplit(" ", 1)[1])
            elif line.startswith(
                ("clipvision_batch_size_count", "clipvision_text_batch_size_count")
            ):
                count += float(line.rsplit(" ", 1)[1])
        return items, count

    def thread_counters(self) -> dict[str, tuple[float, float, float]]:
        """Per kind of thread, so far: CPU seconds, of which in the kernel, and context
        switches (voluntary and not). The kinds: the event loop's (the main thread), gRPC
        core's (named by gRPC), the preprocessing pool's and the device thread's with the
        runtime's workers it started (named by the server), and the rest."""
        assert self.process is not None
        pid = self.process.pid
        totals: dict[str, tuple[float, float, float]] = {}
        ticks = os.sysconf("SC_CLK_TCK")
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                stat = (task / "stat").read_text()
                comm = (task / "comm").read_text().strip()
                status = (task / "status").read_text()
            except OSError:
                continue
            fields = stat.rpartition(")")[2].split()
            user, system = int(fields[11]) / ticks, int(fields[12]) / ticks
            switches = sum(
                int(line.split()[1])
                for line in status.splitlines()
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"))
            )
            if int(task.name) == pid:
                kind = "event loop"
            elif comm.startswith(("grpc", "event_engine", "lifeguard")):
                kind = "grpc core"
            elif comm.startswith("cv-"):  # the server names its pools (ops/threads.py)
                kind = comm.removeprefix("cv-")
            else:
                kind = "other threads"
            seconds, kernel, count = totals.get(kind, (0.0, 0.0, 0.0))
            totals[kind] = (seconds + user + system, kernel + system, count + switches)
        return totals


def clipvision_server(checkpoint: Path, args: Any, tree: str = "") -> ServerUnderTest:
    """This tree's server, or with ``tree`` (a checkout of another commit) that tree's."""
    model = [args.preset, "--dummy-weights"] if args.preset else [f"tiny={checkpoint}"]
    command = [
        sys.executable,
        "-m",
        "clipvision.server.cli",
        "--model",
        *model,
        "--backend",
        args.backend,
        "--device",
        args.device,
        *(["--threads", str(args.threads)] if args.threads else []),
        "--onnx-cache-dir",
        str(checkpoint.parent / "onnx"),
        "--address",
        "127.0.0.1:0",
        "--metrics-address",
        "127.0.0.1:0",
        *(["--http-address", "127.0.0.1:0"] if args.protocol != "grpc" else []),
        # auto is the server's default: not passed, so trees older than --loop run too.
        *(["--loop", args.loop] if args.loop != "auto" else []),
        *args.server_flag,
    ]
    env = None
    if tree:
        env = {**os.environ, "PYTHONPATH": f"{tree}/server{os.pathsep}{tree}/client"}
    return ServerUnderTest(command, f"serving {args.preset or 'tiny'}", env)


def bare_server(args: Any) -> ServerUnderTest:
    command = [sys.executable, __file__, "--bare-server", "--loop", args.floor_loop or args.loop]
    return ServerUnderTest(command, "listening on")


# -- the load generator, in its own process -----------------------------------------------------


def load_process(
    port: int | tuple[int, int, str],
    row: Row,
    images: list[bytes],
    warmup: float,
    seconds: float,
    pipe: multiprocessing.connection.Connection,
) -> None:
    """Run ``row`` against ``port``; send 'open' and 'close' as the window opens and closes,
    then the items answered inside it and the window's length. ``port`` is the gRPC port,
    or (gRPC, HTTP) ports."""
    grpc_port, http_port, model = port if isinstance(port, tuple) else (port, 0, "tiny")
    run = (
        _load_http(http_port, model, row, images, warmup, seconds, pipe)
        if row.protocol == "http"
        else (_load(grpc_port, row, images, warmup, seconds, pipe))
    )
    asyncio.run(run)


async def _window(
    tasks: list[asyncio.Task[None]],
    state: dict[str, bool],
    warmup: float,
    seconds: float,
    pipe: multiprocessing.connection.Connection,
) -> float:
    """Open the counting window after the warm-up, close it, stop the callers: its length."""
    await asyncio.sleep(warmup)
    state["counting"] = True
    opened = time.perf_counter()
    pipe.send("open")
    await asyncio.sleep(seconds)
    state["counting"] = False
    closed = time.perf_counter()
    pipe.send("close")
    state["running"] = False
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return closed - opened


async def _load_http(
    port: int,
    model: str,
    row: Row,
    images: list[bytes],
    warmup: float,
    seconds: float,
    pipe: multiprocessing.connection.Connection,
) -> None:
    import aiohttp  # tritonclient[http]'s dependency, in the dev extra

    answered = 0
    state = {"counting": False, "running": True}
    if row.modality == "image":
        items = ["data:image/jpeg;base64," + base64.b64encode(data).decode() for data in images]
    else:
        items = TEXTS
    bodies = [
        json.dumps(
            {
                "model": model,
                "modality": row.modality,
                "encoding_format": "base64",
                "input": [items[(i + j) % len(items)] for j in range(row.per_call)]
                if row.kind == "batch"
                else items[i % len(items)],
            }
        ).encode()
        for i in range(len(items))
    ]
    url = f"http://127.0.0.1:{port}/v1/embeddings"
    headers = {"content-type": "application/json"}

    async def caller(session: aiohttp.ClientSession) -> None:
        nonlocal answered
        index = 0
        while state["running"]:
            async with session.post(url, data=bodies[index % len(bodies)], headers=headers) as r:
                answer = await r.json()
            index += 1
            if r.status != 200 or len(answer["data"]) != row.per_call:
                raise RuntimeError(f"HTTP {r.status}: {str(answer)[:200]}")
            if state["counting"]:
                answered += row.per_call

    async with contextlib.AsyncExitStack() as stack:
        # HTTP/1.1 has one call in flight per connection: a connection per caller.
        sessions = [
            await stack.enter_async_context(
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=row.callers))
            )
            for _ in range(row.connections)
        ]
        callers = [
            asyncio.create_task(caller(sessions[i % len(sessions)])) for i in range(row.callers)
        ]
        window = await _window(callers, state, warmup, seconds, pipe)
    pipe.send((answered, window))


async def _load(
    port: int,
    row: Row,
    images: list[bytes],
    warmup: float,
    seconds: float,
    pipe: multiprocessing.connection.Connection,
) -> None:
    answered = 0
    state = {"counting": False, "running": True}

    def count(items: int) -> None:
        nonlocal answered
        if state["counting"]:
            answered += items

    requests = _requests(row, images)
    async with contextlib.AsyncExitStack() as stack:
        channels = [
            await stack.enter_async_context(
                grpc.aio.insecure_channel(
                    f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
                )
            )
            for _ in range(row.connections)
        ]
        stubs = [pb_grpc.EmbeddingServiceStub(channel) for channel in channels]
        callers = [
            asyncio.create_task(_caller(row, stubs[i % len(stubs)], requests, count, state))
            for i in range(row.callers)
        ]
        window = await _window(callers, state, warmup, seconds, pipe)
    pipe.send((answered, window))


def _requests(row: Row, images: list[bytes]) -> list[Any]:
    """Messages built once, so that the load generator spends its CPU on the wire, not here."""
    items = [pb.Image(content=data) for data in images]
    if row.modality == "image":
        if row.kind == "stream":
            return [
                pb.EmbedImageStreamRequest(id=str(i), image=items[i % len(items)])
                for i in range(1024)
            ]
        if row.kind == "unary":
            return [pb.EmbedImageRequest(image=item) for item in items]
        return [
            pb.EmbedImagesRequest(images=[items[(i + j) % len(items)] for j in range(row.per_call)])
            for i in range(len(items))
        ]
    if row.kind == "stream":
        return [
            pb.EmbedTextStreamRequest(id=str(i), text=TEXTS[i % len(TEXTS)]) for i in range(1024)
        ]
    if row.kind == "unary":
        return [pb.EmbedTextRequest(text=text) for text in TEXTS]
    return [
        pb.EmbedTextsRequest(texts=[TEXTS[(i + j) % len(TEXTS)] for j in range(row.per_call)])
        for i in range(len(TEXTS))
    ]


async def _caller(
    row: Row,
    stub: pb_grpc.EmbeddingServiceStub,
    requests: list[Any],
    count: Callable[[int], None],
    state: dict[str, bool],
) -> None:
    method: Any
    if row.kind == "stream":

        async def stream() -> AsyncIterator[Any]:
            index = 0
            while state["running"]:
                yield requests[index % len(requests)]
                index += 1

        method = stub.EmbedImageStream if row.modality == "image" else stub.EmbedTextStream
        async for response in method(stream()):
            if response.HasField("error"):
                raise RuntimeError(response.error.message)
            count(1)
        return
    if row.kind == "unary":
        method = stub.EmbedImage if row.modality == "image" else stub.EmbedText
    else:
        method = stub.EmbedImages if row.modality == "image" else stub.EmbedTexts
    index = 0
    while state["running"]:
        response = await method(requests[index % len(requests)], timeout=60)
        index += 1
        if row.kind == "batch" and any(r.HasField("error") for r in response.results):
            raise RuntimeError("a batch item failed")
        count(row.per_call)


@dataclass
class Measured:
    """One row against one server."""

    items_per_s: float
    cpu_ms_per_item: float
    threads_ms_per_item: dict[str, float]
    kernel_ms_per_item: float
    """Of the CPU, what the kernel spent for the server (system time, every thread)."""
    switches_per_item: dict[str, float]
    """Context switches of each kind of thread, voluntary (a wait) or not (preempted)."""
    mean_batch: float


def measure(server: ServerUnderTest, row: Row, images: list[bytes], args: Any) -> Measured:
    """Run ``row`` in a load process; the server's CPU time is read as the window opens/closes."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    ports = (server.port, server.http_port, args.preset or "tiny")
    load = context.Process(
        target=load_process, args=(ports, row, images, args.warmup, args.seconds, theirs)
    )
    load.start()
    profiler: subprocess.Popen[bytes] | None = None
    try:
        assert ours.recv() == "open"
        cpu_open = server.cpu_seconds()
        threads_open = server.thread_counters()
        batches_open = server.batches()
        if args.profile and server.process is not None and server.ready != "listening on":
            profiler = _profile(server.process.pid, row, args)
        assert ours.recv() == "close"
        cpu_close = server.cpu_seconds()
        threads_close = server.thread_counters()
        batches_close = server.batches()
        answered, window = ours.recv()
    finally:
        load.join(60)
        if load.is_alive():
            load.kill()
        if profiler is not None:
            profiler.wait(60)
    if not answered:
        raise RuntimeError(f"{row.name}: nothing was answered in the window")
    # Per kind: CPU seconds, kernel seconds, switches, each over the window, per item.
    spent = {
        kind: [
            (now - then) / answered
            for now, then in zip(close, threads_open.get(kind, (0.0, 0.0, 0.0)), strict=True)
        ]
        for kind, close in threads_close.items()
    }
    items = batches_close[0] - batches_open[0]
    batches = batches_close[1] - batches_open[1]
    return Measured(
        items_per_s=answered / window,
        cpu_ms_per_item=(cpu_close - cpu_open) * 1000 / answered,
        threads_ms_per_item={kind: each[0] * 1000 for kind, each in spent.items()},
        kernel_ms_per_item=sum(each[1] for each in spent.values()) * 1000,
        switches_per_item={kind: each[2] for kind, each in spent.items()},
        mean_batch=items / batches if batches else 0.0,
    )


def _profile(pid: int, row: Row, args: Any) -> subprocess.Popen[bytes]:
    """py-spy records the server's threads (idle ones left out) for the window."""
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^a-z0-9]+", "-", row.name.lower()).strip("-")
    return subprocess.Popen(
        [
            "py-spy",
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(args.seconds)),
            "--rate",
            "200",
            "--format",
            args.profile_format,
            "--output",
            str(out / f"{name}.{'svg' if args.profile_format == 'flamegraph' else 'txt'}"),
            # Native frames (grpc's Cython, uvloop, libc) need py-spy to stop the process
            # for each sample, which slows it many times: shares, not rates, then.
            *(["--native"] if args.profile_native else ["--nonblocking"]),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


# -- the pipeline in-process --------------------------------------------------------------------


def pipeline_cpu_ms(checkpoint: Path, images: list[bytes], args: Any) -> dict[str, float]:
    """CPU ms per item of what the server must do anyway: decode + preprocess and the forward
    pass at batch 32 for images, tokenize and the forward pass for texts, on the backend
    and device the server picks for the same flags (its ONNX export is reused there)."""
    from clipvision.server.config.limits import ImageLimits
    from clipvision.server.config.settings import ModelSpec
    from clipvision.server.runtime.backends import prepare_image_runner, prepare_text_runner
    from clipvision.server.runtime.checkpoint import (
        load_checkpoint,
        resolve_device,
        resolve_dtype,
    )
    from clipvision.server.runtime.image_encoder import ClipImageEncoder
    from clipvision.server.runtime.text_encoder import ClipTextEncoder

    device = resolve_device(args.device)
    spec = ModelSpec.parse(args.preset or f"tiny={checkpoint}")
    loaded = load_checkpoint(
        spec, device=device, dtype=resolve_dtype("auto", device), dummy_weights=bool(args.preset)
    )
    runners: dict[str, Any] = {
        "backend": args.backend,
        "threads": args.threads or None,
        "cache_dir": str(checkpoint.parent / "onnx"),
    }
    image_runner = prepare_image_runner("tiny", loaded, **runners)
    text_runner = prepare_text_runner("tiny", loaded, **runners)
    encoder = ClipImageEncoder("tiny", str(checkpoint), loaded, ImageLimits(), image_runner)
    assert loaded.text is not None
    texts = ClipTextEncoder("tiny", loaded.text, device, 65536, text_runner)
    encoder.warm_up((1, BATCH))
    texts.warm_up((1, BATCH))
    rounds = 3 if args.preset else 40

    def cpu(work: Callable[[], object], items: int) -> float:
        """The median of five timings of ``rounds`` calls: one timing of a fraction of a second
        moved the reference by up to 20 % from run to run, and the own work with it."""
        work()
        timings = []
        for _ in range(5):
            started = time.process_time()
            for _ in range(rounds):
                work()
            timings.append((time.process_time() - started) * 1000 / (rounds * items))
        return statistics.median(timings)

    batch = [images[i % len(images)] for i in range(BATCH)]
    pixels = [encoder.preprocess(data) for data in batch]
    prose = [TEXTS[i % len(TEXTS)] for i in range(BATCH)]
    ids = [texts.tokenize(text, True).ids for text in prose]
    preprocess = cpu(lambda: [encoder.preprocess(data) for data in batch], BATCH)
    forward = cpu(lambda: encoder.embed_batch(pixels), BATCH)
    tokenize = cpu(lambda: [texts.tokenize(text, True) for text in prose], BATCH)
    text_forward = cpu(lambda: texts.embed_batch(ids), BATCH)
    # The forward pass at smaller batches too: the server's batches are what the device is
    # free to take, often far below 32 with a near-free model (read beside its mean batch).
    by_batch: dict[str, float] = {}
    for size in FORWARD_SIZES:
        by_batch[f"image_forward_{size}"] = cpu(
            functools.partial(encoder.embed_batch, pixels[:size]), size
        )
        by_batch[f"text_forward_{size}"] = cpu(
            functools.partial(texts.embed_batch, ids[:size]), size
        )
    # The same work as the server's threads do it: preprocessing in one thread (light jobs
    # run one chunk at a time) while another forwards, at once, sharing the cores and the
    # GIL (but with no event loop, gRPC or load generator beside them).
    image_shared = side_by_side(
        lambda: len([encoder.preprocess(data) for data in batch]),
        lambda: len(encoder.embed_batch(pixels)),
    )
    text_shared = side_by_side(
        lambda: len([texts.tokenize(text, True) for text in prose]),
        lambda: len(texts.embed_batch(ids)),
    )
    return {
        **by_batch,
        "image_preprocess": preprocess,
        "image_forward": forward,
        "image": preprocess + forward,
        "text_tokenize": tokenize,
        "text_forward": text_forward,
        "text": tokenize + text_forward,
        "image_preprocess_shared": image_shared[0],
        "image_forward_shared": image_shared[1],
        "image_shared": sum(image_shared),
        "text_tokenize_shared": text_shared[0],
        "text_forward_shared": text_shared[1],
        "text_shared": sum(text_shared),
    }


def side_by_side(prepare: Callable[[], int], forward: Callable[[], int]) -> tuple[float, float]:
    """CPU ms per item of ``prepare`` and ``forward`` looping at once in two threads (each
    returns the items it did), the median of three one-second windows: the first's from its
    thread's CPU time, the second's from the rest of the process's (its thread and the
    runtime's intra-op workers; the main thread sleeps)."""
    windows = [_side_by_side_once(prepare, forward) for _ in range(3)]
    return (
        statistics.median(first for first, _ in windows),
        statistics.median(second for _, second in windows),
    )


def _side_by_side_once(
    prepare: Callable[[], int], forward: Callable[[], int]
) -> tuple[float, float]:
    stop = threading.Event()
    done = [0, 0]
    prepare_cpu = [0.0]

    def run_prepare() -> None:
        started = time.thread_time()
        while True:  # once at least, however slow (a real model's batch takes seconds)
            done[0] += prepare()
            if stop.is_set():
                break
        prepare_cpu[0] = time.thread_time() - started

    def run_forward() -> None:
        while True:
            done[1] += forward()
            if stop.is_set():
                break

    threads = [threading.Thread(target=run_prepare), threading.Thread(target=run_forward)]
    started = time.process_time()
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join()
    total = time.process_time() - started
    return prepare_cpu[0] * 1000 / done[0], (total - prepare_cpu[0]) * 1000 / done[1]


# -- the run ------------------------------------------------------------------------------------


def build_checkpoint(directory: Path) -> Path:
    from tests.checkpoints import build_clip_model

    target = directory / "tiny-clip"
    build_clip_model(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured window per row")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before it")
    parser.add_argument(
        "--rows",
        default="",
        help="comma-separated words a row's name must contain (stream, unary, batch, image, "
        "text); default every row",
    )
    parser.add_argument(
        "--backend", default="auto", help="the server's --backend (auto: ONNX Runtime on a CPU)"
    )
    parser.add_argument(
        "--protocol",
        default="both",
        choices=("grpc", "http", "both"),
        help="the gRPC rows, the /v1/embeddings rows, or both (a server without HTTP: grpc)",
    )
    parser.add_argument(
        "--preset",
        default="",
        help="serve this preset with --dummy-weights (e.g. ViT-B/32) instead of the tiny model: "
        "the layers' cost beside a real model's compute",
    )
    parser.add_argument("--device", default="auto", help="the server's --device")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads of the forward pass, in the server (its --threads) and in the "
        "in-process pipeline alike; 0: the server's default, every CPU",
    )
    parser.add_argument(
        "--loop",
        default="auto",
        choices=("auto", "uvloop", "asyncio"),
        help="the event loop of the server and of the bare floor (the server's --loop)",
    )
    parser.add_argument(
        "--floor-loop",
        default="",
        choices=("", "auto", "uvloop", "asyncio"),
        help="the bare floor's event loop, where it differs (asyncio: for a server tree "
        "from before --loop, which runs on asyncio's)",
    )
    parser.add_argument("--server-flag", action="append", default=[], help="extra server flags")
    parser.add_argument("--profile", default="", help="py-spy the server into this folder")
    parser.add_argument(
        "--profile-format", default="raw", choices=("raw", "flamegraph", "speedscope")
    )
    parser.add_argument(
        "--profile-native",
        action="store_true",
        help="with --profile: native frames too (the server runs far slower meanwhile)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat the reference, the floor and the server this many times (each round "
        "alternating which goes first); every figure is the median of the rounds",
    )
    parser.add_argument(
        "--before",
        default="",
        help="a checkout of another commit (git worktree add): its server is measured in "
        "every round too, beside this tree's (which goes first swaps every round: give an "
        "even --rounds), and the two are set against each other",
    )
    parser.add_argument("--no-floor", action="store_true", help="skip the bare server")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    parser.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare_server:
        # On the event loop the server runs on: the floor is grpc.aio's cost on it (chosen
        # here as the server's --loop chooses, without importing a server tree).
        factory = None
        if args.loop != "asyncio":
            try:
                import uvloop

                factory = uvloop.new_event_loop
            except ModuleNotFoundError:
                if args.loop == "uvloop":
                    raise
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(run_bare_server())
        return 0
    wanted = [word.strip() for word in args.rows.split(",") if word.strip()]
    rows = [
        row
        for row in ROWS
        if all(word in (row.kind, row.modality) or word in row.name for word in wanted)
        and args.protocol in ("both", row.protocol)
    ]
    images = make_jpegs()
    threads = max(1, len(os.sched_getaffinity(0)))
    results: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": threads,
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "forward_threads": args.threads or "default",
        },
        "rows": [],
    }
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = build_checkpoint(Path(directory))
        for number in range(args.rounds):
            inprocess = pipeline_cpu_ms(checkpoint, images, args)
            # Ordered so that a machine drifting through the run favours no side: the two
            # servers swap every round (an even number of rounds balances them), the floor
            # goes first or last every other round.
            floor: RowsOf = ("floor", functools.partial(floor_rows, rows, images, args))
            servers: list[RowsOf] = [
                ("after", functools.partial(server_rows, checkpoint, rows, images, args))
            ]
            if args.before:
                before = functools.partial(server_rows, checkpoint, rows, images, args, args.before)
                servers.append(("before", before))
            if number % 2:
                servers.reverse()
            parts = [floor, *servers]
            if (number // 2 if args.before else number) % 2:
                parts = parts[1:] + parts[:1]
            measured = {name: run() for name, run in parts}
            one = {
                "in_process_ms": inprocess,
                "rows": round_entries(rows, inprocess, measured["floor"], measured["after"]),
            }
            if args.before:
                one["before_rows"] = round_entries(
                    rows, inprocess, measured["floor"], measured["before"]
                )
            rounds.append(one)
    results["rounds"] = rounds
    results["in_process_ms"] = median_of([one["in_process_ms"] for one in rounds])
    for key in ("rows", "before_rows") if args.before else ("rows",):
        results[key] = [
            median_of([one[key][index] for one in rounds]) for index in range(len(rows))
        ]
        for index, entry in enumerate(results[key]):
            if "own_over_floor" in entry and len(rounds) > 1:
                entry["own_over_floor_rounds"] = [
                    one[key][index]["own_over_floor"] for one in rounds
                ]
    if args.before:
        results["before"] = args.before
        results["after_over_before"] = [
            {
                "row": row.name,
                "own_ms_per_round": [
                    (
                        one["before_rows"][index]["own_ms_per_item"],
                        one["rows"][index]["own_ms_per_item"],
                    )
                    for one in rounds
                ],
                "median_ratio": statistics.median(
                    one["rows"][index]["own_ms_per_item"]
                    / one["before_rows"][index]["own_ms_per_item"]
                    for one in rounds
                ),
            }
            for index, row in enumerate(rows)
        ]
    print_table(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


# A part of a round: its name, and the run measuring every row against it.
RowsOf = tuple[str, Callable[[], dict[str, "Measured"]]]


def floor_rows(rows: list[Row], images: list[bytes], args: Any) -> dict[str, Measured]:
    """The gRPC rows against a fresh bare floor (none with --no-floor)."""
    if args.no_floor:
        return {}
    with bare_server(args) as bare:
        return {
            row.name: measure(bare, row, images, args) for row in rows if row.protocol == "grpc"
        }


def server_rows(
    checkpoint: Path, rows: list[Row], images: list[bytes], args: Any, tree: str = ""
) -> dict[str, Measured]:
    """Every row against a fresh clipvision server (``tree``'s: see clipvision_server)."""
    with clipvision_server(checkpoint, args, tree) as server:
        return {row.name: measure(server, row, images, args) for row in rows}


def round_entries(
    rows: list[Row],
    inprocess: dict[str, float],
    floor: dict[str, Measured],
    ours: dict[str, Measured],
) -> list[dict[str, Any]]:
    """One round's figures per row: the server's, the floor's, and the two set against
    each other and against the in-process reference measured in the same round."""
    entries = []
    for row in rows:
        measured = ours[row.name]
        pipeline = inprocess[row.modality]
        own = measured.cpu_ms_per_item - pipeline
        # Against the reference whose two threads share the cores (not the measure).
        shared_own = measured.cpu_ms_per_item - inprocess[f"{row.modality}_shared"]
        entry: dict[str, Any] = {
            "row": asdict(row),
            "items_per_s": measured.items_per_s,
            "server_cpu_ms_per_item": measured.cpu_ms_per_item,
            "pipeline_cpu_ms_per_item": pipeline,
            "own_ms_per_item": own,
            "own_beyond_shared_ms_per_item": shared_own,
            "threads_ms_per_item": measured.threads_ms_per_item,
            "kernel_ms_per_item": measured.kernel_ms_per_item,
            "switches_per_item": measured.switches_per_item,
            "mean_batch": measured.mean_batch,
        }
        if row.name in floor:
            base = floor[row.name]
            entry["floor_items_per_s"] = base.items_per_s
            entry["floor_cpu_ms_per_item"] = base.cpu_ms_per_item
            entry["floor_threads_ms_per_item"] = base.threads_ms_per_item
            entry["floor_kernel_ms_per_item"] = base.kernel_ms_per_item
            entry["floor_switches_per_item"] = base.switches_per_item
            entry["own_over_floor"] = own / base.cpu_ms_per_item
            entry["own_beyond_shared_over_floor"] = shared_own / base.cpu_ms_per_item
            entry["target"] = 8.0 if row.kind == "batch" else 2.0
        twin = GRPC_TWIN.get(row.name)
        if twin in ours:
            entry["grpc_twin"] = twin
            entry["http_layer_ms_per_item"] = own - (
                ours[twin].cpu_ms_per_item - inprocess[row.modality]
            )
        entries.append(entry)
    return entries


def median_of(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The rounds' entries as one: each number (and each number of a dict) their median,
    everything else the first round's."""
    merged: dict[str, Any] = {}
    for key, first in entries[0].items():
        values = [entry[key] for entry in entries if key in entry]
        if isinstance(first, float | int) and not isinstance(first, bool):
            merged[key] = statistics.median(values)
        elif isinstance(first, dict) and all(isinstance(v, float) for v in first.values()):
            merged[key] = median_of(values)
        else:
            merged[key] = first
    return merged


def print_table(results: dict[str, Any]) -> None:
    machine = results["machine"]
    inprocess = results["in_process_ms"]
    print(
        f"\n{machine['cpu']}, {machine['cpus']} CPUs, Python {machine['python']}, "
        f"grpcio {machine['grpcio']}, forward threads {machine.get('forward_threads', 'default')}; "
        f"in-process per item: image "
        f"{inprocess['image_preprocess']:.3f} ms preprocess + {inprocess['image_forward']:.3f} ms "
        f"forward, text {inprocess['text_tokenize']:.3f} ms tokenize + "
        f"{inprocess['text_forward']:.3f} ms forward (batch {BATCH}); the same side by side "
        f"in two threads: image {inprocess['image_preprocess_shared']:.3f} + "
        f"{inprocess['image_forward_shared']:.3f} ms, text "
        f"{inprocess['text_tokenize_shared']:.3f} + {inprocess['text_forward_shared']:.3f} ms"
    )
    if len(results.get("rounds", ())) > 1:
        print(
            f"the median of {len(results['rounds'])} rounds (each ratio in brackets, in "
            "the order run)"
        )
    if "before_rows" in results:
        print(f"\nbefore: the server of {results['before']}")
        print_rows(results["before_rows"], inprocess)
        print("\nafter: this tree's server")
    print_rows(results["rows"], inprocess)
    if "after_over_before" in results:
        print("\nown work after / before, the median of the rounds' ratios (before -> after ms):")
        for compared in results["after_over_before"]:
            pairs = ", ".join(f"{b:.3f} -> {a:.3f}" for b, a in compared["own_ms_per_round"])
            print(f"- {compared['row']}: {compared['median_ratio']:.2f} ({pairs})")


def print_rows(entries: list[dict[str, Any]], inprocess: dict[str, float]) -> None:
    """One server's table, then its CPU per item by thread."""
    print()
    header = (
        "| pattern | server items/s | server CPU per item | of which pipeline (in-process) "
        "| the server's own work | bare grpc.aio per item | own / bare (target) |"
    )
    print(header)
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for entry in entries:
        floor = entry.get("floor_cpu_ms_per_item")
        ratio = entry.get("own_over_floor")
        versus = f"{ratio:.1f}x (<= {entry.get('target', 0):g}x)" if ratio is not None else "-"
        if "own_over_floor_rounds" in entry:
            versus += " [" + ", ".join(f"{r:.1f}" for r in entry["own_over_floor_rounds"]) + "]"
        if "http_layer_ms_per_item" in entry:
            versus = f"HTTP layer {entry['http_layer_ms_per_item']:+.3f} ms over gRPC's"
        print(
            f"| {entry['row']['name']} | {entry['items_per_s']:,.0f} "
            f"| {entry['server_cpu_ms_per_item']:.3f} ms "
            f"| {entry['pipeline_cpu_ms_per_item']:.3f} ms "
            f"| {entry['own_ms_per_item']:.3f} ms "
            f"| {f'{floor:.3f} ms' if floor is not None else '-'} "
            f"| {versus} |"
        )
    print("\nserver CPU per item by thread (context switches per item):")
    for entry in entries:
        split = by_thread(entry["threads_ms_per_item"], entry.get("switches_per_item", {}))
        bare = by_thread(
            entry.get("floor_threads_ms_per_item", {}), entry.get("floor_switches_per_item", {})
        )
        kernel = f"; in the kernel {entry['kernel_ms_per_item']:.3f} ms"
        if "floor_kernel_ms_per_item" in entry:
            kernel += f" (bare {entry['floor_kernel_ms_per_item']:.3f} ms)"
        at_batch = forward_at(inprocess, entry["row"]["modality"], entry["mean_batch"])
        beyond = entry["own_beyond_shared_ms_per_item"]
        shared = f"; own work beyond the side-by-side reference {beyond:.3f} ms"
        if "own_beyond_shared_over_floor" in entry:
            shared += f", {entry['own_beyond_shared_over_floor']:.1f}x bare"
        print(
            f"- {entry['row']['name']}: {split}{kernel}; mean batch {entry['mean_batch']:.1f} "
            f"(in-process forward at that batch {at_batch:.3f} ms)"
            + (f" (bare grpc.aio: {bare})" if bare else "")
            + shared
        )


def by_thread(cpu_ms: dict[str, float], switches: dict[str, float]) -> str:
    """CPU per item of each kind of thread, with its context switches per item, and their
    sum: a hand-over between threads costs a switch each way, and on busy cores the one
    woken often preempts the one running."""
    if not cpu_ms:
        return ""
    parts = [
        f"{kind} {ms:.3f} ms ({switches.get(kind, 0.0):.1f})" for kind, ms in sorted(cpu_ms.items())
    ]
    return ", ".join(parts) + f", {sum(switches.values()):.1f} switches in all"


def forward_at(inprocess: dict[str, float], modality: str, batch: float) -> float:
    """The in-process forward's CPU per item at a (mean) batch size, interpolated."""
    points = [(size, inprocess[f"{modality}_forward_{size}"]) for size in FORWARD_SIZES]
    points.append((BATCH, inprocess[f"{modality}_forward"]))
    if batch <= points[0][0]:
        return points[0][1]
    for (low, low_ms), (high, high_ms) in itertools.pairwise(points):
        if batch <= high:
            return low_ms + (high_ms - low_ms) * (batch - low) / (high - low)
    return points[-1][1]


if __name__ == "__main__":
    sys.exit(main())
