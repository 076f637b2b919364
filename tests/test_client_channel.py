"""The client's channel: round-robin over several servers, retries, TLS, tokens, size limits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from clipvision.client import (
    AsyncEmbeddingClient,
    EmbeddingClient,
    InvalidImageError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from clipvision.server.config.settings import ModelSpec, Settings, TlsFiles
from clipvision.v1 import embedding_service_pb2 as pb
from tests.conftest import photo_bytes, settings_with
from tests.live_server import LiveServer, live_server
from tests.pki import Pki

SERVICE = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name


@pytest.fixture
async def two_servers(
    base_settings: Settings, clip_dir: Path, vision_dir: Path
) -> AsyncIterator[tuple[LiveServer, LiveServer]]:
    """Two servers that both serve a model named "m": 16-d on the first, 24-d on the second,
    so the length of an embedding tells which one answered."""
    first = settings_with(base_settings, models=(ModelSpec.parse(f"m={clip_dir}"),))
    second = settings_with(base_settings, models=(ModelSpec.parse(f"m={vision_dir}"),))
    async with live_server(first) as one, live_server(second) as two:
        yield one, two


def dimensions_answering(address: str, calls: int, **options: object) -> list[int | str]:
    """Embed ``calls`` times; the dimension of each answer, or the reason of each failure."""
    seen: list[int | str] = []
    with EmbeddingClient(address, **options) as client:  # type: ignore[arg-type]
        for _ in range(calls):
            try:
                seen.append(len(client.embed_image(photo_bytes("rocket.jpg"), model="m")))
            except UnavailableError as error:
                seen.append(error.reason)
    return seen


async def test_a_comma_list_of_addresses_is_balanced_round_robin(
    two_servers: tuple[LiveServer, LiveServer],
) -> None:
    one, two = two_servers
    seen = await asyncio.to_thread(dimensions_answering, f"{one.address},{two.address}", 20)
    assert set(seen) == {16, 24}
    assert seen[-10:].count(16) == 5  # once both are connected, strictly alternating


async def test_unavailable_is_retried_on_the_next_server(
    two_servers: tuple[LiveServer, LiveServer],
) -> None:
    one, two = two_servers
    one.server.registry.drain()  # answers UNAVAILABLE (SERVER_DRAINING) from now on
    both = f"{one.address},{two.address}"
    retried = await asyncio.to_thread(dimensions_answering, both, 10)
    assert retried == [24] * 10
    without_retries = await asyncio.to_thread(dimensions_answering, both, 10, max_attempts=1)
    assert "SERVER_DRAINING" in without_retries
    assert 24 in without_retries


@pytest.mark.parametrize(
    ("address", "complaint"),
    [
        ("server-a:50051,server-b:50051", "dns:///"),
        ("127.0.0.1:50051,[::1]:50051", "all IPv4 or all IPv6"),
        ("127.0.0.1:50051,127.0.0.2", "no port"),
        ("  ", "empty"),
    ],
)
def test_address_lists_the_client_cannot_balance_are_refused(address: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint.replace("/", r"\/")):
        EmbeddingClient(address)


@pytest.mark.parametrize(
    "address", ["10.1.2.3:50051", "dns:///clipvision.internal:50051", "127.0.0.1:1,10.0.0.1:1"]
)
def test_a_token_in_plaintext_to_another_machine_is_refused(address: str) -> None:
    with pytest.raises(ValueError, match="TLS"):
        EmbeddingClient(address, token="s3cret")


async def test_images_over_the_clients_message_limit_are_refused_before_sending() -> None:
    async with AsyncEmbeddingClient("127.0.0.1:1", max_message_bytes=64 * 1024) as client:
        with pytest.raises(InvalidImageError) as caught:
            await client.embed_image(b"\xff" * (100 * 1024))
    assert caught.value.reason == "IMAGE_TOO_LARGE"


async def test_messages_over_the_servers_limit_are_resource_exhausted(
    base_settings: Settings,
) -> None:
    settings = settings_with(base_settings, max_message_bytes=64 * 1024)
    async with live_server(settings) as small, AsyncEmbeddingClient(small.address) as client:
        with pytest.raises(ResourceExhaustedError):
            await client.embed_image(b"\xff" * (100 * 1024))


# -- TLS and bearer tokens


async def test_tls_verifies_the_server_against_the_given_roots(
    base_settings: Settings, pki: Pki
) -> None:
    settings = settings_with(base_settings, tls=TlsFiles(pki.server_cert, pki.server_key))
    async with live_server(settings) as secure:
        roots = pki.ca.read_bytes()
        async with AsyncEmbeddingClient(
            secure.address, tls=True, root_certificates=roots
        ) as trusted:
            vector = await trusted.embed_image(photo_bytes("rocket.jpg"))
        assert vector.shape == (16,)
        async with AsyncEmbeddingClient(secure.address, tls=True, max_attempts=1) as untrusting:
            with pytest.raises(UnavailableError):  # the system roots do not know this CA
                await untrusting.embed_image(photo_bytes("rocket.jpg"))
        async with AsyncEmbeddingClient(secure.address, max_attempts=1) as plaintext:
            with pytest.raises(UnavailableError):
                await plaintext.embed_image(photo_bytes("rocket.jpg"))


async def test_mutual_tls_with_a_client_certificate(base_settings: Settings, pki: Pki) -> None:
    tls = TlsFiles(pki.server_cert, pki.server_key, client_ca=pki.ca)
    async with (
        live_server(settings_with(base_settings, tls=tls)) as secure,
        AsyncEmbeddingClient(
            secure.address,
            tls=True,
            root_certificates=pki.ca.read_bytes(),
            certificate_chain=pki.client_cert.read_bytes(),
            private_key=pki.client_key.read_bytes(),
        ) as client,
    ):
        assert (await client.embed_image(photo_bytes("rocket.jpg"))).shape == (16,)


async def test_the_bearer_token_is_sent_over_tls(base_settings: Settings, pki: Pki) -> None:
    settings = settings_with(
        base_settings, tls=TlsFiles(pki.server_cert, pki.server_key), auth_token="s3cret"
    )
    async with live_server(settings) as secure:
        roots = pki.ca.read_bytes()
        async with AsyncEmbeddingClient(
            secure.address, tls=True, root_certificates=roots, token="s3cret"
        ) as client:
            assert [m.name for m in (await client.model_info()).models] == ["tiny", "tiny-vision"]
        async with AsyncEmbeddingClient(
            secure.address, tls=True, root_certificates=roots, token="wrong"
        ) as client:
            with pytest.raises(UnauthenticatedError):
                await client.model_info()


async def test_the_bearer_token_may_go_in_plaintext_to_a_loopback_address(
    base_settings: Settings,
) -> None:
    async with live_server(settings_with(base_settings, auth_token="s3cret")) as local:
        for address in (local.address, f"localhost:{local.port}"):
            async with AsyncEmbeddingClient(address, token="s3cret") as client:
                assert (await client.embed_image(photo_bytes("rocket.jpg"))).shape == (16,)
            async with AsyncEmbeddingClient(address) as client:
                with pytest.raises(UnauthenticatedError):
                    await client.model_info()
