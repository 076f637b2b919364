"""Channel settings production needs: balancing, retries, keepalive, TLS, a token, size limits.

Both clients build their channel from one :class:`ChannelConfig`, so the sync
and the async client behave the same on the wire.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from clipvision.v1 import embedding_service_pb2 as pb

MIB = 1024 * 1024
DEFAULT_TARGET = "127.0.0.1:50051"
# The server's default --max-message-bytes; a client that accepts less would fail
# on answers the server is allowed to send.
DEFAULT_MAX_MESSAGE_BYTES = 64 * MIB
# A client ping more frequent than the server's minimum ping interval
# (grpc.http2.min_ping_interval_without_data_ms) is answered, the third time, with
# GOAWAY ENHANCE_YOUR_CALM, which fails every call on the connection.
# clipvision-server allows one every 30 s (--min-ping-interval), so 60 s is safe
# against it; a gRPC server that sets no policy allows one per 5 minutes: pass
# keepalive_time_s=300 for such a server.
DEFAULT_KEEPALIVE_TIME_S = 60.0
DEFAULT_KEEPALIVE_TIMEOUT_S = 20.0
# gRPC caps retries at 5 attempts whatever the service config says.
DEFAULT_MAX_ATTEMPTS = 4
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


def grpc_target(address: str) -> str:
    """The gRPC target for ``address``: ``HOST:PORT``, a URI such as ``dns:///HOST:PORT``, or a
    comma-separated list of ``IP:PORT`` entries, which becomes an ``ipv4:`` or ``ipv6:`` target.
    """
    address = address.strip()
    if "," not in address or address.startswith(_SCHEMES):
        if not address:
            raise ValueError("the server address is empty; give HOST:PORT")
        return address
    hosts: list[str] = []
    versions: set[int] = set()
    for entry in (part.strip() for part in address.split(",")):
        host, sep, port = entry.rpartition(":")
        if not sep or not port.isdigit() or host.endswith(":"):
            raise ValueError(f"{entry!r} in the address list has no port; give IP:PORT")
        bare = host.removeprefix("[").removesuffix("]")
        try:
            version = ipaddress.ip_address(bare).version
        except ValueError:
            raise ValueError(
                f"{entry!r} in the address list is not IP:PORT; a comma-separated list takes IP "
                "addresses (use dns:///NAME:PORT to balance over every address a name resolves to)"
            ) from None
        versions.add(version)
        hosts.append(f"[{bare}]:{port}" if version == 6 else f"{bare}:{port}")
    if len(versions) > 1:
        raise ValueError("an address list must be all IPv4 or all IPv6")
    return f"ipv{versions.pop()}:{','.join(hosts)}"


def service_config(max_attempts: int) -> str:
    """The service config: round_robin over every resolved address, and retries on UNAVAILABLE.

    UNAVAILABLE is what a server that is loading or draining answers, and what a
    dead connection produces; every EmbeddingService method is idempotent, so a
    retry (on the next address, with round_robin) is always safe.
    """
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if max_attempts > 1:
        config["methodConfig"] = [
            {
                "name": [{"service": SERVICE_NAME}],
                "retryPolicy": {
                    "maxAttempts": max_attempts,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return json.dumps(config)


@dataclass(frozen=True)
class ChannelConfig:
    """How to reach the server; see EmbeddingClient for what each field means."""

    address: str = DEFAULT_TARGET
    tls: bool = False
    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    token: str | None = None
    server_name: str | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    keepalive_time_s: float = DEFAULT_KEEPALIVE_TIME_S
    keepalive_timeout_s: float = DEFAULT_KEEPALIVE_TIMEOUT_S
    extra_options: Sequence[tuple[str, Any]] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.token is not None and not self.tls and _local_connection(self.target) is None:
            raise ValueError(
                "a bearer token is only sent over TLS, or in plaintext to a loopback address "
                "or unix socket; pass tls=True"
            )
        if not 1 <= self.max_attempts <= 5:
            raise ValueError("max_attempts must be between 1 and 5 (gRPC's own cap)")
        if self.max_message_bytes < 1:
            raise ValueError("max_message_bytes must be positive")

    @property
    def target(self) -> str:
        """The gRPC target string."""
        return grpc_target(self.address)

    def options(self) -> list[tuple[str, Any]]:
        """The channel arguments."""
        options: list[tuple[str, Any]] = [
            ("grpc.service_config", service_config(self.max_attempts)),
            # Our service config is authoritative; DNS TXT records must not replace it.
            ("grpc.service_config_disable_resolution", 1),
            ("grpc.enable_retries", 1),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            # No pings on a connection without calls: servers refuse them by default.
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.primary_user_agent", "clipvision-python-client"),
        ]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
            options.append(("grpc.default_authority", self.server_name))
        return options + list(self.extra_options)

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials (with the bearer token attached to every call), or None for plaintext.

        A token without TLS rides on gRPC's local credentials, which carry call
        credentials in plaintext only over loopback or a unix socket.
        """
        if self.tls:
            channel = grpc.ssl_channel_credentials(
                root_certificates=self.root_certificates,
                private_key=self.private_key,
                certificate_chain=self.certificate_chain,
            )
        elif self.token is not None:
            kind = _local_connection(self.target)
            assert kind is not None  # checked in __post_init__
            channel = grpc.local_channel_credentials(kind)
        else:
            return None
        if self.token is None:
            return channel
        return grpc.composite_channel_credentials(
            channel, grpc.access_token_call_credentials(self.token)
        )


def _local_connection(target: str) -> grpc.LocalConnectionType | None:
    """The local connection type when every address of ``target`` is on this machine."""
    if target.startswith(("unix:", "unix-abstract:")):
        return grpc.LocalConnectionType.UDS
    scheme, _, rest = target.partition(":")
    if scheme in ("ipv4", "ipv6"):
        entries = rest.split(",")
    else:
        entries = [target.removeprefix("dns:///").removeprefix("dns:")]
    for entry in entries:
        host = entry.rpartition(":")[0].removeprefix("[").removesuffix("]")
        if host == "localhost":
            continue
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return None
        except ValueError:
            return None
    return grpc.LocalConnectionType.LOCAL_TCP
