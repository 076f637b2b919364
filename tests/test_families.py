"""SigLIP, SigLIP 2 (FixRes) and MetaCLIP 2, each served exactly as its reference computes it.

Tiny checkpoints of each family are built here, offline (tests/checkpoints.py), in the
Hugging Face layout with their own processor and tokenizer. The references are
transformers on the same directory, called as the model cards call it: AutoProcessor,
then ``get_image_features`` and ``get_text_features``; SigLIP's texts with
``padding="max_length", max_length=64`` (no mask: its tokenizer returns none), MetaCLIP
2's with ``padding=True``; Classify against the model's own scores (sigmoid with bias,
or softmax). One server serves all three families, on torch and on ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import AsyncIterator
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, AutoTokenizer

from clipvision.client._messages import to_label_scores
from clipvision.client.cli import _describe_model as describe_model
from clipvision.inference_v2 import grpc_service_pb2 as oip
from clipvision.inference_v2 import grpc_service_pb2_grpc as oip_grpc
from clipvision.server.config.presets import PRESETS
from clipvision.server.config.settings import ModelSpec, Settings
from clipvision.server.errors import CheckpointError
from clipvision.server.runtime.checkpoint import load_checkpoint
from clipvision.server.runtime.dummy import random_towers
from clipvision.server.runtime.families import FAMILIES
from clipvision.server.runtime.text_encoder import ClipTextEncoder
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.checkpoints import (
    METACLIP_2_CONTEXT,
    SIGLIP_CONTEXT,
    SIGLIP_LOGIT_BIAS,
    build_gemma_tokenizer,
    build_metaclip_2_model,
    build_siglip_model,
)
from tests.conftest import DATA, photo_bytes, running_server
from tests.processes import server_process

if TYPE_CHECKING:
    from clipvision.v1.embedding_service_pb2_grpc import EmbeddingServiceAsyncStub as Stub

CPU = torch.device("cpu")
# The served name of each family's checkpoint, and how its model card pads a batch of texts.
MODELS = {"siglip": "max_length", "siglip2": "max_length", "metaclip2": "longest"}
CONTEXTS = {"siglip": SIGLIP_CONTEXT, "siglip2": SIGLIP_CONTEXT, "metaclip2": METACLIP_2_CONTEXT}
TEXTS = {
    "ascii": "a photo of a cat",
    "cased and punctuated": "A Photo, of a CAT!!",
    "accented": "une photo d'un château en été",
    "cjk": "猫の写真",
    "emoji": "a bowl of ramen 🍜🥚",
    "whitespace only": " \t\n  ",
    "very long": "the quick brown fox jumps over the lazy dog " * 20,
}
PHOTOS = ["chelsea.png", "rocket.jpg", "coffee.png", "camera.png"]
LABELS = ["cat", "dog", "city at night", "bowl of ramen"]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny checkpoint of each family: SigLIP (SentencePiece), SigLIP 2 (Gemma), MetaCLIP 2."""
    root = tmp_path_factory.mktemp("families")
    build_siglip_model(root / "siglip")
    build_siglip_model(root / "siglip2", gemma=True, seed=4)
    build_metaclip_2_model(root / "metaclip2")
    return {name: root / name for name in MODELS}


@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
async def family_server(
    request: pytest.FixtureRequest, family_dirs: dict[str, Path]
) -> AsyncIterator[tuple[grpc.aio.Channel, str]]:
    """One server with the three families, each tower on torch, or on ONNX Runtime after
    its start-up check (the whole module runs once per backend)."""
    settings = Settings(
        models=tuple(ModelSpec.parse(f"{name}={path}") for name, path in family_dirs.items()),
        address="127.0.0.1:0",
        device="cpu",
        backend=request.param,
        max_batch_size=8,
        preprocess_workers=2,
        grace_period_s=5.0,
    )
    async with running_server(settings) as (_, channel):
        yield channel, request.param


@pytest.fixture
def stub(family_server: tuple[grpc.aio.Channel, str]) -> Stub:
    """An EmbeddingService stub on the family server."""
    return pb_grpc.EmbeddingServiceStub(family_server[0])


# -- the references ---------------------------------------------------------------------


@cache
def reference(directory: Path) -> tuple[Any, Any]:
    """The model card's way in: AutoProcessor and AutoModel on the checkpoint directory."""
    return AutoProcessor.from_pretrained(directory), AutoModel.from_pretrained(directory).eval()


def features(output: Any) -> np.ndarray:
    """get_*_features' result: a tensor, or (transformers 5) an output whose pooler it is."""
    tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
    return np.asarray(tensor.numpy(), dtype=np.float32)


