"""The Python client's texts and Classify: results, typed errors, ordering, window, the CLI.

Most tests talk to an in-process fake grpc.aio server that implements the text
RPCs with the contract's semantics (deterministic vectors, in-band errors,
ErrorInfo reasons), so that they test the client alone: what it sends, how it
orders, bounds and resumes a stream, and how it reports faults, including
faults a real server cannot be made to produce (answers out of order, a stream
broken mid-way). The tests at the end run the same calls against the real server.
"""

from __future__ import annotations

import asyncio
import json
import sys
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from clipvision.client import (
    AsyncEmbeddingClient,
    ClipVisionError,
    EmbeddingClient,
    InternalError,
    InvalidRequestError,
    InvalidTextError,
    LabelScore,
    ModalityNotServedError,
    ModelNotFoundError,
    TextEmbedding,
    TextResult,
    UnavailableError,
)
from clipvision.server.config.settings import Settings
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import DATA
from tests.live_server import LiveServer, live_server

SERVICE = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
DIM = 8
CONTEXT_WORDS = 6
"""The fake's context: a text of more words is embedded from its first six (truncated)."""
MAX_BATCH_TEXTS = 8
TEXT_MODEL, VISION_MODEL = "clip", "vision-only"
LOGIT_SCALE = 100.0
RUN_TIMEOUT = 60.0


# -- the fake server


def fake_vector(text: str, normalize: bool = True) -> np.ndarray:
    """What the fake answers for ``text``: a pseudo-random vector of its first words."""
    kept = " ".join(text.split(" ")[:CONTEXT_WORDS])
    vector = np.random.default_rng(zlib.crc32(kept.encode())).standard_normal(DIM)
    vector = vector.astype(np.float32)
    return vector / np.linalg.norm(vector) if normalize else vector * 3


def long_text(words: int = CONTEXT_WORDS + 4) -> str:
    return " ".join(f"word{i}" for i in range(words))


