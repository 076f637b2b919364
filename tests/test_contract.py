"""The contract: generated stubs are fresh and the proto passes buf lint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# clipvision.v1 and the Open Inference Protocol's stubs (proto/inference).
GENERATED = ("v1", "inference_v2")


@pytest.mark.parametrize("package", GENERATED)
def test_generated_stubs_match_the_proto(tmp_path: Path, package: str) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_stubs.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = tmp_path / "clipvision" / package
    committed = ROOT / "client" / "clipvision" / package
    fresh_files = sorted(p.name for p in fresh.iterdir() if p.is_file())
    committed_files = sorted(p.name for p in committed.iterdir() if p.is_file())
    assert fresh_files == committed_files, "run: python scripts/generate_stubs.py"
    for name in fresh_files:
        assert (fresh / name).read_bytes() == (committed / name).read_bytes(), (
            f"{name} is stale; run: python scripts/generate_stubs.py"
        )


def test_buf_lint_passes() -> None:
    # buf-bin installs the CLI beside the interpreter; fall back to PATH.
    beside = Path(sys.executable).parent / "buf"
    buf = str(beside) if beside.exists() else shutil.which("buf")
    assert buf is not None, "the buf CLI is missing: pip install -e '.[dev]'"
    result = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rpc_uses_its_own_request_and_response() -> None:
    from clipvision.v1 import embedding_service_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["EmbeddingService"]
    assert [m.name for m in service.methods] == [
        "EmbedImage",
        "EmbedImages",
        "EmbedImageStream",
        "GetModelInfo",
        "EmbedText",
        "EmbedTexts",
        "EmbedTextStream",
        "Classify",
    ]
    for method in service.methods:
        assert method.input_type.name == f"{method.name}Request"
        assert method.output_type.name == f"{method.name}Response"
    for name in ("EmbedImageStream", "EmbedTextStream"):
        stream = service.methods_by_name[name]
        assert stream.client_streaming
        assert stream.server_streaming
