"""The Open Inference Protocol (v2): tritonclient and kserve, unmodified, against a real server.

The protocol's clients run in a child process (tests/oip_clients.py): they bring
their own generated ``inference`` package, which cannot share this process's
protobuf descriptor pool with the server's. What those clients cannot send
(malformed tensors, the bytes_contents form) is sent with our stubs.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import sys
import threading
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import numpy as np
import pytest
import yaml
from PIL import Image

from clipvision.inference_v2 import grpc_service_pb2 as oip
from clipvision.inference_v2 import grpc_service_pb2_grpc as oip_grpc
from clipvision.server.app import ClipVisionServer
from clipvision.server.config.settings import Settings
from clipvision.server.pipelines.inference_plane import split_bytes
from clipvision.server.runtime.image_encoder import ClipImageEncoder, FloatArray
from clipvision.server.runtime.preprocess import UInt8Array
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import encode, photo_bytes, running_server, settings_with
from tests.test_errors import error_info

DRIVER = Path(__file__).with_name("oip_clients.py")
DIMENSION = 16  # the tiny CLIP checkpoint's embedding size
Pair = tuple[ClipVisionServer, grpc.aio.Channel]


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Seventeen small JPEG files, then a real photograph, then bytes no decoder reads."""
    folder = tmp_path_factory.mktemp("oip-images")
    paths = []
    for index, data in enumerate([*(_jpeg(seed) for seed in range(17)), photo_bytes("rocket.jpg")]):
        paths.append(folder / f"{index}.jpg")
        paths[-1].write_bytes(data)
    paths.append(folder / "bad.jpg")
    paths[-1].write_bytes(b"\xff\xd8 this is not a JPEG")
    return paths


def _files(paths: list[Path]) -> list[str]:
    return [str(path) for path in paths]


async def drive(
    address: str, steps: list[dict[str, Any]], python: str = sys.executable, client: str = "triton"
) -> list[dict[str, Any]]:
    """Run the steps with the protocol's own client in a child process (see oip_clients)."""
    child = await asyncio.create_subprocess_exec(
        python,
        str(DRIVER),
        address,
        client,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out = await _finish(child, json.dumps(steps).encode())
    results: list[dict[str, Any]] = json.loads(out)
    return results


async def _finish(child: asyncio.subprocess.Process, stdin: bytes | None = None) -> bytes:
    """The child's output once it exits with 0; killed if it takes over a minute."""
    try:
        out, err = await asyncio.wait_for(child.communicate(stdin), 60)
    except TimeoutError:
        child.kill()
        await child.wait()
        raise
    assert child.returncode == 0, err.decode()
    return out


def _address(server: ClipVisionServer) -> str:
    return f"127.0.0.1:{server.listener.port}"


async def native_vectors(
    channel: grpc.aio.Channel, paths: list[Path], normalize: bool = True
) -> np.ndarray[Any, Any]:
    """What EmbedImages answers for the same files."""
    request = pb.EmbedImagesRequest(
        model="tiny",
        images=[pb.Image(content=path.read_bytes()) for path in paths],
        normalize=normalize,
    )
    response = await pb_grpc.EmbeddingServiceStub(channel).EmbedImages(request)
    return np.array([result.embedding.values for result in response.results], np.float32)


# -- tritonclient, against the shared server -----------------------------------------


@pytest.fixture(scope="module")
async def triton_results(server_channel: Pair, images: list[Path]) -> list[dict[str, Any]]:
    """One run of tritonclient through every call a user of it makes (one child process)."""
    server, _ = server_channel
    good, bad = images[:16], images[-1]
    steps: list[dict[str, Any]] = [
        {"kind": "health", "models": ["tiny", "tiny-text", "tiny-vision", "tiny-vision-text", "x"]},
        {"kind": "describe", "model": "tiny"},
        {"kind": "describe", "model": "tiny-text"},
        {"kind": "infer", "model": "tiny", "files": _files(images[17:18])},
        {"kind": "infer", "model": "tiny", "files": _files(good)},
        {"kind": "async_infer", "model": "tiny", "files": _files(good[:4])},
        {"kind": "aio", "model": "tiny", "files": _files(good[4:6])},
        {
            "kind": "infer",
            "model": "tiny",
            "files": _files(good[:2]),
            "parameters": {"normalize": False},
        },
        {
            "kind": "stream",
            "model": "tiny",
            "requests": [
                {"files": _files(good[:2])},
                {"files": _files([good[2], bad])},
                {"files": _files(good[3:4])},
            ],
        },
        {"kind": "infer", "model": "tiny", "files": _files([good[0], bad, good[1]])},
        {"kind": "infer", "model": "nope", "files": _files(good[:1])},
        {"kind": "infer", "model": "tiny", "files": _files(images[:17])},
        {"kind": "unimplemented"},
    ]
    return await drive(_address(server), steps)


async def test_health_agrees_and_models_are_named_after_the_served_ones(
    triton_results: list[dict[str, Any]],
) -> None:
    health = triton_results[0]
    assert health == {
        "live": True,
        "ready": True,
        # tiny-vision is served without a text tower, so it has no text model.
        "models": {
            "tiny": True,
            "tiny-text": True,
            "tiny-vision": True,
            "tiny-vision-text": False,
            "x": False,
        },
    }


async def test_metadata_and_config_describe_bytes_in_and_fp32_out(
    triton_results: list[dict[str, Any]],
) -> None:
    images, texts = triton_results[1], triton_results[2]
    assert images["server"]["name"] == "clipvision"
    assert images["metadata"] == {
        "name": "tiny",
        "versions": ["1"],
        "platform": "clipvision",
        "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": ["-1"]}],
        "outputs": [{"name": "EMBEDDING", "datatype": "FP32", "shape": ["-1", str(DIMENSION)]}],
    }
    assert texts["metadata"]["inputs"] == [{"name": "TEXT", "datatype": "BYTES", "shape": ["-1"]}]
    config = images["config"]["config"]
    assert config["max_batch_size"] == 16  # the server's --max-batch-images
    assert config["input"] == [{"name": "IMAGE", "data_type": "TYPE_STRING", "dims": ["1"]}]
    assert config["output"] == [
        {"name": "EMBEDDING", "data_type": "TYPE_FP32", "dims": [str(DIMENSION)]}
    ]
    assert texts["config"]["config"]["name"] == "tiny-text"