class FakeError(Exception):
    """A fault the fake reports, as a status or in-band."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def item(self) -> pb.ItemError:
        return pb.ItemError(code=self.code.value[0], reason=self.reason, message=self.message)

    async def abort(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=self.reason, domain="clipvision.dev"))
        status = rpc_status.to_status(
            status_pb2.Status(code=self.code.value[0], message=self.message, details=[info])
        )
        await context.abort(status.code, status.details, status.trailing_metadata)


def check_model(name: str) -> str:
    model = name or TEXT_MODEL
    if model == VISION_MODEL:
        raise FakeError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "MODALITY_NOT_SERVED",
            f"Model {model!r} is served without its text tower; use a full CLIP checkpoint.",
        )
    if model != TEXT_MODEL:
        raise FakeError(
            grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", f"No model is named {model!r}."
        )
    return model


def embed_one(text: str, model: str, normalize: bool, truncate: bool) -> pb.Embedding:
    if not text:
        raise FakeError(grpc.StatusCode.INVALID_ARGUMENT, "TEXT_EMPTY", "The text is empty.")
    too_long = len(text.split(" ")) > CONTEXT_WORDS
    if too_long and not truncate:
        raise FakeError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "TEXT_TOO_LONG",
            f"The text is longer than the model's context of {CONTEXT_WORDS} tokens.",
        )
    return pb.Embedding(
        values=fake_vector(text, normalize).tolist(),
        model=model,
        normalized=normalize,
        truncated=too_long,
    )


def option(message: Any, name: str) -> bool:
    """An optional bool field: unset means true."""
    return bool(getattr(message, name)) if message.HasField(name) else True


@dataclass
class FakeServer:
    """What the fake saw, and the faults it is told to commit."""

    port: int = 0
    texts: list[str] = field(default_factory=list)
    """Every text that reached the server, in arrival order."""
    stream_calls: int = 0
    break_first_stream_after: int | None = None
    """End the first stream with UNAVAILABLE once it has answered this many requests."""
    swap_answers: bool = False
    """Answer a stream's second request before its first."""
    drop_a_batch_result: bool = False
    classify_requests: list[pb.ClassifyRequest] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def embed_text(
        self, request: pb.EmbedTextRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.EmbedTextResponse:
        self.texts.append(request.text)
        try:
            model = check_model(request.model)
            embedding = embed_one(
                request.text, model, option(request, "normalize"), option(request, "truncate")
            )
        except FakeError as fault:
            await fault.abort(context)
            raise AssertionError("abort returns only by raising") from None
        return pb.EmbedTextResponse(embedding=embedding)

    async def embed_texts(
        self, request: pb.EmbedTextsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.EmbedTextsResponse:
        self.texts.extend(request.texts)
        try:
            model = check_model(request.model)
            if len(request.texts) > MAX_BATCH_TEXTS:
                raise FakeError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "TOO_MANY_TEXTS",
                    f"{len(request.texts)} texts is more than {MAX_BATCH_TEXTS} per call.",
                )
        except FakeError as fault:
            await fault.abort(context)
            raise AssertionError("abort returns only by raising") from None
        results = []
        for text in request.texts:
            normalize, truncate = option(request, "normalize"), option(request, "truncate")
            try:
                results.append(
                    pb.EmbedTextsResult(embedding=embed_one(text, model, normalize, truncate))
                )
            except FakeError as fault:
                results.append(pb.EmbedTextsResult(error=fault.item()))
        if self.drop_a_batch_result:
            results.pop()
        return pb.EmbedTextsResponse(results=results)

    async def embed_text_stream(
        self,
        requests: AsyncIterator[pb.EmbedTextStreamRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.EmbedTextStreamResponse]:
        self.stream_calls += 1
        first_call = self.stream_calls == 1
        answered = 0
        held: pb.EmbedTextStreamResponse | None = None
        async for request in requests:
            self.texts.append(request.text)
            if first_call and answered == self.break_first_stream_after:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "The server is draining.")
            response = pb.EmbedTextStreamResponse(id=request.id)
            try:
                model = check_model(request.model)
                normalize, truncate = option(request, "normalize"), option(request, "truncate")
                response.embedding.CopyFrom(embed_one(request.text, model, normalize, truncate))
            except FakeError as fault:
                response.error.CopyFrom(fault.item())
            if self.swap_answers and request.id == "0":
                held = response
                continue
            yield response
            answered += 1
            if held is not None:
                yield held
                held, answered = None, answered + 1

    async def classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ClassifyResponse:
        self.classify_requests.append(request)
        image = fake_vector(request.image.content.hex())
        template = request.prompt_template or "{}"
        prompts = [fake_vector(template.replace("{}", label)) for label in request.labels]
        cosines = np.array([float(image @ prompt) for prompt in prompts])
        logits = LOGIT_SCALE * cosines
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        scores = [
            pb.LabelScore(label=label, probability=p, cosine=c, truncated=False)
            for label, p, c in zip(request.labels, probabilities, cosines, strict=True)
        ]
        return pb.ClassifyResponse(scores=scores, model=TEXT_MODEL)

    async def model_info(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetModelInfoResponse:
        both = [pb.MODALITY_IMAGE, pb.MODALITY_TEXT]
        return pb.GetModelInfoResponse(
            models=[
                pb.ModelInfo(
                    name=TEXT_MODEL,
                    embedding_dimension=DIM,
                    is_default=True,
                    loaded=True,
                    modalities=both,
                    text_context_length=CONTEXT_WORDS,
                    vocab_size=1024,
                    logit_scale=LOGIT_SCALE,
                ),
                pb.ModelInfo(
                    name=VISION_MODEL,
                    embedding_dimension=DIM,
                    loaded=True,
                    modalities=[pb.MODALITY_IMAGE],
                ),
            ],
            limits=pb.Limits(
                max_batch_images=16,
                max_batch_texts=MAX_BATCH_TEXTS,
                max_text_bytes=2048,
                max_classify_labels=32,
            ),
        )

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        def unary(
            function: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]],
            request: Any,
            response: Any,
        ) -> grpc.RpcMethodHandler[Any, Any]:
            return grpc.unary_unary_rpc_method_handler(
                function,
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )

        stream = grpc.stream_stream_rpc_method_handler(
            self.embed_text_stream,
            request_deserializer=pb.EmbedTextStreamRequest.FromString,
            response_serializer=pb.EmbedTextStreamResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "EmbedText": unary(self.embed_text, pb.EmbedTextRequest, pb.EmbedTextResponse),
                "EmbedTexts": unary(self.embed_texts, pb.EmbedTextsRequest, pb.EmbedTextsResponse),
                "EmbedTextStream": stream,
                "Classify": unary(self.classify, pb.ClassifyRequest, pb.ClassifyResponse),
                "GetModelInfo": unary(
                    self.model_info, pb.GetModelInfoRequest, pb.GetModelInfoResponse
                ),
            },
        )


