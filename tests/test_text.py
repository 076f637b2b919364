"""EmbedText, EmbedTexts, EmbedTextStream and Classify against a real server.

The tiny CLIPModel checkpoint ships a byte-level BPE tokenizer trained offline
(tests/checkpoints.py) and a 16-token context, so truncation is easy to reach.
References are computed by transformers itself on the same checkpoint.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from clipvision.server.app import ClipVisionServer
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import DATA, photo_bytes, running_server, settings_with

if TYPE_CHECKING:
    from clipvision.server.config.settings import Settings
    from clipvision.v1.embedding_service_pb2_grpc import EmbeddingServiceAsyncStub as Stub

CONTEXT = 16
TEXTS = {
    "ascii": "a photo of a cat",
    "accented": "une photo d'un château en été",
    "cjk": "猫の写真",
    "emoji": "a bowl of ramen 🍜🥚",
    "very long": "the quick brown fox jumps over the lazy dog " * 20,
    "whitespace only": " \t\n  ",
}


def reference_text(directory: Path, text: str) -> tuple[np.ndarray, bool]:
    """CLIPModel.get_text_features on CLIPTokenizer's ids cut to the context, and whether cut."""
    tokenizer = CLIPTokenizer.from_pretrained(directory)
    full = tokenizer(text)["input_ids"]
    inputs = tokenizer(text, truncation=True, max_length=CONTEXT, return_tensors="pt")
    with torch.inference_mode():
        output = CLIPModel.from_pretrained(directory).eval().get_text_features(**inputs)
    features = output if isinstance(output, torch.Tensor) else output.pooler_output
    return features[0].numpy(), len(full) > CONTEXT


def values(embedding: pb.Embedding) -> np.ndarray:
    return np.asarray(embedding.values, dtype=np.float32)


@pytest.mark.parametrize("name", list(TEXTS))
async def test_embed_text_matches_transformers(stub: Stub, clip_dir: Path, name: str) -> None:
    text = TEXTS[name]
    expected, cut = reference_text(clip_dir, text)

    raw = await stub.EmbedText(pb.EmbedTextRequest(text=text, normalize=False))
    assert raw.embedding.model == "tiny"
    assert not raw.embedding.normalized
    assert raw.embedding.truncated is cut
    np.testing.assert_allclose(values(raw.embedding), expected, atol=1e-5, rtol=0)

    unit = await stub.EmbedText(pb.EmbedTextRequest(text=text))
    assert unit.embedding.normalized
    np.testing.assert_allclose(
        values(unit.embedding), expected / np.linalg.norm(expected), atol=1e-5, rtol=0
    )


async def test_the_long_text_is_cut_and_said_so(stub: Stub) -> None:
    long = await stub.EmbedText(pb.EmbedTextRequest(text=TEXTS["very long"]))
    short = await stub.EmbedText(pb.EmbedTextRequest(text=TEXTS["ascii"]))
    assert long.embedding.truncated
    assert not short.embedding.truncated


async def test_a_batch_is_padded_yet_equal_to_each_text_alone(stub: Stub) -> None:
    texts = list(TEXTS.values())
    batch = await stub.EmbedTexts(pb.EmbedTextsRequest(texts=texts))
    assert len(batch.results) == len(texts)
    for text, result in zip(texts, batch.results, strict=True):
        alone = await stub.EmbedText(pb.EmbedTextRequest(text=text))
        assert result.WhichOneof("result") == "embedding"
        assert result.embedding.truncated == alone.embedding.truncated
        np.testing.assert_allclose(
            values(result.embedding), values(alone.embedding), atol=1e-5, rtol=0
        )


async def test_bad_texts_in_a_batch_are_answered_in_band(stub: Stub) -> None:
    texts = ["a cat", "", TEXTS["very long"], "a dog"]
    batch = await stub.EmbedTexts(pb.EmbedTextsRequest(texts=texts, truncate=False))
    kinds = [result.WhichOneof("result") for result in batch.results]
    assert kinds == ["embedding", "error", "error", "embedding"]
    empty, long = batch.results[1].error, batch.results[2].error
    assert (empty.code, empty.reason) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], "TEXT_EMPTY")
    assert long.reason == "TEXT_TOO_LONG"
    assert f"at most {CONTEXT}" in long.message