def text_inputs(name: str, directory: Path, texts: list[str], **padding: Any) -> Any:
    """The texts tokenized as the family's model card says, cut to the context."""
    processor, _ = reference(directory)
    if not padding:
        padding = {"padding": "max_length" if MODELS[name] == "max_length" else True}
    return processor(
        text=texts, max_length=CONTEXTS[name], truncation=True, return_tensors="pt", **padding
    )


def reference_texts(name: str, directory: Path, texts: list[str], **padding: Any) -> np.ndarray:
    _, model = reference(directory)
    with torch.inference_mode():
        return features(model.get_text_features(**text_inputs(name, directory, texts, **padding)))


def reference_images(directory: Path, images: list[Image.Image]) -> np.ndarray:
    processor, model = reference(directory)
    with torch.inference_mode():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        return features(model.get_image_features(pixel_values=pixels))


def values(embedding: pb.Embedding) -> np.ndarray:
    return np.asarray(embedding.values, dtype=np.float32)


def photo(name: str) -> Image.Image:
    with Image.open(DATA / name) as image:
        return image.convert("RGB")


# -- parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
async def test_images_match_get_image_features(
    stub: Stub, family_dirs: dict[str, Path], name: str
) -> None:
    expected = reference_images(family_dirs[name], [photo(p) for p in PHOTOS])
    reply = await stub.EmbedImages(
        pb.EmbedImagesRequest(
            images=[pb.Image(content=photo_bytes(p)) for p in PHOTOS], model=name, normalize=False
        )
    )
    got = np.stack([values(result.embedding) for result in reply.results])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("text", list(TEXTS))
@pytest.mark.parametrize("name", MODELS)
async def test_texts_match_get_text_features(
    stub: Stub, family_dirs: dict[str, Path], name: str, text: str
) -> None:
    directory = family_dirs[name]
    expected = reference_texts(name, directory, [TEXTS[text]])[0]
    processor, _ = reference(directory)
    cut = len(processor.tokenizer(TEXTS[text])["input_ids"]) > CONTEXTS[name]
    reply = await stub.EmbedText(pb.EmbedTextRequest(text=TEXTS[text], model=name, normalize=False))
    assert reply.embedding.truncated is cut
    np.testing.assert_allclose(values(reply.embedding), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MODELS)
async def test_a_batch_of_texts_is_each_text_alone(
    stub: Stub, family_dirs: dict[str, Path], name: str
) -> None:
    texts = list(TEXTS.values())
    expected = reference_texts(name, family_dirs[name], texts)
    reply = await stub.EmbedTexts(pb.EmbedTextsRequest(texts=texts, model=name, normalize=False))
    got = np.stack([values(result.embedding) for result in reply.results])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MODELS)
async def test_classify_matches_the_models_own_scores(
    stub: Stub, family_dirs: dict[str, Path], name: str
) -> None:
    directory = family_dirs[name]
    _, model = reference(directory)
    prompts = [f"a photo of a {label}" for label in LABELS]
    pixels = reference(directory)[0](images=photo("chelsea.png"), return_tensors="pt")
    with torch.inference_mode():
        output = model(**text_inputs(name, directory, prompts), **pixels)
    sigmoid = MODELS[name] == "max_length"
    logits = output.logits_per_image[0]
    expected = (torch.sigmoid(logits) if sigmoid else logits.softmax(-1)).numpy()
    cosines = (output.image_embeds @ output.text_embeds.T)[0].numpy()

    response = await stub.Classify(
        pb.ClassifyRequest(
            image=pb.Image(content=photo_bytes("chelsea.png")),
            labels=LABELS,
            prompt_template="a photo of a {}",
            model=name,
        )
    )
    assert response.score_type == (pb.SCORE_TYPE_SIGMOID if sigmoid else pb.SCORE_TYPE_SOFTMAX)
    got = np.asarray([score.probability for score in response.scores])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose([s.cosine for s in response.scores], cosines, atol=1e-5, rtol=0)
    # The tiny models' scale and bias keep SigLIP's probabilities off 0 and 1, so that the
    # comparison above means something; each label stands alone (no sum to one).
    if sigmoid:
        assert got.min() > 0.01
        assert got.max() < 0.99
        assert abs(got.sum() - 1) > 0.1
    else:
        assert got.sum() == pytest.approx(1.0, abs=1e-5)


async def test_padding_siglip_texts_the_clip_way_changes_the_vectors(
    stub: Stub, family_dirs: dict[str, Path]
) -> None:
    # What Infinity and Weaviate's container did: pad to the longest text, with a mask.
    texts = ["a photo of a cat", "an aerial photograph of the city at night"]
    for name in ("siglip", "siglip2"):
        directory = family_dirs[name]
        right = reference_texts(name, directory, texts)
        clip_way = reference_texts(
            name, directory, texts, padding="longest", return_attention_mask=True
        )
        reply = await stub.EmbedTexts(
            pb.EmbedTextsRequest(texts=texts, model=name, normalize=False)
        )
        served = np.stack([values(result.embedding) for result in reply.results])
        np.testing.assert_allclose(served, right, atol=1e-5, rtol=0)
        for got, wrong in zip(served, clip_way, strict=True):
            cosine = got @ wrong / (np.linalg.norm(got) * np.linalg.norm(wrong))
            assert np.abs(got - wrong).max() > 1e-2, name
            assert cosine < 0.99, name


