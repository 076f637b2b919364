"""Attack bench: hostile traffic of issues 11 and 21 against a real server, one after another.

    .venv/bin/python bench/attack.py                 # ViT-B/32 with dummy weights, CPU
    .venv/bin/python bench/attack.py --tiny          # a tiny test checkpoint: quicker
    .venv/bin/python bench/attack.py --only cancel,metrics_half_requests

It starts clipvision-server as a child process on 127.0.0.1 (with a bearer token,
metrics on), then runs each attack, bounded in count and time, while a bystander
makes ordinary EmbedImage calls with a real photo and a health probe asks
grpc.health.v1 Check every 2 s. Per attack it reports what the attacker sent and
saw, the bystander's and the probe's results, the server's RSS, threads and open
file descriptors (before, at peak, after) and whether the port still answers; a
server that stops answering is restarted for the next attack. The table (markdown,
for docs/SECURITY.md) and the raw figures (JSON) go to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psutil
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
# The raw HTTP/2 toolkit lives with the tests, which the bench shares.
sys.path.insert(0, str(ROOT))
from tests.h2wire import WireConnection  # noqa: E402
from tests.scrape import scrape, value  # noqa: E402

TOKEN = "attack-bench-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
Detail = TypeVar("Detail", error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo)
SERVICE = "/clipvision.v1.EmbeddingService/"
EMBED_IMAGE = SERVICE + "EmbedImage"
EMBED_IMAGES = SERVICE + "EmbedImages"
EMBED_STREAM = SERVICE + "EmbedImageStream"
GET_MODEL_INFO = SERVICE + "GetModelInfo"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
PHOTO = (ROOT / "tests" / "data" / "chelsea.png").read_bytes()
# How long slot-holding attacks hold what they took; bystanders keep calling meanwhile.
HOLD_S = 8.0
SETTLE_S = 4.0
PROBE_EVERY_S = 2.0


# -- the server under attack ---------------------------------------------------------


class Server:
    """clipvision-server in a child process; its ports come from its log."""

    def __init__(self, flags: list[str], port: int = 0) -> None:
        self.flags = flags
        self.port = port
        self.metrics_port = 0
        self.process: asyncio.subprocess.Process | None = None
        self.log: list[str] = []
        self._drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self) -> None:
        """Start it and wait until it serves (or raise with its log)."""
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "clipvision.server.cli",
            "--address",
            f"127.0.0.1:{self.port}",
            "--metrics-address",
            "127.0.0.1:0",
            *self.flags,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "CLIPVISION_AUTH_TOKEN": TOKEN},
        )
        async with asyncio.timeout(600):
            while True:
                line = await self._line()
                if line is None:
                    raise RuntimeError("the server exited during start-up:\n" + self.tail())
                if match := re.search(r"listening on [\d.]+:(\d+)", line):
                    self.port = int(match.group(1))
                if match := re.search(r"metrics on http://[\d.]+:(\d+)/", line):
                    self.metrics_port = int(match.group(1))
                if re.search(r"\bserving\b", line):
                    break
        self._drain = asyncio.get_running_loop().create_task(self._drain_log())

    async def _line(self) -> str | None:
        assert self.process is not None
        assert self.process.stderr is not None
        raw = await self.process.stderr.readline()
        if not raw:
            return None
        line = raw.decode(errors="replace")
        self.log.append(line)
        return line

    async def _drain_log(self) -> None:
        while await self._line() is not None:
            pass

    def tail(self, lines: int = 20) -> str:
        """The last lines of its log."""
        return "".join(self.log[-lines:])

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.process is not None and self.process.returncode is None

    async def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 30 s; returns the exit status."""
        if self.process is None:
            return None
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 30)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._drain is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain
        return self.process.returncode


@dataclass
class Usage:
    """RSS (MiB), threads and open file descriptors of the server process."""

    rss_mib: float = 0.0
    threads: int = 0
    fds: int = 0

    @classmethod
    def of(cls, pid: int) -> Usage:
        try:
            process = psutil.Process(pid)
            return cls(process.memory_info().rss / 2**20, process.num_threads(), process.num_fds())
        except psutil.Error:
            return cls()

    def peak(self, other: Usage) -> Usage:
        return Usage(
            max(self.rss_mib, other.rss_mib),
            max(self.threads, other.threads),
            max(self.fds, other.fds),
        )


