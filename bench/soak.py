"""Soak: mixed traffic against one server for a set time; RSS over time, errors, lost items.

    .venv/bin/python bench/soak.py --seconds 300            # ViT-B/32 dummy weights, CPU
    .venv/bin/python bench/soak.py --seconds 60 --quick     # a short check

Traffic, all at once, bounded in count and time, to 127.0.0.1 only:
- unary callers sending good photos, and some corrupt, truncated or oversized ones;
- EmbedImages batches mixing good and bad images;
- streams of mixed items, some abandoned half-way by their client;
- calls cancelled or given deadlines too short to meet.

Lost items must be zero: a stream item with no answer, an answer out of order or
with another id, or any status other than the expected ones (OK,
INVALID_ARGUMENT, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, CANCELLED). It writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from throughput import ROOT, ServerProcess, make_jpegs

from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from clipvision.v1.embedding_service_pb2_grpc import EmbeddingServiceAsyncStub as AsyncStub

EXPECTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Tally:
    """What happened: statuses by code, in-band errors by reason, items lost."""

    def __init__(self) -> None:
        self.codes: collections.Counter[str] = collections.Counter()
        self.in_band: collections.Counter[str] = collections.Counter()
        self.lost = 0
        self.lost_examples: list[str] = []
        self.images = 0

    def status(self, code: grpc.StatusCode) -> None:
        self.codes[code.name] += 1
        if code not in EXPECTED:
            self.lose(f"status {code.name}")

    def lose(self, what: str) -> None:
        self.lost += 1
        if len(self.lost_examples) < 10:
            self.lost_examples.append(what)


def bad_images(good: list[bytes]) -> list[bytes]:
    rng = np.random.default_rng(7)
    out = [b"", b"not an image", rng.bytes(5000)]
    for data in good[:4]:
        out.append(data[: len(data) // 3])
        flipped = bytearray(data)
        for _ in range(20):
            flipped[int(rng.integers(0, 64))] ^= 0xFF
        out.append(bytes(flipped))
    out.append(b"\xff\xd8" + b"\x00" * (21 * 1024 * 1024))  # over the byte limit
    return out


async def unary_worker(
    stub: AsyncStub,
    good: list[bytes],
    bad: list[bytes],
    tally: Tally,
    deadline: float,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    while time.monotonic() < deadline:
        roll = rng.random()
        data = (
            bad[int(rng.integers(0, len(bad)))]
            if roll < 0.2
            else good[int(rng.integers(0, len(good)))]
        )
        timeout = 0.01 if roll > 0.97 else 60.0
        call = stub.EmbedImage(pb.EmbedImageRequest(image=pb.Image(content=data)), timeout=timeout)
        if 0.94 < roll <= 0.97:
            await asyncio.sleep(0.005)
            call.cancel()
        try:
            await call
            tally.images += 1
            tally.status(grpc.StatusCode.OK)
        except asyncio.CancelledError:
            tally.status(grpc.StatusCode.CANCELLED)
        except grpc.aio.AioRpcError as error:
            tally.status(error.code())
            await back_off(error)


async def back_off(error: grpc.aio.AioRpcError) -> None:
    """Wait as the server's RetryInfo says after RESOURCE_EXHAUSTED, as a good client does."""
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return
    delay = 0.1
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            delay = info.retry_delay.ToTimedelta().total_seconds()
    await asyncio.sleep(delay)


async def batch_worker(
    stub: AsyncStub,
    good: list[bytes],
    bad: list[bytes],
    tally: Tally,
    deadline: float,
) -> None:
    rng = np.random.default_rng(99)
    while time.monotonic() < deadline:
        images = [
            pb.Image(content=(bad if rng.random() < 0.25 else good)[int(rng.integers(0, 4))])
            for _ in range(8)
        ]
        try:
            response = await stub.EmbedImages(pb.EmbedImagesRequest(images=images), timeout=120)
        except grpc.aio.AioRpcError as error:
            tally.status(error.code())
            await back_off(error)
            continue
        tally.status(grpc.StatusCode.OK)
        if len(response.results) != len(images):
            tally.lose(f"EmbedImages returned {len(response.results)} of {len(images)}")
        for result in response.results:
            if result.HasField("error"):
                tally.in_band[result.error.reason] += 1
                if result.error.code != grpc.StatusCode.INVALID_ARGUMENT.value[0]:
                    tally.lose(f"batch item {result.error.reason}")
            else:
                tally.images += 1