async def test_model_info_says_family_score_and_bias(
    stub: Stub, family_server: tuple[grpc.aio.Channel, str]
) -> None:
    info = {
        model.name: model for model in (await stub.GetModelInfo(pb.GetModelInfoRequest())).models
    }
    for name in ("siglip", "siglip2"):
        model = info[name]
        assert model.family == "siglip"
        assert model.score_type == pb.SCORE_TYPE_SIGMOID
        assert model.HasField("logit_bias")
        assert model.logit_bias == pytest.approx(SIGLIP_LOGIT_BIAS, abs=1e-6)
        assert model.logit_scale == pytest.approx(20.0, rel=1e-5)
        assert model.text_context_length == SIGLIP_CONTEXT
        prep = model.preprocessing
        assert (prep.resize_shortest_edge, prep.resize_height, prep.resize_width) == (0, 32, 32)
        assert (prep.crop_height, prep.crop_width) == (0, 0)
        assert list(prep.mean) == list(prep.std) == [0.5, 0.5, 0.5]
    metaclip = info["metaclip2"]
    assert metaclip.family == "metaclip_2"
    assert metaclip.score_type == pb.SCORE_TYPE_SOFTMAX
    assert not metaclip.HasField("logit_bias")
    assert metaclip.text_context_length == METACLIP_2_CONTEXT
    assert metaclip.preprocessing.resize_shortest_edge == 32
    assert metaclip.preprocessing.crop_height == 32
    # Every family's towers on the backend the server was given (ONNX Runtime: each passed
    # its start-up check against torch).
    backend = family_server[1]
    assert {(m.image_runtime, m.text_runtime) for m in info.values()} == {(backend, backend)}
    # What `clipvision info` prints of them.
    siglip = describe_model(info["siglip"])
    assert "family siglip" in siglip
    assert "preprocessing: resize to 32x32 px (bicubic), no crop" in siglip
    assert "logit scale 20, logit bias -0.3, sigmoid scores" in siglip
    assert "shortest edge 32 px (bicubic), centre crop 32x32" in describe_model(metaclip)


def test_the_client_says_which_probabilities_classify_returned() -> None:
    score = pb.LabelScore(label="cat", probability=0.7, cosine=0.1)
    sigmoid = to_label_scores(pb.ClassifyResponse(scores=[score], score_type=pb.SCORE_TYPE_SIGMOID))
    older = to_label_scores(pb.ClassifyResponse(scores=[score]))
    assert [(s.label, s.score_type) for s in sigmoid + older] == [
        ("cat", "sigmoid"),
        ("cat", "softmax"),
    ]


@pytest.mark.parametrize("name", MODELS)
async def test_the_open_inference_protocol_serves_every_family_alike(
    stub: Stub, family_server: tuple[grpc.aio.Channel, str], name: str
) -> None:
    inference = oip_grpc.GRPCInferenceServiceStub(family_server[0])

    def request(model: str, tensor: str, elements: list[bytes]) -> oip.ModelInferRequest:
        raw = b"".join(struct.pack("<I", len(e)) + e for e in elements)
        shape = oip.ModelInferRequest.InferInputTensor(
            name=tensor, datatype="BYTES", shape=[len(elements)]
        )
        return oip.ModelInferRequest(model_name=model, inputs=[shape], raw_input_contents=[raw])

    texts = [TEXTS["accented"], TEXTS["very long"]]
    image = await inference.ModelInfer(request(name, "IMAGE", [photo_bytes("rocket.jpg")]))
    text = await inference.ModelInfer(request(f"{name}-text", "TEXT", [t.encode() for t in texts]))
    unary_image = await stub.EmbedImage(
        pb.EmbedImageRequest(image=pb.Image(content=photo_bytes("rocket.jpg")), model=name)
    )
    unary_texts = await stub.EmbedTexts(pb.EmbedTextsRequest(texts=texts, model=name))
    got_image = np.frombuffer(image.raw_output_contents[0], dtype=np.float32)
    got_texts = np.frombuffer(text.raw_output_contents[0], dtype=np.float32).reshape(2, -1)
    np.testing.assert_allclose(got_image, values(unary_image.embedding), atol=1e-6, rtol=0)
    expected = np.stack([values(result.embedding) for result in unary_texts.results])
    np.testing.assert_allclose(got_texts, expected, atol=1e-6, rtol=0)