# -- bystander and probe -------------------------------------------------------------


@dataclass
class Calls:
    """Outcomes of ordinary calls: counts by status and latencies."""

    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies_ms: list[float] = field(default_factory=list)

    def record(self, code: str, started: float) -> None:
        self.codes[code] += 1
        self.latencies_ms.append((time.perf_counter() - started) * 1000)

    def summary(self) -> str:
        if not self.codes:
            return "none"
        codes = ", ".join(f"{name} {count}" for name, count in self.codes.most_common())
        p50 = statistics.median(self.latencies_ms)
        return f"{codes}; p50 {p50:.0f} ms, max {max(self.latencies_ms):.0f} ms"


def own_channel(port: int) -> grpc.aio.Channel:
    """A channel with a connection of its own (grpcio shares connections between channels)."""
    return grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
    )


async def bystander(port: int, calls: Calls, stop: asyncio.Event) -> None:
    """Ordinary authenticated EmbedImage calls, one after another, until ``stop``."""
    request = pb.EmbedImageRequest(image=pb.Image(content=PHOTO))
    async with own_channel(port) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        while not stop.is_set():
            started = time.perf_counter()
            try:
                await stub.EmbedImage(request, metadata=AUTH, timeout=10)
                calls.record("OK", started)
            except grpc.aio.AioRpcError as error:
                calls.record(error.code().name, started)
                await asyncio.sleep(0.2)  # no hot loop against a refusing server


async def health_probe(port: int, calls: Calls, stop: asyncio.Event) -> None:
    """grpc.health.v1 Check every PROBE_EVERY_S on a fresh connection, as a kubelet does."""
    while not stop.is_set():
        started = time.perf_counter()
        async with own_channel(port) as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
                calls.record(
                    health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status), started
                )
            except grpc.aio.AioRpcError as error:
                calls.record(error.code().name, started)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), PROBE_EVERY_S)


async def port_answers(port: int) -> str:
    """'yes' if a new connection gets an authenticated GetModelInfo answered, else why not."""
    async with own_channel(port) as channel:
        try:
            await pb_grpc.EmbeddingServiceStub(channel).GetModelInfo(
                pb.GetModelInfoRequest(), metadata=AUTH, timeout=5
            )
        except grpc.aio.AioRpcError as error:
            return f"no ({error.code().name})"
    return "yes"


# -- the attacks ---------------------------------------------------------------------


@dataclass
class Attack:
    """One attack: its name, what it sends, and the coroutine that sends it."""

    name: str
    sends: str
    run: Callable[[Server], Awaitable[str]]


STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def answer(result: Any) -> str:
    """How the server ended one raw stream: a status name, a RST_STREAM, or nothing."""
    if result.grpc_status is not None:
        return STATUS_NAMES.get(result.grpc_status, str(result.grpc_status))
    if result.reset_code is not None:
        return f"RST_STREAM {result.reset_code}"
    return "no answer"


def tally(results: list[Any]) -> str:
    """Count how the server ended raw streams."""
    counts = collections.Counter(answer(result) for result in results)
    return ", ".join(f"{name} x{count}" for name, count in counts.most_common())


def connection_events(wires: list[WireConnection]) -> str:
    """GOAWAY error codes received and connections closed (with the first reason)."""
    goaways = collections.Counter(goaway.error_code for wire in wires for goaway in wire.goaways)
    closed = [wire.close_reason for wire in wires if wire.closed]
    codes = ", ".join(f"{code} x{count}" for code, count in sorted(goaways.items())) or "none"
    reason = f" ({closed[0]})" if closed else ""
    return f"GOAWAY {codes}, closed {len(closed)}/{len(wires)}{reason}"


BAD_PATHS = [b"/\xff", b"/\x80\x80", b"/\xc3", b"\xed\xa0\x80/x", b"/ok/\xfe\xff"]


