"""Prometheus metrics, on a registry of the server's own and an HTTP address of their own."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """The server's metrics; it is the batcher's observer."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.batch_size = Histogram(
            "clipvision_batch_size",
            "Images per forward pass.",
            ["model"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "clipvision_inference_seconds",
            "Device time per batch: forward pass and copy to host.",
            ["model"],
            registry=self.registry,
        )
        self.images_embedded = Counter(
            "clipvision_images_embedded",
            "Images that went through the model.",
            ["model"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "clipvision_queue_depth",
            "Images admitted and not yet answered.",
            ["model"],
            registry=self.registry,
        )
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    def on_batch(self, model: str, size: int, seconds: float) -> None:
        """Record one batch that went through the device."""
        self.batch_size.labels(model).observe(size)
        self.inference_seconds.labels(model).observe(seconds)
        self.images_embedded.labels(model).inc(size)

    def on_queue_depth(self, model: str, depth: int) -> None:
        """Record the number of admitted, unanswered images of a model."""
        self.queue_depth.labels(model).set(depth)

    def serve(self, address: str) -> int:
        """Expose /metrics over HTTP on ``HOST:PORT``; returns the port (0 picks one)."""
        host, _, port = address.rpartition(":")
        server, thread = start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
        self._http = (server, thread)
        return int(server.server_port)

    def close(self) -> None:
        """Stop the HTTP endpoint, if it runs."""
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._http = None
