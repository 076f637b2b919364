"""Prometheus metrics, on a registry of the server's own and an HTTP address of their own."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from clipvision.server.ops.calls import StageTimes
from clipvision.server.ops.metrics_http import MetricsHTTPServer

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# From a millisecond (a tiny model's preprocessing) to half a minute (a long queue).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

MemoryStats = Callable[[torch.device], tuple[int, int]]


def cuda_memory(device: torch.device) -> tuple[int, int]:
    """Bytes allocated by tensors and reserved by torch's caching allocator on a CUDA device."""
    return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)


class DeviceMemoryCollector(Collector):
    """``clipvision_device_memory_bytes``, read at scrape time for every CUDA device in use.

    CPU (and MPS) devices report nothing: torch keeps no allocator statistics
    for host memory, and the process's own resident size is what
    ``process_resident_memory_bytes`` of a node exporter or cAdvisor shows.
    """

    def __init__(
        self,
        devices: Callable[[], Iterable[torch.device]],
        stats: MemoryStats = cuda_memory,
    ) -> None:
        self._devices = devices
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One sample per CUDA device and kind (allocated, reserved); none without CUDA."""
        family = GaugeMetricFamily(
            "clipvision_device_memory_bytes",
            "Device memory held by torch: allocated by tensors, reserved by its allocator.",
            labels=["device", "kind"],
        )
        for device in sorted(set(self._devices()), key=str):
            if device.type != "cuda":
                continue
            allocated, reserved = self._stats(device)
            family.add_metric([str(device), "allocated"], allocated)
            family.add_metric([str(device), "reserved"], reserved)
        yield family


class BudgetUse(Protocol):
    """What the memory budget holds at one moment (resources.admission.BudgetUsage)."""

    @property
    def resident(self) -> int:
        """Bytes held until answered."""

    @property
    def decoding(self) -> int:
        """Bytes held while decoding."""

    @property
    def callers(self) -> int:
        """Callers holding or waiting."""

    @property
    def largest_share(self) -> float:
        """The largest holder's fraction of what is held."""