async def test_truncate_false_refuses_a_long_text_naming_the_limit(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.EmbedText(pb.EmbedTextRequest(text=TEXTS["very long"], truncate=False))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"reads at most {CONTEXT}" in (error.value.details() or "")


@pytest.mark.parametrize(
    ("text", "reason"),
    [("", "TEXT_EMPTY"), ("x" * 65537, "TEXT_TOO_LARGE")],
)
async def test_empty_and_oversized_texts_are_refused(stub: Stub, text: str, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.EmbedText(pb.EmbedTextRequest(text=text))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in str(error.value.trailing_metadata())


async def test_more_texts_than_the_limit_are_refused(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.EmbedTexts(pb.EmbedTextsRequest(texts=["a"] * 257))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "257 texts and the limit is 256" in (error.value.details() or "")


async def test_a_vision_only_model_says_it_has_no_text_tower(stub: Stub) -> None:
    for call in (
        stub.EmbedText(pb.EmbedTextRequest(text="a cat", model="tiny-vision")),
        stub.Classify(
            pb.ClassifyRequest(
                image=pb.Image(content=photo_bytes("chelsea.png")),
                labels=["cat"],
                model="tiny-vision",
            )
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "without a text tower" in (error.value.details() or "")


async def test_model_info_says_which_modalities_each_model_serves(stub: Stub) -> None:
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    tiny, vision = info.models
    assert list(tiny.modalities) == [pb.MODALITY_IMAGE, pb.MODALITY_TEXT]
    assert tiny.text_context_length == CONTEXT
    assert tiny.logit_scale == pytest.approx(np.exp(2.6592), rel=1e-4)
    assert list(vision.modalities) == [pb.MODALITY_IMAGE]
    assert (vision.text_context_length, vision.vocab_size, vision.logit_scale) == (0, 0, 0.0)
    assert info.limits.max_batch_texts == 256
    assert info.limits.max_text_bytes == 65536
    assert info.limits.max_classify_labels == 256


async def test_model_info_reports_the_tokenizer_vocabulary(stub: Stub, clip_dir: Path) -> None:
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.models[0].vocab_size == len(CLIPTokenizer.from_pretrained(clip_dir))


# -- Classify ------------------------------------------------------------------


def reference_classify(
    directory: Path, image: Image.Image, prompts: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """CLIPModel's logits_per_image.softmax(-1) and the cosines, on the same inputs."""
    model = CLIPModel.from_pretrained(directory).eval()
    tokenizer = CLIPTokenizer.from_pretrained(directory)
    processor = CLIPImageProcessorPil.from_pretrained(directory)
    texts = tokenizer(
        prompts, padding=True, truncation=True, max_length=CONTEXT, return_tensors="pt"
    )
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        output = model(**texts, pixel_values=pixels)
    probabilities = output.logits_per_image.softmax(-1)[0].numpy()
    cosines = (output.image_embeds @ output.text_embeds.T)[0].numpy()
    return probabilities, cosines


async def test_classify_matches_clipmodel(stub: Stub, clip_dir: Path) -> None:
    labels = ["cat", "dog", "city at night", "bowl of ramen"]
    with Image.open(DATA / "chelsea.png") as image:
        expected, cosines = reference_classify(
            clip_dir, image.convert("RGB"), [f"a photo of a {label}" for label in labels]
        )
    response = await stub.Classify(
        pb.ClassifyRequest(
            image=pb.Image(content=photo_bytes("chelsea.png")),
            labels=labels,
            prompt_template="a photo of a {}",
        )
    )
    assert response.model == "tiny"
    assert [score.label for score in response.scores] == labels
    got = np.asarray([score.probability for score in response.scores])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(
        [score.cosine for score in response.scores], cosines, atol=1e-5, rtol=0
    )
    assert got.sum() == pytest.approx(1.0, abs=1e-5)


async def test_classify_keeps_label_vectors_for_the_next_call(
    server_channel: tuple[ClipVisionServer, grpc.aio.Channel],
) -> None:
    server, channel = server_channel
    stub = pb_grpc.EmbeddingServiceStub(channel)
    served = server.registry.loaded("tiny")
    assert served is not None
    assert served.text is not None
    cache = served.text.labels
    request = pb.ClassifyRequest(
        image=pb.Image(content=photo_bytes("chelsea.png")),
        labels=["zebra", "giraffe", "okapi"],
        prompt_template="a drawing of a {}",
    )
    texts_before = served.text.batcher.capacity.used
    first = await stub.Classify(request)
    hits, misses = cache.hits, cache.misses
    second = await stub.Classify(request)
    assert (cache.hits - hits, cache.misses - misses) == (3, 0)
    assert served.text.batcher.capacity.used == texts_before
    assert [s.probability for s in second.scores] == [s.probability for s in first.scores]


@pytest.mark.parametrize(
    ("labels", "template", "reason"),
    [
        ([], "", "LABELS_MISSING"),
        (["cat", ""], "", "TEXT_EMPTY"),
        (["cat"], "a {} and a {}", "PROMPT_TEMPLATE_INVALID"),
        (["cat"], "a photo of a {label}", "PROMPT_TEMPLATE_INVALID"),
        (["cat"] * 257, "", "TOO_MANY_LABELS"),
        # Refused before any prompt is built: 64 prompts of 64 KiB each are never made.
        (["cat"] * 64, "{}" + "x" * 65536, "TEXT_TOO_LARGE"),
    ],
)
async def test_classify_refuses_what_it_cannot_score(
    stub: Stub, labels: list[str], template: str, reason: str
) -> None:
    request = pb.ClassifyRequest(
        image=pb.Image(content=photo_bytes("chelsea.png")), labels=labels, prompt_template=template
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Classify(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in str(error.value.trailing_metadata())


async def test_classify_with_a_bad_image_fails_as_embed_image_does(stub: Stub) -> None:
    request = pb.ClassifyRequest(image=pb.Image(content=b"not an image"), labels=["cat"])
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Classify(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "IMAGE_FORMAT_UNSUPPORTED" in str(error.value.trailing_metadata())


# -- streams and mixed load ----------------------------------------------------


async def test_text_stream_answers_in_order_with_in_band_errors(stub: Stub) -> None:
    texts = [f"photo number {i}" if i % 7 else "" for i in range(40)]

    async def requests() -> AsyncIterator[pb.EmbedTextStreamRequest]:
        for index, text in enumerate(texts):
            yield pb.EmbedTextStreamRequest(id=f"t{index}", text=text)

    responses = [response async for response in stub.EmbedTextStream(requests())]
    assert [response.id for response in responses] == [f"t{i}" for i in range(40)]
    for text, response in zip(texts, responses, strict=True):
        if text:
            assert response.WhichOneof("result") == "embedding"
        else:
            assert response.error.reason == "TEXT_EMPTY"


async def test_text_stream_on_a_vision_only_model_answers_each_item(stub: Stub) -> None:
    async def requests() -> AsyncIterator[pb.EmbedTextStreamRequest]:
        for index in range(3):
            yield pb.EmbedTextStreamRequest(id=str(index), text="a cat", model="tiny-vision")

    responses = [response async for response in stub.EmbedTextStream(requests())]
    assert [r.error.reason for r in responses] == ["MODALITY_NOT_SERVED"] * 3


async def test_images_and_texts_share_the_device_and_both_batch(base_settings: Settings) -> None:
    settings = settings_with(base_settings, max_batch_size=8)
    image = photo_bytes("chelsea.png")
    async with running_server(settings) as (server, channel):
        stub = pb_grpc.EmbeddingServiceStub(channel)

        async def images() -> AsyncIterator[pb.EmbedImageStreamRequest]:
            for index in range(48):
                yield pb.EmbedImageStreamRequest(id=f"i{index}", image=pb.Image(content=image))

        async def texts() -> AsyncIterator[pb.EmbedTextStreamRequest]:
            for index in range(96):
                yield pb.EmbedTextStreamRequest(id=f"t{index}", text=f"photo number {index}")

        async def collect(call: object) -> list[str]:
            return [r.id async for r in call if r.WhichOneof("result") == "embedding"]  # type: ignore[attr-defined]

        image_ids, text_ids = await asyncio.wait_for(
            asyncio.gather(
                collect(stub.EmbedImageStream(images())), collect(stub.EmbedTextStream(texts()))
            ),
            timeout=120,
        )
        assert image_ids == [f"i{i}" for i in range(48)]
        assert text_ids == [f"t{i}" for i in range(96)]
        samples = server.metrics.registry
        for family in ("clipvision_batch_size", "clipvision_text_batch_size"):
            total = samples.get_sample_value(f"{family}_sum", {"model": "tiny"})
            count = samples.get_sample_value(f"{family}_count", {"model": "tiny"})
            assert total is not None
            assert count is not None
            assert total / count > 1, family


async def test_a_text_that_is_not_utf8_is_refused_by_the_gate(
    server_channel: tuple[ClipVisionServer, grpc.aio.Channel],
) -> None:
    # grpcio's client cannot build such a message, so the bytes are written by hand:
    # field 1 (text), length-delimited, two bytes that are not UTF-8.
    _, channel = server_channel
    call = channel.unary_unary(
        "/clipvision.v1.EmbeddingService/EmbedText",
        request_serializer=bytes,
        response_deserializer=pb.EmbedTextResponse.FromString,
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call(b"\x0a\x02\xff\xfe")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "REQUEST_MALFORMED" in str(error.value.trailing_metadata())
    # The server goes on answering texts.
    stub = pb_grpc.EmbeddingServiceStub(channel)
    assert (await stub.EmbedText(pb.EmbedTextRequest(text="still here"))).embedding.values