@asynccontextmanager
async def fake_server(**faults: Any) -> AsyncIterator[FakeServer]:
    fake = FakeServer(**faults)
    server = grpc.aio.server(handlers=[fake.handler()])
    fake.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield fake
    finally:
        await server.stop(0)


@pytest.fixture
async def fake() -> AsyncIterator[FakeServer]:
    async with fake_server() as server:
        yield server


def vector_of(result: TextResult) -> np.ndarray:
    assert isinstance(result, TextEmbedding), result
    return result.vector


# -- embed_text


async def test_embed_text_returns_the_vector_whether_it_was_truncated_and_the_model(
    fake: FakeServer,
) -> None:
    def embed() -> list[TextEmbedding]:
        with EmbeddingClient(fake.address) as client:
            return [
                client.embed_text("a photo of a cat"),
                client.embed_text(long_text()),
                client.embed_text("a photo of a cat", normalize=False),
                client.embed_text("  "),  # whitespace is a text like any other
            ]

    short, truncated, raw, blank = await asyncio.to_thread(embed)
    assert short.vector.dtype == np.float32
    np.testing.assert_array_equal(short.vector, fake_vector("a photo of a cat"))
    assert (short.truncated, short.model) == (False, TEXT_MODEL)
    assert truncated.truncated
    np.testing.assert_array_equal(truncated.vector, fake_vector(long_text(CONTEXT_WORDS)))
    np.testing.assert_array_equal(raw.vector, fake_vector("a photo of a cat", normalize=False))
    np.testing.assert_array_equal(blank.vector, fake_vector("  "))


@pytest.mark.parametrize(
    ("text", "options", "error_class", "code", "reason"),
    [
        ("", {}, InvalidTextError, "INVALID_ARGUMENT", "TEXT_EMPTY"),
        (long_text(), {"truncate": False}, InvalidTextError, "INVALID_ARGUMENT", "TEXT_TOO_LONG"),
        (
            "a cat",
            {"model": VISION_MODEL},
            ModalityNotServedError,
            "FAILED_PRECONDITION",
            "MODALITY_NOT_SERVED",
        ),
        ("a cat", {"model": "absent"}, ModelNotFoundError, "NOT_FOUND", "MODEL_NOT_FOUND"),
    ],
)
async def test_text_failures_raise_typed_errors_with_code_and_reason(
    fake: FakeServer,
    text: str,
    options: dict[str, Any],
    error_class: type[ClipVisionError],
    code: str,
    reason: str,
) -> None:
    def embed() -> None:
        with EmbeddingClient(fake.address) as client:
            client.embed_text(text, **options)

    with pytest.raises(error_class) as caught:
        await asyncio.to_thread(embed)
    assert (caught.value.code.name, caught.value.reason) == (code, reason)
    assert isinstance(caught.value.__cause__, grpc.RpcError)
    assert not isinstance(caught.value, grpc.RpcError)
    assert fake.texts == [text]


async def test_unsendable_texts_are_fault_before_anything_is_sent(fake: FakeServer) -> None:
    def embed(text: Any, **options: Any) -> None:
        with EmbeddingClient(fake.address, **options) as client:
            client.embed_text(text)

    with pytest.raises(InvalidTextError) as caught:
        await asyncio.to_thread(embed, "caf\udce9")  # os.fsdecode's escape of a Latin-1 byte
    assert caught.value.reason == "TEXT_NOT_UTF8"
    assert "'\\udce9' at character 3" in caught.value.message
    with pytest.raises(InvalidTextError) as caught:
        await asyncio.to_thread(embed, "x" * 70_000, max_message_bytes=64 * 1024)
    assert caught.value.reason == "TEXT_TOO_LARGE"
    assert "65536" in caught.value.message
    with pytest.raises(TypeError, match=r"bytes as text; decode it first"):
        await asyncio.to_thread(embed, b"a cat")
    assert fake.texts == []


