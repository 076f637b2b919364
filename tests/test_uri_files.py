"""file:// URIs naming a FIFO, a directory or a device are refused at once, leaking nothing.

A FIFO without a writer used to block a preprocessing thread forever in open(),
and a directory used to leak one descriptor per call and answer INTERNAL.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from clipvision.server.config.limits import FetchPolicy
from clipvision.server.config.settings import Settings
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import photo_bytes, running_server, settings_with
from tests.test_errors import error_info

if TYPE_CHECKING:
    from clipvision.v1.embedding_service_pb2_grpc import EmbeddingServiceAsyncStub as Stub

PHOTO = photo_bytes("rocket.jpg")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An allowed root holding a photo, a FIFO nobody writes to and a subdirectory."""
    root = tmp_path_factory.mktemp("images")
    (root / "rocket.jpg").write_bytes(PHOTO)
    os.mkfifo(root / "pipe.jpg")
    (root / "album.jpg").mkdir()
    return root


@pytest.fixture(scope="module")
async def file_stub(base_settings: Settings, root: Path) -> AsyncIterator[Stub]:
    """A server that may read below ``root`` and below /dev."""
    settings = settings_with(
        base_settings, fetch_policy=FetchPolicy(file_roots=(root, Path("/dev")))
    )
    async with running_server(settings) as (_, channel):
        yield pb_grpc.EmbeddingServiceStub(channel)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def refused_reason(stub: Stub, uri: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EmbedImage(pb.EmbedImageRequest(image=pb.Image(uri=uri)), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return str(error_info(caught.value).reason)


@pytest.mark.parametrize(
    ("name", "kind"),
    [("pipe.jpg", "a FIFO"), ("album.jpg", "a directory"), ("/dev/zero", "a device")],
)
async def test_special_files_are_refused_with_a_reason(
    file_stub: Stub, root: Path, name: str, kind: str
) -> None:
    uri = (root / name).as_uri()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await file_stub.EmbedImage(pb.EmbedImageRequest(image=pb.Image(uri=uri)), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "URI_NOT_A_FILE"
    assert kind in (caught.value.details() or "")


async def test_fifos_block_no_worker_and_nothing_leaks(file_stub: Stub, root: Path) -> None:
    uris = [(root / "pipe.jpg").as_uri(), (root / "album.jpg").as_uri(), "file:///dev/zero"]
    # More FIFO calls at once than there are preprocessing workers (2): none may hang.
    started = time.monotonic()
    reasons = await asyncio.gather(*(refused_reason(file_stub, uris[0]) for _ in range(8)))
    assert set(reasons) == {"URI_NOT_A_FILE"}
    assert time.monotonic() - started < 2
    reply = await file_stub.EmbedImage(
        pb.EmbedImageRequest(image=pb.Image(content=PHOTO)), timeout=5
    )
    assert reply.embedding.values

    before = open_descriptors()
    for index in range(200):
        assert await refused_reason(file_stub, uris[index % 3]) == "URI_NOT_A_FILE"
    # One leaked descriptor per call would show as +200.
    assert open_descriptors() - before < 20
    by_uri = await file_stub.EmbedImage(
        pb.EmbedImageRequest(image=pb.Image(uri=(root / "rocket.jpg").as_uri())), timeout=5
    )
    assert list(by_uri.embedding.values) == list(reply.embedding.values)
