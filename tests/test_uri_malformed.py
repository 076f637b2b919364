"""Every malformed or hostile image URI is answered with a reason, never INTERNAL.

The server allows everything it can here (file roots, any domain, plain http,
private addresses), so each row is refused by the URI checks themselves, and
none of them reaches the network.
"""

from __future__ import annotations

import base64
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

INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED
ROOT = "{root}"  # replaced by the allowed file root
PHOTO = photo_bytes("rocket.jpg")

# (uri, expected status, expected reason)
ROWS: list[tuple[str, grpc.StatusCode, str]] = [
    # file://
    (f"file://{ROOT}/rocket%00.jpg", INVALID, "URI_INVALID"),
    (f"file://{ROOT}/rocket\x00.jpg", INVALID, "URI_INVALID"),
    (f"file://{ROOT}/rocket .jpg", INVALID, "URI_INVALID"),
    (f"file://{ROOT}/rocket.jpg?size=1", INVALID, "URI_INVALID"),
    (f"file://{ROOT}/rocket.jpg#top", INVALID, "URI_INVALID"),
    ("file:rocket.jpg", INVALID, "URI_INVALID"),
    (f"file://{ROOT}/" + "x/" * 5000, INVALID, "URI_INVALID"),
    (f"file://{ROOT}/%ff%fe.jpg", INVALID, "URI_UNREADABLE"),
    (f"file://{ROOT}/" + "a" * 300 + ".jpg", INVALID, "URI_UNREADABLE"),
    ("file://images.example.com/rocket.jpg", DENIED, "URI_PATH_REFUSED"),
    (f"file://{ROOT}/%2e%2e/%2e%2e/etc/passwd", DENIED, "URI_PATH_REFUSED"),
    # ports
    ("https://images.example.com:abc/a.jpg", INVALID, "URI_INVALID"),
    ("https://images.example.com:99999/a.jpg", INVALID, "URI_INVALID"),
    ("https://images.example.com:0/a.jpg", INVALID, "URI_INVALID"),
    ("https://images.example.com:443:1/a.jpg", INVALID, "URI_INVALID"),
    # control characters, spaces, NUL, backslashes
    ("https://images.example.com/a\x01.jpg", INVALID, "URI_INVALID"),
    ("https://images.example.com/a\x7f.jpg", INVALID, "URI_INVALID"),
    ("https://images.example.com/a\n.jpg", INVALID, "URI_INVALID"),
    ("https://images.example.com/a b.jpg", INVALID, "URI_INVALID"),
    ("https://images example.com/a.jpg", INVALID, "URI_INVALID"),
    ("https://images.example.com/a%00.jpg", INVALID, "URI_INVALID"),
    ("https://localhost\\@images.example.com/a.jpg", INVALID, "URI_INVALID"),
    ("https://images.example.com/" + "x" * 9000, INVALID, "URI_INVALID"),
    # userinfo
    ("https://user:secret@images.example.com/a.jpg", INVALID, "URI_INVALID"),
    ("https://images.example.com@localhost/a.jpg", INVALID, "URI_INVALID"),
    ("https://@images.example.com/a.jpg", INVALID, "URI_INVALID"),
    # IPv6 literals
    ("https://[::1/a.jpg", INVALID, "URI_INVALID"),
    ("https://[::1]x/a.jpg", INVALID, "URI_INVALID"),
    ("https://[zz::1]/a.jpg", INVALID, "URI_INVALID"),
    ("https://[fe80::1%25eth0]/a.jpg", INVALID, "URI_INVALID"),
    ("https://[fe80::1]/a.jpg", DENIED, "URI_ADDRESS_REFUSED"),
    ("https://[::ffff:169.254.169.254]/a.jpg", DENIED, "URI_ADDRESS_REFUSED"),
    # IPv4 literals other than dotted quads: inet_aton reads them all as 127.0.0.1
    ("https://0177.0.0.1/a.jpg", INVALID, "URI_INVALID"),
    ("https://0x7f.1/a.jpg", INVALID, "URI_INVALID"),
    ("https://0x7f000001/a.jpg", INVALID, "URI_INVALID"),
    ("https://2130706433/a.jpg", INVALID, "URI_INVALID"),
    ("https://127.1/a.jpg", INVALID, "URI_INVALID"),
    ("https://127.0.0.1.1/a.jpg", INVALID, "URI_INVALID"),
    ("https://256.0.0.1/a.jpg", INVALID, "URI_INVALID"),
    ("https://169.254.169.254/latest/meta-data", DENIED, "URI_ADDRESS_REFUSED"),
    ("https://0.0.0.0/a.jpg", DENIED, "URI_ADDRESS_REFUSED"),
    # host names that are not DNS names, IDNA failures
    ("https://xn--zz.example/a.jpg", INVALID, "URI_INVALID"),
    ("https://ex\u200bample.com/a.jpg", INVALID, "URI_INVALID"),
    ("https://\u2488.example/a.jpg", INVALID, "URI_INVALID"),
    ("https://images..example.com/a.jpg", INVALID, "URI_INVALID"),
    ("https://-images.example.com/a.jpg", INVALID, "URI_INVALID"),
    ("https://" + "a" * 64 + ".example.com/a.jpg", INVALID, "URI_INVALID"),
    ("https://%6cocalhost/a.jpg", INVALID, "URI_INVALID"),
    ("https://*.example.com/a.jpg", INVALID, "URI_INVALID"),
    ("https:///a.jpg", INVALID, "URI_INVALID"),
    ("https:images.example.com/a.jpg", INVALID, "URI_INVALID"),
    # schemes
    ("gopher://images.example.com/a.jpg", INVALID, "URI_INVALID"),
    ("jar:https://images.example.com/a.zip!/a.jpg", INVALID, "URI_INVALID"),
    ("", INVALID, "URI_INVALID"),
    ("rocket.jpg", INVALID, "URI_INVALID"),
    # data:
    ("data:image/jpeg;base64", INVALID, "URI_INVALID"),
    ("data:" + "x" * 2000 + ",QUJD", INVALID, "URI_INVALID"),
    ("data:image/jpeg;base64,QQ", INVALID, "URI_INVALID"),
    ("data:image/jpeg;base64,QU JD", INVALID, "URI_INVALID"),
    ("data:image/jpeg;base64,QUJD\u00e9", INVALID, "URI_INVALID"),
    ("data:image/jpeg;base64,QQ==QUJD", INVALID, "URI_INVALID"),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The allowed file root, holding one photo."""
    root = tmp_path_factory.mktemp("images")
    (root / "rocket.jpg").write_bytes(PHOTO)
    return root


@pytest.fixture(scope="module")
async def open_stub(base_settings: Settings, root: Path) -> AsyncIterator[Stub]:
    """A server that allows every kind of URI, private addresses included."""
    policy = FetchPolicy(
        file_roots=(root,),
        fetch_domains=("*",),
        allow_http=True,
        allow_private_addresses=True,
        timeout_s=2.0,
    )
    # Messages up to 64 MiB, as an operator might allow: the data: URI's own limit must hold
    # where the message limit (by default the largest image as a data: URI) does not.
    settings = settings_with(base_settings, fetch_policy=policy, max_message_bytes=64 << 20)
    async with running_server(settings) as (_, channel):
        yield pb_grpc.EmbeddingServiceStub(channel)


async def refusal(stub: Stub, uri: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EmbedImage(pb.EmbedImageRequest(image=pb.Image(uri=uri)), timeout=10)
    return caught.value


@pytest.mark.parametrize(("uri", "code", "reason"), ROWS, ids=[ascii(row[0])[:60] for row in ROWS])
async def test_malformed_uris_are_refused_with_a_reason(
    open_stub: Stub, root: Path, uri: str, code: grpc.StatusCode, reason: str
) -> None:
    error = await refusal(open_stub, uri.replace(ROOT, str(root)))
    assert error.code() == code, error.details()
    assert error_info(error).reason == reason, error.details()
    assert (error.details() or "").endswith(".")


async def test_the_table_is_not_refusing_everything(open_stub: Stub, root: Path) -> None:
    reply = await open_stub.EmbedImage(
        pb.EmbedImageRequest(image=pb.Image(uri=(root / "rocket.jpg").as_uri())), timeout=10
    )
    assert reply.embedding.values


async def test_an_oversized_data_uri_is_refused_before_it_is_decoded(open_stub: Stub) -> None:
    # 63 MB: under the 64 MiB message limit, far over 4/3 of the 20 MiB image limit.
    uri = "data:image/jpeg;base64," + "A" * 63_000_000
    started = time.monotonic()
    error = await refusal(open_stub, uri)
    assert error.code() == INVALID
    assert error_info(error).reason == "IMAGE_TOO_LARGE"
    assert str(20 * 1024 * 1024) in (error.details() or "")
    assert time.monotonic() - started < 5


async def test_large_data_uris_are_decoded_exactly(open_stub: Stub) -> None:
    # Over 1 MiB of base64 is decoded in slices in a worker; slices must join exactly.
    padded = PHOTO + b"\0" * (1_500_001 - len(PHOTO))  # JPEG readers stop at the end marker
    payload = base64.b64encode(padded).decode()
    uri = "data:image/jpeg;base64," + payload
    by_uri = await open_stub.EmbedImage(pb.EmbedImageRequest(image=pb.Image(uri=uri)), timeout=10)
    content = pb.EmbedImageRequest(image=pb.Image(content=padded))
    by_content = await open_stub.EmbedImage(content, timeout=10)
    assert list(by_uri.embedding.values) == list(by_content.embedding.values)
    # Padding in the middle is refused, wherever the slices fall.
    early_padding = "data:image/jpeg;base64,QQ==" + payload
    refused = await refusal(open_stub, early_padding)
    assert error_info(refused).reason == "URI_INVALID"