# -- embed_texts: one call, one result per text, in order


async def test_embed_texts_answers_in_order_with_errors_in_place(fake: FakeServer) -> None:
    texts = ["a cat", "", "a dog", "caf\udce9", long_text(), "a bird"]

    def embed() -> list[TextResult]:
        with EmbeddingClient(fake.address) as client:
            return client.embed_texts(texts, return_exceptions=True)

    results = await asyncio.to_thread(embed)
    assert [r.reason if isinstance(r, ClipVisionError) else r.truncated for r in results] == [
        False,
        "TEXT_EMPTY",
        False,
        "TEXT_NOT_UTF8",
        True,
        False,
    ]
    for text, result in zip(texts, results, strict=True):
        if isinstance(result, TextEmbedding):
            np.testing.assert_array_equal(result.vector, fake_vector(text))
    assert fake.texts == ["a cat", "", "a dog", long_text(), "a bird"]  # one call, refusal unsent


async def test_embed_texts_raises_the_first_error_unless_asked_to_keep_it(
    fake: FakeServer,
) -> None:
    def embed(texts: list[str], **options: Any) -> list[TextEmbedding]:
        with EmbeddingClient(fake.address) as client:
            return client.embed_texts(texts, **options)

    with pytest.raises(InvalidTextError) as caught:
        await asyncio.to_thread(embed, ["a cat", long_text(), ""], truncate=False)
    assert caught.value.reason == "TEXT_TOO_LONG"
    with pytest.raises(InvalidRequestError) as too_many:
        await asyncio.to_thread(embed, [f"text {i}" for i in range(MAX_BATCH_TEXTS + 1)])
    assert too_many.value.reason == "TOO_MANY_TEXTS"
    calls = len(fake.texts)
    assert await asyncio.to_thread(embed, []) == []
    assert len(fake.texts) == calls  # nothing to embed, no call


async def test_a_batch_answer_missing_a_result_is_an_internal_error() -> None:
    async with (
        fake_server(drop_a_batch_result=True) as fake,
        AsyncEmbeddingClient(fake.address) as client,
    ):
        with pytest.raises(InternalError) as caught:
            await client.embed_texts(["a", "b", "c"])
    assert caught.value.reason == "RESULTS_MISMATCH"
    assert "2 results for 3 texts" in caught.value.message


# -- embed_text_stream: the image stream's window, ordering and resumption, for texts


def stream_inputs() -> tuple[list[str], list[str | None]]:
    """Texts, each different, between bad ones; returns them and the expected reasons."""
    texts: list[str] = []
    reasons: list[str | None] = []
    for index in range(30):
        texts.append(f"caption number {index}")
        reasons.append(None)
        if index % 7 == 3:
            texts.append("")
            reasons.append("TEXT_EMPTY")
        if index % 11 == 5:
            texts.append(f"bad \udcff {index}")
            reasons.append("TEXT_NOT_UTF8")
    return texts, reasons


def check_stream_results(
    texts: list[str], reasons: list[str | None], results: list[TextResult]
) -> None:
    assert len(results) == len(texts)
    for text, reason, result in zip(texts, reasons, results, strict=True):
        if reason is None:
            np.testing.assert_array_equal(vector_of(result), fake_vector(text))
        else:
            assert isinstance(result, InvalidTextError)
            assert result.reason == reason


async def test_embed_text_stream_yields_in_input_order_with_errors_in_place(
    fake: FakeServer,
) -> None:
    texts, reasons = stream_inputs()

    def stream() -> list[TextResult]:
        with EmbeddingClient(fake.address, stream_window=3) as client:
            return list(client.embed_text_stream(texts, return_exceptions=True))

    check_stream_results(texts, reasons, await asyncio.to_thread(stream))
    assert fake.stream_calls == 1
    assert fake.texts == [t for t, r in zip(texts, reasons, strict=True) if r != "TEXT_NOT_UTF8"]


