"""Access control: TLS, mutual TLS and the bearer token; health stays open for probes."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipvision.server.app import create_server
from clipvision.server.settings import Settings, TlsFiles
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import photo_bytes, running_server, settings_with

TOKEN = "s3cret-token-for-tests"


@dataclass(frozen=True)
class Pki:
    """A throwaway CA with a server certificate for 127.0.0.1 and one client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _cert("clipvision test CA", ca_key, None, ca_key, ca=True)
    server_key, client_key = _key(), _key()
    files = {
        "ca": ca.public_bytes(serialization.Encoding.PEM),
        "server_cert": _cert("localhost", server_key, ca, ca_key, server=True).public_bytes(
            serialization.Encoding.PEM
        ),
        "server_key": _pem_key(server_key),
        "client_cert": _cert("ingest", client_key, ca, ca_key).public_bytes(
            serialization.Encoding.PEM
        ),
        "client_key": _pem_key(client_key),
    }
    for name, data in files.items():
        (directory / f"{name}.pem").write_bytes(data)
    return Pki(**{name: directory / f"{name}.pem" for name in files})


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
