"""The contract: generated stubs are fresh, the proto passes buf lint, its comments are complete."""

from __future__ import annotations

import re
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


# Reasons that only ever fail a whole call and never come back in an ItemError, and why.
CALL_LEVEL_ONLY = {
    # The HTTP routes only: the body, the request's timeout, OpenAI's options we refuse.
    "REQUEST_TOO_LARGE",
    "DEADLINE_EXCEEDED",
    "INPUT_TOKENS_UNSUPPORTED",
    "DIMENSIONS_UNSUPPORTED",
    "METHOD_NOT_FOUND",  # no such method (or an Open Inference Protocol RPC not implemented)
    # The call gate, before the request reaches a handler.
    "UNAUTHENTICATED",
    "TOO_MANY_CALLS",
    "REQUEST_MISSING",
    "REQUEST_MALFORMED",
    "REQUEST_READ_TIMEOUT",
    "STREAM_IDLE",
    # The request as a whole, checked before any item runs.
    "TOO_MANY_IMAGES",
    "TOO_MANY_TEXTS",
    "LABELS_MISSING",
    "TOO_MANY_LABELS",
    "PROMPT_TEMPLATE_INVALID",
    # Capacity: refusing a unary call (re-raised past the in-band path); streams wait.
    "QUEUE_FULL",
    "MEMORY_BUDGET_FULL",
    # A draining stream stops reading before an item could ask for its model.
    "SERVER_DRAINING",
}
PROTO = ROOT / "proto" / "clipvision" / "v1" / "embedding_service.proto"


def field_comment(proto: str, message: str, field: str) -> list[str]:
    """The comment lines just above ``field``'s declaration in ``message``, without ``//``."""
    body = proto[proto.index(f"message {message} {{") :]
    lines = body[: body.index("\n}")].splitlines()
    (at,) = [i for i, line in enumerate(lines) if re.match(rf"\s*\S+ {field} = \d+;", line)]
    comment: list[str] = []
    for line in reversed(lines[:at]):
        if not line.strip().startswith("//"):
            break
        comment.insert(0, line.strip().removeprefix("//").strip())
    return comment


def item_error_problems(proto: str) -> list[str]:
    """What ItemError.reason's comment gets wrong: each Reason is listed once, on the right side.

    The comment lists the reasons an item may carry, then, after "Never an item's",
    those that only ever fail a call, which must be CALL_LEVEL_ONLY.
    """
    from clipvision.server.errors import Reason

    reasons = {reason.value for reason in Reason}
    comment = "\n".join(field_comment(proto, "ItemError", "reason"))
    item, marker, call = comment.partition("Never an item's")
    if not marker:
        return ["the comment lost its paragraph 'Never an item's: ...'"]
    words = re.compile(r"\b[A-Z][A-Z0-9_]+\b")
    in_band = set(words.findall(item)) - {"UPPER_SNAKE_CASE"}
    call_only = set(words.findall(call))
    problems = [f"not a reason: {name}" for name in sorted((in_band | call_only) - reasons)]
    problems += [f"missing: {name}" for name in sorted(reasons - in_band - call_only)]
    problems += [f"an item never carries {name}" for name in sorted(in_band & CALL_LEVEL_ONLY)]
    problems += [
        f"{name} is said call-only but not in CALL_LEVEL_ONLY"
        for name in sorted(call_only - CALL_LEVEL_ONLY)
    ]
    problems += [f"not said call-only: {name}" for name in sorted(CALL_LEVEL_ONLY - call_only)]
    return problems


def test_item_error_names_every_reason_in_band_or_call_level_only() -> None:
    assert item_error_problems(PROTO.read_text()) == []


def test_the_item_error_check_sees_a_missing_or_misplaced_reason() -> None:
    proto = PROTO.read_text()
    assert item_error_problems(proto.replace("IMAGE_TOO_SMALL, ", "", 1)) == [
        "missing: IMAGE_TOO_SMALL"
    ]
    moved = proto.replace("IMAGE_TOO_SMALL, ", "", 1).replace(
        "TOO_MANY_CALLS, ", "TOO_MANY_CALLS, IMAGE_TOO_SMALL, ", 1
    )
    assert item_error_problems(moved) == [
        "IMAGE_TOO_SMALL is said call-only but not in CALL_LEVEL_ONLY"
    ]