async def test_embed_text_stream_reads_lazily_with_a_bounded_number_in_flight(
    fake: FakeServer,
) -> None:
    window = 4
    pulled = 0

    def source() -> Iterator[str]:
        nonlocal pulled
        for index in range(40):
            pulled += 1
            yield f"text {index}"

    def stream() -> list[int]:
        ahead = []
        with EmbeddingClient(fake.address, stream_window=window) as client:
            for consumed, _ in enumerate(client.embed_text_stream(source()), start=1):
                ahead.append(pulled - consumed)
        return ahead

    ahead = await asyncio.to_thread(stream)
    assert len(ahead) == 40
    assert max(ahead) == window - 1  # the window is used, and never exceeded


async def test_embed_text_stream_raises_at_the_first_bad_text_and_stops_cleanly(
    fake: FakeServer,
) -> None:
    received: list[TextEmbedding] = []

    def stream() -> None:
        with EmbeddingClient(fake.address, stream_window=2) as client:
            received.extend(client.embed_text_stream(["one", "two", "", "four"]))

    with pytest.raises(InvalidTextError, match="empty"):
        await asyncio.to_thread(stream)
    assert len(received) == 2

    def stop_early() -> int:
        with EmbeddingClient(fake.address, stream_window=2) as client:
            results = client.embed_text_stream(f"text {i}" for i in range(10_000))
            next(results)
            results.close()
            return len(list(client.embed_text_stream(["again"])))

    assert await asyncio.wait_for(asyncio.to_thread(stop_early), RUN_TIMEOUT) == 1


async def test_a_stream_broken_by_unavailable_resumes_without_losing_or_repeating() -> None:
    texts = [f"caption {i}" for i in range(25)]
    async with fake_server(break_first_stream_after=7) as fake:

        def stream() -> list[TextEmbedding]:
            with EmbeddingClient(fake.address, stream_window=4) as client:
                return list(client.embed_text_stream(texts))

        results = await asyncio.to_thread(stream)
    assert [r.vector.tolist() for r in results] == [fake_vector(t).tolist() for t in texts]
    assert fake.stream_calls == 2
    # The second stream starts with the first unanswered text: nothing answered is re-sent.
    resent = fake.texts.index(texts[7], fake.texts.index(texts[7]) + 1)
    assert fake.texts[resent:] == texts[7:]


async def test_a_stream_broken_with_restarts_off_raises_unavailable() -> None:
    received: list[TextEmbedding] = []

    async def consume(address: str) -> None:
        async with AsyncEmbeddingClient(address, max_stream_restarts=0) as client:
            async for result in client.embed_text_stream([f"t{i}" for i in range(10)]):
                received.append(result)

    async with fake_server(break_first_stream_after=3) as fake:
        with pytest.raises(UnavailableError):
            await consume(fake.address)
    assert len(received) == 3


async def test_answers_out_of_order_are_an_internal_error() -> None:
    async with (
        fake_server(swap_answers=True) as fake,
        AsyncEmbeddingClient(fake.address) as client,
    ):
        results = client.embed_text_stream(["first", "second", "third"])
        with pytest.raises(InternalError) as caught:
            await anext(results)
        await results.aclose()
    assert caught.value.reason == "STREAM_OUT_OF_ORDER"
    assert "EmbedTextStream" in caught.value.message


# -- classify


async def test_classify_returns_one_score_per_label_in_label_order(fake: FakeServer) -> None:
    labels = ["cat", "dog", "rocket"]

    def classify() -> list[LabelScore]:
        with EmbeddingClient(fake.address) as client:
            return client.classify(
                b"image bytes", labels, prompt_template="a photo of a {}", truncate=False
            )

    scores = await asyncio.to_thread(classify)
    assert [score.label for score in scores] == labels
    assert sum(score.probability for score in scores) == pytest.approx(1.0, abs=1e-5)
    image = fake_vector(b"image bytes".hex())
    for score in scores:
        expected = float(image @ fake_vector(f"a photo of a {score.label}"))
        assert score.cosine == pytest.approx(expected, abs=1e-6)
        assert not score.truncated
    best = max(scores, key=lambda score: score.probability)
    assert best.cosine == max(score.cosine for score in scores)
    (request,) = fake.classify_requests
    assert (request.prompt_template, request.truncate) == ("a photo of a {}", False)


