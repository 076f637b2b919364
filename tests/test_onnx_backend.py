"""Both towers on ONNX Runtime: exact as torch, cached, refused when not exact, weights freed."""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPVisionModelWithProjection

from clipvision.server.config.flags import parse_settings
from clipvision.server.config.settings import ModelSpec, Settings
from clipvision.server.errors import CheckpointError
from clipvision.server.runtime import onnx_backend
from clipvision.server.runtime.backends import choose_backend
from clipvision.server.runtime.checkpoint import Checkpoint, load_checkpoint
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.checkpoints import build_vision_model
from tests.conftest import DATA, running_server, settings_with
from tests.test_text import TEXTS, reference_text

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed")

PHOTOS = sorted(path for path in DATA.iterdir() if path.suffix in {".jpg", ".png"})


@cache
def reference_features(directory: Path, photo: Path) -> np.ndarray:
    """What transformers itself computes for a photograph (get_image_features)."""
    processor = CLIPImageProcessorPil.from_pretrained(directory)
    with Image.open(photo) as image:
        rgb = ImageOps.exif_transpose(image).convert("RGB")
    pixels = processor(images=rgb, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        if '"model_type": "clip"' in (directory / "config.json").read_text():
            output = CLIPModel.from_pretrained(directory).eval().get_image_features(pixels)
            features = output if isinstance(output, torch.Tensor) else output.pooler_output
        else:
            model = CLIPVisionModelWithProjection.from_pretrained(directory).eval()
            features = model(pixel_values=pixels).image_embeds
    return np.asarray(features[0].numpy())


def cpu_checkpoint(directory: Path, dtype: torch.dtype = torch.float32) -> Checkpoint:
    return load_checkpoint(ModelSpec.parse(str(directory)), device=torch.device("cpu"), dtype=dtype)


async def embed_photos(settings: Settings, model: str) -> tuple[str, np.ndarray]:
    """The backend a server chose for ``model`` and its raw features for every photograph."""
    async with running_server(settings) as (server, channel):
        served = server.registry.loaded(model)
        assert served is not None
        stub = pb_grpc.EmbeddingServiceStub(channel)
        reply = await stub.EmbedImages(
            pb.EmbedImagesRequest(
                images=[pb.Image(content=photo.read_bytes()) for photo in PHOTOS],
                model=model,
                normalize=False,
            )
        )
    vectors = [np.asarray(result.embedding.values, dtype=np.float32) for result in reply.results]
    return served.encoder.backend, np.stack(vectors)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "auto"])
@pytest.mark.parametrize("model", ["tiny", "tiny-vision"])
async def test_every_backend_matches_transformers_on_real_photographs(
    base_settings: Settings, backend: str, model: str
) -> None:
    # The suite's shared cache (the default): entries are keyed by content, so reusing them
    # is what a restart does; the tests below that damage or count entries use their own.
    settings = settings_with(base_settings, backend=backend)
    served_by, features = await embed_photos(settings, model)

    # auto means ONNX Runtime here: float32 on the CPU, with the extra installed.
    assert served_by == ("torch" if backend == "torch" else "onnxruntime")
    directory = Path(next(s.source for s in settings.models if s.name == model))
    for photo, row in zip(PHOTOS, features, strict=True):
        np.testing.assert_allclose(
            row, reference_features(directory, photo), atol=1e-5, rtol=0, err_msg=photo.name
        )