# -- the text policy without a server -----------------------------------------------------


def test_a_tokenizer_that_pads_on_the_left_is_followed(family_dirs: dict[str, Path]) -> None:
    # SigLIP pools the last position: padding on the left puts the end token there.
    directory = family_dirs["siglip2"]
    checkpoint = load_checkpoint(ModelSpec.parse(str(directory)), device=CPU, dtype=torch.float32)
    assert checkpoint.text is not None
    left = build_gemma_tokenizer()
    left.padding_side = "left"
    tower = dataclasses.replace(checkpoint.text, tokenizer=left)
    encoder = ClipTextEncoder("left", tower, CPU, 65536)
    texts = [TEXTS["ascii"], TEXTS["cjk"]]
    got = encoder.embed_batch([encoder.tokenize(text, True).ids for text in texts])
    inputs = left(texts, padding="max_length", max_length=SIGLIP_CONTEXT, return_tensors="pt")
    assert int(inputs["input_ids"][0, -1]) == left.eos_token_id
    with torch.inference_mode():
        expected = features(reference(directory)[1].get_text_features(**inputs))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    right = reference_texts("siglip2", directory, texts)
    assert np.abs(right - expected).max() > 1e-2


def test_a_siglip_checkpoint_loads_its_own_tokenizer_and_bias(family_dirs: dict[str, Path]) -> None:
    checkpoint = load_checkpoint(
        ModelSpec.parse(str(family_dirs["siglip"])), device=CPU, dtype=torch.float32
    )
    assert checkpoint.family is FAMILIES["siglip"]
    assert checkpoint.text is not None
    assert type(checkpoint.text.tokenizer).__name__ == "SiglipTokenizer"
    assert checkpoint.text.logit_bias == pytest.approx(SIGLIP_LOGIT_BIAS, abs=1e-6)
    # SiglipTokenizer lowercases and drops punctuation, as the checkpoint says.
    encoder = ClipTextEncoder("s", checkpoint.text, CPU, 65536)
    same = [
        encoder.tokenize(t, True).ids.tolist() for t in ("A Photo, of a CAT!!", "a photo of a cat")
    ]
    assert same[0] == same[1]
    assert same[0][-1] == AutoTokenizer.from_pretrained(family_dirs["siglip"]).eos_token_id


# -- refusals and presets -------------------------------------------------------------------


def _config_only(directory: Path, config: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"model_type": "siglip2"}, "SigLIP 2 NaFlex"),
        (
            {
                "model_type": "jina_clip",
                "auto_map": {"AutoModel": "jinaai/x--modeling.JinaCLIPModel"},
            },
            "remote code",
        ),
        ({"model_type": "blip"}, "'blip' model"),
    ],
)
def test_unsupported_types_are_refused_naming_what_is_served(
    tmp_path: Path, config: dict[str, Any], words: str
) -> None:
    directory = _config_only(tmp_path / "model", config)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(ModelSpec.parse(str(directory)), device=CPU, dtype=torch.float32)
    message = str(caught.value)
    assert words in message
    assert "\n" not in message
    for served in ("clip", "siglip (SigLIP, SigLIP 2 FixRes)", "metaclip_2"):
        assert served in message


async def test_a_naflex_checkpoint_stops_the_server_with_one_line(tmp_path: Path) -> None:
    directory = _config_only(tmp_path / "naflex", {"model_type": "siglip2"})
    async with server_process("--model", f"naflex={directory}", "--device", "cpu") as server:
        code, log = await server.finish()
    assert code == 1
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if "SigLIP 2 NaFlex" in line]
    assert len(lines) == 1
    assert "siglip (SigLIP, SigLIP 2 FixRes)" in lines[0]


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_has_dummy_weights_of_its_family(name: str) -> None:
    # Built on the meta device: the architectures and tokenizers, without the weights.
    preset = PRESETS[name]
    family = FAMILIES[preset.family]
    with torch.device("meta"):
        towers = random_towers(preset, family)
    assert family.embedding_dim(towers.vision.config) == preset.embedding_dim
    assert family.text_embedding_dim(towers.text.config) == preset.embedding_dim
    assert towers.preprocess.crop_height == preset.image_size
    assert (towers.logit_bias is not None) is family.has_logit_bias
    ids = towers.tokenizer("a photo of a cat 猫")["input_ids"]
    assert ids[-1] == towers.tokenizer.eos_token_id == towers.text.config.eos_token_id
    assert max(ids) < towers.vocab_size
    if family.name == "siglip":
        assert towers.context_length == SIGLIP_CONTEXT
        assert towers.preprocess.resize_height == preset.image_size
        assert towers.tokenizer.pad_token_id == towers.text.config.pad_token_id
    assert not preset.mismatches(family.name, towers.vision.config, preset.embedding_dim)