async def test_infer_equals_embed_images(
    triton_results: list[dict[str, Any]], server_channel: Pair, images: list[Path]
) -> None:
    channel = server_channel[1]
    one, sixteen = triton_results[3], triton_results[4]
    assert one["shape"] == [1, DIMENSION]
    assert one["dtype"] == "float32"
    np.testing.assert_allclose(
        one["vectors"], await native_vectors(channel, images[17:18]), atol=1e-5
    )
    assert sixteen["shape"] == [16, DIMENSION]
    native = await native_vectors(channel, images[:16])
    np.testing.assert_allclose(sixteen["vectors"], native, atol=1e-5)
    # async_infer and the aio client answer the same vectors.
    np.testing.assert_allclose(triton_results[5]["vectors"], native[:4], atol=1e-5)
    assert triton_results[6]["ready"] is True
    np.testing.assert_allclose(triton_results[6]["vectors"], native[4:6], atol=1e-5)
    # normalize=False: the raw projected features, as EmbedImages with normalize=false.
    raw = await native_vectors(channel, images[:2], normalize=False)
    np.testing.assert_allclose(triton_results[7]["vectors"], raw, atol=1e-5)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)


async def test_a_stream_answers_a_bad_image_in_band_and_goes_on(
    triton_results: list[dict[str, Any]], server_channel: Pair, images: list[Path]
) -> None:
    first, failed, last = triton_results[8]["responses"]
    native = await native_vectors(server_channel[1], images[:4])
    assert first["id"] == "0"
    np.testing.assert_allclose(first["vectors"], native[:2], atol=1e-5)
    assert "IMAGE element 1 failed (IMAGE_" in failed["error"]["message"]
    assert last["id"] == "2"
    np.testing.assert_allclose(last["vectors"], native[3:4], atol=1e-5)


