"""Access control: TLS, mutual TLS and the bearer token; health stays open for probes."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipvision.server.app import create_server
from clipvision.server.config.settings import Settings, TlsFiles
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import photo_bytes, running_server, settings_with
from tests.pki import Pki

TOKEN = "s3cret-token-for-tests"


REQUEST = pb.EmbedImageRequest(image=pb.Image(content=photo_bytes("rocket.jpg")))


async def test_bearer_token_is_required_except_for_health(base_settings: Settings) -> None:
    settings = settings_with(base_settings, auth_token=TOKEN)
    async with running_server(settings) as (_, channel):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.EmbedImage(REQUEST, metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert TOKEN not in (caught.value.details() or "")
        ok = await stub.EmbedImage(REQUEST, metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert len(ok.embedding.values) == 16

        async def stream() -> object:
            yield pb.EmbedImageStreamRequest(id="1", image=REQUEST.image)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.EmbedImageStream(stream()):  # type: ignore[arg-type]
                pass
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest())
        assert status.status == health_pb2.HealthCheckResponse.SERVING


async def test_tls_serves_clients_that_trust_the_ca(base_settings: Settings, pki: Pki) -> None:
    settings = settings_with(base_settings, tls=TlsFiles(pki.server_cert, pki.server_key))
    server, port = await create_server(settings)
    await server.start()
    try:
        await server.load_models()
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
            response = await pb_grpc.EmbeddingServiceStub(channel).EmbedImage(REQUEST, timeout=30)
            assert len(response.embedding.values) == 16
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pb_grpc.EmbeddingServiceStub(plain).EmbedImage(REQUEST, timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(grace=1.0)


async def test_mutual_tls_refuses_a_client_without_a_certificate(
    base_settings: Settings, pki: Pki
) -> None:
    settings = settings_with(
        base_settings, tls=TlsFiles(pki.server_cert, pki.server_key, client_ca=pki.ca)
    )
    server, port = await create_server(settings)
    await server.start()
    try:
        await server.load_models()
        anonymous = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{port}", anonymous) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pb_grpc.EmbeddingServiceStub(channel).EmbedImage(REQUEST, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        identified = grpc.ssl_channel_credentials(
            root_certificates=pki.ca.read_bytes(),
            private_key=pki.client_key.read_bytes(),
            certificate_chain=pki.client_cert.read_bytes(),
        )
        async with grpc.aio.secure_channel(f"localhost:{port}", identified) as channel:
            response = await pb_grpc.EmbeddingServiceStub(channel).EmbedImage(REQUEST, timeout=30)
            assert len(response.embedding.values) == 16
    finally:
        await server.stop(grace=1.0)
