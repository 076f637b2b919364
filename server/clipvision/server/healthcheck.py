"""``clipvision-healthcheck``: ask a server's grpc.health.v1 service whether it is SERVING.

For the container's HEALTHCHECK (Docker has no native gRPC probe). Exit status
0 when SERVING, 1 otherwise (NOT_SERVING, unreachable, or no answer in time).
It imports only grpc, so it starts fast and never loads torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc


def probe_target(address: str) -> str:
    """Where to dial for a server listening on ``address``: a wildcard host means this host."""
    host, _, port = address.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):  # noqa: S104 (a listening address, not a bind)
        host = "127.0.0.1"
    return f"{host}:{port}"


def main(argv: Sequence[str] | None = None) -> int:
    """Probe once and report; see the module docstring for the exit status."""
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except ModuleNotFoundError as error:
        from clipvision.server.cli import missing_server_extra

        return missing_server_extra("clipvision-healthcheck", error)
    parser = argparse.ArgumentParser(
        prog="clipvision-healthcheck", description="Exit 0 if the clipvision server is SERVING."
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("CLIPVISION_ADDRESS", "127.0.0.1:50051"),
        help="the server's HOST:PORT (default: CLIPVISION_ADDRESS, a wildcard host as 127.0.0.1)",
    )
    parser.add_argument("--service", default="", help="health service name ('' = whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an answer")
    args = parser.parse_args(argv)
    target = probe_target(args.address)
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            print(f"{target}: no health answer ({code})", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{target}: {status}", file=sys.stderr)
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