def test_the_export_is_cached_by_content_and_reused(
    vision_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = cpu_checkpoint(vision_dir)
    _, difference = onnx_backend.build_onnx_runner(checkpoint, tmp_path, threads=1)
    assert difference <= 1e-5
    entries = list(tmp_path.iterdir())
    graph = onnx_backend.image_graph(checkpoint)
    assert [entry.name for entry in entries] == [onnx_backend.cache_key(graph)]
    assert (entries[0] / "image.onnx").is_file()

    # A restart (the same checkpoint loaded again) exports nothing: the entry is used as is.
    def no_export(*args: object) -> Path:
        raise AssertionError("exported again although the cache holds this checkpoint")

    monkeypatch.setattr(onnx_backend, "export_graph", no_export)
    runner, _ = onnx_backend.build_onnx_runner(cpu_checkpoint(vision_dir), tmp_path, threads=1)
    assert runner.path.parent == entries[0]
    assert runner.threads == 1


def test_other_weights_get_another_cache_entry(vision_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    build_vision_model(other, seed=7)  # same architecture and preprocessing, other weights

    def key(directory: Path) -> str:
        return onnx_backend.cache_key(onnx_backend.image_graph(cpu_checkpoint(directory)))

    assert key(vision_dir) == key(vision_dir)
    assert key(other) != key(vision_dir)


def onnx_only(base: Settings, model: str, cache_dir: Path) -> Settings:
    """Serve ``model`` alone with --backend onnxruntime and its ONNX cache in ``cache_dir``."""
    return settings_with(
        base,
        models=tuple(s for s in base.models if s.name == model),
        backend="onnxruntime",
        onnx_cache_dir=str(cache_dir),
    )


def damage_weights(path: Path) -> None:
    """Make a cache entry's weights go bad (disk, a hand edit): it loads, but computes wrong."""
    weights = path.with_name(path.name + ".data")
    damaged = np.frombuffer(weights.read_bytes(), dtype=np.float32) * np.float32(1.01)
    weights.write_bytes(damaged.tobytes())


async def test_an_inexact_export_is_refused_and_torch_serves_exactly(
    base_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vision_dir = Path(next(s.source for s in base_settings.models if s.name == "tiny-vision"))
    checkpoint = cpu_checkpoint(vision_dir)
    damage_weights(onnx_backend.cached_model(onnx_backend.image_graph(checkpoint), tmp_path))

    settings = onnx_only(base_settings, "tiny-vision", tmp_path)
    with caplog.at_level(logging.WARNING, logger="clipvision.server.runtime.backends"):
        served_by, features = await embed_photos(settings, "tiny-vision")

    assert served_by == "torch"
    warning = next(r.getMessage() for r in caplog.records if "ONNX Runtime refused" in r.message)
    assert "differ from torch's by up to" in warning
    assert "limit is 0.0001" in warning
    for photo, row in zip(PHOTOS, features, strict=True):
        np.testing.assert_allclose(row, reference_features(vision_dir, photo), atol=1e-5, rtol=0)


def test_auto_keeps_torch_where_onnx_runtime_does_not_apply(
    vision_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    float32 = cpu_checkpoint(vision_dir)
    assert choose_backend("auto", float32)[0] == "onnxruntime"
    assert choose_backend("torch", float32) == ("torch", "--backend torch")

    bfloat16 = cpu_checkpoint(vision_dir, torch.bfloat16)
    assert choose_backend("auto", bfloat16) == ("torch", "auto: bfloat16 stays on torch")
    with pytest.raises(CheckpointError, match="runs float32 on the CPU"):
        choose_backend("onnxruntime", bfloat16)

    monkeypatch.setattr(
        "clipvision.server.runtime.backends.missing_modules", lambda: ["onnxruntime"]
    )
    backend, reason = choose_backend("auto", float32)
    assert backend == "torch"
    assert "not installed" in reason
    with pytest.raises(CheckpointError, match=r"install the onnx extra"):
        choose_backend("onnxruntime", float32)


async def test_onnxruntime_asked_for_but_not_installed_stops_the_load(
    base_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        "clipvision.server.runtime.backends.missing_modules", lambda: ["onnxruntime"]
    )
    settings = settings_with(base_settings, backend="onnxruntime", onnx_cache_dir=str(tmp_path))
    async with running_server(settings, load=False) as (server, _):
        with pytest.raises(CheckpointError, match=r"pip install 'clipvision\[onnx\]'"):
            await server.load_models()


def test_backend_threads_and_cache_options_parse() -> None:
    settings = parse_settings(
        ["--backend", "onnxruntime", "--threads", "3", "--onnx-cache-dir", "/tmp/x"], environ={}
    )
    assert (settings.backend, settings.threads, settings.onnx_cache_dir) == (
        "onnxruntime",
        3,
        "/tmp/x",
    )
    defaults = parse_settings([], environ={"CLIPVISION_BACKEND": "torch"})
    assert (defaults.backend, defaults.threads) == ("torch", None)
    with pytest.raises(SystemExit):
        parse_settings(["--backend", "tensorrt"], environ={})
    with pytest.raises(SystemExit):
        parse_settings(["--threads", "0"], environ={})


async def test_an_unwritable_cache_leaves_torch_serving(
    base_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    settings = settings_with(
        base_settings, backend="auto", onnx_cache_dir=str(blocker / "onnx-cache")
    )
    with caplog.at_level(logging.WARNING, logger="clipvision.server.runtime.backends"):
        served_by, features = await embed_photos(settings, "tiny-vision")

    assert served_by == "torch"
    assert any(
        "ONNX Runtime refused" in r.message and "a-file" in r.message for r in caplog.records
    )
    vision_dir = Path(next(s.source for s in base_settings.models if s.name == "tiny-vision"))
    np.testing.assert_allclose(
        features[0], reference_features(vision_dir, PHOTOS[0]), atol=1e-5, rtol=0
    )


# -- the text tower ------------------------------------------------------------------


async def embed_texts(settings: Settings) -> tuple[pb.ModelInfo, np.ndarray]:
    """The tiny CLIP model's info and its raw text features for every one of TEXTS."""
    async with running_server(settings) as (_, channel):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest())
        reply = await stub.EmbedTexts(
            pb.EmbedTextsRequest(texts=list(TEXTS.values()), model="tiny", normalize=False)
        )
    vectors = [np.asarray(result.embedding.values, dtype=np.float32) for result in reply.results]
    return next(model for model in info.models if model.name == "tiny"), np.stack(vectors)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "auto"])
async def test_texts_match_transformers_on_every_backend(
    base_settings: Settings, clip_dir: Path, backend: str
) -> None:
    info, features = await embed_texts(settings_with(base_settings, backend=backend))

    runtime = "torch" if backend == "torch" else "onnxruntime"
    assert (info.image_runtime, info.text_runtime) == (runtime, runtime)
    # Padded batches of texts of many lengths (one cut to the context), as served.
    for name, row in zip(TEXTS, features, strict=True):
        expected, _ = reference_text(clip_dir, TEXTS[name])
        np.testing.assert_allclose(row, expected, atol=1e-5, rtol=0, err_msg=name)


async def test_a_vision_only_model_reports_no_text_runtime(base_settings: Settings) -> None:
    async with running_server(base_settings) as (_, channel):
        info = await pb_grpc.EmbeddingServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest())
    vision = next(model for model in info.models if model.name == "tiny-vision")
    assert (vision.image_runtime, vision.text_runtime) == ("onnxruntime", "")


async def test_an_inexact_text_export_is_refused_and_torch_serves_texts_exactly(
    base_settings: Settings, clip_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tower = cpu_checkpoint(clip_dir).text
    assert tower is not None
    damage_weights(onnx_backend.cached_model(onnx_backend.text_graph(tower), tmp_path))

    settings = onnx_only(base_settings, "tiny", tmp_path)
    with caplog.at_level(logging.WARNING, logger="clipvision.server.runtime.backends"):
        info, features = await embed_texts(settings)

    # Only the text tower falls back; the image tower's export is sound and serves.
    assert (info.image_runtime, info.text_runtime) == ("onnxruntime", "torch")
    warning = next(r.getMessage() for r in caplog.records if "ONNX Runtime refused" in r.message)
    assert "serves the text tower instead" in warning
    assert "differ from torch's by up to" in warning
    for name, row in zip(TEXTS, features, strict=True):
        np.testing.assert_allclose(row, reference_text(clip_dir, TEXTS[name])[0], atol=1e-5)


def test_the_text_export_is_cached_and_its_self_check_covers_padding(
    clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tower = cpu_checkpoint(clip_dir).text
    assert tower is not None
    ids, mask = onnx_backend.text_self_check_input(tower)
    # A full-context row, and a row padded behind its end token.
    assert ids.shape == (2, tower.context_length)
    assert mask[0].all()
    assert 0 < mask[1].sum() < tower.context_length
    assert ids[1, mask[1].sum() - 1] == tower.tokenizer.eos_token_id

    runner, difference = onnx_backend.build_onnx_text_runner(tower, tmp_path, threads=1)
    assert difference <= 1e-5
    key = onnx_backend.cache_key(onnx_backend.text_graph(tower))
    assert runner.path == tmp_path / key / "text.onnx"

    def no_export(*args: object) -> Path:
        raise AssertionError("exported again although the cache holds this tower")

    monkeypatch.setattr(onnx_backend, "export_graph", no_export)
    again, _ = onnx_backend.build_onnx_text_runner(tower, tmp_path, threads=1)
    assert again.path == runner.path
    # Image and text entries of one checkpoint never share a key.
    image_key = onnx_backend.cache_key(onnx_backend.image_graph(cpu_checkpoint(clip_dir)))
    assert image_key != key


async def test_torch_weights_are_freed_only_for_towers_onnx_runtime_serves(
    base_settings: Settings,
) -> None:
    def devices(module: torch.nn.Module) -> set[str]:
        return {parameter.device.type for parameter in module.parameters()}

    for backend, kept in (("auto", {"meta"}), ("torch", {"cpu"})):
        settings = settings_with(base_settings, backend=backend)
        async with running_server(settings) as (server, channel):
            served = server.registry.loaded("tiny")
            assert served is not None
            assert served.text is not None
            assert devices(served.encoder.checkpoint.model) == kept
            assert devices(served.text.encoder.tower.model) == kept
            # Freed or not, both towers still answer.
            stub = pb_grpc.EmbeddingServiceStub(channel)
            text = await stub.EmbedText(pb.EmbedTextRequest(text="a cat", model="tiny"))
            image = await stub.EmbedImage(
                pb.EmbedImageRequest(image=pb.Image(content=PHOTOS[0].read_bytes()), model="tiny")
            )
        assert len(text.embedding.values) == len(image.embedding.values) == 16
