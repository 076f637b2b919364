"""grpc.health.v1 status that tells the truth: SERVING only when requests can be served."""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2

from clipvision.v1 import embedding_service_pb2 as pb

# The empty name is the whole server, which Kubernetes' gRPC probes ask about by default.
HEALTH_SERVICES = ("", pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name)


class HealthReporter:
    """Owns the standard health servicer and flips every service's status together."""

    def __init__(self) -> None:
        # grpc-stubs predates the asyncio health servicer.
        self.servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._serving = False
        self._shut_down = False

    @property
    def serving(self) -> bool:
        """Whether the server reports SERVING now (for the HTTP probes and readiness)."""
        return self._serving and not self._shut_down

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING for the server and for EmbeddingService."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self._serving = serving
        for service in HEALTH_SERVICES:
            await self.servicer.set(service, status)

    async def shut_down(self) -> None:
        """Report NOT_SERVING for good; later set_serving calls are ignored."""
        self._shut_down = True
        await self.servicer.enter_graceful_shutdown()
