"""HTTP beside gRPC: the real clients, unmodified, against a real server, and HTTP's attacks.

Every vector an HTTP route answers is compared with what gRPC answers for the same
input on the same server: OpenAI's SDK (float and its default base64), LangChain's
OpenAIEmbeddings (both check_embedding_ctx_length modes), tritonclient.http (binary
data on and off; in a child process, as tests/test_oip.py runs tritonclient.grpc),
Weaviate's multi2vec-clip requests and JSON/protobuf calls to our own methods.
The attacks leave bystander gRPC and HTTP callers answered, and no answer is a 500.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from clipvision.server.app import ClipVisionServer, create_server
from clipvision.server.config.settings import Settings
from clipvision.server.http.listener import HttpBindError
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import photo_bytes, running_server, settings_with
from tests.test_oip import drive

Pair = tuple[ClipVisionServer, grpc.aio.Channel]
TEXTS = ["a photo of a cat", "a rocket on its pad", "a cup of coffee"]
PHOTOS = ["chelsea.png", "rocket.jpg", "coffee.png"]
TOKEN = "s3cret-token"


def _data_uri(name: str) -> str:
    kind = "png" if name.endswith(".png") else "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(photo_bytes(name)).decode()


@pytest.fixture(scope="module")
async def http_pair(base_settings: Settings) -> AsyncIterator[Pair]:
    """A loaded server with HTTP on a free port; fast read and head timeouts for the attacks."""
    settings = settings_with(
        base_settings,
        http_address="127.0.0.1:0",
        request_read_timeout_s=1.0,
        max_message_bytes=4 * 1024 * 1024,
    )
    async with running_server(settings) as pair:
        yield pair


def _url(server: ClipVisionServer, path: str = "") -> str:
    assert server.http is not None
    return f"http://127.0.0.1:{server.http.port}{path}"


async def _grpc_texts(channel: grpc.aio.Channel, texts: list[str]) -> np.ndarray[Any, Any]:
    stub = pb_grpc.EmbeddingServiceStub(channel)
    reply = await stub.EmbedTexts(pb.EmbedTextsRequest(model="tiny", texts=texts))
    return np.array([r.embedding.values for r in reply.results], np.float32)


async def _grpc_images(channel: grpc.aio.Channel, names: list[str]) -> np.ndarray[Any, Any]:
    stub = pb_grpc.EmbeddingServiceStub(channel)
    images = [pb.Image(content=photo_bytes(name)) for name in names]
    reply = await stub.EmbedImages(pb.EmbedImagesRequest(model="tiny", images=images))
    return np.array([r.embedding.values for r in reply.results], np.float32)


# -- OpenAI's SDK and LangChain --------------------------------------------------------


async def test_openai_sdk_texts_float_and_base64_equal_grpc(http_pair: Pair) -> None:
    from openai import AsyncOpenAI

    server, channel = http_pair
    expected = await _grpc_texts(channel, TEXTS)
    async with AsyncOpenAI(base_url=_url(server, "/v1"), api_key="unused") as client:
        default = await client.embeddings.create(model="tiny", input=TEXTS)  # base64 on the wire
        floats = await client.embeddings.create(model="tiny", input=TEXTS, encoding_format="float")
        models = await client.models.list()
    for answer in (default, floats):
        got = np.array([item.embedding for item in answer.data], np.float32)
        np.testing.assert_array_equal(got, expected)
        assert [item.index for item in answer.data] == [0, 1, 2]
        assert answer.model == "tiny"
        assert answer.usage.prompt_tokens > len(TEXTS)  # the model's tokenizer counted them
    assert [model.id for model in models.data] == ["tiny", "tiny-vision"]


async def test_openai_sdk_images_equal_grpc(http_pair: Pair) -> None:
    from openai import AsyncOpenAI

    server, channel = http_pair
    expected = await _grpc_images(channel, PHOTOS)
    uris = [_data_uri(name) for name in PHOTOS]
    async with AsyncOpenAI(base_url=_url(server, "/v1"), api_key="unused") as client:
        infinity = await client.embeddings.create(
            model="tiny", input=uris, extra_body={"modality": "image"}
        )
        mixed = await client.embeddings.create(
            model="tiny",
            input=[{"image": uris[0]}, {"text": TEXTS[0]}, {"image": uris[2]}],  # type: ignore[arg-type]
        )
    got = np.array([item.embedding for item in infinity.data], np.float32)
    np.testing.assert_array_equal(got, expected)
    text = await _grpc_texts(channel, TEXTS[:1])
    mixed_got = np.array([item.embedding for item in mixed.data], np.float32)
    np.testing.assert_array_equal(mixed_got, np.stack([expected[0], text[0], expected[2]]))


async def test_openai_sdk_errors_name_the_reason_and_the_fix(http_pair: Pair) -> None:
    import openai

    server, _ = http_pair
    async with openai.AsyncOpenAI(
        base_url=_url(server, "/v1"), api_key="unused", max_retries=0
    ) as client:
        with pytest.raises(openai.BadRequestError) as wrong_size:
            await client.embeddings.create(model="tiny", input="x", dimensions=8)
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.embeddings.create(model="nope", input="x")
        with pytest.raises(openai.BadRequestError) as bad_image:
            await client.embeddings.create(
                model="tiny", input=["data:image/png;base64,AAAA"], extra_body={"modality": "image"}
            )
    assert wrong_size.value.code == "DIMENSIONS_UNSUPPORTED"
    assert "16" in wrong_size.value.message
    assert unknown.value.code == "MODEL_NOT_FOUND"
    assert bad_image.value.code in ("IMAGE_DECODE_FAILED", "IMAGE_FORMAT_UNSUPPORTED")
    assert "input[0]" in bad_image.value.message


async def test_langchain_in_both_context_length_modes(http_pair: Pair) -> None:
    import openai
    import tiktoken
    import tiktoken.registry
    from langchain_openai import OpenAIEmbeddings

    server, channel = http_pair
    expected = await _grpc_texts(channel, TEXTS)
    async with httpx.AsyncClient() as transport:  # LangChain's clients are never closed
        texts_mode = OpenAIEmbeddings(
            model="tiny",
            base_url=_url(server, "/v1"),
            api_key="unused",  # type: ignore[arg-type]
            check_embedding_ctx_length=False,
            http_async_client=transport,
        )
        documents = await texts_mode.aembed_documents(TEXTS)
        query = await texts_mode.aembed_query(TEXTS[1])
    np.testing.assert_array_equal(np.array(documents, np.float32), expected)
    np.testing.assert_array_equal(np.array(query, np.float32), expected[1])
    # The default mode tokenizes with tiktoken and sends token ids. Its cl100k_base file
    # cannot be downloaded here: a byte-level encoding stands in for it (ids differ, the
    # request's shape, lists of ids, is what LangChain sends); langchain-openai runs as is.
    ranks = {bytes([value]): value for value in range(256)}
    stand_in = tiktoken.Encoding(
        "cl100k_base", pat_str=r".", mergeable_ranks=ranks, special_tokens={}
    )
    saved = tiktoken.registry.ENCODINGS.get("cl100k_base")
    tiktoken.registry.ENCODINGS["cl100k_base"] = stand_in
    try:
        async with httpx.AsyncClient() as transport:
            ids_mode = OpenAIEmbeddings(
                model="tiny",
                base_url=_url(server, "/v1"),
                api_key="unused",  # type: ignore[arg-type]
                max_retries=0,
                http_async_client=transport,
            )
            with pytest.raises(openai.BadRequestError) as refused:
                await ids_mode.aembed_documents(TEXTS)
    finally:
        if saved is None:
            del tiktoken.registry.ENCODINGS["cl100k_base"]
        else:
            tiktoken.registry.ENCODINGS["cl100k_base"] = saved
    assert refused.value.code == "INPUT_TOKENS_UNSUPPORTED"
    assert "check_embedding_ctx_length=False" in refused.value.message


# -- tritonclient.http --------------------------------------------------------------------


async def test_tritonclient_http_binary_on_and_off_equal_grpc(
    http_pair: Pair, tmp_path: Path
) -> None:
    server, channel = http_pair
    files = []
    for name in PHOTOS:
        files.append(tmp_path / name)
        files[-1].write_bytes(photo_bytes(name))
    steps: list[dict[str, Any]] = [
        {"kind": "health", "models": ["tiny", "tiny-text", "nope"]},
        {"kind": "describe", "model": "tiny-text"},
        *(
            {
                "kind": "infer",
                "model": "tiny",
                "files": [str(f) for f in files],
                "binary_in": True,
                "binary_out": out,
            }
            for out in (True, False)
        ),
        *(
            {
                "kind": "infer",
                "model": "tiny-text",
                "input": "TEXT",
                "texts": TEXTS,
                "binary_in": binary,
                "binary_out": binary,
            }
            for binary in (True, False)
        ),
        {
            "kind": "infer",
            "model": "nope",
            "texts": ["x"],
            "input": "TEXT",
            "binary_in": False,
            "binary_out": False,
        },
    ]
    assert server.http is not None
    health, describe, *answers, unknown = await drive(
        f"127.0.0.1:{server.http.port}", steps, client="triton-http"
    )
    assert health == {
        "live": True,
        "ready": True,
        "models": {"tiny": True, "tiny-text": True, "nope": False},
    }
    assert describe["metadata"]["outputs"] == [
        {"name": "EMBEDDING", "datatype": "FP32", "shape": [-1, 16]}
    ]
    assert describe["config"]["max_batch_size"] == 256  # --max-batch-texts
    images, texts = await _grpc_images(channel, PHOTOS), await _grpc_texts(channel, TEXTS)
    for answer, expected in zip(answers, [images, images, texts, texts], strict=True):
        assert answer["shape"] == [3, 16]
        assert answer["dtype"] == "float32"
        np.testing.assert_array_equal(np.array(answer["vectors"], np.float32), expected)
    assert unknown["error"]["status"] == "404"
    assert "MODEL_NOT_FOUND" in unknown["error"]["message"]


# -- Weaviate's multi2vec-clip --------------------------------------------------------------


async def test_weaviate_module_requests(http_pair: Pair) -> None:
    server, channel = http_pair
    images = [base64.b64encode(photo_bytes(name)).decode() for name in PHOTOS]
    async with httpx.AsyncClient(base_url=_url(server), timeout=30) as client:
        ready = await client.get("/.well-known/ready")
        live = await client.get("/.well-known/live")
        meta = await client.get("/meta")
        both = await client.post("/vectorize", json={"texts": TEXTS, "images": images})
        texts_only = await client.post("/vectorize", json={"texts": TEXTS[:1]})
        bad = await client.post("/vectorize", json={"texts": [], "images": ["not base64!"]})
    assert ready.status_code == 204
    assert live.status_code == 204
    assert meta.json()["model"]["name"] == "tiny"
    vectors = both.json()
    np.testing.assert_array_equal(
        np.array(vectors["textVectors"], np.float32), await _grpc_texts(channel, TEXTS)
    )
    np.testing.assert_array_equal(
        np.array(vectors["imageVectors"], np.float32), await _grpc_images(channel, PHOTOS)
    )
    norms = np.linalg.norm(np.array(vectors["imageVectors"]), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    assert texts_only.json()["imageVectors"] == []
    assert len(texts_only.json()["textVectors"]) == 1
    assert bad.status_code == 400
    assert "images[0]" in bad.json()["error"]


async def test_weaviate_ready_is_503_until_the_models_are_loaded(base_settings: Settings) -> None:
    settings = settings_with(base_settings, http_address="127.0.0.1:0")
    async with (
        running_server(settings, load=False) as (server, _),
        httpx.AsyncClient(base_url=_url(server), timeout=10) as client,
    ):
        before = await client.get("/.well-known/ready")
        v2_before = await client.get("/v2/health/ready")
        await server.load_models()
        after = await client.get("/.well-known/ready")
    assert (before.status_code, v2_before.status_code, after.status_code) == (503, 503, 204)


# -- JSON and protobuf for our own methods ----------------------------------------------------


async def test_json_and_proto_calls_to_our_methods_equal_grpc(http_pair: Pair) -> None:
    server, channel = http_pair
    stub = pb_grpc.EmbeddingServiceStub(channel)
    image = base64.b64encode(photo_bytes("chelsea.png")).decode()
    method = "/clipvision.v1.EmbeddingService/"
    async with httpx.AsyncClient(base_url=_url(server), timeout=30) as client:
        as_json = await client.post(method + "EmbedImage", json={"image": {"content": image}})
        request = pb.EmbedTextRequest(model="tiny", text=TEXTS[0])
        as_proto = await client.post(
            method + "EmbedText",
            content=request.SerializeToString(),
            headers={"content-type": "application/proto"},
        )
        classify = await client.post(
            method + "Classify",
            json={"image": {"content": image}, "labels": ["cat", "dog"], "promptTemplate": "a {}"},
        )
        info = await client.post(method + "GetModelInfo", json={})
        invalid = await client.post(method + "EmbedImage", json={"image": {"content": "AAAA"}})
        unknown = await client.post(method + "EmbedImage", json={"nope": 1})
    grpc_image = await stub.EmbedImage(
        pb.EmbedImageRequest(image=pb.Image(content=photo_bytes("chelsea.png")))
    )
    assert np.array_equal(
        np.array(as_json.json()["embedding"]["values"], np.float32),
        np.array(grpc_image.embedding.values, np.float32),
    )
    text = pb.EmbedTextResponse.FromString(as_proto.content)
    assert text == await stub.EmbedText(request)
    grpc_scores = await stub.Classify(
        pb.ClassifyRequest(
            image=pb.Image(content=photo_bytes("chelsea.png")),
            labels=["cat", "dog"],
            prompt_template="a {}",
        )
    )
    assert [s["label"] for s in classify.json()["scores"]] == ["cat", "dog"]
    assert np.array_equal(
        np.array([s["cosine"] for s in classify.json()["scores"]], np.float32),
        np.array([s.cosine for s in grpc_scores.scores], np.float32),
    )
    assert [m["name"] for m in info.json()["models"]] == ["tiny", "tiny-vision"]
    assert invalid.status_code == 400
    error = invalid.json()
    assert error["code"] == "invalid_argument"
    assert error["details"][0]["type"] == "google.rpc.ErrorInfo"
    assert unknown.status_code == 400
    assert unknown.json()["code"] == "invalid_argument"


async def test_a_deadline_of_zero_is_exceeded_and_calls_are_counted(http_pair: Pair) -> None:
    server, _ = http_pair
    async with httpx.AsyncClient(base_url=_url(server), timeout=30) as client:
        late = await client.post(
            "/v1/embeddings",
            json={"model": "tiny", "input": "x"},
            headers={"connect-timeout-ms": "0"},
        )
    assert late.status_code == 504
    assert late.json()["error"]["code"] == "DEADLINE_EXCEEDED"
    labels = {"protocol": "http", "method": "POST /v1/embeddings", "code": "DEADLINE_EXCEEDED"}
    assert server.metrics.registry.get_sample_value("clipvision_requests_total", labels)


# -- attacks ----------------------------------------------------------------------------------


async def _bystanders_answered(server: ClipVisionServer, channel: grpc.aio.Channel) -> None:
    """A gRPC caller and an HTTP caller, each answered as usual."""
    reply = await pb_grpc.EmbeddingServiceStub(channel).EmbedText(
        pb.EmbedTextRequest(model="tiny", text="bystander"), timeout=10
    )
    assert len(reply.embedding.values) == 16
    async with httpx.AsyncClient(base_url=_url(server), timeout=10) as client:
        answer = await client.post("/v1/embeddings", json={"model": "tiny", "input": "bystander"})
    assert answer.status_code == 200
    assert answer.json()["data"][0]["embedding"] == list(reply.embedding.values)


async def _raw(port: int, data: bytes, wait_s: float = 5.0) -> bytes:
    """Send raw bytes on a new connection; everything the server answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(wait_s):
            return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize(
    ("name", "body", "status", "reason"),
    [
        ("deep JSON", b"[" * 100_000 + b"]" * 100_000, 400, "REQUEST_MALFORMED"),
        (
            "10,000 items",
            json.dumps({"model": "tiny", "input": ["x"] * 10_000}).encode(),
            400,
            "REQUEST_MALFORMED",
        ),
        (
            "300 texts",
            json.dumps({"model": "tiny", "input": ["x"] * 300}).encode(),
            400,
            "TOO_MANY_TEXTS",
        ),
        (
            "invalid base64",
            json.dumps(
                {"model": "tiny", "modality": "image", "input": ["data:image/png;base64,%%%"]}
            ).encode(),
            400,
            "URI_INVALID",
        ),
        ("not JSON", b"{'model': ", 400, "REQUEST_MALFORMED"),
    ],
)
async def test_hostile_bodies_are_refused_and_bystanders_answered(
    http_pair: Pair, name: str, body: bytes, status: int, reason: str
) -> None:
    server, channel = http_pair
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=_url(server), timeout=30) as client:
        answer = await client.post(
            "/v1/embeddings", content=body, headers={"content-type": "application/json"}
        )
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == reason
    assert "Traceback" not in answer.text
    assert 'File "' not in answer.text
    assert time.perf_counter() - started < 10
    await _bystanders_answered(server, channel)