async def refused_unknown(server: Server) -> float:
    """Calls on unregistered paths counted so far (clipvision_refused_calls_total)."""
    return value(
        await scrape(server.metrics_port),
        "clipvision_refused_calls_total",
        protocol="grpc",
        method="unknown",
        code="UNIMPLEMENTED",
        reason="METHOD_NOT_FOUND",
    )


async def bad_path(server: Server) -> str:
    """One call on a :path that is not UTF-8 (grpcio's serving loop used to die decoding it),
    then 1,000 more in five shapes of bad bytes, 100 at a time, then one on a new connection."""
    counted = await refused_unknown(server)
    results = []
    async with await WireConnection.open(server.port) as wire:
        stream_id = wire.start_call(b"/\xff" + b"a" * 127, AUTH)
        wire.send_message(stream_id, b"")
        await wire.flush()
        with contextlib.suppress(TimeoutError):
            await wire.result(stream_id, timeout_s=5)
        results.append(wire.stream(stream_id))
        first = f"first: {tally(results)}"
        for offset in range(0, 1000, 100):
            if wire.closed or not server.alive():
                break
            ids = []
            for index in range(offset, offset + 100):
                path = BAD_PATHS[index % len(BAD_PATHS)] + b"y" * (index % 7)
                stream_id = wire.start_call(path, AUTH)
                wire.send_message(stream_id, b"")
                ids.append(stream_id)
            await wire.flush()
            with contextlib.suppress(TimeoutError):
                await wire.results(ids, timeout_s=30)
            results += [wire.stream(stream_id) for stream_id in ids]
        if server.alive():
            # And on a connection of its own: the listener answers, not only this connection.
            async with await WireConnection.open(server.port) as other:
                stream_id = other.start_call(b"/\xff\xfe", AUTH)
                other.send_message(stream_id, b"")
                await other.flush()
                with contextlib.suppress(TimeoutError):
                    await other.result(stream_id, timeout_s=5)
                results.append(other.stream(stream_id))
        events = connection_events([wire])
    if not server.alive():
        assert server.process is not None
        status = server.process.returncode
        return f"{first}; all: {tally(results)}; {events}; process EXITED, status {status}"
    counted = await refused_unknown(server) - counted
    return (
        f"{first}; all {len(results):,}: {tally(results)}; {events}; process alive, "
        f"METHOD_NOT_FOUND counted {counted:,.0f}"
    )


