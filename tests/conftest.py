"""Shared fixtures: tiny real checkpoints and a real server on 127.0.0.1:0."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from PIL import Image

from clipvision.server.app import ClipVisionServer, create_server
from clipvision.server.config.settings import ModelSpec, Settings
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.checkpoints import build_clip_model, build_vision_model
from tests.pki import Pki, build_pki

if TYPE_CHECKING:
    # Only the generated .pyi has the asyncio stub's type; at run time the stub
    # class adapts to the channel it is given.
    from clipvision.v1.embedding_service_pb2_grpc import EmbeddingServiceAsyncStub as AsyncStub

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full CLIPModel checkpoint directory (16-d)."""
    directory = tmp_path_factory.mktemp("tiny-clip")
    build_clip_model(directory)
    return directory


@pytest.fixture(scope="session")
def vision_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLIPVisionModelWithProjection checkpoint directory (24-d, 40 px, own mean/std)."""
    directory = tmp_path_factory.mktemp("tiny-vision")
    build_vision_model(directory)
    return directory


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for localhost and 127.0.0.1, and a client certificate."""
    return build_pki(tmp_path_factory)


@pytest.fixture(scope="session")
def base_settings(clip_dir: Path, vision_dir: Path) -> Settings:
    """Two tiny models on the CPU, listening on a free loopback port."""
    return Settings(
        models=(ModelSpec.parse(f"tiny={clip_dir}"), ModelSpec.parse(f"tiny-vision={vision_dir}")),
        address="127.0.0.1:0",
        device="cpu",
        max_batch_size=8,
        max_batch_images=16,
        stream_window=16,
        preprocess_workers=2,
        grace_period_s=5.0,
    )


@asynccontextmanager
async def running_server(
    settings: Settings, *, load: bool = True
) -> AsyncIterator[tuple[ClipVisionServer, grpc.aio.Channel]]:
    """Start a real server and a channel to it; stop both afterwards."""
    server, port = await create_server(settings)
    await server.start()
    try:
        if load:
            await server.load_models()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield server, channel
    finally:
        await server.stop(grace=1.0)


@pytest.fixture(scope="session")
async def server_channel(
    base_settings: Settings,
) -> AsyncIterator[tuple[ClipVisionServer, grpc.aio.Channel]]:
    """One loaded server shared by the read-only tests."""
    async with running_server(base_settings) as pair:
        yield pair


@pytest.fixture
def stub(server_channel: tuple[ClipVisionServer, grpc.aio.Channel]) -> AsyncStub:
    """An EmbeddingService stub on the shared server."""
    return pb_grpc.EmbeddingServiceStub(server_channel[1])


def settings_with(settings: Settings, **changes: object) -> Settings:
    """A copy of ``settings`` with some fields changed."""
    return replace(settings, **changes)  # type: ignore[arg-type]


def encode(image: Image.Image, fmt: str = "JPEG", **params: object) -> bytes:
    """Encode a PIL image in memory."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def photo_bytes(name: str) -> bytes:
    """One of the real photographs in tests/data."""
    return (DATA / name).read_bytes()