async def test_endless_headers_slow_heads_and_slow_bodies_are_cut(http_pair: Pair) -> None:
    server, channel = http_pair
    assert server.http is not None
    port = server.http.port
    # A body over --max-message-bytes (4 MiB here): refused from its Content-Length, unread,
    # and the connection closed; sent chunked, refused once the limit is passed.
    oversized = (
        b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 1000000000\r\n\r\n{"
    )
    refused = await _raw(port, oversized)
    assert refused.startswith(b"HTTP/1.1 413"), refused[:80]
    assert b"REQUEST_TOO_LARGE" in refused
    chunk = b"x" * (1024 * 1024)
    chunked = (
        b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 4
        + b"1\r\nx\r\n"  # one byte over, and no end: all of it is read, none left unread
    )
    refused = await _raw(port, chunked)
    assert refused.startswith(b"HTTP/1.1 413"), refused[:80]
    endless = b"GET /v1/models HTTP/1.1\r\nhost: x\r\n" + b"x-junk: " + b"a" * 40_000 + b"\r\n"
    answered = await _raw(port, endless)
    assert answered.startswith(b"HTTP/1.1 400"), answered[:80]
    started = time.perf_counter()
    # Slowloris: half a request head, then nothing: closed after the head timeout (1 s here).
    assert await _raw(port, b"GET /v1/models HTTP/1.1\r\nhost: x\r\n") == b""
    assert time.perf_counter() - started < 4
    # A slow body: the head and part of the body, then nothing: 408 after the read timeout.
    head = (
        b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b'content-length: 100\r\n\r\n{"input": '
    )
    slow = await _raw(port, head)
    assert slow.startswith(b"HTTP/1.1 408"), slow[:80]
    assert b"REQUEST_READ_TIMEOUT" in slow
    await _bystanders_answered(server, channel)


async def test_a_token_is_needed_when_set_and_probes_stay_open(base_settings: Settings) -> None:
    settings = settings_with(base_settings, http_address="127.0.0.1:0", auth_token=TOKEN)
    async with (
        running_server(settings) as (server, _),
        httpx.AsyncClient(base_url=_url(server), timeout=10) as client,
    ):
        without = await client.post("/v1/embeddings", json={"model": "tiny", "input": "x"})
        wrong = await client.post(
            "/v1/embeddings",
            json={"model": "tiny", "input": "x"},
            headers={"authorization": "Bearer nope"},
        )
        ready = await client.get("/.well-known/ready")
        with_token = await client.post(
            "/v1/embeddings",
            json={"model": "tiny", "input": "x"},
            headers={"authorization": f"Bearer {TOKEN}"},
        )
    assert (without.status_code, wrong.status_code) == (401, 401)
    assert without.json()["error"]["code"] == "UNAUTHENTICATED"
    assert ready.status_code == 204
    assert with_token.status_code == 200


async def test_a_busy_http_port_fails_the_start_with_one_line(base_settings: Settings) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        settings = settings_with(base_settings, http_address=f"127.0.0.1:{port}")
        with pytest.raises(HttpBindError, match=f"cannot listen for HTTP on 127.0.0.1:{port}"):
            _server, _ = await create_server(settings)
