"""Build, start and stop the server.

``create_server`` is kept apart from ``serve`` so that tests can bind port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from clipvision.server.api.embedding_service import EmbeddingServicer
from clipvision.server.api.inference_service import SERVICE_NAME as OIP_SERVICE_NAME
from clipvision.server.api.inference_service import InferenceServicer
from clipvision.server.api.inference_service import add_to_server as add_oip_service
from clipvision.server.config.settings import Settings
from clipvision.server.errors import CheckpointError
from clipvision.server.http.exchange import HttpExchange, HttpLimits
from clipvision.server.http.listener import HttpBindError, HttpListener
from clipvision.server.http.routes import build_app
from clipvision.server.ops.health import HealthReporter
from clipvision.server.ops.metrics import ServerMetrics
from clipvision.server.ops.threads import name_this_thread
from clipvision.server.ops.watchdog import DeviceWatchdog
from clipvision.server.pipelines.embedding_plane import EmbeddingPlane
from clipvision.server.pipelines.images import ImagePipeline
from clipvision.server.pipelines.inference_plane import InferencePlane
from clipvision.server.pipelines.sources import ImageSources
from clipvision.server.pipelines.texts import TextPipeline
from clipvision.server.resources.allocator import MemoryTrimmer
from clipvision.server.resources.dispatch import FairDispatcher
from clipvision.server.runtime.models import ModelRegistry
from clipvision.server.wire.gate import CallGate, GateLimits
from clipvision.server.wire.interceptors import SERVICE_NAME, ErrorMappingInterceptor
from clipvision.server.wire.listener import GrpcListener, ListenerError
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


def connection_options(settings: Settings) -> list[tuple[str, int]]:
    """Keepalive and connection age: find dead peers, let clients ping, spread load.

    A connection older than ``max_connection_age`` gets a GOAWAY, so clients
    reconnect and re-resolve, and replicas added since then get their share;
    calls on it have ``max_connection_age_grace`` more to finish.
    """
    options = [
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
        # Clients may ping this often while calls are open (the Python client: every 60 s);
        # more often is answered with GOAWAY ENHANCE_YOUR_CALM.
        ("grpc.http2.min_ping_interval_without_data_ms", int(settings.min_ping_interval_s * 1000)),
    ]
    if settings.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * 1000)),
        ]
    return options


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Every gRPC core option the server sets: message sizes, connections, transport limits."""
    return [
        ("grpc.max_receive_message_length", settings.message_limit),
        ("grpc.max_send_message_length", settings.message_limit),
        *connection_options(settings),
        # gRPC turns SO_REUSEPORT on by default, which lets a second server on the same port
        # silently take part of the traffic; sharing a port must be asked for.
        ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
        ("grpc.max_allowed_incoming_connections", settings.max_connections),
        # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: calls of any kind open on one connection.
        ("grpc.max_concurrent_streams", settings.max_http2_streams),
        # With gRPC core's overload protection (its default) a stream counts against that
        # limit until grpc.aio has let go of its call, well after the client saw it end: a
        # client that opens a new stream as soon as one ends was refused at the transport,
        # RST_STREAM REFUSED_STREAM, which its library reports as UNAVAILABLE (the server is
        # down) where the gate would have answered RESOURCE_EXHAUSTED with RetryInfo. Counted
        # as HTTP/2 counts them, streams the client may open are the ones the gate sees; what
        # core holds meanwhile stays bounded by its backlog limits below.
        ("grpc.http.overload_protection", 0),
        # gRPC core queues, per method, calls the application has not yet taken (grpc.aio
        # takes them one at a time from the event loop) and counts cancelled ones until
        # they are taken; past 1,000 (its default) it refuses other callers' calls at
        # random, as CANCELLED, unseen by any handler. A burst of HEADERS + RST_STREAM
        # from many connections did that; the gate's own limits answer long before these.
        # About 6 KiB per queued call: the hard limit bounds it near 240 MiB per method.
        ("grpc.server.max_pending_requests", 20_000),
        ("grpc.server.max_pending_requests_hard_limit", 40_000),
        # A connection that never completes its HTTP/2 (or TLS) handshake is closed.
        ("grpc.server_handshake_timeout_ms", 10_000),
        # Requests carry images, which gRPC compression cannot shrink, and gRPC inflates a
        # compressed message before any handler sees it (60 MB of zeros travel as 58 KB): only
        # identity is accepted; a compressed request gets UNIMPLEMENTED from gRPC itself.
        ("grpc.compression_enabled_algorithms_bitset", 1),
        # gRPC's window growth (BDP probing) let each stream buffer tens of MB the server had
        # not asked for yet, beside the memory budget: 16 streams of 20 MB images peaked at
        # 5.2 GiB with it, 4.0 without. Without it a stream's window is the HTTP/2 default
        # plus the message being read, so a large image still arrives at full speed.
        ("grpc.http2.bdp_probe", 0),
    ]


