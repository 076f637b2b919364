"""The image tower on ONNX Runtime: exact as torch, cached, refused when it is not exact."""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPVisionModelWithProjection

from clipvision.server import onnx_backend
from clipvision.server.checkpoint import Checkpoint, load_checkpoint
from clipvision.server.errors import CheckpointError
from clipvision.server.flags import parse_settings
from clipvision.server.image_backend import choose_backend
from clipvision.server.settings import ModelSpec, Settings
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.checkpoints import build_vision_model
from tests.conftest import DATA, running_server, settings_with

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
    base_settings: Settings, tmp_path: Path, backend: str, model: str
) -> None:
    settings = settings_with(base_settings, backend=backend, onnx_cache_dir=str(tmp_path))
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
    assert [entry.name for entry in entries] == [onnx_backend.cache_key(checkpoint)]
    assert (entries[0] / onnx_backend.MODEL_FILE).is_file()

    # A restart (the same checkpoint loaded again) exports nothing: the entry is used as is.
    def no_export(*args: object) -> Path:
        raise AssertionError("exported again although the cache holds this checkpoint")

    monkeypatch.setattr(onnx_backend, "export_image_graph", no_export)
    runner, _ = onnx_backend.build_onnx_runner(cpu_checkpoint(vision_dir), tmp_path, threads=1)
    assert runner.path.parent == entries[0]
    assert runner.threads == 1


def test_other_weights_get_another_cache_entry(vision_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    build_vision_model(other, seed=7)  # same architecture and preprocessing, other weights
    assert onnx_backend.cache_key(cpu_checkpoint(vision_dir)) == onnx_backend.cache_key(
        cpu_checkpoint(vision_dir)
    )
    assert onnx_backend.cache_key(cpu_checkpoint(other)) != onnx_backend.cache_key(
        cpu_checkpoint(vision_dir)
    )


async def test_an_inexact_export_is_refused_and_torch_serves_exactly(
    base_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vision_dir = Path(next(s.source for s in base_settings.models if s.name == "tiny-vision"))
    checkpoint = cpu_checkpoint(vision_dir)
    # A cache entry whose weights went bad (disk, a hand edit): it loads, but computes wrong.
    path = onnx_backend.cached_model(checkpoint, tmp_path)
    weights = path.with_name(path.name + ".data")
    damaged = np.frombuffer(weights.read_bytes(), dtype=np.float32) * np.float32(1.01)
    weights.write_bytes(damaged.tobytes())

    settings = settings_with(base_settings, backend="onnxruntime", onnx_cache_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="clipvision.server.image_backend"):
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

    monkeypatch.setattr("clipvision.server.image_backend.missing_modules", lambda: ["onnxruntime"])
    backend, reason = choose_backend("auto", float32)
    assert backend == "torch"
    assert "not installed" in reason
    with pytest.raises(CheckpointError, match=r"install the onnx extra"):
        choose_backend("onnxruntime", float32)


async def test_onnxruntime_asked_for_but_not_installed_stops_the_load(
    base_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("clipvision.server.image_backend.missing_modules", lambda: ["onnxruntime"])
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
    with caplog.at_level(logging.WARNING, logger="clipvision.server.image_backend"):
        served_by, features = await embed_photos(settings, "tiny-vision")

    assert served_by == "torch"
    assert any(
        "ONNX Runtime refused" in r.message and "a-file" in r.message for r in caplog.records
    )
    vision_dir = Path(next(s.source for s in base_settings.models if s.name == "tiny-vision"))
    np.testing.assert_allclose(
        features[0], reference_features(vision_dir, PHOTOS[0]), atol=1e-5, rtol=0
    )
