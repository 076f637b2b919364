"""Loading checkpoints: both layouts, only the vision tower, and clear refusals."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clipvision.server.config.settings import ModelSpec
from clipvision.server.errors import CheckpointError
from clipvision.server.runtime.checkpoint import load_checkpoint, resolve_device, resolve_dtype

CPU = torch.device("cpu")


def test_full_clip_checkpoint_materialises_only_the_vision_tower(clip_dir: Path) -> None:
    checkpoint = load_checkpoint(ModelSpec.parse(str(clip_dir)), device=CPU, dtype=torch.float32)
    assert checkpoint.embedding_dim == 16
    assert checkpoint.image_size == 32
    names = [name for name, _ in checkpoint.model.named_parameters()]
    assert names
    assert all(n.startswith(("vision_model.", "visual_projection.")) for n in names)
    assert not any(p.requires_grad for p in checkpoint.model.parameters())
    assert not checkpoint.model.training
    saved = load_file(clip_dir / "model.safetensors")
    state = checkpoint.model.state_dict()
    torch.testing.assert_close(state["visual_projection.weight"], saved["visual_projection.weight"])


def test_vision_only_checkpoint_loads_with_its_preprocessing(vision_dir: Path) -> None:
    checkpoint = load_checkpoint(ModelSpec.parse(str(vision_dir)), device=CPU, dtype=torch.float32)
    assert checkpoint.embedding_dim == 24
    assert checkpoint.preprocess.shortest_edge == 40
    assert checkpoint.preprocess.mean == (0.5, 0.5, 0.5)


def test_a_preset_name_pins_the_architecture(clip_dir: Path) -> None:
    with pytest.raises(
        CheckpointError, match=r"not a ViT-B/32 checkpoint: its embeddings have 16 dimensions"
    ):
        load_checkpoint(ModelSpec.parse(f"ViT-B/32={clip_dir}"), device=CPU, dtype=torch.float32)


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(ModelSpec.parse(str(tmp_path / "nowhere")), device=CPU, dtype=torch.float32)


def test_non_clip_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="'bert' model; clipvision serves model types clip"):
        load_checkpoint(ModelSpec.parse(str(tmp_path)), device=CPU, dtype=torch.float32)


def test_checkpoint_without_safetensors_is_refused(clip_dir: Path, tmp_path: Path) -> None:
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(clip_dir / name, tmp_path / name)
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors weights"):
        load_checkpoint(ModelSpec.parse(str(tmp_path)), device=CPU, dtype=torch.float32)


def test_checkpoint_without_preprocessor_config_is_refused(clip_dir: Path, tmp_path: Path) -> None:
    for name in ("config.json", "model.safetensors"):
        shutil.copy(clip_dir / name, tmp_path / name)
    with pytest.raises(CheckpointError, match=r"no preprocessor_config\.json"):
        load_checkpoint(ModelSpec.parse(str(tmp_path)), device=CPU, dtype=torch.float32)


def test_checkpoint_missing_vision_weights_is_refused(vision_dir: Path, tmp_path: Path) -> None:
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(vision_dir / name, tmp_path / name)
    weights = load_file(vision_dir / "model.safetensors")
    del weights["visual_projection.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lacks vision weights"):
        load_checkpoint(ModelSpec.parse(str(tmp_path)), device=CPU, dtype=torch.float32)


def test_unreachable_hub_fails_fast_naming_the_two_ways_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(
            ModelSpec.parse("ViT-B/32"), device=CPU, dtype=torch.float32, cache_dir=str(tmp_path)
        )
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert "openai/clip-vit-base-patch32" in message
    assert "local checkpoint directory" in message
    assert "--dummy-weights" in message


def test_dummy_weights_build_the_preset_architecture() -> None:
    checkpoint = load_checkpoint(
        ModelSpec.parse("ViT-B/32"), device=CPU, dtype=torch.float32, dummy_weights=True
    )
    assert checkpoint.dummy_weights
    assert checkpoint.embedding_dim == 512
    assert checkpoint.model.config.patch_size == 32
    assert checkpoint.model.config.num_hidden_layers == 12
    assert checkpoint.preprocess.shortest_edge == 224


def test_dummy_weights_need_a_preset(clip_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="needs a preset"):
        load_checkpoint(
            ModelSpec.parse(str(clip_dir)), device=CPU, dtype=torch.float32, dummy_weights=True
        )


def test_bfloat16_is_honoured_on_the_cpu(clip_dir: Path) -> None:
    checkpoint = load_checkpoint(ModelSpec.parse(str(clip_dir)), device=CPU, dtype=torch.bfloat16)
    assert next(checkpoint.model.parameters()).dtype == torch.bfloat16


@pytest.mark.skipif(
    torch.cuda.is_available() or torch.backends.mps.is_available(), reason="needs a CPU-only host"
)
def test_device_falls_back_to_cpu_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_device("auto") == CPU
    assert "running on the CPU" in caplog.text
    assert resolve_dtype("auto", CPU) == torch.float32
    with pytest.raises(CheckpointError, match="CUDA is not available"):
        resolve_device("cuda")


def test_float16_is_the_cuda_default() -> None:
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.float16
    assert resolve_dtype("float32", torch.device("cuda", 0)) == torch.float32