def gate_limits(settings: Settings) -> GateLimits:
    """The call gate's limits, from the settings."""
    return GateLimits(
        max_calls=settings.max_concurrent_rpcs,
        max_calls_per_connection=settings.max_calls_per_connection,
        max_streams=settings.max_streams,
        max_streams_per_connection=settings.max_streams_per_connection,
        read_timeout_s=settings.request_read_timeout_s,
        stream_idle_timeout_s=settings.stream_idle_timeout_s,
        client_certificates=settings.tls is not None and settings.tls.client_ca is not None,
    )


def service_limits(settings: Settings) -> pb.Limits:
    """The limits GetModelInfo reports and the servicer enforces (the memory budget apart)."""
    return pb.Limits(
        max_batch_images=settings.max_batch_images,
        max_receive_message_bytes=settings.message_limit,
        max_image_bytes=settings.image_limits.max_image_bytes,
        max_image_pixels=settings.image_limits.max_image_pixels,
        stream_window=settings.stream_window,
        max_queue_size=settings.max_queue_size,
        max_batch_texts=settings.max_batch_texts,
        max_text_bytes=settings.max_text_bytes,
        max_classify_labels=settings.max_classify_labels,
    )


class ClipVisionServer:
    """A built server and everything it owns: models, thread pools and health."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # One thread owns the device: loads, forward passes and device-to-host copies
        # run there in order, so batches never contend for it.
        self._device_executor = ThreadPoolExecutor(
            1,
            thread_name_prefix="clipvision-device",
            initializer=_device_thread,
            # OpenMP's thread count is per thread: a new thread does not inherit the
            # main thread's, and measured 15 % slower on CPU until it is set there.
            initargs=(torch.get_num_threads(),),
        )
        self._preprocess_executor = ThreadPoolExecutor(
            settings.preprocess_workers,
            thread_name_prefix="clipvision-preprocess",
            initializer=name_this_thread,
            initargs=("cv-preprocess",),
        )
        self.metrics = ServerMetrics()
        self.registry = ModelRegistry(settings, self._device_executor, observer=self.metrics)
        self.health = HealthReporter()
        self.watchdog = DeviceWatchdog(
            self.registry.busy_batches, self.health, settings.watchdog_timeout_s
        )
        self.metrics.watch_devices(self.registry.devices)
        self.metrics.watch_queues(self.registry.queue_depths)
        self.metrics.watch_budget(self.registry.budget.usage)
        # The gate goes first: it refuses, counts slots and reads requests for every service.
        self.gate = CallGate(
            gate_limits(settings), self.metrics, settings.auth_token, self.registry.budget
        )
        self._interceptors = (self.gate, ErrorMappingInterceptor(self.metrics))
        self.sources = ImageSources(settings.image_limits, settings.fetch_policy)
        # At most one decode (or tokenization) per worker is handed to the pool; the rest
        # wait in per-caller queues, so the pool's own FIFO never holds one caller's backlog.
        preprocessing = FairDispatcher(self._preprocess_executor, settings.preprocess_workers)
        # One pipeline per modality, shared by every service on the port.
        self.images = ImagePipeline(self.sources, self.registry.budget, preprocessing, self.metrics)
        self.texts = TextPipeline(self.registry.budget, preprocessing, self.metrics)
        # The protocols' data planes: gRPC's servicers and the HTTP routes call the same ones.
        self.embedding = EmbeddingPlane(
            self.registry, self.images, self.texts, service_limits(settings), self.metrics
        )
        self.inference = InferencePlane(
            self.registry,
            self.images,
            self.texts,
            service_limits(settings),
            lazy=settings.lazy_load,
        )
        self._servicer = EmbeddingServicer(self.embedding)
        self.listener = GrpcListener(
            self._build_grpc_server(),
            settings.address,
            _credentials(settings),
            on_fatal=self._listener_lost,
            refuse_unregistered=self.gate.refuse_unregistered,
        )
        self.http: HttpListener | None = None
        self.fatal = asyncio.Event()
        self._stopped = False
        self.metrics_port: int | None = None

    def _build_grpc_server(self) -> grpc.aio.Server:
        server = grpc.aio.server(
            interceptors=self._interceptors,
            options=server_options(self.settings),
        )
        pb_grpc.add_EmbeddingServiceServicer_to_server(self._servicer, server)
        add_oip_service(
            InferenceServicer(self.inference, self.health, observer=self.metrics),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                OIP_SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        return server

    def _listener_lost(self, error: BaseException) -> None:
        # No port to answer on, and grpc is not safe to go on with: the process must exit.
        self.fatal.set()

    @property
    def grpc_server(self) -> grpc.aio.Server:
        """The gRPC server answering on the address now."""
        return self.listener.server

    def bind(self) -> int:
        """Listen on the configured addresses (gRPC's, and HTTP's when set); returns gRPC's
        port (useful with port 0; ``http.port`` is HTTP's). A busy port raises, before any
        call could be answered."""
        port = self.listener.bind()
        if self.settings.http_address is not None:
            self.http = self._build_http(self.settings.http_address)
        return port

    def _build_http(self, address: str) -> HttpListener:
        """HTTP beside gRPC: the same data planes, budget, limits, token, TLS and metrics."""
        settings = self.settings
        exchange = HttpExchange(
            HttpLimits(
                max_body_bytes=settings.message_limit,
                read_timeout_s=settings.request_read_timeout_s,
                timeout_s=settings.http_timeout_s,
                max_calls=settings.max_concurrent_rpcs,
            ),
            self.registry.budget,
            self.metrics,
            settings.auth_token,
        )
        app = build_app(
            exchange, self.embedding, self.inference, self.health, settings.http_cors_origins
        )
        return HttpListener(
            app,
            address,
            settings.tls,
            head_timeout_s=settings.request_read_timeout_s,
            max_connections=settings.max_connections,
            on_cut=exchange.connection_cut,
        )

    async def start(self) -> None:
        """Start answering calls; health says NOT_SERVING until the models are ready."""
        await self.health.set_serving(False)
        self.gate.start()
        await self.listener.start()
        if self.http is not None:
            await self.http.start()
            host = (self.settings.http_address or "").rpartition(":")[0]
            logger.info("http on http://%s:%d", host, self.http.port)
        if self.settings.metrics_address is not None:
            self.metrics_port = self.metrics.serve(self.settings.metrics_address)
            host = self.settings.metrics_address.rpartition(":")[0]
            logger.info("metrics on http://%s:%d/metrics", host, self.metrics_port)

    async def load_models(self, before_serving: Callable[[], None] | None = None) -> None:
        """Load and warm every model (or, in lazy mode, nothing yet), then report SERVING.

        ``before_serving`` runs once the models are loaded, before any call can reach them.
        """
        if not self.settings.lazy_load:
            await self.registry.load_all()
        if before_serving is not None:
            before_serving()
        await self.health.set_serving(True)
        self.watchdog.start()

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new work, let in-flight calls finish within ``grace``."""
        if self._stopped:
            return
        self._stopped = True
        await self.watchdog.stop()
        await self.health.shut_down()
        self.registry.drain()
        grace_s = self.settings.grace_period_s if grace is None else grace
        if self.http is not None:
            await asyncio.gather(self.listener.stop(grace_s), self.http.stop(grace_s))
        else:
            await self.listener.stop(grace_s)
        await self.gate.stop()
        await self.registry.close()
        self.metrics.close()
        await self.sources.aclose()
        self._preprocess_executor.shutdown(wait=False, cancel_futures=True)
        self._device_executor.shutdown(wait=False, cancel_futures=True)


def _device_thread(threads: int) -> None:
    name_this_thread("cv-device")
    torch.set_num_threads(threads)


def _exit_at_once() -> NoReturn:
    """Exit with status 1 now, without draining: the listener is gone and grpc unsafe to touch."""
    logger.critical("exiting with status 1 so that the supervisor starts a fresh process")
    logging.shutdown()
    os._exit(1)


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    tls = settings.tls
    if tls is None:
        return None
    return grpc.ssl_server_credentials(
        [(tls.key.read_bytes(), tls.cert.read_bytes())],
        root_certificates=tls.client_ca.read_bytes() if tls.client_ca else None,
        require_client_auth=tls.client_ca is not None,
    )


async def create_server(settings: Settings) -> tuple[ClipVisionServer, int]:
    """Build a server bound to ``settings.address`` (not started) and return it with its port."""
    server = ClipVisionServer(settings)
    return server, server.bind()


async def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT, then drain; returns the process exit status."""
    try:
        server, port = await create_server(settings)
    except (ListenerError, HttpBindError) as exc:
        logger.error("cannot serve: %s", exc)
        return 1
    await server.start()
    # Process-wide (gc.freeze, malloc_trim), so here and not in ClipVisionServer, which
    # tests build in their own process.
    trimmer = MemoryTrimmer()
    host = settings.address.rpartition(":")[0]
    logger.info("listening on %s:%d", host, port)
    loop = asyncio.get_running_loop()
    logger.info("event loop: %s", type(loop).__module__.partition(".")[0])
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    # The trimmer's start collects and freezes what is alive (a pause of up to half a
    # second with a model loaded): done before SERVING, so no call waits on it.
    loading = loop.create_task(server.load_models(before_serving=trimmer.start))
    stopping = loop.create_task(stop_requested.wait())
    lost = loop.create_task(server.fatal.wait())
    await asyncio.wait({loading, stopping, lost}, return_when=asyncio.FIRST_COMPLETED)
    if server.fatal.is_set():
        _exit_at_once()
    status = 0
    if not loading.done():
        loading.cancel()  # a signal during start-up: stop loading, then drain
        with contextlib.suppress(asyncio.CancelledError):
            await loading
    elif loading.exception() is not None:
        error = loading.exception()
        if isinstance(error, CheckpointError):
            logger.error("cannot serve: %s", error)
        else:
            logger.error("cannot serve: loading failed", exc_info=error)
        status = 1
    else:
        logger.info("serving %s", ", ".join(spec.name for spec in server.registry.specs))
        await asyncio.wait({stopping, lost}, return_when=asyncio.FIRST_COMPLETED)
        if server.fatal.is_set():
            _exit_at_once()
    stopping.cancel()
    lost.cancel()
    if stop_requested.is_set():
        logger.info("signal received; draining for up to %.1f s", settings.grace_period_s)
    await server.stop(settings.grace_period_s if status == 0 else 0)
    await asyncio.to_thread(trimmer.stop)
    logger.info("stopped")
    return status