def test_classify_refuses_one_string_as_the_labels() -> None:
    with EmbeddingClient("127.0.0.1:1") as client, pytest.raises(TypeError, match=r"\[label\]"):
        client.classify(b"image", "cat")


# -- the asyncio twin


async def test_async_client_gives_the_sync_clients_results(fake: FakeServer) -> None:
    texts, reasons = stream_inputs()

    async def source() -> AsyncIterator[str]:
        for text in texts:
            yield text

    async with AsyncEmbeddingClient(fake.address, stream_window=3) as client:
        single = await client.embed_text(long_text())
        batch = await client.embed_texts(["a", "", "b"], return_exceptions=True)
        streamed = [r async for r in client.embed_text_stream(source(), return_exceptions=True)]
        scores = await client.classify(b"image bytes", ["cat", "dog"])
        with pytest.raises(ModalityNotServedError):
            await client.embed_text("a cat", model=VISION_MODEL)

    def sync_calls() -> tuple[TextEmbedding, list[TextResult], list[LabelScore]]:
        with EmbeddingClient(fake.address) as sync_client:
            return (
                sync_client.embed_text(long_text()),
                sync_client.embed_texts(["a", "", "b"], return_exceptions=True),
                sync_client.classify(b"image bytes", ["cat", "dog"]),
            )

    sync_single, sync_batch, sync_scores = await asyncio.to_thread(sync_calls)
    np.testing.assert_array_equal(single.vector, sync_single.vector)
    assert single.truncated
    assert sync_single.truncated
    assert [type(r) for r in batch] == [type(r) for r in sync_batch]
    check_stream_results(texts, reasons, streamed)
    assert scores == sync_scores


# -- clipvision embed --text


async def run_cli(*args: str | Path, stdin: bytes | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clipvision.client.cli",
        *map(str, args),
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), RUN_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def read_output(out: Path) -> tuple[np.ndarray, dict[str, Any], list[dict[str, Any]]]:
    meta, *entries = [
        json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()
    ]
    return np.load(out), meta, entries


async def test_embed_text_writes_one_row_per_distinct_text_and_resumes(
    fake: FakeServer, tmp_path: Path
) -> None:
    captions = tmp_path / "captions.txt"
    lines = [
        "a photo of a cat",
        "",
        "un château en été",
        long_text(),
        "a photo of a cat",
        "猫の写真 🍜",
        "   ",
    ]
    captions.write_bytes(("\ufeff" + "\r\n".join(lines) + "\n").encode())
    out = tmp_path / "texts.npy"

    code, _, err = await run_cli(
        "embed", "--text", captions, "--out", out, "--server", fake.address
    )
    assert code == 0, err
    matrix, meta, entries = read_output(out)
    distinct = ["a photo of a cat", "un château en été", long_text(), "猫の写真 🍜", "   "]
    assert meta["input"] == "text"
    assert meta["model"] == TEXT_MODEL
    assert [e["text"] for e in entries] == distinct
    assert [e["row"] for e in entries] == list(range(5))
    assert [e["truncated"] for e in entries] == [False, False, True, False, False]
    np.testing.assert_array_equal(matrix, np.stack([fake_vector(t) for t in distinct]))
    assert "5 texts; 0 already in" in err
    assert "1 text longer than the model's context embedded only in part" in err

    captions.write_text("a photo of a cat\na new caption\n\n")
    code, _, err = await run_cli(
        "embed", "--text", captions, "--out", out, "--server", fake.address
    )
    assert code == 0, err
    matrix, _, entries = read_output(out)
    assert [e["text"] for e in entries] == [*distinct, "a new caption"]
    assert "2 texts; 1 already in" in err
    assert fake.texts.count("a photo of a cat") == 1  # not embedded again on resume