async def stream_worker(
    stub: AsyncStub,
    good: list[bytes],
    bad: list[bytes],
    tally: Tally,
    deadline: float,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    while time.monotonic() < deadline:
        count = int(rng.integers(20, 200))
        abandon_at = int(rng.integers(1, count)) if rng.random() < 0.2 else None

        sent = [0]

        async def items(
            n: int = count, sent: list[int] = sent
        ) -> AsyncIterator[pb.EmbedImageStreamRequest]:
            for index in range(n):
                if time.monotonic() > deadline:
                    return
                source = bad if rng.random() < 0.15 else good
                data = source[int(rng.integers(0, len(source)))]
                sent[0] += 1
                image = pb.Image(content=data)
                yield pb.EmbedImageStreamRequest(id=f"{seed}-{index}", image=image)

        call = stub.EmbedImageStream(items())
        expected = 0
        try:
            async for response in call:
                if response.id != f"{seed}-{expected}":
                    tally.lose(f"stream answer {response.id} where {seed}-{expected} was due")
                expected += 1
                if response.HasField("error"):
                    tally.in_band[response.error.reason] += 1
                    if response.error.code != grpc.StatusCode.INVALID_ARGUMENT.value[0]:
                        tally.lose(f"stream item {response.error.reason}")
                else:
                    tally.images += 1
                if abandon_at is not None and expected == abandon_at:
                    call.cancel()
                    break
        except grpc.aio.AioRpcError as error:
            tally.status(error.code())
            continue
        if abandon_at is None:
            tally.status(grpc.StatusCode.OK)
            if expected != sent[0]:
                tally.lose(f"stream of {sent[0]} answered {expected}")
        else:
            tally.status(grpc.StatusCode.CANCELLED)


async def run(args: argparse.Namespace) -> dict[str, object]:
    good = make_jpegs()
    bad = bad_images(good)
    tally = Tally()
    samples: list[tuple[float, float]] = []
    flags = ["--model", args.model, "--max-batch-size", "16", "--max-queue-size", "64"]
    async with (
        ServerProcess(*flags) as server,
        grpc.aio.insecure_channel(
            f"127.0.0.1:{server.port}",
            options=[("grpc.max_send_message_length", 64 * 1024 * 1024)],
        ) as channel,
    ):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        started = time.monotonic()
        deadline = started + args.seconds

        async def sample() -> None:
            while time.monotonic() < deadline:
                samples.append((time.monotonic() - started, rss_mib(server.pid)))
                await asyncio.sleep(args.sample_every)

        await asyncio.gather(
            sample(),
            *(unary_worker(stub, good, bad, tally, deadline, seed) for seed in range(args.unary)),
            batch_worker(stub, good, bad, tally, deadline),
            *(
                stream_worker(stub, good, bad, tally, deadline, 1000 + s)
                for s in range(args.streams)
            ),
        )
        elapsed = time.monotonic() - started
    first_half = [rss for t, rss in samples if t < args.seconds / 2] or [0.0]
    second_half = [rss for t, rss in samples if t >= args.seconds / 2] or [0.0]
    return {
        "model": args.model,
        "seconds": round(elapsed, 1),
        "images_embedded": tally.images,
        "calls_by_status": dict(tally.codes),
        "in_band_errors_by_reason": dict(tally.in_band),
        "lost_items": tally.lost,
        "lost_examples": tally.lost_examples,
        "rss_mib": {
            "start": round(samples[0][1], 1) if samples else None,
            "max_first_half": round(max(first_half), 1),
            "max_second_half": round(max(second_half), 1),
            "end": round(samples[-1][1], 1) if samples else None,
        },
        "rss_samples": [(round(t, 1), round(r, 1)) for t, r in samples],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B/32")
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--unary", type=int, default=16, help="concurrent unary callers")
    parser.add_argument("--streams", type=int, default=2, help="concurrent streams")
    parser.add_argument("--sample-every", type=float, default=5.0, help="RSS sampling period")
    parser.add_argument("--quick", action="store_true", help="sample RSS every second")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.sample_every = 1.0
    report = asyncio.run(run(args))
    printable = {k: v for k, v in report.items() if k != "rss_samples"}
    print(json.dumps(printable, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if report["lost_items"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
