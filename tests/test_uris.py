"""Image URIs: file:// under allowed roots, http(s):// with SSRF guards, both off by default.

The HTTP tests talk to a real server on 127.0.0.1, which the guards must refuse
unless the test allows private addresses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc
import numpy as np
import pytest

from clipvision.server.errors import (
    ClipVisionError,
    InvalidImageError,
    Reason,
    UriRefusedError,
)
from clipvision.server.fetch import FetchPolicy, UriFetcher
from clipvision.server.image_sources import ImageSources
from clipvision.server.preprocess import ImageLimits
from clipvision.server.settings import Settings
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import photo_bytes, running_server, settings_with

PHOTO = photo_bytes("rocket.jpg")
LIMITS = ImageLimits(max_image_bytes=len(PHOTO) + 1000)


class ImageHandler(BaseHTTPRequestHandler):
    """/photo, /redirect?to=URL, /big (over the byte limit), /slow (trickles forever)."""

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path == "/photo":
            self._reply(200, PHOTO)
        elif parts.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", parse_qs(parts.query)["to"][0])
            self.end_headers()
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


def sources(**policy: object) -> ImageSources:
    return ImageSources(LIMITS, FetchPolicy(**policy))  # type: ignore[arg-type]


def refusal(source: ImageSources, uri: str) -> ClipVisionError:
    with pytest.raises(ClipVisionError) as caught:
        source.image_bytes(pb.Image(uri=uri))
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


def test_file_uris_are_refused_without_an_allowed_root(image_root: Path) -> None:
    error = refusal(sources(), (image_root / "rocket.jpg").as_uri())
    assert isinstance(error, UriRefusedError)
    assert error.reason is Reason.URI_SCHEME_REFUSED


def test_file_uris_are_read_below_an_allowed_root(image_root: Path) -> None:
    source = sources(file_roots=(image_root,))
    assert source.image_bytes(pb.Image(uri=(image_root / "rocket.jpg").as_uri())) == PHOTO


@pytest.mark.parametrize(
    "relative",
    ["../secret.jpg", "link.jpg", "sub/../../secret.jpg", "/etc/passwd"],
)
def test_file_uris_cannot_escape_the_root(image_root: Path, relative: str) -> None:
    path = relative if relative.startswith("/") else f"{image_root}/{relative}"
    error = refusal(sources(file_roots=(image_root,)), f"file://{path}")
    assert isinstance(error, UriRefusedError)
    assert error.reason is Reason.URI_PATH_REFUSED


def test_missing_and_oversized_files_are_invalid(image_root: Path) -> None:
    source = sources(file_roots=(image_root,))
    missing = refusal(source, (image_root / "absent.jpg").as_uri())
    assert missing.reason is Reason.URI_UNREADABLE
    big = refusal(source, (image_root / "big.jpg").as_uri())
    assert big.reason is Reason.IMAGE_TOO_LARGE
    assert str(LIMITS.max_image_bytes) in big.message


# -- http(s):// -----------------------------------------------------------------


def test_fetching_is_off_by_default(http_base: str) -> None:
    error = refusal(sources(), f"{http_base}/photo")
    assert error.reason is Reason.URI_SCHEME_REFUSED


def test_loopback_is_refused_unless_private_fetching_is_allowed(http_base: str) -> None:
    guarded = sources(fetch_domains=("localhost",), allow_http=True)
    error = refusal(guarded, f"{http_base}/photo")
    assert isinstance(error, UriRefusedError)
    assert error.reason is Reason.URI_ADDRESS_REFUSED
    allowed = sources(fetch_domains=("localhost",), allow_http=True, allow_private_addresses=True)
    assert allowed.image_bytes(pb.Image(uri=f"{http_base}/photo")) == PHOTO


def test_hosts_off_the_allowlist_and_plain_http_are_refused(http_base: str) -> None:
    error = refusal(
        sources(fetch_domains=("images.example.com",), allow_http=True), f"{http_base}/photo"
    )
    assert error.reason is Reason.URI_HOST_REFUSED
    plain = refusal(sources(fetch_domains=("localhost",)), f"{http_base}/photo")
    assert plain.reason is Reason.URI_SCHEME_REFUSED


def test_every_redirect_is_checked_again(http_base: str) -> None:
    source = sources(fetch_domains=("localhost",), allow_http=True, allow_private_addresses=True)
    followed = source.image_bytes(pb.Image(uri=f"{http_base}/redirect?to=/photo"))
    assert followed == PHOTO
    off_list = refusal(source, f"{http_base}/redirect?to=http://example.com/x.jpg")
    assert off_list.reason is Reason.URI_HOST_REFUSED
    anywhere = sources(fetch_domains=("*",), allow_http=True, allow_private_addresses=True)
    metadata = refusal(anywhere, f"{http_base}/redirect?to=http://169.254.169.254/latest/meta-data")
    assert metadata.reason is Reason.URI_ADDRESS_REFUSED


def test_bodies_are_capped_in_bytes_and_time(http_base: str) -> None:
    source = sources(
        fetch_domains=("localhost",), allow_http=True, allow_private_addresses=True, timeout_s=1.0
    )
    big = refusal(source, f"{http_base}/big")
    assert big.reason is Reason.IMAGE_TOO_LARGE
    started = time.monotonic()
    slow = refusal(source, f"{http_base}/slow")
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
    fetcher = UriFetcher(FetchPolicy(fetch_domains=("*",)), 100)
    if allowed:
        fetcher._check_address(address)
    else:
        with pytest.raises(UriRefusedError):
            fetcher._check_address(address)


def test_private_allowance_never_opens_link_local() -> None:
    fetcher = UriFetcher(FetchPolicy(fetch_domains=("*",), allow_private_addresses=True), 100)
    fetcher._check_address("10.0.0.7")
    fetcher._check_address("127.0.0.1")
    for address in ("169.254.169.254", "fe80::1", "::ffff:169.254.169.254"):
        with pytest.raises(UriRefusedError):
            fetcher._check_address(address)


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