async def test_embed_text_records_refused_texts_and_reads_stdin(
    fake: FakeServer, tmp_path: Path
) -> None:
    out = tmp_path / "texts.npy"
    stdin = f"short\n{long_text(20)}\n".encode()
    code, _, err = await run_cli(
        "embed",
        "--text",
        "-",
        "--no-truncate",
        "--raw",
        "--out",
        out,
        "--server",
        fake.address,
        stdin=stdin,
    )
    assert code == 1, err
    matrix, meta, entries = read_output(out)
    assert meta["normalized"] is False
    assert entries[0] == {"text": "short", "status": "ok", "row": 0, "truncated": False}
    assert entries[1]["status"] == "failed"
    assert entries[1]["reason"] == "TEXT_TOO_LONG"
    np.testing.assert_array_equal(matrix, [fake_vector("short", normalize=False)])
    assert '1 text cannot be embedded (status "failed" in the index):' in err
    assert f"'{long_text(20)[:57]}...': TEXT_TOO_LONG" in err


async def test_embed_text_usage_errors_say_what_is_wrong(fake: FakeServer, tmp_path: Path) -> None:
    captions = tmp_path / "captions.txt"
    captions.write_text("a cat\n")
    out = tmp_path / "texts.npy"
    server = ("--server", fake.address)

    code, _, err = await run_cli("embed", tmp_path, "--text", captions, "--out", out, *server)
    assert (code, "image PATHs or --text FILE, one or the other" in err) == (2, True)
    code, _, err = await run_cli("embed", "--out", out, *server)
    assert (code, "one or the other" in err) == (2, True)
    code, _, err = await run_cli("embed", "--text", tmp_path / "absent.txt", "--out", out, *server)
    assert (code, "absent.txt: no such file" in err) == (2, True)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("first\ncaf\xe9\n".encode("latin-1"))
    code, _, err = await run_cli("embed", "--text", latin1, "--out", out, *server)
    assert (code, "line 2 is not UTF-8" in err, "Traceback" in err) == (2, True, False)
    code, _, err = await run_cli(
        "embed", "--text", captions, "--out", out, "--model", VISION_MODEL, *server
    )
    assert (code, "served without its text tower" in err) == (2, True)

    # An output of images is not mixed with texts.
    image_out = tmp_path / "images.npy"
    image_out.with_suffix(".jsonl").write_text(
        json.dumps(
            {
                "format": "clipvision-embeddings",
                "version": 1,
                "model": TEXT_MODEL,
                "normalized": True,
            }
        )
        + "\n"
    )
    code, _, err = await run_cli("embed", "--text", captions, "--out", image_out, *server)
    assert (code, "holds embeddings of images, not of texts" in err) == (2, True)
    assert fake.texts == []


async def test_info_describes_the_text_tower_and_limits(fake: FakeServer) -> None:
    code, out, err = await run_cli("info", "--server", fake.address)
    assert code == 0, err
    assert "texts: context 6 tokens, vocabulary 1,024, logit scale 100" in out
    assert "texts: not served (no text tower)" in out
    assert "8 texts per EmbedTexts call, texts up to 2,048 bytes, 32 labels per Classify" in out


# -- against the real server (tiny CLIPModel "tiny" with its tokenizer, 16 tokens of context;
#    "tiny-vision" without a text tower)

TEXTS = [
    "a photo of a cat",
    "une photo d'un château en été",
    "猫の写真",
    "a bowl of ramen 🍜",
    "   ",
    "a photo of a dog sleeping on the sofa " * 4,  # longer than 16 tokens
]
ATOL = 1e-6


@pytest.fixture(scope="module")
async def live(base_settings: Settings) -> AsyncIterator[LiveServer]:
    async with live_server(base_settings) as server:
        yield server


