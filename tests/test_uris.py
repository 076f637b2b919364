"""Image URIs: file:// under allowed roots, http(s):// with SSRF guards, both off by default.

The HTTP tests talk to a real server on 127.0.0.1, which the guards must refuse
unless the test allows private addresses.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, quote, urlsplit

import grpc
import numpy as np
import pytest

from clipvision.server.config.limits import FetchPolicy, ImageLimits
from clipvision.server.config.settings import Settings
from clipvision.server.errors import (
    ClipVisionError,
    InvalidImageError,
    Reason,
    UriRefusedError,
)
from clipvision.server.pipelines.fetch import check_address
from clipvision.server.pipelines.sources import ImageSources
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import photo_bytes, running_server, settings_with

PHOTO = photo_bytes("rocket.jpg")
LIMITS = ImageLimits(max_image_bytes=len(PHOTO) + 1000)


class ImageHandler(BaseHTTPRequestHandler):
    """/photo, /redirect?to=URL, /loop, /length?value=HEADER, /big (over the limit), /slow."""

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path == "/photo":
            self._reply(200, PHOTO)
        elif parts.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", parse_qs(parts.query)["to"][0])
            self.end_headers()
        elif parts.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        elif parts.path == "/length":
            self.send_response(200)
            self.send_header("Content-Length", parse_qs(parts.query)["value"][0])
            self.end_headers()
            self.wfile.write(PHOTO)
        elif parts.path == "/big":
            self.send_response(200)
            self.end_headers()  # no Content-Length: the cap must hold while streaming
            for _ in range(64):
                self.wfile.write(b"\xff" * 65536)
        elif parts.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(50):  # bounded: 5 s at most
                self.wfile.write(b"\xff")
                self.wfile.flush()
                time.sleep(0.1)
        else:
            self._reply(404, b"")

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class QuietServer(ThreadingHTTPServer):
    """Clients that hang up mid-body are what the tests do on purpose."""

    def handle_error(self, request: object, client_address: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_base() -> Iterator[str]:
    """A plain HTTP image server on 127.0.0.1, for as long as the module runs."""
    server = QuietServer(("127.0.0.1", 0), ImageHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://localhost:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class Sources(Protocol):
    def __call__(self, **policy: object) -> ImageSources: ...


@pytest.fixture
async def sources() -> AsyncIterator[Sources]:
    """Builds ImageSources under a FetchPolicy; closes their connection pools afterwards."""
    made: list[ImageSources] = []

    def make(**policy: object) -> ImageSources:
        made.append(ImageSources(LIMITS, FetchPolicy(**policy)))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for source in made:
        await source.aclose()


async def refusal(source: ImageSources, uri: str) -> ClipVisionError:
    with pytest.raises(ClipVisionError) as caught:
        await source.resolve(pb.Image(uri=uri))
    return caught.value


# -- file:// -------------------------------------------------------------------


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    (root / "rocket.jpg").write_bytes(PHOTO)
    (tmp_path / "secret.jpg").write_bytes(PHOTO)
    (root / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    (root / "big.jpg").write_bytes(b"\xff" * (LIMITS.max_image_bytes + 1))
    return root


async def test_file_uris_are_refused_without_an_allowed_root(
    sources: Sources, image_root: Path
) -> None:
    error = await refusal(sources(), (image_root / "rocket.jpg").as_uri())
    assert isinstance(error, UriRefusedError)
    assert error.reason is Reason.URI_SCHEME_REFUSED


async def test_file_uris_are_read_below_an_allowed_root(sources: Sources, image_root: Path) -> None:
    source = sources(file_roots=(image_root,))
    assert await source.resolve(pb.Image(uri=(image_root / "rocket.jpg").as_uri())) == PHOTO


@pytest.mark.parametrize(
    "relative",
    ["../secret.jpg", "link.jpg", "sub/../../secret.jpg", "/etc/passwd"],
)
async def test_file_uris_cannot_escape_the_root(
    sources: Sources, image_root: Path, relative: str
) -> None:
    path = relative if relative.startswith("/") else f"{image_root}/{relative}"
    error = await refusal(sources(file_roots=(image_root,)), f"file://{path}")
    assert isinstance(error, UriRefusedError)
    assert error.reason is Reason.URI_PATH_REFUSED


async def test_missing_and_oversized_files_are_invalid(sources: Sources, image_root: Path) -> None:
    source = sources(file_roots=(image_root,))
    missing = await refusal(source, (image_root / "absent.jpg").as_uri())
    assert missing.reason is Reason.URI_UNREADABLE
    big = await refusal(source, (image_root / "big.jpg").as_uri())
    assert big.reason is Reason.IMAGE_TOO_LARGE
    assert str(LIMITS.max_image_bytes) in big.message


# -- http(s):// -----------------------------------------------------------------


async def test_fetching_is_off_by_default(sources: Sources, http_base: str) -> None:
    error = await refusal(sources(), f"{http_base}/photo")
    assert error.reason is Reason.URI_SCHEME_REFUSED


async def test_loopback_is_refused_unless_private_fetching_is_allowed(
    sources: Sources, http_base: str
) -> None:
    guarded = sources(fetch_domains=("localhost",), allow_http=True)
    error = await refusal(guarded, f"{http_base}/photo")
    assert isinstance(error, UriRefusedError)
    assert error.reason is Reason.URI_ADDRESS_REFUSED
    allowed = sources(fetch_domains=("localhost",), allow_http=True, allow_private_addresses=True)
    assert await allowed.resolve(pb.Image(uri=f"{http_base}/photo")) == PHOTO


async def test_hosts_off_the_allowlist_and_plain_http_are_refused(
    sources: Sources, http_base: str
) -> None:
    error = await refusal(
        sources(fetch_domains=("images.example.com",), allow_http=True), f"{http_base}/photo"
    )
    assert error.reason is Reason.URI_HOST_REFUSED
    plain = await refusal(sources(fetch_domains=("localhost",)), f"{http_base}/photo")
    assert plain.reason is Reason.URI_SCHEME_REFUSED


async def test_every_redirect_is_checked_again(sources: Sources, http_base: str) -> None:
    source = sources(fetch_domains=("localhost",), allow_http=True, allow_private_addresses=True)
    followed = await source.resolve(pb.Image(uri=f"{http_base}/redirect?to=/photo"))
    assert followed == PHOTO
    off_list = await refusal(source, f"{http_base}/redirect?to=http://example.com/x.jpg")
    assert off_list.reason is Reason.URI_HOST_REFUSED
    anywhere = sources(fetch_domains=("*",), allow_http=True, allow_private_addresses=True)
    metadata = await refusal(
        anywhere, f"{http_base}/redirect?to=http://169.254.169.254/latest/meta-data"
    )
    assert metadata.reason is Reason.URI_ADDRESS_REFUSED


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("file:///etc/passwd", Reason.URI_SCHEME_REFUSED),
        # httpx itself refuses to build a request for these Location headers
        ("data:image/jpeg;base64,QUJD", Reason.URI_UNREADABLE),
        ("http://0177.0.0.1/photo", Reason.URI_UNREADABLE),
        ("http://0x7f.1/photo", Reason.URI_INVALID),
        ("http://user@localhost/photo", Reason.URI_INVALID),
        ("http://[::1/photo", Reason.URI_UNREADABLE),
        ("http://localhost:99999/photo", Reason.URI_INVALID),
        ("http://[fe80::1]/photo", Reason.URI_ADDRESS_REFUSED),
    ],
)
async def test_hostile_redirects_are_refused_with_a_reason(
    sources: Sources, http_base: str, target: str, reason: Reason
) -> None:
    source = sources(fetch_domains=("*",), allow_http=True, allow_private_addresses=True)
    error = await refusal(source, f"{http_base}/redirect?to={quote(target)}")
    assert error.reason is reason, error.message


async def test_redirect_loops_and_odd_lengths_end_with_a_reason(
    sources: Sources, http_base: str
) -> None:
    source = sources(fetch_domains=("localhost",), allow_http=True, allow_private_addresses=True)
    looped = await refusal(source, f"{http_base}/loop")
    assert looped.reason is Reason.URI_UNREADABLE
    assert "more than 3 times" in looped.message
    huge = await refusal(source, f"{http_base}/length?value={'9' * 19}")
    assert huge.reason is Reason.IMAGE_TOO_LARGE
    for value in ("\u00b2", "-1", "12abc", "9" * 5000):
        odd = await refusal(source, f"{http_base}/length?value={quote(value)}")
        assert odd.reason is Reason.URI_UNREADABLE, odd.message


async def test_bodies_are_capped_in_bytes_and_time(sources: Sources, http_base: str) -> None:
    source = sources(
        fetch_domains=("localhost",), allow_http=True, allow_private_addresses=True, timeout_s=1.0
    )
    big = await refusal(source, f"{http_base}/big")
    assert big.reason is Reason.IMAGE_TOO_LARGE
    started = time.monotonic()
    slow = await refusal(source, f"{http_base}/slow")
    assert isinstance(slow, InvalidImageError)
    assert "longer than 1 s" in slow.message
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("100.64.0.1", False),
        ("169.254.169.254", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("64:ff9b::a9fe:a9fe", False),
        ("2002:7f00:1::", False),
    ],
)
def test_address_guard(address: str, allowed: bool) -> None:
    policy = FetchPolicy(fetch_domains=("*",))
    if allowed:
        check_address(address, policy)
    else:
        with pytest.raises(UriRefusedError):
            check_address(address, policy)


def test_private_allowance_never_opens_link_local() -> None:
    policy = FetchPolicy(fetch_domains=("*",), allow_private_addresses=True)
    check_address("10.0.0.7", policy)
    check_address("127.0.0.1", policy)
    for address in ("169.254.169.254", "fe80::1", "::ffff:169.254.169.254"):
        with pytest.raises(UriRefusedError):
            check_address(address, policy)


# -- end to end -----------------------------------------------------------------


async def test_uri_images_through_the_server(
    base_settings: Settings, http_base: str, image_root: Path
) -> None:
    settings = settings_with(
        base_settings,
        fetch_policy=FetchPolicy(
            file_roots=(image_root,),
            fetch_domains=("localhost",),
            allow_http=True,
            allow_private_addresses=True,
        ),
    )
    async with running_server(settings) as (_, channel):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        by_content = await stub.EmbedImage(pb.EmbedImageRequest(image=pb.Image(content=PHOTO)))
        for uri in (f"{http_base}/photo", (image_root / "rocket.jpg").as_uri()):
            by_uri = await stub.EmbedImage(pb.EmbedImageRequest(image=pb.Image(uri=uri)))
            np.testing.assert_allclose(by_uri.embedding.values, by_content.embedding.values)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.EmbedImage(
                pb.EmbedImageRequest(image=pb.Image(uri=f"file://{image_root}/link.jpg"))
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


# -- data: ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [LIMITS.max_image_bytes, 3_000_000])
async def test_data_uris_up_to_the_limit_decode_exactly(size: int) -> None:
    # 3 MB is 4 MiB of base64: decoded in a worker thread, slice by slice.
    source = ImageSources(ImageLimits(max_image_bytes=size))
    for length in (size, size - 1, size - 2):  # two, one and no padding characters
        raw = os.urandom(length)
        uri = "data:image/jpeg;base64," + base64.b64encode(raw).decode()
        assert await source.resolve(pb.Image(uri=uri)) == raw
    over = "data:image/jpeg;base64," + base64.b64encode(os.urandom(size + 1)).decode()
    with pytest.raises(InvalidImageError) as caught:
        await source.resolve(pb.Image(uri=over))
    assert caught.value.reason is Reason.IMAGE_TOO_LARGE
    await source.aclose()