async def hold_streams(
    server: Server,
    path: str,
    count: int,
    first: Callable[[WireConnection, int], None],
    per_connection: int = 100,
) -> str:
    """Keep ``count`` streams open (``per_connection`` per connection) for HOLD_S, then close.

    Like a persistent attacker, it replaces every stream the server ends at once
    (refused or answered) for as long as it holds, so what it took stays taken.
    """
    wires = [await WireConnection.open(server.port) for _ in range(-(-count // per_connection))]
    slots: list[tuple[WireConnection, int]] = []
    ended: list[Any] = []

    def open_stream(wire: WireConnection) -> int:
        stream_id = wire.start_call(path, AUTH if path == EMBED_STREAM else ())
        first(wire, stream_id)
        return stream_id

    try:
        for index in range(count):
            wire = wires[index // per_connection]
            slots.append((wire, open_stream(wire)))
        deadline = time.monotonic() + HOLD_S
        while time.monotonic() < deadline:
            for wire in wires:
                await wire.flush()
            await asyncio.sleep(0.25)
            for index, (wire, stream_id) in enumerate(slots):
                if wire.stream(stream_id).finished and not wire.closed:
                    ended.append(wire.stream(stream_id))
                    slots[index] = (wire, open_stream(wire))
        held = sum(not wire.stream(stream_id).finished for wire, stream_id in slots)
        refused = tally(ended) or "none"
        return f"{held} held at the end; ended by the server: {refused}; {connection_events(wires)}"
    finally:
        for wire in wires:
            await wire.close()


async def watch_streams(server: Server) -> str:
    request = health_pb2.HealthCheckRequest().SerializeToString()

    def first(wire: WireConnection, stream_id: int) -> None:
        wire.send_message(stream_id, request)

    return await hold_streams(server, HEALTH_WATCH, 260, first)


async def idle_streams(server: Server) -> str:
    return await hold_streams(server, EMBED_STREAM, 260, lambda wire, stream_id: None)


async def stalled_unary(server: Server) -> str:
    def first(wire: WireConnection, stream_id: int) -> None:
        wire.send_message(stream_id, b"\x00" * 900, declared_length=1000, end_stream=False)

    # 50 per connection: 100 x 905 bytes would not fit HTTP/2's initial 64 KiB window.
    return await hold_streams(server, EMBED_IMAGE, 300, first, per_connection=50)


async def huge_watches(server: Server) -> str:
    """Health.Watch calls naming a 1 MiB service, no token, 16 at a time on 4 connections,
    each opened again as soon as it ends, for HOLD_S: a watch keeps its request's read room
    while it watches, so such watches held the probes' room (and before that the data
    calls') until the gate capped health requests."""
    request = health_pb2.HealthCheckRequest(service="s" * (1 << 20))
    outcomes: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + HOLD_S

    async def watcher(channel: grpc.aio.Channel) -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            call = stub.Watch(request, timeout=HOLD_S + 5)
            try:
                await call.read()
                outcomes["watching"] += 1  # served: hold it, as an attacker would
                await asyncio.sleep(max(0.0, deadline - time.monotonic()))
                call.cancel()
            except grpc.aio.AioRpcError as error:
                outcomes[f"{error.code().name} {details_reason(error)}".strip()] += 1

    channels = [own_channel(server.port) for _ in range(4)]
    try:
        await asyncio.gather(*(watcher(channels[index % 4]) for index in range(16)))
    finally:
        for channel in channels:
            await channel.close(None)
    return ", ".join(f"{name} x{count}" for name, count in sorted(outcomes.items()))


def details_reason(error: grpc.RpcError) -> str:
    """The ErrorInfo reason of a refusal, or nothing."""
    info = status_detail(error, error_details_pb2.ErrorInfo)
    return str(info.reason) if info is not None else ""


FLOOD_CALLS = 400
FLOOD_THREADS = 100


def retry_delay_s(error: grpc.RpcError) -> float:
    """The RetryInfo delay a refusal carries (0 without one)."""
    retry = status_detail(error, error_details_pb2.RetryInfo)
    return float(retry.retry_delay.ToTimedelta().total_seconds()) if retry is not None else 0.0


def status_detail(error: grpc.RpcError, kind: type[Detail]) -> Detail | None:
    """The first detail of type ``kind`` in a refusal's rich status, or None."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(kind.DESCRIPTOR):
            found = kind()
            detail.Unpack(found)
            return found
    return None


def flood_once(port: int) -> collections.Counter[str]:
    """FLOOD_CALLS EmbedImage calls from FLOOD_THREADS threads on one channel of grpcio's
    blocking client (the issue's flood): each thread starts its share at once, then waits."""
    outcomes: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    request = pb.EmbedImageRequest(image=pb.Image(content=PHOTO))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)

        def one_thread(_: int) -> None:
            started = [
                stub.EmbedImage.future(request, metadata=AUTH, timeout=60)
                for _ in range(FLOOD_CALLS // FLOOD_THREADS)
            ]
            for future in started:
                try:
                    future.result()
                    outcome = "OK"
                except grpc.RpcError as error:
                    code = error.code() if isinstance(error, grpc.Call) else None
                    outcome = code.name if code is not None else "?"
                    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not retry_delay_s(error):
                        outcome += " without RetryInfo"
                    elif code == grpc.StatusCode.UNAVAILABLE and isinstance(error, grpc.Call):
                        outcome += f" ({error.details()})"
                with lock:
                    outcomes[outcome] += 1

        with ThreadPoolExecutor(FLOOD_THREADS) as pool:
            list(pool.map(one_thread, range(FLOOD_THREADS)))
    return outcomes


async def flood(server: Server) -> str:
    """The flood twice in a row: overload must be RESOURCE_EXHAUSTED (with RetryInfo) or OK,
    never UNAVAILABLE (the transport refusing streams, which clients read as "server down")."""
    rounds = []
    for number in (1, 2):
        outcomes = await asyncio.to_thread(flood_once, server.port)
        counts = ", ".join(f"{code} x{count}" for code, count in outcomes.most_common())
        rounds.append(f"round {number}: {counts}")
    return "; ".join(rounds) + " (RESOURCE_EXHAUSTED: all with RetryInfo unless said)"


async def malformed(server: Server) -> str:
    garbage = b"\xff\xff\xff\xff\x0f"
    cases: list[tuple[str, str, Callable[[WireConnection, int], None]]] = []
    methods = [
        EMBED_IMAGE,
        EMBED_IMAGES,
        EMBED_STREAM,
        GET_MODEL_INFO,
        HEALTH_CHECK,
        HEALTH_WATCH,
        REFLECTION,
    ]
    for method in methods:
        short = method.rpartition("/")[2]
        cases += [
            (f"{short} invalid", method, lambda w, s: w.send_message(s, garbage)),
            (f"{short} empty", method, lambda w, s: w.end_stream(s)),
            (
                f"{short} truncated",
                method,
                lambda w, s: w.send_message(s, garbage, declared_length=100),
            ),
            (
                f"{short} compressed",
                method,
                lambda w, s: w.send_message(s, b"x", compressed=True),
            ),
        ]
    seen: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    async with await WireConnection.open(server.port) as wire:
        for _ in range(10):
            streams = []
            for label, method, send in cases:
                stream_id = wire.start_call(method, AUTH, grpc_timeout="3S")
                send(wire, stream_id)
                streams.append((label, stream_id))
            await wire.flush()
            with contextlib.suppress(TimeoutError):
                await wire.results([stream_id for _, stream_id in streams], timeout_s=4)
            for label, stream_id in streams:
                seen[answer(wire.stream(stream_id))][label.rpartition(" ")[2]] += 1
        events = connection_events([wire])
    return (
        "; ".join(
            f"{answer}: " + ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items()))
            for answer, kinds in sorted(seen.items())
        )
        + f" (7 methods x 10; DEADLINE_EXCEEDED: silence until grpc-timeout 3S); {events}"
    )


async def calls_right_after(stub: Any) -> str:
    """25 ordinary calls at once, as the issue's bystanders made right after a burst."""
    request = pb.EmbedImageRequest(image=pb.Image(content=PHOTO))
    after = await asyncio.gather(
        *(stub.EmbedImage(request, metadata=AUTH, timeout=30) for _ in range(25)),
        return_exceptions=True,
    )
    codes = collections.Counter(
        error.code().name if isinstance(error, grpc.aio.AioRpcError) else "OK" for error in after
    )
    return ", ".join(f"{code} x{count}" for code, count in codes.most_common())


async def raw_burst(port: int, resets: int, connections: int) -> list[WireConnection]:
    """HEADERS + RST_STREAM ``resets`` times over ``connections`` connections, written in 500s."""
    wires = [await WireConnection.open(port) for _ in range(connections)]
    for start in range(0, resets, 500):
        for index in range(start, min(start + 500, resets)):
            wire = wires[index % connections]
            wire.reset(wire.start_call(EMBED_IMAGE, AUTH))
        await asyncio.gather(*(wire.flush() for wire in wires))
    return wires


async def cancellations(server: Server) -> str:
    async with own_channel(server.port) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        request = pb.EmbedImageRequest(image=pb.Image(content=PHOTO))
        for _ in range(50):
            started: list[Any] = [
                stub.EmbedImage(request, metadata=AUTH)
                if index % 2
                else stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=AUTH)
                for index in range(100)
            ]
            await asyncio.sleep(0.005)
            for call in started:
                call.cancel()
            await asyncio.gather(*started, return_exceptions=True)
    report = ["grpcio: 5,000 calls cancelled"]
    async with own_channel(server.port) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        await stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=AUTH, timeout=10)
        # One connection, then many: a per-connection stream limit only bounds the first.
        for resets, connections in ((20_000, 1), (5_000, 100)):
            wires = await raw_burst(server.port, resets, connections)
            try:
                after = await calls_right_after(stub)
                await asyncio.gather(*(wire.round_trip(timeout_s=30) for wire in wires))
                events = connection_events(wires)
            finally:
                for wire in wires:
                    await wire.close()
            report.append(
                f"raw: {resets:,} resets on {connections} conn. ({events}), "
                f"25 calls right after: {after}"
            )
    return "; ".join(report)


async def second_server(server: Server) -> str:
    twin = Server(server.flags, port=server.port)
    try:
        await asyncio.wait_for(twin.start(), 120)
        outcome = f"second server STARTED on port {twin.port} (pid {twin.pid})"
        await asyncio.sleep(HOLD_S)
    except (RuntimeError, TimeoutError):
        last = twin.tail(3).strip().splitlines()
        outcome = "second server refused: " + (last[-1][:120] if last else "?")
    finally:
        code = await twin.stop()
    return f"{outcome}; its exit status {code}"


async def metrics_half_requests(server: Server) -> str:
    async def half_request() -> asyncio.StreamWriter | None:
        try:
            async with asyncio.timeout(5):
                _, writer = await asyncio.open_connection("127.0.0.1", server.metrics_port)
        except (OSError, TimeoutError):
            return None
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no final CRLF
        return writer

    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(10):
            opened = await asyncio.gather(*(half_request() for _ in range(100)))
            writers += [writer for writer in opened if writer is not None]
        await asyncio.sleep(HOLD_S)
        closed_by_server = sum(writer.transport.is_closing() for writer in writers)
        return (
            f"{len(writers)} connected, {1000 - len(writers)} not within 5 s, "
            f"{closed_by_server} closed by the server"
        )
    finally:
        for writer in writers:
            writer.close()


async def many_connections(server: Server) -> str:
    wires = []
    failed = 0
    try:
        for _ in range(1000):
            try:
                wires.append(await WireConnection.open(server.port))
            except (OSError, TimeoutError):
                failed += 1
        await asyncio.sleep(HOLD_S)
        return f"{len(wires)} connected, {failed} failed; {connection_events(wires)}"
    finally:
        for wire in wires:
            await wire.close()


async def ping_flood(server: Server) -> str:
    async with await WireConnection.open(server.port) as wire:
        for index in range(20):
            for number in range(1000):
                if wire.closed:
                    break
                wire.ping((index * 1000 + number).to_bytes(8, "big"))
            await wire.flush()
        await asyncio.sleep(1)
        return f"20,000 PINGs, {wire.pings_acked} acked; {connection_events([wire])}"


async def settings_flood(server: Server) -> str:
    async with await WireConnection.open(server.port) as wire:
        for _ in range(20):
            for _ in range(1000):
                if wire.closed:
                    break
                wire.h2.update_settings({})
                wire.write_pending()
            await wire.flush()
        await asyncio.sleep(1)
        return f"20,000 SETTINGS; {connection_events([wire])}"


async def huge_metadata(server: Server) -> str:
    # h2's pure-Python HPACK encoder is quadratic in a value's length: 64 KiB is its
    # practical ceiling here, and far past gRPC's default metadata limits anyway.
    variants = {
        "8 KiB value": [("x-pad", "a" * 8 * 1024)],
        "64 KiB value": [("x-pad", "a" * 64 * 1024)],
        "1,000 headers": [(f"x-pad-{index}", "a" * 100) for index in range(1000)],
    }
    answers = []
    wires = []
    try:
        for label, metadata in variants.items():
            wire = await WireConnection.open(server.port)
            wires.append(wire)
            results = []
            for _ in range(3):
                stream_id = wire.start_call(GET_MODEL_INFO, [*AUTH, *metadata])
                wire.send_message(stream_id, b"")
                await wire.flush()
                with contextlib.suppress(TimeoutError):
                    await wire.result(stream_id, timeout_s=5)
                results.append(wire.stream(stream_id))
                if wire.closed:
                    break
            answers.append(f"{label}: {tally(results)}")
        return "; ".join(answers) + f"; {connection_events(wires)}"
    finally:
        for wire in wires:
            await wire.close()


async def bad_utf8_metadata(server: Server) -> str:
    async with await WireConnection.open(server.port) as wire:
        streams = []
        for key in (b"x-request-id", b"x-custom", b"authorization"):
            for method in (GET_MODEL_INFO, EMBED_IMAGE, HEALTH_CHECK):
                metadata: list[tuple[bytes | str, bytes | str]] = [(key, b"\xff\xfe\x80")]
                if key != b"authorization":
                    metadata += list(AUTH)
                stream_id = wire.start_call(method, metadata)
                wire.send_message(stream_id, b"")
                streams.append(stream_id)
        await wire.flush()
        with contextlib.suppress(TimeoutError):
            await wire.results(streams, timeout_s=10)
        return f"{tally([wire.stream(s) for s in streams])}; {connection_events([wire])}"


ATTACKS = [
    Attack(
        "bad_path",
        ':path not UTF-8, with token: b"/\\xff" + 127 bytes, then 1,000 in 5 shapes '
        "(100 at a time), then 1 on a new conn.",
        bad_path,
    ),
    Attack(
        "watch_streams", "260 Health.Watch streams, no token, 100 per connection", watch_streams
    ),
    Attack(
        "huge_watches",
        "Health.Watch naming a 1 MiB service, no token, 16 at a time on 4 conn., reopened",
        huge_watches,
    ),
    Attack("idle_streams", "260 EmbedImageStream, token, no message, 100 per conn.", idle_streams),
    Attack(
        "stalled_unary",
        "300 EmbedImage, no token, prefix says 1,000 B, 900 sent, 50 per conn.",
        stalled_unary,
    ),
    Attack(
        "flood",
        "400 EmbedImage at once from 100 threads on one channel, with token; twice",
        flood,
    ),
    Attack(
        "malformed",
        "invalid / empty / truncated / compressed-flag messages to 7 methods, x20",
        malformed,
    ),
    Attack(
        "cancel",
        "5,000 grpcio calls cancelled at once; HEADERS+RST_STREAM x20,000 on 1 conn., "
        "x5,000 on 100 conns",
        cancellations,
    ),
    Attack("second_server", "a second clipvision-server on the same port", second_server),
    Attack(
        "metrics_half_requests", "1,000 half-sent HTTP requests to /metrics", metrics_half_requests
    ),
    Attack("many_connections", "1,000 idle HTTP/2 connections", many_connections),
    Attack("ping_flood", "20,000 PINGs on one connection", ping_flood),
    Attack("settings_flood", "20,000 SETTINGS frames on one connection", settings_flood),
    Attack("huge_metadata", "3 calls each: 8 KiB, 64 KiB value, 1,000 headers", huge_metadata),
    Attack(
        "bad_utf8_metadata", "metadata values b'\\xff\\xfe\\x80' to 3 methods", bad_utf8_metadata
    ),
]


# -- running them --------------------------------------------------------------------


@dataclass
class Row:
    """The figures for one attack."""

    attack: str
    sends: str
    attacker_saw: str
    bystander: str
    health: str
    before: Usage
    peak: Usage
    after: Usage
    port_after: str
    log_errors: int
    seconds: float
    restarted: bool = False


async def run_attack(server: Server, attack: Attack, timeout_s: float) -> Row:
    """Run one attack with a bystander and a probe, sampling the server's usage."""
    stop = asyncio.Event()
    bystander_calls, probe_calls = Calls(), Calls()
    before = Usage.of(server.pid)
    peak = before
    log_mark = len(server.log)
    helpers = [
        asyncio.create_task(bystander(server.port, bystander_calls, stop)),
        asyncio.create_task(health_probe(server.port, probe_calls, stop)),
    ]

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = peak.peak(Usage.of(server.pid))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    started = time.monotonic()
    await asyncio.sleep(1.0)  # the bystander's baseline, before the attack
    try:
        saw = await asyncio.wait_for(attack.run(server), timeout_s)
    except TimeoutError:
        saw = f"attack stopped after {timeout_s:.0f} s"
    except Exception as error:  # an attack that breaks is a result too
        saw = f"attack failed: {error!r}"[:200]
    await asyncio.sleep(SETTLE_S)
    stop.set()
    await asyncio.gather(*helpers, sampler)
    seconds = time.monotonic() - started
    port = await port_answers(server.port) if server.alive() else "no (process exited)"
    new_log = server.log[log_mark:]
    errors = sum(" ERROR " in line or "Traceback" in line for line in new_log)
    return Row(
        attack.name,
        attack.sends,
        saw,
        bystander_calls.summary(),
        probe_calls.summary(),
        before,
        peak.peak(Usage.of(server.pid)),
        Usage.of(server.pid),
        port,
        errors,
        seconds,
    )


def usage_cell(row: Row, name: str, fmt: str) -> str:
    values = [getattr(usage, name) for usage in (row.before, row.peak, row.after)]
    return " / ".join(format(value, fmt) for value in values)


def markdown(rows: list[Row], command: str) -> str:
    lines = [
        f"`{command}`",
        "",
        "| attack | attacker sent | attacker saw | bystander EmbedImage | health probes | "
        "RSS MiB before/peak/after | threads | fds | port answers after | error log lines |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        restarted = " (restarted)" if row.restarted else ""
        cells = [
            row.attack,
            row.sends,
            row.attacker_saw,
            row.bystander,
            row.health,
            usage_cell(row, "rss_mib", ".0f"),
            usage_cell(row, "threads", "d"),
            usage_cell(row, "fds", "d"),
            row.port_after + restarted,
            str(row.log_errors),
        ]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def server_flags(args: argparse.Namespace, scratch: Path) -> list[str]:
    if args.tiny:
        from tests.checkpoints import build_clip_model

        directory = scratch / "tiny"
        build_clip_model(directory)
        return ["--model", f"tiny={directory}", "--device", "cpu", *args.server_flag]
    return ["--model", args.model, "--dummy-weights", "--device", "cpu", *args.server_flag]


async def run(args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    """Every chosen attack in turn; the rows and the servers' log lines."""
    chosen = [attack for attack in ATTACKS if not args.only or attack.name in args.only]
    rows: list[Row] = []
    logs: list[str] = []
    with tempfile.TemporaryDirectory() as scratch:
        server = Server(server_flags(args, Path(scratch)))
        await server.start()
        try:
            for attack in chosen:
                print(f"-- {attack.name}: {attack.sends}", flush=True)
                row = await run_attack(server, attack, args.attack_timeout)
                print(f"   {row.attacker_saw}\n   bystander {row.bystander}", flush=True)
                print(f"   health {row.health}; port answers after: {row.port_after}", flush=True)
                if row.port_after != "yes":
                    # Later attacks need a listening server; say that this one was restarted.
                    code = await server.stop()
                    logs += server.log
                    row.port_after += f", exit status {code}"
                    row.restarted = True
                    server = Server(server.flags)
                    await server.start()
                rows.append(row)
        finally:
            await server.stop()
            logs += server.log
    return rows, logs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B/32", help="preset served with dummy weights")
    parser.add_argument("--tiny", action="store_true", help="serve a tiny test checkpoint")
    parser.add_argument(
        "--only", type=lambda text: set(text.split(",")), default=set(), help="attack names"
    )
    parser.add_argument("--attack-timeout", type=float, default=120.0, help="seconds per attack")
    parser.add_argument(
        "--server-flag", action="append", default=[], help="extra clipvision-server flag"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    command = "bench/attack.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows, logs = asyncio.run(run(args))
    table = markdown(rows, command.strip())
    print()
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    (args.out / f"attack-{stamp}.md").write_text(table)
    (args.out / f"attack-{stamp}.log").write_text("".join(logs))
    (args.out / f"attack-{stamp}.json").write_text(
        json.dumps([asdict(row) for row in rows], indent=2)
    )
    print(f"written to {args.out}/attack-{stamp}.md, .json and .log (the servers' logs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
