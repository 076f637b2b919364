"""Texts per second, Classify latency, and images beside them, per backend, in one run.

    .venv/bin/python bench/text.py                    # ViT-B/32 dummy weights, torch and auto
    .venv/bin/python bench/text.py --seconds 5        # shorter
    .venv/bin/python bench/text.py --backends auto    # one server only
    python3 bench/text.py --device cuda --dtype float16 --backends torch   # on a GPU

1. EmbedText at 1 and 32 callers (one connection per 32 callers): texts/s, p50,
   p99, mean text batch;
2. one EmbedTextStream;
3. Classify with 10 labels, one caller: cold (labels never seen, so ten texts go
   through the text tower with the image) and warm (the same labels again, from
   the label cache);
4. the image figures of bench/throughput.py's unary rows (1 and 32 callers) in the
   same run, as the control: they must stay within noise of docs/PERFORMANCE.md.

With several --backends (default: torch and auto, that is ONNX Runtime for both towers
on a CPU where installed), one server runs per backend, all started at once, and each
row runs on every server in turn, so that they see the same machine state.

With --dummy-weights the tokenizer is byte-level (one token per byte, see
docs/PERFORMANCE.md): texts are about 3x more tokens than with CLIP's real BPE
vocabulary, so the text figures here are a lower bound for the real checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import ServerProcess, cycle, make_jpegs, percentile

from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from clipvision.v1.embedding_service_pb2_grpc import EmbeddingServiceAsyncStub as Stub

ROOT = Path(__file__).resolve().parent.parent
CALLERS_PER_CONNECTION = 32
NOUNS = ["cat", "dog", "city at night", "bowl of ramen", "mountain lake", "red car", "beach"]


def queries() -> list[str]:
    """Search queries of typical length (5 to 12 words)."""
    return [
        f"a photo of a {noun} {detail}"
        for noun in NOUNS
        for detail in ("", "in the rain", "seen from above at sunset", "on a sunny day")
    ]


async def metric_sum(server: ServerProcess, family: str) -> tuple[float, float]:
    """(sum, count) of a histogram family from /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    total = count = 0.0
    for metrics in text_string_to_metric_families(text):
        if metrics.name == family:
            for sample in metrics.samples:
                if sample.name.endswith("_sum"):
                    total += sample.value
                elif sample.name.endswith("_count"):
                    count += sample.value
    return total, count


async def unary_load(
    server: ServerProcess,
    callers: int,
    seconds: float,
    call: Callable[[Stub], Awaitable[object]],
    family: str,
) -> dict[str, float]:
    """``callers`` concurrent callers of ``call`` for ``seconds``; rate, latencies, mean batch."""
    latencies: list[float] = []
    connections = -(-callers // CALLERS_PER_CONNECTION)
    async with contextlib.AsyncExitStack() as stack:
        stubs = [
            pb_grpc.EmbeddingServiceStub(
                await stack.enter_async_context(
                    grpc.aio.insecure_channel(
                        f"127.0.0.1:{server.port}", options=[("grpc.use_local_subchannel_pool", 1)]
                    )
                )
            )
            for _ in range(connections)
        ]
        for stub in stubs:
            await call(stub)  # connect and warm
        before = await metric_sum(server, family)
        started = time.perf_counter()
        deadline = started + seconds

        async def caller(stub: Stub) -> None:
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                await call(stub)
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(caller(stubs[i % connections]) for i in range(callers)))
        elapsed = time.perf_counter() - started
        after = await metric_sum(server, family)
    return {
        "per_s": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "mean_batch": (after[0] - before[0]) / max(1.0, after[1] - before[1]),
    }


async def text_stream(server: ServerProcess, seconds: float) -> dict[str, float]:
    source = cycle([text.encode() for text in queries()])
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        before = await metric_sum(server, "clipvision_text_batch_size")
        started = time.perf_counter()
        deadline = started + seconds

        async def requests() -> AsyncIterator[pb.EmbedTextStreamRequest]:
            index = 0
            while time.perf_counter() < deadline:
                sent_at[str(index)] = time.perf_counter()
                yield pb.EmbedTextStreamRequest(id=str(index), text=next(source).decode())
                index += 1

        async for response in stub.EmbedTextStream(requests()):
            if response.HasField("error"):
                raise RuntimeError(f"stream item failed: {response.error.message}")
            latencies.append(time.perf_counter() - sent_at.pop(response.id))
        elapsed = time.perf_counter() - started
        after = await metric_sum(server, "clipvision_text_batch_size")
    return {
        "per_s": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "mean_batch": (after[0] - before[0]) / max(1.0, after[1] - before[1]),
    }


async def classify_latency(server: ServerProcess, image: bytes, count: int) -> dict[str, float]:
    """Classify with 10 labels, one call at a time: new labels (cold), then the same (warm)."""
    cold: list[float] = []
    warm: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        for round_ in range(count):
            labels = [f"{noun} number {round_}-{index}" for index, noun in enumerate(NOUNS[:5] * 2)]
            request = pb.ClassifyRequest(
                image=pb.Image(content=image), labels=labels, prompt_template="a photo of a {}"
            )
            for times in (cold, warm):
                started = time.perf_counter()
                await stub.Classify(request)
                times.append(time.perf_counter() - started)
    return {
        "cold_p50_ms": statistics.median(cold) * 1000,
        "warm_p50_ms": statistics.median(warm) * 1000,
    }