async def stub_vectors(live: LiveServer, texts: list[str]) -> list[pb.Embedding]:
    """The embeddings as the raw generated stub returns them, one EmbedText call each."""
    async with grpc.aio.insecure_channel(live.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        return [(await stub.EmbedText(pb.EmbedTextRequest(text=t))).embedding for t in texts]


async def test_real_server_unary_batch_and_stream_agree_in_order(live: LiveServer) -> None:
    expected = await stub_vectors(live, TEXTS)
    assert [e.truncated for e in expected] == [False] * 5 + [True]

    def sync_calls() -> list[list[TextEmbedding]]:
        with EmbeddingClient(live.address, stream_window=2) as client:
            return [
                [client.embed_text(text) for text in TEXTS],
                client.embed_texts(TEXTS),
                list(client.embed_text_stream(TEXTS)),
            ]

    async def source() -> AsyncIterator[str]:
        for text in TEXTS:
            yield text

    async with AsyncEmbeddingClient(live.address, stream_window=3) as client:
        async_results = [r async for r in client.embed_text_stream(source())]
    for results in [*await asyncio.to_thread(sync_calls), async_results]:
        assert [r.truncated for r in results] == [e.truncated for e in expected]
        assert {r.model for r in results} == {"tiny"}
        for result, embedding in zip(results, expected, strict=True):
            np.testing.assert_allclose(result.vector, embedding.values, atol=ATOL)
            assert np.linalg.norm(result.vector) == pytest.approx(1.0, abs=1e-5)


async def test_real_server_faults_are_typed_and_in_place(live: LiveServer) -> None:
    async with AsyncEmbeddingClient(live.address) as client:
        with pytest.raises(InvalidTextError) as empty:
            await client.embed_text("")
        with pytest.raises(InvalidTextError) as too_long:
            await client.embed_text(TEXTS[-1], truncate=False)
        with pytest.raises(ModalityNotServedError) as vision_only:
            await client.embed_text("a cat", model="tiny-vision")
        streamed = [
            r.reason if isinstance(r, ClipVisionError) else r.truncated
            async for r in client.embed_text_stream(
                ["a cat", "", TEXTS[-1], "caf\udce9", "a dog"],
                truncate=False,
                return_exceptions=True,
            )
        ]
        raw = await client.embed_text("a cat", normalize=False)
    assert empty.value.reason == "TEXT_EMPTY"
    assert too_long.value.reason == "TEXT_TOO_LONG"
    assert "16" in too_long.value.message
    assert vision_only.value.reason == "MODALITY_NOT_SERVED"
    assert streamed == [False, "TEXT_EMPTY", "TEXT_TOO_LONG", "TEXT_NOT_UTF8", False]
    assert np.linalg.norm(raw.vector) != pytest.approx(1.0, abs=1e-3)


async def test_classify_scores_are_the_softmax_of_the_scaled_cosines_of_the_embeddings(
    live: LiveServer,
) -> None:
    labels = ["cat", "dog", "rocket", "château"]
    photo = DATA / "rocket.jpg"

    def calls() -> tuple[list[LabelScore], np.ndarray, np.ndarray, float]:
        with EmbeddingClient(live.address) as client:
            scores = client.classify(photo, labels, prompt_template="a photo of a {}")
            image = client.embed_image(photo)
            prompts = client.embed_texts([f"a photo of a {label}" for label in labels])
            logit_scale = client.model_info().models[0].logit_scale
        return scores, image, np.stack([p.vector for p in prompts]), logit_scale

    scores, image, prompts, logit_scale = await asyncio.to_thread(calls)
    assert [s.label for s in scores] == labels
    # Text-to-image search in one line: cosines of unit vectors are dot products.
    cosines = prompts @ image
    np.testing.assert_allclose([s.cosine for s in scores], cosines, atol=1e-5)
    logits = logit_scale * cosines
    softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose([s.probability for s in scores], softmax, atol=1e-5)
    assert sum(s.probability for s in scores) == pytest.approx(1.0, abs=1e-5)


async def test_embed_text_cli_against_the_real_server(live: LiveServer, tmp_path: Path) -> None:
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "captions.npy"
    code, _, err = await run_cli(
        "embed", "--text", captions, "--out", out, "--server", live.address
    )
    assert code == 0, err
    matrix, meta, entries = read_output(out)
    expected = await stub_vectors(live, TEXTS)
    assert meta["model"] == "tiny"
    assert [e["text"] for e in entries] == TEXTS
    assert [e["truncated"] for e in entries] == [e.truncated for e in expected]
    np.testing.assert_allclose(matrix, [e.values for e in expected], atol=ATOL)
