"""What the Open Inference Protocol costs: tritonclient beside EmbedImages, same server and run.

    .venv/bin/python bench/oip.py                   # ViT-B/32 dummy weights, this machine
    .venv/bin/python bench/oip.py --seconds 5       # shorter
    .venv/bin/python bench/oip.py --tiny            # the tests' tiny CLIP: an upper bound

Rows, alternated (native first, then oip first) for --rounds rounds, so that drift
on a shared machine hits both:

1. native: 4 callers, each sending EmbedImages with 16 images per call;
2. oip: 4 callers, each sending tritonclient.grpc.aio ``infer`` with 16 images
   per call (input IMAGE, BYTES, [16]) to the same server.

Images are bench/throughput.py's photographs (640x480 and 1920x1080 JPEGs). The
figures that matter are oip / native: images per second (the median of each round's
ratio) and the server's CPU time per image, which other load on the machine hardly
moves: the protocol's framing (length-prefixed BYTES in, one raw FP32 tensor out)
against ours, on the same batcher. The issue's target is a cost under 5 %. With
ViT-B/32 on a CPU the forward pass dominates; --tiny serves the tests' 16-d CLIP
checkpoint instead, where decoding and the protocols' framing are most of the work,
so its ratio bounds the cost.

tritonclient runs in this process (it never imports the server's stubs here: the
server is a child process, see bench/throughput.ServerProcess).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import ServerProcess, cycle, make_jpegs, percentile

from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
CALLERS = 4
IMAGES_PER_CALL = 16


def cpu_seconds(process: psutil.Process) -> float:
    """CPU time the server process has used so far, all threads."""
    times = process.cpu_times()
    return float(times.user + times.system)


async def load(
    callers: int, seconds: float, call: Callable[[int], Awaitable[object]], server: psutil.Process
) -> dict[str, float]:
    """``callers`` loops of ``call`` for ``seconds``: images/s, latencies, server CPU per image.

    The server's CPU time per image is the steadier figure on a shared machine: other
    processes slow both protocols' wall clock, but not the work the server does for each.
    """
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    cpu_before = cpu_seconds(server)
    started = time.perf_counter()

    async def caller(index: int) -> None:
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            await call(index)
            latencies.append(time.perf_counter() - sent)

    await asyncio.gather(*(caller(index) for index in range(callers)))
    elapsed = time.perf_counter() - started
    images = len(latencies) * IMAGES_PER_CALL
    return {
        "images_per_s": images / elapsed,
        "server_cpu_ms_per_image": (cpu_seconds(server) - cpu_before) * 1000 / images,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "calls": float(len(latencies)),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import tritonclient.grpc.aio as triton_aio
    from tritonclient.grpc import InferInput

    images = make_jpegs()
    source = cycle(images)

    def batch() -> list[bytes]:
        return [next(source) for _ in range(IMAGES_PER_CALL)]

    flags = ["--model", args.model, "--device", "cpu", "--dtype", "float32"]
    flags += ["--max-batch-size", "32", "--max-queue-size", "1024"]
    rows: dict[str, list[dict[str, float]]] = {"native": [], "oip": []}
    async with contextlib.AsyncExitStack() as stack:
        process = ServerProcess(*flags)
        if args.tiny:
            process.command.remove("--dummy-weights")  # a saved checkpoint, not a preset
        server = await stack.enter_async_context(process)
        address = f"127.0.0.1:{server.port}"
        # One connection per caller for both, as separate client processes would have.
        channels = [
            await stack.enter_async_context(
                grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
            )
            for _ in range(CALLERS)
        ]
        stubs = [pb_grpc.EmbeddingServiceStub(channel) for channel in channels]
        clients = [triton_aio.InferenceServerClient(address) for _ in range(CALLERS)]
        for client in clients:
            stack.push_async_callback(client.close)
        model = args.model.partition("=")[0]  # the served name: IMAGE in, EMBEDDING out

        async def native(index: int) -> object:
            request = pb.EmbedImagesRequest(images=[pb.Image(content=data) for data in batch()])
            return await stubs[index].EmbedImages(request, timeout=300)

        async def oip(index: int) -> object:
            tensor = InferInput("IMAGE", [IMAGES_PER_CALL], "BYTES")
            tensor.set_data_from_numpy(np.array(batch(), dtype=np.object_))
            result = await clients[index].infer(model, [tensor], client_timeout=300)
            return result.as_numpy("EMBEDDING")

        for index in range(CALLERS):  # warm every connection and the model
            await native(index)
            await oip(index)
        server_process = psutil.Process(server.pid)
        order = [("native", native), ("oip", oip)]
        for round_ in range(args.rounds):
            # native, oip, then oip, native: a load that grows or shrinks during the run
            # falls on both rows alike.
            for name, call in order if round_ % 2 == 0 else order[::-1]:
                row = await load(CALLERS, args.seconds, call, server_process)
                rows[name].append(row)
                print(f"round {round_ + 1} {name}: {row}", flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(row[key] for row in rows[name])

    def paired(key: str) -> list[float]:
        return [o[key] / n[key] for o, n in zip(rows["oip"], rows["native"], strict=True)]

    keys = ("images_per_s", "server_cpu_ms_per_image", "p50_ms", "p99_ms")
    summary = {name: {key: median(name, key) for key in keys} for name in rows}
    return {
        "model": args.model,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "callers": CALLERS,
        "images_per_call": IMAGES_PER_CALL,
        "rows": rows,
        "median": summary,
        # Medians of each round's ratio: rounds run back to back, so each pair shares the
        # machine's load at that time.
        "oip_over_native": statistics.median(paired("images_per_s")),
        "oip_over_native_rounds": paired("images_per_s"),
        "server_cpu_oip_over_native": statistics.median(paired("server_cpu_ms_per_image")),
        "server_cpu_rounds": paired("server_cpu_ms_per_image"),
    }


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['model']}, {report['callers']} callers x {report['images_per_call']} images")
    print(f"per call, median of {report['rounds']} rounds of {report['seconds']:.0f} s each\n")
    print("| row | images/s | server CPU ms/image | p50 ms | p99 ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    labels = {"native": "EmbedImages (native)", "oip": "tritonclient infer (OIP v2)"}
    for name, label in labels.items():
        row = report["median"][name]
        print(
            f"| {label} | {row['images_per_s']:.1f} | {row['server_cpu_ms_per_image']:.1f} "
            f"| {row['p50_ms']:.0f} | {row['p99_ms']:.0f} |"
        )
    rounds = ", ".join(f"{ratio:.3f}" for ratio in report["oip_over_native_rounds"])
    cpu = ", ".join(f"{ratio:.3f}" for ratio in report["server_cpu_rounds"])
    print(f"\noip / native images/s, median of rounds: {report['oip_over_native']:.3f} ({rounds})")
    print(f"oip / native server CPU per image: {report['server_cpu_oip_over_native']:.3f} ({cpu})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B/32")
    parser.add_argument("--seconds", type=float, default=10.0, help="per row and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="serve the tests' tiny CLIP")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "oip.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tiny:
        if args.tiny:
            sys.path.insert(0, str(ROOT))
            from tests.checkpoints import build_clip_model

            build_clip_model(Path(tiny))
            args.model = f"tiny={tiny}"
        report = asyncio.run(run(args))
        if args.tiny:
            report["model"] = "tiny (tests/checkpoints.py, 16-d)"
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
