"""Images/s and texts/s of models of different families, side by side, in one run.

    .venv/bin/python bench/families.py                                   # ViT-B/16, SigLIP-B/16
    .venv/bin/python bench/families.py --models ViT-B/16,SigLIP-B/16,SigLIP2-B/16 --seconds 5
    python3 bench/families.py --device cuda --dtype float16 --backend torch     # on a GPU

One server per model (dummy weights: each architecture's full size, so the same FLOPs
as the real checkpoint), all started first; then each row runs on every server in
turn, so that they see the same machine state:

1. EmbedImage, 32 callers: images/s, p50, mean batch;
2. EmbedText, 32 callers: texts/s, p50, mean batch;
3. EmbedText, 1 caller: texts/s and p50 (one text per forward pass).

The queries are bench/text.py's (5 to 12 words). What differs between the families:
SigLIP pads every text to its full 64-token context (as it was trained; CLIP pads a
batch only to its longest text, at most 77), with a 768-wide text tower where
ViT-B/16's is 512; its image tower is the same ViT-B/16 with an attention-pooling
head instead of a projection. With --dummy-weights the tokenizers are byte-level, so
CLIP's texts are several times more tokens than with its real vocabulary (SigLIP's
are padded to 64 either way).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text import queries, unary_load
from throughput import ServerProcess, cycle, make_jpegs

from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from clipvision.v1.embedding_service_pb2_grpc import EmbeddingServiceAsyncStub as Stub

ROWS = ("EmbedImage, 32 callers", "EmbedText, 32 callers", "EmbedText, 1 caller")


async def describe(server: ServerProcess) -> dict[str, Any]:
    """What GetModelInfo says of the server's model: family, runtimes, context."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        info = await pb_grpc.EmbeddingServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest())
    model = info.models[0]
    return {
        "family": model.family,
        "embedding_dimension": model.embedding_dimension,
        "text_context_length": model.text_context_length,
        "image_runtime": model.image_runtime,
        "text_runtime": model.text_runtime,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    images = make_jpegs()
    image_source = cycle(images)
    text_source = cycle([text.encode() for text in queries()])

    def embed_image(stub: Stub) -> Awaitable[object]:
        request = pb.EmbedImageRequest(image=pb.Image(content=next(image_source)))
        return stub.EmbedImage(request, timeout=300)

    def embed_text(stub: Stub) -> Awaitable[object]:
        return stub.EmbedText(pb.EmbedTextRequest(text=next(text_source).decode()), timeout=300)

    flags = ["--device", args.device, "--dtype", args.dtype, "--backend", args.backend]
    flags += ["--max-batch-size", "32", "--max-queue-size", "1024"]
    measures: dict[str, Callable[[ServerProcess], Awaitable[dict[str, float]]]] = {
        ROWS[0]: lambda s: unary_load(s, 32, args.seconds, embed_image, "clipvision_batch_size"),
        ROWS[1]: lambda s: unary_load(
            s, 32, args.seconds, embed_text, "clipvision_text_batch_size"
        ),
        ROWS[2]: lambda s: unary_load(s, 1, args.seconds, embed_text, "clipvision_text_batch_size"),
    }
    rows: dict[str, dict[str, dict[str, float]]] = {model: {} for model in args.models}
    models: dict[str, dict[str, Any]] = {}
    async with contextlib.AsyncExitStack() as stack:
        servers = {}
        for model in args.models:
            servers[model] = await stack.enter_async_context(
                ServerProcess(*flags, "--model", model)
            )
            models[model] = await describe(servers[model])
            print(f"{model}: {models[model]}", flush=True)
        for name, measure in measures.items():
            for model, server in servers.items():
                rows[model][name] = await measure(server)
                print(f"{model}: {name}: {rows[model][name]}", flush=True)
    return {
        "device": args.device,
        "dtype": args.dtype,
        "backend": args.backend,
        "seconds": args.seconds,
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs",
        "models": models,
        "rows": rows,
    }


def cpu_model() -> str:
    """The CPU's model name (Linux), else what the platform module knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def print_table(report: dict[str, Any]) -> None:
    print(
        f"\n{report['dtype']} on {report['device']}, --backend {report['backend']}, "
        f"{report['seconds']} s per row, dummy weights ({report['machine']})"
    )
    print("| model | family | scenario | items/s | p50 ms | mean batch |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for name in ROWS:
        for model, table in report["rows"].items():
            row = table[name]
            print(
                f"| {model} | {report['models'][model]['family']} | {name} | "
                f"{row['per_s']:.1f} | {row['p50_ms']:.0f} | {row['mean_batch']:.1f} |"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        type=lambda value: value.split(","),
        default=["ViT-B/16", "SigLIP-B/16"],
        help="comma-separated presets, one server each (default: ViT-B/16,SigLIP-B/16)",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each row")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--backend", default="auto", help="auto, torch or onnxruntime")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    print_table(report)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
