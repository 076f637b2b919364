"""What an operator sees: Prometheus metrics, per-call timings and request ids, failed-call logs."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from clipvision.server.app import connection_options
from clipvision.server.config.flags import parse_settings
from clipvision.server.config.settings import Settings
from clipvision.server.ops.calls import request_id_from
from clipvision.server.ops.logs import ClientFaultFilter, JsonFormatter
from clipvision.server.ops.metrics import (
    LATENCY_BUCKETS,
    BulkHistogram,
    DeviceMemoryCollector,
    ServerMetrics,
)
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import encode, photo_bytes, settings_with
from tests.live_server import LiveServer, live_server
from tests.scrape import scrape, total, value

TIMING_KEYS = ("clipvision-queue-ms", "clipvision-preprocess-ms", "clipvision-inference-ms")


@pytest.fixture(scope="module")
async def live(base_settings: Settings) -> AsyncIterator[LiveServer]:
    """A loaded server with /metrics on a free port, for this module alone (its counts are ours)."""
    async with live_server(settings_with(base_settings, metrics_address="127.0.0.1:0")) as server:
        yield server


def small_png(shade: int) -> bytes:
    return encode(Image.new("RGB", (32, 32), (shade, 255 - shade, 90)), "PNG")


async def test_metrics_count_calls_by_code_and_time_every_stage(live: LiveServer) -> None:
    assert live.server.metrics_port is not None
    async with grpc.aio.insecure_channel(live.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        await stub.EmbedImage(pb.EmbedImageRequest(image=pb.Image(content=small_png(1))))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.EmbedImage(pb.EmbedImageRequest(image=pb.Image(content=b"not an image")))
        response = await stub.EmbedImages(
            pb.EmbedImagesRequest(
                images=[pb.Image(content=small_png(2)), pb.Image(content=b"garbage")]
            )
        )
        reason = response.results[1].error.reason
        assert reason.startswith("IMAGE_")
    samples = await scrape(live.server.metrics_port)
    assert (
        value(samples, "clipvision_requests_total", protocol="grpc", method="EmbedImage", code="OK")
        == 1
    )
    assert (
        value(
            samples,
            "clipvision_requests_total",
            protocol="grpc",
            method="EmbedImage",
            code="INVALID_ARGUMENT",
        )
        == 1
    )
    assert (
        value(
            samples, "clipvision_requests_total", protocol="grpc", method="EmbedImages", code="OK"
        )
        == 1
    )
    # The in-band failure is counted as an item error, not as a failed call.
    assert value(samples, "clipvision_item_errors_total", reason=reason) == 1
    assert total(samples, "clipvision_request_duration_seconds_count", method="EmbedImage") == 2
    # Two images went through the model, and each stage saw each of them once.
    for stage in ("queue", "preprocess", "inference"):
        assert value(samples, f"clipvision_image_{stage}_seconds_count", model="tiny") == 2
    assert value(samples, "clipvision_image_preprocess_seconds_sum", model="tiny") > 0
    assert value(samples, "clipvision_image_inference_seconds_sum", model="tiny") > 0
    assert value(samples, "clipvision_images_embedded_total", model="tiny") == 2
    assert value(samples, "clipvision_model_load_seconds", model="tiny") > 0
    assert value(samples, "clipvision_model_load_seconds", model="tiny-vision") > 0
    # On the CPU there is no device memory to report (see DeviceMemoryCollector).
    assert total(samples, "clipvision_device_memory_bytes") == 0


async def test_trailing_metadata_carries_timings_and_the_callers_request_id(
    live: LiveServer,
) -> None:
    async with grpc.aio.insecure_channel(live.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        call = stub.EmbedImage(
            pb.EmbedImageRequest(image=pb.Image(content=photo_bytes("coffee.png"))),
            metadata=(("x-request-id", "job-7/item-3"),),
        )
        await call
        single = dict(await call.trailing_metadata())
        batch_call = stub.EmbedImages(
            pb.EmbedImagesRequest(images=[pb.Image(content=small_png(i)) for i in range(5)])
        )
        await batch_call
        batch = dict(await batch_call.trailing_metadata())
    assert single["x-request-id"] == "job-7/item-3"
    assert single["clipvision-images"] == "1"
    # Decoding and resizing a real photograph takes measurable time, and so does the model.
    assert float(single["clipvision-preprocess-ms"]) > 0
    assert float(single["clipvision-inference-ms"]) > 0
    assert float(single["clipvision-queue-ms"]) >= 0
    assert batch["clipvision-images"] == "5"
    assert all(float(batch[key]) >= 0 for key in TIMING_KEYS)
    assert re.fullmatch("[0-9a-f]{32}", str(batch["x-request-id"]))  # generated: 128 bits


async def test_a_failed_call_logs_one_line_with_its_request_id(
    live: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="clipvision.server.wire.interceptors")
    async with grpc.aio.insecure_channel(live.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        call = stub.EmbedImage(
            pb.EmbedImageRequest(image=pb.Image(content=b"GIF89a broken")),
            metadata=(("x-request-id", "req-42"),),
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        metadata: dict[str, str | bytes] = dict(caught.value.trailing_metadata() or ())  # type: ignore[arg-type]
    assert metadata["x-request-id"] == "req-42"
    lines = [r for r in caplog.records if getattr(r, "request_id", None) == "req-42"]
    assert len(lines) == 1
    record = lines[0]
    assert record.getMessage().startswith("EmbedImage failed: INVALID_ARGUMENT IMAGE_")
    assert "req-42" in record.getMessage()
    assert getattr(record, "code", None) == "INVALID_ARGUMENT"
    assert getattr(record, "duration_ms", -1) >= 0


def test_request_ids_from_callers_are_kept_only_when_sane() -> None:
    assert request_id_from((("x-request-id", "abc-123"),)) == "abc-123"
    for bad in ("has space", "x" * 200, "new\nline", ""):
        generated = request_id_from((("x-request-id", bad),))
        assert generated != bad
        assert len(generated) == 32
    assert request_id_from(None) != request_id_from(None)


def test_json_logs_are_one_object_per_line_with_the_extra_fields() -> None:
    logger = logging.getLogger("clipvision.test.json")
    record = logger.makeRecord(
        logger.name,
        logging.WARNING,
        __file__,
        1,
        "%s failed",
        ("EmbedImage",),
        None,
        extra={"request_id": "r-1", "code": "UNAVAILABLE", "duration_ms": 1.5},
    )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "EmbedImage failed"
    assert entry["level"] == "WARNING"
    assert entry["request_id"] == "r-1"
    assert entry["code"] == "UNAVAILABLE"
    assert entry["duration_ms"] == 1.5
    assert "args" not in entry
    assert "msg" not in entry


def test_grpcs_errors_about_what_a_client_sent_are_demoted_to_info_without_a_traceback() -> None:
    # grpc logs "Invalid encoding on b'...'" at ERROR with a UnicodeDecodeError's traceback
    # for each metadata value a client sends that is not UTF-8 (the attack bench: 10 lines).
    logger = logging.getLogger("grpc._cython.cygrpc")
    try:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    except UnicodeDecodeError:
        client_fault = logger.makeRecord(
            logger.name, logging.ERROR, "grpc_string.pyx.pxi", 48,
            "Invalid encoding on %s", (b"\xff\xfe\x80",), sys.exc_info(),
        )  # fmt: skip
    own_fault = logger.makeRecord(
        logger.name, logging.ERROR, "server.pyx.pxi", 1, "Unexpected error", (), None
    )
    demote = ClientFaultFilter()
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        assert demote.filter(client_fault)
        assert (client_fault.levelname, client_fault.exc_info) == ("INFO", None)
        assert "Traceback" not in logging.Formatter().format(client_fault)
        assert demote.filter(own_fault)
        assert own_fault.levelname == "ERROR"  # grpc's own faults stay errors
        logger.setLevel(logging.WARNING)  # a server logging warnings and up drops it
        client_fault.levelno, client_fault.levelname = logging.ERROR, "ERROR"
        assert not demote.filter(client_fault)
    finally:
        logger.setLevel(previous)


def test_device_memory_is_reported_for_cuda_devices_only() -> None:
    calls: list[torch.device] = []

    def fake_stats(device: torch.device) -> tuple[int, int]:
        calls.append(device)
        return 1000, 4096

    cpu_only = DeviceMemoryCollector(lambda: [torch.device("cpu")], fake_stats)
    assert [family.samples for family in cpu_only.collect()] == [[]]
    assert calls == []  # torch.cuda is never asked about a CPU model
    # Without a GPU here, a CUDA device is named, not used: the collector only reads stats.
    on_cuda = DeviceMemoryCollector(
        lambda: [torch.device("cuda", 0), torch.device("cuda", 0)], fake_stats
    )
    (family,) = list(on_cuda.collect())
    assert {(s.labels["device"], s.labels["kind"], s.value) for s in family.samples} == {
        ("cuda:0", "allocated", 1000),
        ("cuda:0", "reserved", 4096),
    }


def test_metrics_registry_is_per_server() -> None:
    first, second = ServerMetrics(), ServerMetrics()
    first.on_call("EmbedImage", "OK", 0.01)
    assert (
        second.registry.get_sample_value(
            "clipvision_requests_total", {"protocol": "grpc", "method": "EmbedImage", "code": "OK"}
        )
        is None
    )


def test_keepalive_and_connection_age_come_from_flags_and_environment() -> None:
    defaults = dict(connection_options(parse_settings([], environ={})))
    assert defaults["grpc.keepalive_time_ms"] == 60_000
    assert defaults["grpc.keepalive_timeout_ms"] == 20_000
    assert defaults["grpc.http2.min_ping_interval_without_data_ms"] == 30_000
    assert defaults["grpc.max_connection_age_ms"] == 300_000
    assert defaults["grpc.max_connection_age_grace_ms"] == 30_000
    tuned = parse_settings(
        ["--max-connection-age", "120", "--log-format", "json"],
        environ={"CLIPVISION_MIN_PING_INTERVAL": "10"},
    )
    options = dict(connection_options(tuned))
    assert options["grpc.max_connection_age_ms"] == 120_000
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 10_000
    assert tuned.log_format == "json"
    unlimited = dict(connection_options(parse_settings(["--max-connection-age", "0"], environ={})))
    assert "grpc.max_connection_age_ms" not in unlimited


def test_per_item_histograms_expose_what_prometheus_client_would() -> None:
    # The per-image stage histograms count their buckets in bulk; a scrape must read the
    # same buckets and count as prometheus_client's own Histogram fed the same values,
    # including values observed since the last fold and values right on a bound.
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    bulk = BulkHistogram("stage_seconds", "A stage.", ["model"], LATENCY_BUCKETS, ours)
    reference = Histogram(
        "stage_seconds", "A stage.", ["model"], buckets=LATENCY_BUCKETS, registry=theirs
    )
    rng = np.random.default_rng(3)
    values = [*rng.exponential(0.05, 9000).tolist(), *LATENCY_BUCKETS, 0.0, 100.0]
    for index, seconds in enumerate(values):
        model = "a" if index % 3 else "b"
        bulk.labels(model).observe(seconds)
        reference.labels(model).observe(seconds)

    def samples(registry: CollectorRegistry) -> dict[str, float]:
        exposed = generate_latest(registry).decode().splitlines()
        return {
            name: float(number)
            for name, number in (line.rsplit(" ", 1) for line in exposed if line[:1] != "#")
            if "_created" not in name
        }

    got, want = samples(ours), samples(theirs)
    assert got.keys() == want.keys()
    for name, number in want.items():
        if "_sum" in name:
            assert got[name] == pytest.approx(number, rel=1e-9)
        else:
            assert got[name] == number, name
    assert want['stage_seconds_count{model="a"}'] == 6010
