"""The clipvision-server process: start, serve, drain on SIGTERM, refuse bad start-ups."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc
import pytest

from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import photo_bytes
from tests.processes import server_process


async def test_sigterm_drains_in_flight_calls_and_exits_zero(clip_dir: Path) -> None:
    async with server_process(
        "--model", f"tiny={clip_dir}", "--device", "cpu", "--max-batch-delay-ms", "500"
    ) as server:
        port = int((await server.wait_for(r"listening on 127\.0\.0\.1:(\d+)")).group(1))
        await server.wait_for(r"serving tiny")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.EmbeddingServiceStub(channel)
            request = pb.EmbedImageRequest(image=pb.Image(content=photo_bytes("rocket.jpg")))
            in_flight = asyncio.ensure_future(stub.EmbedImage(request, timeout=30))
            await asyncio.sleep(0.2)
            server.process.send_signal(signal.SIGTERM)
            response = await in_flight
            assert len(response.embedding.values) == 16
        code, log = await server.finish()
    assert code == 0, log
    assert "event loop: uvloop" in log, "the server extra's uvloop runs the loop by default"
    assert "draining" in log
    assert "stopped" in log


async def test_the_loop_flag_picks_asyncio_and_a_missing_uvloop_is_one_line(
    clip_dir: Path, tmp_path: Path
) -> None:
    async with server_process(
        "--model", f"tiny={clip_dir}", "--device", "cpu", "--loop", "asyncio"
    ) as server:
        await server.wait_for(r"serving tiny")
        assert any("event loop: asyncio" in line for line in server.log)
        server.process.send_signal(signal.SIGTERM)
        code, _ = await server.finish()
    assert code == 0
    # Where uvloop cannot be imported, --loop uvloop says so in one line (auto falls back).
    (tmp_path / "uvloop.py").write_text("raise ModuleNotFoundError('no uvloop', name='uvloop')\n")
    async with server_process(
        "--model",
        f"tiny={clip_dir}",
        "--loop",
        "uvloop",
        env={"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])},
    ) as server:
        code, log = await server.finish()
    assert code == 2
    assert "--loop uvloop, but uvloop is not installed" in log
    assert "Traceback" not in log


async def test_missing_checkpoint_stops_the_server_with_a_clear_message(tmp_path: Path) -> None:
    async with server_process("--model", str(tmp_path / "absent")) as server:
        code, log = await server.finish()
    assert code == 1
    assert "does not exist" in log
    assert "Traceback" not in log


async def test_unreachable_hub_names_the_two_ways_on(tmp_path: Path) -> None:
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    async with server_process(env=env) as server:
        code, log = await server.finish()
    assert code == 1
    assert "local checkpoint directory" in log
    assert "--dummy-weights" in log


@pytest.mark.parametrize("argv", [["--help"]])
async def test_help_exits_zero(argv: list[str]) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clipvision.server.cli",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    assert process.returncode == 0
    assert b"--dummy-weights" in out
    assert b"CLIPVISION_MODEL" in out


async def test_dummy_vit_b32_smoke_run_embeds_a_jpeg() -> None:
    async with server_process(
        "--model", "ViT-B/32", "--dummy-weights", "--max-batch-size", "2"
    ) as server:
        port = int((await server.wait_for(r"listening on 127\.0\.0\.1:(\d+)")).group(1))
        await server.wait_for(r"serving ViT-B/32")
        assert any("DUMMY RANDOM WEIGHTS" in line for line in server.log)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.EmbeddingServiceStub(channel)
            info = await stub.GetModelInfo(pb.GetModelInfoRequest())
            assert info.models[0].dummy_weights
            assert info.models[0].embedding_dimension == 512
            response = await stub.EmbedImage(
                pb.EmbedImageRequest(image=pb.Image(content=photo_bytes("rocket.jpg")))
            )
            assert len(response.embedding.values) == 512
            # Random weights serve the text tower too, with CLIP's context and vocabulary.
            assert list(info.models[0].modalities) == [pb.MODALITY_IMAGE, pb.MODALITY_TEXT]
            assert (info.models[0].text_context_length, info.models[0].vocab_size) == (77, 49408)
            text = await stub.EmbedText(pb.EmbedTextRequest(text="a photo of a rocket"))
            assert len(text.embedding.values) == 512
            assert not text.embedding.truncated
        server.process.send_signal(signal.SIGINT)
        code, log = await server.finish()
    assert code == 0, log
