"""Flags and CLIPVISION_* environment variables become one frozen Settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipvision.server.config.flags import build_parser, parse_settings
from clipvision.server.config.settings import ModelSpec


def test_defaults_serve_the_vit_b32_preset_on_loopback() -> None:
    settings = parse_settings([], environ={})
    assert [m.name for m in settings.models] == ["ViT-B/32"]
    assert settings.models[0].hub_or_path == "openai/clip-vit-base-patch32"
    assert settings.address == "127.0.0.1:50051"
    assert not settings.dummy_weights
    assert not settings.lazy_load


def test_model_specs_name_sources_and_pin_presets(tmp_path: Path) -> None:
    directory = tmp_path / "my-clip"
    directory.mkdir()
    assert ModelSpec.parse(str(directory)).name == "my-clip"
    assert ModelSpec.parse("openai/clip-vit-large-patch14").name == "openai/clip-vit-large-patch14"
    named = ModelSpec.parse(f"photos={directory}")
    assert (named.name, named.source, named.preset) == ("photos", str(directory), None)
    pinned = ModelSpec.parse(f"ViT-L/14={directory}")
    assert pinned.preset is not None
    assert pinned.preset.embedding_dim == 768
    assert ModelSpec.parse("ViT-L/14").hub_or_path == "openai/clip-vit-large-patch14"


def test_environment_fills_defaults_and_flags_win() -> None:
    env = {
        "CLIPVISION_MODEL": "a=ViT-B/32,b=ViT-L/14",
        "CLIPVISION_MAX_BATCH_SIZE": "7",
        "CLIPVISION_ADDRESS": "0.0.0.0:9000",
        "CLIPVISION_DUMMY_WEIGHTS": "true",
        "CLIPVISION_MAX_IMAGE_PIXELS": "1000",
    }
    settings = parse_settings(["--address", "127.0.0.1:0"], environ=env)
    assert [m.name for m in settings.models] == ["a", "b"]
    assert settings.default_model == "a"
    assert settings.max_batch_size == 7
    assert settings.address == "127.0.0.1:0"
    assert settings.dummy_weights
    assert settings.image_limits.max_image_pixels == 1000
    flagged = parse_settings(["--model", "ViT-L/14", "--max-batch-size", "3"], environ=env)
    assert [m.name for m in flagged.models] == ["ViT-L/14"]
    assert flagged.max_batch_size == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "x=ViT-B/32", "--model", "x=ViT-L/14"], "must be unique"),
        (["--model", "some/repo", "--dummy-weights"], "--dummy-weights builds a preset"),
        (["--max-batch-size", "0"], "must be at least 1"),
        (["--model", "name="], "names no checkpoint"),
        (["--dtype", "int4"], "invalid choice"),
    ],
)
def test_bad_settings_stop_with_a_clear_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_settings(argv, environ={})
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_help_documents_every_option_and_its_environment_variable() -> None:
    parser = build_parser({})
    text = parser.format_help()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            flag = action.option_strings[0]
            assert flag in text
            variable = "CLIPVISION_" + flag.lstrip("-").upper().replace("-", "_")
            assert variable in text, f"{flag} does not name {variable}"
