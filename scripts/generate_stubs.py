"""Regenerate the Python stubs in client/clipvision/v1 from proto/.

Run from the repository root with the pinned dev tools installed:

    python scripts/generate_stubs.py            # writes client/
    python scripts/generate_stubs.py --out DIR  # writes elsewhere (freshness test)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


def proto_files() -> list[Path]:
    """Return the contract's .proto files, sorted so the output is stable."""
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out: Path) -> None:
    """Write *_pb2.py, *_pb2.pyi, *_pb2_grpc.py and *_pb2_grpc.pyi under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    # protoc finds the mypy plugins on PATH; they are installed beside this interpreter.
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--mypy_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(path.relative_to(PROTO_ROOT)) for path in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")
    # The package must be importable as a regular package for type checkers.
    for package in {path.parent.relative_to(PROTO_ROOT) for path in proto_files()}:
        (out / package / "__init__.py").write_text('"""Generated gRPC stubs; do not edit."""\n')
        # PEP 561: callers' type checkers read the .pyi stubs shipped beside the code.
        (out / package / "py.typed").write_text("")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "client", help="output import root")
    generate(parser.parse_args(argv).out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
