"""Regenerate the Python stubs in client/clipvision/v1 and client/clipvision/inference_v2.

clipvision.v1 is generated from proto/clipvision/v1. The Open Inference Protocol's
package ``inference`` (proto/inference) is generated as clipvision.inference_v2:
its file is mapped to that import path, so no top-level ``inference`` module is
installed beside tritonclient's or kserve's copies of the protocol.

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


# Each source directory under proto/ and the import path its files are generated at.
PACKAGES = {
    Path("clipvision/v1"): Path("clipvision/v1"),
    Path("inference"): Path("clipvision/inference_v2"),
}


def proto_files(source: Path) -> list[Path]:
    """Return the .proto files of one source directory, sorted so the output is stable."""
    return sorted((PROTO_ROOT / source).glob("*.proto"))


def generate(out: Path) -> None:
    """Write *_pb2.py, *_pb2.pyi, *_pb2_grpc.py and *_pb2_grpc.pyi under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    # protoc finds the mypy plugins on PATH; they are installed beside this interpreter.
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    include = Path(protoc.__file__).parent / "_proto"
    for source, package in PACKAGES.items():
        args = [
            "grpc_tools.protoc",
            # VIRTUAL=DISK: protoc sees the files at the import path they are generated at.
            f"-I{package.as_posix()}={PROTO_ROOT / source}",
            f"-I{include}",
            f"--python_out={out}",
            f"--mypy_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_grpc_out={out}",
            *((package / path.name).as_posix() for path in proto_files(source)),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed; see the messages above")
        # The package must be importable as a regular package for type checkers.
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
