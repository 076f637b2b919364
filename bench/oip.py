"""What the Open Inference Protocol costs: tritonclient beside EmbedImages, same server and run.

    .venv/bin/python bench/oip.py                   # ViT-B/32 dummy weights, this machine
    .venv/bin/python bench/oip.py --seconds 5       # shorter
    .venv/bin/python bench/oip.py --tiny            # the tests' tiny CLIP: an upper bound
    .venv/bin/python bench/oip.py --framing-only    # only the in-process framing row

Rows, alternated (native first, then oip first) for --rounds rounds, so that drift
on a shared machine hits both:

1. native: 4 callers, each sending EmbedImages with 16 images per call;
2. oip: 4 callers, each sending tritonclient.grpc.aio ``infer`` with 16 images
   per call (input IMAGE, BYTES, [16]) to the same server.

Images are bench/throughput.py's photographs (640x480 and 1920x1080 JPEGs). Each
row is measured as bench/throughput.py measures the server: the load runs for
--warmup seconds before a window of --seconds opens and goes on until it closes, and
images/s is the slope of the images answered over time within the window (answers
come 16 at a time, so counting them would be off by a call's worth). The figures
that matter are oip / native, the median of each round's ratio: images per second,
and the server's CPU time per image, which other load on the machine moves less: the
protocol's framing (length-prefixed BYTES in, one raw FP32 tensor out) against
ours, on the same batcher. The bench process's own CPU per image is the clients'
cost (tritonclient's against a bare generated stub), which on one machine takes
cores from the server. The issue's target is a protocol cost under 5 %.

3. framing: in a child process, without a model or a network, the server's own
   conversion of one 16-image request and its response, for each protocol:
   parsing the request's bytes, the OIP servicer's tensor checks and split
   (clipvision.server.pipelines.inference_plane), the images as the pipeline reads them, and the
   response built and serialised. This is the whole of what the protocol layer adds
   on the server; beside the server's CPU per image it says what share it can be.

With ViT-B/32 on a CPU the forward pass dominates; --tiny serves the tests' 16-d CLIP
checkpoint instead, where decoding and the protocols' framing are most of the work,
so its ratio bounds the cost.

tritonclient runs in this process (it never imports the server's stubs here: the
server is a child process, see bench/throughput.ServerProcess; the framing row runs
in a child too, since tritonclient's generated ``inference`` messages and the
server's share one protobuf pool otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
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
from throughput import ServerProcess, Window, cycle, make_jpegs, percentile

from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
CALLERS = 4
IMAGES_PER_CALL = 16


def cpu_seconds(process: psutil.Process) -> float:
    """CPU time the process has used so far, all threads."""
    times = process.cpu_times()
    return float(times.user + times.system)


async def load(
    callers: int,
    seconds: float,
    warmup: float,
    call: Callable[[int], Awaitable[object]],
    server: ServerProcess,
) -> dict[str, float]:
    """``callers`` loops of ``call`` (16 images each); the window's figures.

    images/s is the window's slope (bench/throughput.Window); CPU per image is each
    process's CPU time over the window divided by the images that rate says it
    answered, for the server and for this process (the clients).
    """
    server_process, bench_process = psutil.Process(server.pid), psutil.Process()
    window = Window(
        server,
        warmup,
        seconds,
        probes={
            "server_cpu_s": lambda: cpu_seconds(server_process),
            "client_cpu_s": lambda: cpu_seconds(bench_process),
        },
    )

    async def caller(index: int) -> None:
        while window.open:
            sent = time.perf_counter()
            await call(index)
            window.record(sent, time.perf_counter(), IMAGES_PER_CALL)

    await asyncio.gather(window.sample_batches(), *(caller(index) for index in range(callers)))
    rate = window.rate()
    images = rate * seconds
    changes = window.changes
    return {
        "images_per_s": rate,
        "server_cpu_ms_per_image": changes["server_cpu_s"] * 1000 / images,
        "client_cpu_ms_per_image": changes["client_cpu_s"] * 1000 / images,
        "p50_ms": percentile(window.latencies, 50),
        "p99_ms": percentile(window.latencies, 99),
        "calls": float(len(window.latencies)),
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
        order = [("native", native), ("oip", oip)]
        for round_ in range(args.rounds):
            # native, oip, then oip, native: a load that grows or shrinks during the run
            # falls on both rows alike.
            for name, call in order if round_ % 2 == 0 else order[::-1]:
                row = await load(CALLERS, args.seconds, args.warmup, call, server)
                rows[name].append(row)
                print(f"round {round_ + 1} {name}: {row}", flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(row[key] for row in rows[name])

    def paired(key: str) -> list[float]:
        return [o[key] / n[key] for o, n in zip(rows["oip"], rows["native"], strict=True)]

    keys = ["images_per_s", "server_cpu_ms_per_image", "client_cpu_ms_per_image"]
    keys += ["p50_ms", "p99_ms"]
    summary = {name: {key: median(name, key) for key in keys} for name in rows}
    return {
        "model": args.model,
        "seconds": args.seconds,
        "warmup": args.warmup,
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


def framing(images: list[bytes], repeats: int) -> dict[str, float]:
    """Milliseconds per image of the server's protocol layer alone, for each protocol.

    Runs in a child process (see the module docstring). For one 16-image request:
    parse its bytes as the gate does; the OIP servicer's own checks and split of the
    BYTES tensor into elements, each wrapped as the pipeline's pb.Image; every image's
    bytes read as the pipeline reads them; then the response of 16 vectors (512-d)
    built and serialised as each servicer builds it.
    """
    from clipvision.inference_v2 import grpc_service_pb2 as oip
    from clipvision.server.pipelines.inference_plane import OUTPUT, _elements

    vectors = np.random.default_rng(0).standard_normal((IMAGES_PER_CALL, 512)).astype("<f4")
    batch = images[:IMAGES_PER_CALL]
    native_wire = pb.EmbedImagesRequest(
        images=[pb.Image(content=data) for data in batch]
    ).SerializeToString()
    tensor = oip.ModelInferRequest.InferInputTensor(
        name="IMAGE", datatype="BYTES", shape=[IMAGES_PER_CALL]
    )
    raw = b"".join(len(data).to_bytes(4, "little") + data for data in batch)
    oip_wire = oip.ModelInferRequest(
        model_name="m", inputs=[tensor], raw_input_contents=[raw]
    ).SerializeToString()

    def native() -> int:
        request = pb.EmbedImagesRequest.FromString(native_wire)
        read = sum(len(image.content) for image in request.images)
        response = pb.EmbedImagesResponse(
            results=[
                pb.EmbedImagesResult(
                    embedding=pb.Embedding(values=row.tolist(), model="m", normalized=True)
                )
                for row in vectors
            ]
        )
        return read + len(response.SerializeToString())

    def inference() -> int:
        request = oip.ModelInferRequest.FromString(oip_wire)
        elements = _elements(request, "IMAGE", 64, False)
        read = sum(len(pb.Image(content=element).content) for element in elements)
        output = oip.ModelInferResponse.InferOutputTensor(
            name=OUTPUT, datatype="FP32", shape=[len(vectors), vectors.shape[1]]
        )
        response = oip.ModelInferResponse(
            model_name="m",
            model_version="1",
            outputs=[output],
            raw_output_contents=[np.stack(list(vectors)).astype("<f4", copy=False).tobytes()],
        )
        return read + len(response.SerializeToString())

    result: dict[str, float] = {}
    for name, work in (("native", native), ("oip", inference)):
        work()
        timings = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(repeats):
                work()
            timings.append((time.perf_counter() - started) / repeats / IMAGES_PER_CALL)
        result[f"{name}_ms_per_image"] = min(timings) * 1000  # the least disturbed of five
    return result


def framing_in_child(repeats: int) -> dict[str, float]:
    """framing() in a fresh interpreter, where no tritonclient stubs are loaded."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import oip; "
        "from throughput import make_jpegs; "
        "print(json.dumps(oip.framing(make_jpegs(), int(sys.argv[2]))))"
    )
    here = str(Path(__file__).resolve().parent)
    output = subprocess.run(
        [sys.executable, "-c", code, here, str(repeats)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    return result


def print_table(report: dict[str, Any]) -> None:
    framed = report["framing"]
    if "median" in report:
        print(
            f"\n{report['model']}, {report['callers']} callers x {report['images_per_call']} "
            f"images per call, median of {report['rounds']} rounds, each a "
            f"{report['seconds']:.0f} s window after {report['warmup']:.0f} s of load\n"
        )
        print("| row | images/s | server CPU ms/image | client CPU ms/image | p50 ms | p99 ms |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        labels = {"native": "EmbedImages (native)", "oip": "tritonclient infer (OIP v2)"}
        for name, label in labels.items():
            row = report["median"][name]
            print(
                f"| {label} | {row['images_per_s']:.2f} | {row['server_cpu_ms_per_image']:.1f} "
                f"| {row['client_cpu_ms_per_image']:.2f} | {row['p50_ms']:.0f} "
                f"| {row['p99_ms']:.0f} |"
            )
        rounds = ", ".join(f"{ratio:.3f}" for ratio in report["oip_over_native_rounds"])
        cpu = ", ".join(f"{ratio:.3f}" for ratio in report["server_cpu_rounds"])
        print(
            f"\noip / native images/s, median of rounds: {report['oip_over_native']:.3f} ({rounds})"
        )
        print(
            f"oip / native server CPU per image: {report['server_cpu_oip_over_native']:.3f} ({cpu})"
        )
    print(
        f"framing alone (server side, in-process, 16 images per request): native "
        f"{framed['native_ms_per_image']:.4f} ms per image, OIP "
        f"{framed['oip_ms_per_image']:.4f} ms per image"
    )
    if "median" in report:
        per_image = report["median"]["native"]["server_cpu_ms_per_image"]
        extra = framed["oip_ms_per_image"] - framed["native_ms_per_image"]
        print(
            f"OIP framing's extra cost against the server's CPU per image: {extra / per_image:.3%}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B/32")
    parser.add_argument("--seconds", type=float, default=20.0, help="per row and round")
    parser.add_argument(
        "--warmup", type=float, default=5.0, help="seconds of load before each window"
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="serve the tests' tiny CLIP")
    parser.add_argument(
        "--framing-only", action="store_true", help="only the in-process framing row"
    )
    parser.add_argument("--framing-repeats", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "oip.json")
    args = parser.parse_args(argv)
    framed = framing_in_child(args.framing_repeats)
    report: dict[str, Any] = {"framing": framed}
    if not args.framing_only:
        with tempfile.TemporaryDirectory() as tiny:
            if args.tiny:
                sys.path.insert(0, str(ROOT))
                from tests.checkpoints import build_clip_model

                build_clip_model(Path(tiny))
                args.model = f"tiny={tiny}"
            report.update(asyncio.run(run(args)))
            if args.tiny:
                report["model"] = "tiny (tests/checkpoints.py, 16-d)"
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