class QueueDepthCollector(Collector):
    """``clipvision_queue_depth`` and ``clipvision_text_queue_depth``, read at scrape time.

    Items are admitted and answered thousands of times a second: reading the depth
    when Prometheus asks costs nothing per item.
    """

    def __init__(self, depths: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        self._depths = depths

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One sample per model and modality that is loaded."""
        images = GaugeMetricFamily(
            "clipvision_queue_depth", "Images admitted and not yet answered.", labels=["model"]
        )
        texts = GaugeMetricFamily(
            "clipvision_text_queue_depth",
            "Texts admitted and not yet answered.",
            labels=["model"],
        )
        for model, modality, depth in self._depths():
            (texts if modality == "text" else images).add_metric([model], depth)
        yield images
        yield texts


class _BulkChild:
    """One label set of a BulkHistogram: observations appended, counted in bulk."""

    __slots__ = ("_bounds", "_counts", "_lock", "_pending", "_sum")

    FOLD_AT = 4096

    def __init__(self, bounds: npt.NDArray[np.float64]) -> None:
        self._bounds = bounds
        self._counts = np.zeros(len(bounds) + 1, dtype=np.int64)  # the last one is +Inf
        self._sum = 0.0
        self._pending: list[float] = []
        self._lock = threading.Lock()  # the event loop observes, the metrics thread reads

    def observe(self, value: float) -> None:
        """Record one value: an append; the buckets are counted every FOLD_AT values."""
        with self._lock:
            self._pending.append(value)
            if len(self._pending) >= self.FOLD_AT:
                self._fold()

    def _fold(self) -> None:
        values = np.asarray(self._pending, dtype=np.float64)
        self._pending = []
        # A value lands in the first bucket whose upper bound is >= it (Prometheus's le).
        slots = np.searchsorted(self._bounds, values, side="left")
        self._counts += np.bincount(slots, minlength=len(self._counts))
        self._sum += float(values.sum())

    def snapshot(self) -> tuple[list[int], float]:
        """Cumulative counts per bucket (+Inf last) and the sum, pending values included."""
        with self._lock:
            if self._pending:
                self._fold()
            return [int(count) for count in np.cumsum(self._counts)], self._sum


class BulkHistogram(Collector):
    """A Prometheus histogram for values observed once per item, thousands of times a second.

    prometheus_client's Histogram takes a lock and walks its buckets in Python on every
    observation (about 1.3 us, three times per image); this one appends under a lock and
    counts the buckets with numpy once per 4,096 values or at scrape time. The exposition
    is the same (``_bucket``, ``_count``, ``_sum``).
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: list[str],
        buckets: tuple[float, ...],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = labelnames
        self._buckets = buckets
        self._bounds = np.asarray(buckets, dtype=np.float64)
        self._children: dict[tuple[str, ...], _BulkChild] = {}
        self._children_lock = threading.Lock()
        registry.register(self)

    def labels(self, *values: str) -> _BulkChild:
        """The child for one label set, made on first use."""
        child = self._children.get(values)
        if child is None:
            with self._children_lock:
                child = self._children.setdefault(values, _BulkChild(self._bounds))
        return child

    def collect(self) -> Iterator[HistogramMetricFamily]:
        """Every label set's buckets, count and sum, as they stand now."""
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        with self._children_lock:
            children = list(self._children.items())
        for values, child in children:
            counts, total = child.snapshot()
            # As prometheus_client writes ``le`` for these bounds (repr: 0.001, 1.0, 30.0).
            bounds = [*(repr(float(bound)) for bound in self._buckets), "+Inf"]
            family.add_metric(list(values), list(zip(bounds, counts, strict=True)), total)
        yield family


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
        self.requests = Counter(
            "clipvision_requests",
            "Calls finished, by protocol (grpc, http), method (an RPC, or an HTTP route) and "
            "status code.",
            ["protocol", "method", "code"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "clipvision_request_duration_seconds",
            "Wall time of a call, from arrival to status (a stream's lifetime), by protocol and "
            "method.",
            ["protocol", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.image_queue_seconds = BulkHistogram(
            "clipvision_image_queue_seconds",
            "Per image: from entering the batcher's queue to the start of its batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.image_preprocess_seconds = BulkHistogram(
            "clipvision_image_preprocess_seconds",
            "Per image: resolve, decode and preprocess, measured in the worker thread.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.image_inference_seconds = BulkHistogram(
            "clipvision_image_inference_seconds",
            "Per image: device time of the batch it went in (forward and copy to host).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.text_batch_size = Histogram(
            "clipvision_text_batch_size",
            "Texts per forward pass of a text tower.",
            ["model"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.text_inference_seconds = Histogram(
            "clipvision_text_inference_seconds",
            "Device time per text batch: forward pass and copy to host.",
            ["model"],
            registry=self.registry,
        )
        self.texts_embedded = Counter(
            "clipvision_texts_embedded",
            "Texts that went through a text tower.",
            ["model"],
            registry=self.registry,
        )
        self.text_tokenize_seconds = BulkHistogram(
            "clipvision_text_tokenize_seconds",
            "Per text: tokenizing, measured in the worker thread.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.text_queue_seconds = BulkHistogram(
            "clipvision_text_queue_seconds",
            "Per text: from entering the batcher's queue to the start of its batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.item_errors = Counter(
            "clipvision_item_errors",
            "Items answered with an in-band error (EmbedImages, EmbedTexts, the streams), by "
            "reason.",
            ["reason"],
            registry=self.registry,
        )
        self.model_load_seconds = Gauge(
            "clipvision_model_load_seconds",
            "Seconds the last load of a model took, warm-up included.",
            ["model"],
            registry=self.registry,
        )
        self.refused_calls = Counter(
            "clipvision_refused_calls",
            "Calls refused before their handler ran (token, call slots, missing, late or "
            "malformed request, unknown method), by protocol, method, status code and reason.",
            ["protocol", "method", "code", "reason"],
            registry=self.registry,
        )
        self.call_slots = Gauge(
            "clipvision_call_slots",
            "Call slots held, by pool (unary, stream, watch).",
            ["pool"],
            registry=self.registry,
        )
        self._add_admission_metrics()
        self._http: MetricsHTTPServer | None = None
        self._image_stages: dict[str, tuple[Any, Any, Any]] = {}
        self._text_stages: dict[str, tuple[Any, Any]] = {}
        self._batch_children: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self._call_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def on_batch(self, model: str, size: int, seconds: float, modality: str = "image") -> None:
        """Record one batch that went through the device."""
        children = self._batch_children.get((model, modality))
        if children is None:  # looked up once per model: labels() costs more than observe()
            text = modality == "text"
            children = self._batch_children[(model, modality)] = (
                (self.text_batch_size if text else self.batch_size).labels(model),
                (self.text_inference_seconds if text else self.inference_seconds).labels(model),
                (self.texts_embedded if text else self.images_embedded).labels(model),
            )
        children[0].observe(size)
        children[1].observe(seconds)
        children[2].inc(size)

    def on_model_loaded(self, model: str, seconds: float) -> None:
        """Record how long a model took to load and warm up."""
        self.model_load_seconds.labels(model).set(seconds)

    def on_image(self, model: str, times: StageTimes) -> None:
        """Record where one embedded image's time went."""
        stages = self._image_stages.get(model)
        if stages is None:  # looked up once per model: this runs for every image
            stages = self._image_stages[model] = (
                self.image_preprocess_seconds.labels(model),
                self.image_queue_seconds.labels(model),
                self.image_inference_seconds.labels(model),
            )
        stages[0].observe(times.preprocess_s)
        stages[1].observe(times.queue_s)
        stages[2].observe(times.inference_s)

    def on_text(self, model: str, times: StageTimes) -> None:
        """Record where one embedded text's time went."""
        stages = self._text_stages.get(model)
        if stages is None:
            stages = self._text_stages[model] = (
                self.text_tokenize_seconds.labels(model),
                self.text_queue_seconds.labels(model),
            )
        stages[0].observe(times.preprocess_s)
        stages[1].observe(times.queue_s)

    def on_item_error(self, reason: str) -> None:
        """Count one image answered in-band with an error."""
        self.item_errors.labels(reason).inc()

    def on_call(self, method: str, code: str, seconds: float, protocol: str = "grpc") -> None:
        """Count one finished call and its duration."""
        children = self._call_children.get((protocol, method, code))
        if children is None:  # methods and codes are few: each pair looked up once
            children = self._call_children[(protocol, method, code)] = (
                self.requests.labels(protocol, method, code),
                self.request_seconds.labels(protocol, method),
            )
        children[0].inc()
        children[1].observe(seconds)

    def on_refused(self, method: str, code: str, reason: str, protocol: str = "grpc") -> None:
        """Count one call refused before its handler ran (the gate, or HTTP's checks)."""
        self.refused_calls.labels(protocol, method, code, reason).inc()

    def watch_call_slots(self, pools: Mapping[str, Sized]) -> None:
        """Report the slots each pool holds, read at scrape time."""
        for name, pool in pools.items():
            self.call_slots.labels(name).set_function(pool.__len__)

    def watch_queues(self, depths: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        """Report each model's items admitted and not yet answered, read at scrape time from
        ``depths()``: (model, modality, depth) per batcher."""
        self.registry.register(QueueDepthCollector(depths))

    def watch_budget(self, usage: Callable[[], BudgetUse]) -> None:
        """Report what the memory budget holds, read at scrape time from ``usage()``."""
        self._admitted_resident.set_function(lambda: usage().resident)
        self._admitted_decode.set_function(lambda: usage().decoding)
        self.admission_callers.set_function(lambda: usage().callers)
        self.admission_largest_share.set_function(lambda: usage().largest_share)

    def watch_devices(
        self, devices: Callable[[], Iterable[torch.device]], stats: MemoryStats = cuda_memory
    ) -> None:
        """Report device memory for the devices ``devices()`` names at each scrape."""
        self.registry.register(DeviceMemoryCollector(devices, stats))

    def serve(self, address: str) -> int:
        """Expose /metrics over HTTP on ``HOST:PORT``; returns the port (0 picks one).

        Connections and the time to send a request are bounded (see ``metrics_http``).
        """
        host, _, port = address.rpartition(":")
        server = MetricsHTTPServer(make_wsgi_app(self.registry))
        bound = server.start(host.strip("[]"), int(port))
        self._http = server
        return bound

    def close(self) -> None:
        """Stop the HTTP endpoint, if it runs."""
        if self._http is not None:
            self._http.close()
            self._http = None

    def _add_admission_metrics(self) -> None:
        # No label per caller: callers come and go, the series must stay few.
        self.memory_budget = Gauge(
            "clipvision_memory_budget_bytes",
            "Bytes that requests in flight may hold, images and texts and the messages being read "
            "(--memory-budget).",
            registry=self.registry,
        )
        self.memory_admitted = Gauge(
            "clipvision_memory_admitted_bytes",
            "Bytes of the budget admitted now, by stage: resident (encoded bytes and crops, "
            "held until answered) and decode (working sets of images admitted, not yet decoded).",
            ["stage"],
            registry=self.registry,
        )
        # Read at scrape time (watch_budget): admitting an image updates no metric.
        self._admitted_resident = self.memory_admitted.labels("resident")
        self._admitted_decode = self.memory_admitted.labels("decode")
        self.admission_callers = Gauge(
            "clipvision_admission_callers",
            "Callers (identities or connections) holding or waiting for memory budget.",
            registry=self.registry,
        )
        self.admission_largest_share = Gauge(
            "clipvision_admission_largest_share",
            "Fraction of the admitted bytes that the largest caller holds (0 to 1).",
            registry=self.registry,
        )
        self.admission_waits = Counter(
            "clipvision_admission_waits",
            "Items (images, texts) that waited for room, by resource (queue: items per model "
            "and tower; memory).",
            ["resource"],
            registry=self.registry,
        )
        self.admission_refusals = Counter(
            "clipvision_admission_refusals",
            "Calls or items (images, texts) refused for capacity, by reason.",
            ["reason"],
            registry=self.registry,
        )

    def on_budget(self, total: int) -> None:
        """Record the memory budget in bytes."""
        self.memory_budget.set(total)

    def on_admission_wait(self, resource: str) -> None:
        """Count one image that waited for ``resource``."""
        self.admission_waits.labels(resource).inc()

    def on_admission_refused(self, reason: str) -> None:
        """Count one call or image refused for capacity."""
        self.admission_refusals.labels(reason).inc()
