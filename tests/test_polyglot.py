"""Other languages reach the server from proto/ alone, or from nothing but reflection.

- A Node.js client (@grpc/grpc-js + @grpc/proto-loader, pinned in tests/node/)
  loads proto/ as it is and gets the same image and text vectors as the Python client.
- ``buf curl`` calls the server through server reflection, with no proto at all.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from clipvision.client import AsyncEmbeddingClient, ClipVisionError
from clipvision.server.config.settings import Settings
from tests.conftest import DATA, encode, photo_bytes
from tests.live_server import LiveServer, live_server

ROOT = Path(__file__).resolve().parent.parent
NODE_PROJECT = ROOT / "tests" / "node"
RUN_TIMEOUT = 60.0
ATOL = 1e-6


@pytest.fixture(scope="module")
async def live(base_settings: Settings) -> AsyncIterator[LiveServer]:
    async with live_server(base_settings) as server:
        yield server


async def run(*command: str | Path, stdin: bytes | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *map(str, command),
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), RUN_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_node_client_from_the_proto_gets_the_python_clients_vectors(
    live: LiveServer, tmp_path: Path
) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed; the polyglot check needs the node command")
    if not (NODE_PROJECT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("tests/node has no node_modules; run: npm ci --prefix tests/node")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(photo_bytes("rocket.jpg")[:500])
    images = [DATA / "rocket.jpg", DATA / "logo.png", corrupt, DATA / "chelsea.png"]
    texts = ["a photo of a cat", "猫の写真 🍜", "", "a photo of a dog sleeping on the sofa " * 4]

    code, out, err = await run(node, NODE_PROJECT / "embed.mjs", live.address, ROOT / "proto",
                               *images, "--text", *texts)  # fmt: skip
    assert code == 0, err
    node_results = json.loads(out)

    async with AsyncEmbeddingClient(live.address) as client:
        expected = [r async for r in client.embed_images(images, return_exceptions=True)]
        expected_texts = await client.embed_texts(texts, return_exceptions=True)
    assert node_results["models"] == [
        {"name": "tiny", "embedding_dimension": 16},
        {"name": "tiny-vision", "embedding_dimension": 24},
    ]
    assert [r["id"] for r in node_results["stream"]] == ["0", "1", "2", "3"]
    for unary, streamed, python in zip(
        node_results["unary"], node_results["stream"], expected, strict=True
    ):
        if isinstance(python, ClipVisionError):
            assert unary == {"code": 3, "details": python.message}
            assert streamed["error"] == {
                "code": 3,
                "reason": python.reason,
                "message": python.message,
            }
        else:
            np.testing.assert_allclose(unary["values"], python, atol=ATOL)
            np.testing.assert_allclose(streamed["values"], python, atol=ATOL)
    assert [
        "error" if isinstance(python_text, ClipVisionError) else python_text.truncated
        for python_text in expected_texts
    ] == [False, False, "error", True]
    for node_text, python_text in zip(node_results["texts"], expected_texts, strict=True):
        if isinstance(python_text, ClipVisionError):
            assert node_text == {"code": 3, "details": python_text.message}
        else:
            assert node_text["truncated"] is python_text.truncated
            np.testing.assert_allclose(node_text["values"], python_text.vector, atol=ATOL)


def buf_command() -> str:
    # buf-bin installs the CLI beside the interpreter; fall back to PATH.
    beside = Path(sys.executable).parent / "buf"
    buf = str(beside) if beside.exists() else shutil.which("buf")
    assert buf is not None, "the buf CLI is missing: pip install -e '.[dev]'"
    return buf


async def buf_curl(live: LiveServer, method: str, body: dict[str, Any]) -> tuple[int, Any]:
    code, out, err = await run(
        buf_command(),
        "curl",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        "--data",
        "@-",
        f"http://{live.address}/clipvision.v1.EmbeddingService/{method}",
        stdin=json.dumps(body).encode(),
    )
    return code, json.loads(out or err)


async def test_buf_curl_calls_the_server_through_reflection(live: LiveServer) -> None:
    content = encode(Image.new("RGB", (24, 24), (200, 30, 90)), "PNG")
    data_uri = "data:image/png;base64," + base64.b64encode(content).decode()

    code, reply = await buf_curl(live, "EmbedImage", {"image": {"uri": data_uri}})
    assert code == 0, reply
    async with AsyncEmbeddingClient(live.address) as client:
        expected = await client.embed_image(content)
    assert reply["embedding"]["model"] == "tiny"
    assert reply["embedding"]["normalized"] is True
    np.testing.assert_allclose(reply["embedding"]["values"], expected, atol=ATOL)

    body = {"image": {"content": base64.b64encode(content).decode()}, "model": "tiny-vision"}
    code, reply = await buf_curl(live, "EmbedImage", body)
    assert code == 0, reply
    assert len(reply["embedding"]["values"]) == 24

    code, reply = await buf_curl(live, "GetModelInfo", {})
    assert code == 0, reply
    assert [m["embeddingDimension"] for m in reply["models"]] == [16, 24]

    code, reply = await buf_curl(live, "EmbedImage", {"image": {"content": "bm90IGFuIGltYWdl"}})
    assert code != 0
    assert reply["code"] == "invalid_argument"
    assert reply["details"][0]["type"] == "google.rpc.ErrorInfo"