async def test_one_bad_image_fails_the_call_naming_its_index(
    triton_results: list[dict[str, Any]],
) -> None:
    error = triton_results[9]["error"]
    assert error["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "IMAGE element 1 failed (IMAGE_" in error["message"]


async def test_request_level_faults_have_the_native_statuses(
    triton_results: list[dict[str, Any]],
) -> None:
    unknown, too_many, unimplemented = triton_results[10:13]
    assert unknown["error"]["status"] == "StatusCode.NOT_FOUND"
    assert "'tiny-text'" in unknown["error"]["message"]  # it lists the names to use
    assert too_many["error"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "17 elements and the limit is 16" in too_many["error"]["message"]
    assert unimplemented["error"]["status"] == "StatusCode.UNIMPLEMENTED"
    assert "RepositoryIndex" in unimplemented["error"]["message"]


async def test_texts_equal_embed_texts(server_channel: Pair, tmp_path: Path) -> None:
    server, channel = server_channel
    texts = ["a photo of a cat", "un chien", "🚀 rocket"]
    paths = []
    for index, text in enumerate(texts):
        paths.append(tmp_path / f"{index}.txt")
        paths[-1].write_text(text, encoding="utf-8")
    step = {"kind": "infer", "model": "tiny-text", "input": "TEXT", "files": _files(paths)}
    (result,) = await drive(_address(server), [step])
    response = await pb_grpc.EmbeddingServiceStub(channel).EmbedTexts(
        pb.EmbedTextsRequest(model="tiny", texts=texts)
    )
    native = [r.embedding.values for r in response.results]
    np.testing.assert_allclose(result["vectors"], native, atol=1e-5)


# -- deadlines, cancellation and size, as through our own client ----------------------


async def test_deadline_cancel_and_oversize_behave_as_natively(
    base_settings: Settings, images: list[Path]
) -> None:
    settings = settings_with(base_settings, max_message_bytes=64 * 1024)
    big = images[17]  # the photograph: over 64 KiB
    async with running_server(settings) as (server, channel):
        steps: list[dict[str, Any]] = [
            {"kind": "infer", "model": "tiny", "files": _files(images[:8]), "client_timeout": 1e-4},
            {"kind": "cancel", "model": "tiny", "files": _files(images[:8])},
            {"kind": "infer", "model": "tiny", "files": _files([big])},
        ]
        deadline, cancelled, oversize = await drive(_address(server), steps)
        assert deadline["error"]["status"] == "StatusCode.DEADLINE_EXCEEDED"
        assert cancelled["error"]["status"] == "StatusCode.CANCELLED"
        assert oversize["error"]["status"] == "StatusCode.RESOURCE_EXHAUSTED"
        with pytest.raises(grpc.aio.AioRpcError) as native:
            await native_vectors(channel, [big])
        assert native.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Whatever was admitted has been given back, as after a native call.
        model = server.registry.loaded("tiny")
        assert model is not None
        for _ in range(100):
            if model.batcher.capacity.used == 0:
                break
            await asyncio.sleep(0.02)
        assert model.batcher.capacity.used == 0


# -- what the protocol's clients do not send: our stubs ---------------------------------


def _request(elements: list[bytes], **changes: Any) -> oip.ModelInferRequest:
    tensor = oip.ModelInferRequest.InferInputTensor(
        name="IMAGE", datatype="BYTES", shape=[len(elements)]
    )
    raw = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    request = oip.ModelInferRequest(model_name="tiny", inputs=[tensor], raw_input_contents=[raw])
    for name, value in changes.items():
        if name == "raw":
            del request.raw_input_contents[:]
            request.raw_input_contents.append(value)
        elif name == "contents":
            del request.raw_input_contents[:]
            request.inputs[0].contents.bytes_contents.extend(value)
    return request


async def _invalid(stub: Any, request: oip.ModelInferRequest) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The interceptor mapped our error: ErrorInfo with its reason, as on EmbeddingService.
    info = error_info(caught.value)
    return f"{info.reason}: {caught.value.details()}"


async def test_bytes_contents_and_raw_contents_are_the_same(
    server_channel: Pair, images: list[Path]
) -> None:
    server, channel = server_channel
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    data = [path.read_bytes() for path in images[:3]]
    labels = {"protocol": "grpc", "method": "ModelInfer", "code": "OK"}
    before = server.metrics.registry.get_sample_value("clipvision_requests_total", labels) or 0
    raw = await stub.ModelInfer(_request(data))
    listed = await stub.ModelInfer(_request(data, contents=data))
    assert raw.outputs[0].shape == [3, DIMENSION]
    np.testing.assert_allclose(
        np.frombuffer(raw.raw_output_contents[0], "<f4"),
        np.frombuffer(listed.raw_output_contents[0], "<f4"),
        atol=1e-5,
    )
    # Counted like any EmbeddingService call, by the same interceptor.
    after = server.metrics.registry.get_sample_value("clipvision_requests_total", labels)
    assert after == before + 2


async def test_malformed_tensors_are_refused_naming_what_is_wrong(
    server_channel: Pair, images: list[Path]
) -> None:
    stub = oip_grpc.GRPCInferenceServiceStub(server_channel[1])
    data = images[0].read_bytes()
    good = struct.pack("<I", len(data)) + data
    cut = await _invalid(stub, _request([data, data], raw=good + b"\x05\x00"))
    assert f"length prefix at byte offset {len(good)} is cut short" in cut
    assert cut.startswith("REQUEST_MALFORMED")
    claims = await _invalid(stub, _request([data, data], raw=good + struct.pack("<I", 99) + b"x"))
    assert f"element at byte offset {len(good)} claims 99 bytes but only 1 follow" in claims
    assert "shape [3] but 2 elements" in await _invalid(stub, _shape([data, data], 3))
    wrong_name = _request([data])
    wrong_name.inputs[0].name = "INPUT0"
    assert "takes one input, IMAGE (BYTES); the request has 'INPUT0'" in await _invalid(
        stub, wrong_name
    )
    assert "IMAGE element 0 failed (IMAGE_" in await _invalid(stub, _request([b"not an image"]))


async def test_a_flood_of_empty_elements_is_refused_before_it_is_split(
    server_channel: Pair,
) -> None:
    stub = oip_grpc.GRPCInferenceServiceStub(server_channel[1])
    # Four bytes per element: 4 MB are a million zero-length elements, which the server
    # must not make on its event loop. The shape says 1 and the limit is 16.
    flood = _request([b""], raw=b"\x00\x00\x00\x00" * 1_000_000)
    message = await _invalid(stub, flood)
    assert "has shape [1] but more than 16 elements" in message
    # And by the shape alone, before anything is split.
    assert "1000000 elements and the limit is 16" in await _invalid(stub, _shape([b""], 1_000_000))
    assert split_bytes(b"\x00" * 4 * 20, "IMAGE", limit=16) is None
    assert split_bytes(b"\x00" * 4 * 3, "IMAGE", limit=16) == [b"", b"", b""]


async def test_only_the_protocols_own_rpcs_are_named_as_unimplemented(
    server_channel: Pair,
) -> None:
    server, channel = server_channel
    for name, named in (("LogSettings", True), ("NoSuchMethodOfAnyProtocol", False)):
        call = channel.unary_unary(
            f"/inference.GRPCInferenceService/{name}",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(b"")
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert (name in (caught.value.details() or "")) is named
    # A name the caller makes up never becomes a metrics label.
    labels = {"protocol": "grpc", "method": "NoSuchMethodOfAnyProtocol", "code": "UNIMPLEMENTED"}
    assert server.metrics.registry.get_sample_value("clipvision_requests_total", labels) is None


def _shape(elements: list[bytes], claimed: int) -> oip.ModelInferRequest:
    request = _request(elements)
    request.inputs[0].shape[0] = claimed
    return request


async def test_ready_agrees_with_grpc_health(base_settings: Settings) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with running_server(base_settings, load=False) as (server, channel):
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        async def states() -> tuple[bool, bool, bool]:
            checked = await health.Check(health_pb2.HealthCheckRequest(service=""))
            serving = checked.status == health_pb2.HealthCheckResponse.SERVING
            ready = await stub.ServerReady(oip.ServerReadyRequest())
            model = await stub.ModelReady(oip.ModelReadyRequest(name="tiny"))
            return serving, ready.ready, model.ready

        assert await states() == (False, False, False)  # loading
        assert (await stub.ServerLive(oip.ServerLiveRequest())).live
        await server.load_models()
        assert await states() == (True, True, True)
        await server.health.set_serving(False)  # what the watchdog does on a stuck device
        assert await states() == (False, False, False)
        await server.health.set_serving(True)
        server.registry.drain()
        assert (await stub.ModelReady(oip.ModelReadyRequest(name="tiny"))).ready is False


# -- kserve's client, where an interpreter with kserve is given --------------------------

KSERVE_PYTHON = os.environ.get("CLIPVISION_KSERVE_PYTHON")


@pytest.mark.skipif(
    KSERVE_PYTHON is None,
    reason="kserve pins protobuf<7 (ours is 7): set CLIPVISION_KSERVE_PYTHON to a Python "
    "with kserve installed to run it (scripts/test makes .venv-kserve and sets it)",
)
async def test_kserve_client_infer_equals_embed_images(
    server_channel: Pair, images: list[Path]
) -> None:
    assert KSERVE_PYTHON is not None
    server, channel = server_channel
    step = {"kind": "infer", "model": "tiny", "files": _files(images[:4])}
    (result,) = await drive(_address(server), [step], python=KSERVE_PYTHON, client="kserve")
    assert result["shape"] == [4, DIMENSION]
    np.testing.assert_allclose(
        result["vectors"], await native_vectors(channel, images[:4]), atol=1e-5
    )


# -- the KServe example ------------------------------------------------------------------

MANIFEST = Path(__file__).resolve().parent.parent / "deploy" / "kserve" / "inferenceservice.yaml"


def test_the_kserve_example_runs_our_grpc_port_with_valid_pods() -> None:
    doc = yaml.safe_load(MANIFEST.read_text())
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert doc["kind"] == "InferenceService"
    predictor = doc["spec"]["predictor"]
    (container,) = predictor["containers"]
    (port,) = container["ports"]
    # h2c is how KServe knows the predictor speaks gRPC; the server must listen there.
    assert port["name"] == "h2c"
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["CLIPVISION_ADDRESS"] == f"0.0.0.0:{port['containerPort']}"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port["containerPort"]
    # The predictor's pod fields, checked strictly against Kubernetes' own schema.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "clipvision"},
        "spec": {
            "containers": predictor["containers"],
            "volumes": predictor["volumes"],
            "terminationGracePeriodSeconds": predictor["terminationGracePeriodSeconds"],
            "securityContext": predictor["securityContext"],
        },
    }
    kubernetes_validate.validate(pod, "1.33.0", strict=True)


@pytest.mark.skipif(KSERVE_PYTHON is None, reason="needs CLIPVISION_KSERVE_PYTHON, as above")
async def test_kserve_models_know_every_field_of_the_example() -> None:
    assert KSERVE_PYTHON is not None
    child = await asyncio.create_subprocess_exec(
        KSERVE_PYTHON,
        str(DRIVER),
        str(MANIFEST),
        "kserve-manifest",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert json.loads(await _finish(child)) == []


async def test_a_streams_requests_show_in_the_queue_depth_until_answered(
    base_settings: Settings, images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real = ClipImageEncoder.embed_batch

    def held(encoder: ClipImageEncoder, pixels: list[UInt8Array]) -> FloatArray:
        release.wait(timeout=30)
        return real(encoder, pixels)

    # Patched before the model loads: the batcher holds the bound batch function.
    monkeypatch.setattr(ClipImageEncoder, "embed_batch", held)
    async with running_server(base_settings) as (server, channel):

        def depth() -> float | None:
            return server.metrics.registry.get_sample_value(
                "clipvision_queue_depth", {"model": "tiny"}
            )

        call = oip_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
            iter([_request([p.read_bytes() for p in images[:3]])])
        )
        reading = asyncio.ensure_future(_collect(call))
        try:
            async with asyncio.timeout(10):
                while depth() != 3:  # the request's three images, admitted and in flight
                    await asyncio.sleep(0.02)
        finally:
            release.set()
        responses = await reading
        assert not responses[0].error_message
        assert depth() == 0


async def _collect(call: Any) -> list[oip.ModelStreamInferResponse]:
    return [response async for response in call]