async def run(args: argparse.Namespace) -> dict[str, object]:
    images = make_jpegs()
    texts = queries()
    flags = ["--model", args.model, "--device", args.device, "--dtype", args.dtype]
    flags += ["--max-batch-size", "32", "--max-queue-size", "1024"]
    backends: list[str] = args.backends
    rows: dict[str, dict[str, dict[str, float]]] = {backend: {} for backend in backends}
    classify: dict[str, dict[str, float]] = {}
    runtimes: dict[str, str] = {}
    text_source = cycle([text.encode() for text in texts])
    image_source = cycle(images)

    def embed_text(stub: Stub) -> Awaitable[object]:
        return stub.EmbedText(pb.EmbedTextRequest(text=next(text_source).decode()), timeout=120)

    def embed_image(stub: Stub) -> Awaitable[object]:
        request = pb.EmbedImageRequest(image=pb.Image(content=next(image_source)))
        return stub.EmbedImage(request, timeout=120)

    async with contextlib.AsyncExitStack() as stack:
        servers = {
            backend: await stack.enter_async_context(ServerProcess(*flags, "--backend", backend))
            for backend in backends
        }
        for backend, server in servers.items():
            runtimes[backend] = await text_runtime(server)

        async def each(name: str, measure: Callable[[ServerProcess], Awaitable[object]]) -> None:
            for backend, server in servers.items():
                rows[backend][name] = await measure(server)  # type: ignore[assignment]
                print(f"{backend}: {name}: {rows[backend][name]}", flush=True)

        for callers in (1, 32):
            name = f"EmbedText, {callers} caller{'s' if callers > 1 else ''}"
            await each(
                name,
                lambda server, c=callers: unary_load(  # type: ignore[misc]
                    server, c, args.seconds, embed_text, "clipvision_text_batch_size"
                ),
            )
        await each("one EmbedTextStream", lambda server: text_stream(server, args.seconds))
        for callers in (1, 32):
            name = f"EmbedImage, {callers} caller{'s' if callers > 1 else ''}"
            await each(
                name,
                lambda server, c=callers: unary_load(  # type: ignore[misc]
                    server, c, args.seconds, embed_image, "clipvision_batch_size"
                ),
            )
        for backend, server in servers.items():
            classify[backend] = await classify_latency(server, images[0], args.classify)
            print(f"{backend}: Classify, 10 labels: {classify[backend]}", flush=True)
    return {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "seconds": args.seconds,
        "text_runtime": runtimes,
        "rows": rows,
        "classify_10_labels": classify,
    }


async def text_runtime(server: ServerProcess) -> str:
    """The runtime the server says runs its text tower (GetModelInfo)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        info = await pb_grpc.EmbeddingServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest())
    return info.models[0].text_runtime


def print_table(report: dict[str, Any]) -> None:
    rows: dict[str, dict[str, dict[str, float]]] = report["rows"]
    for backend, table in rows.items():
        print(
            f"\n{report['model']} (dummy weights), {report['dtype']} on {report['device']}, "
            f"{report['seconds']} s per row, --backend {backend} (text tower on "
            f"{report['text_runtime'][backend]})"
        )
        print("| scenario | items/s | p50 ms | p99 ms | mean batch |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, row in table.items():
            print(
                f"| {name} | {row['per_s']:.1f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} "
                f"| {row['mean_batch']:.1f} |"
            )
        classify = report["classify_10_labels"][backend]
        print(
            f"\nClassify, 10 labels, one caller: cold p50 {classify['cold_p50_ms']:.1f} ms, "
            f"warm (label cache) p50 {classify['warm_p50_ms']:.1f} ms"
        )
    names = list(rows)
    if len(names) < 2:
        return
    base = names[0]
    print(f"\nside by side: items/s of each backend over {base}'s, same row")
    print("| scenario | " + " | ".join(f"{name} / {base}" for name in names[1:]) + " |")
    print("| --- |" + " ---: |" * (len(names) - 1))
    for scenario in rows[base]:
        ratios = [
            rows[name][scenario]["per_s"] / rows[base][scenario]["per_s"] for name in names[1:]
        ]
        print(f"| {scenario} | " + " | ".join(f"{ratio:.2f}" for ratio in ratios) + " |")
    for name in names[1:]:
        cold = report["classify_10_labels"][name]["cold_p50_ms"]
        print(
            f"Classify cold p50, {name} / {base}: "
            f"{cold / report['classify_10_labels'][base]['cold_p50_ms']:.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B/32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seconds", type=float, default=10.0, help="per scenario")
    parser.add_argument("--classify", type=int, default=10, help="Classify rounds (cold + warm)")
    parser.add_argument(
        "--backends",
        type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
        default=["torch", "auto"],
        help="the servers' --backend values, measured side by side",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "text.json")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
