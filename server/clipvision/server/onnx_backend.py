"""The image tower on ONNX Runtime: exported from the loaded checkpoint, cached on disk, checked.

The exported graph takes the uint8 (N, 3, H, W) pixels the queue carries and does
the rescale and mean/std by the same exact lookup table as the torch path, so
nothing upstream changes. The export runs once per checkpoint content and
exporter version (offline: it only traces the loaded module) and is cached; the
session is then checked against torch on a fixed input before it serves.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipvision.server.checkpoint import Checkpoint
from clipvision.server.encoder import ClipImageEncoder, FloatArray
from clipvision.server.preprocess import ClipPreprocessor, ImageLimits, UInt8Array

logger = logging.getLogger(__name__)

# Raise when the exported graph changes for the same checkpoint (inputs, ops, options).
EXPORT_FORMAT = 1
# The start-up check's limit: above it the backend is refused (torch serves instead).
SELF_CHECK_TOLERANCE = 1e-4
# What the export needs beside torch: onnxruntime to run it, onnx and onnxscript to write
# it (torch.onnx's exporter, torch.export-based; the TorchScript one is deprecated).
REQUIRED_MODULES = ("onnxruntime", "onnx", "onnxscript")
# Part of the cache key: a new version of any of these may export a different graph.
EXPORTER_PACKAGES = ("torch", "transformers", "onnx", "onnxscript")
INPUT_NAME = "pixels"
OUTPUT_NAME = "image_embeds"
MODEL_FILE = "image.onnx"


class OnnxBackendError(Exception):
    """The ONNX Runtime backend could not be built or failed its check; torch serves instead."""


def missing_modules() -> list[str]:
    """The packages the ONNX Runtime backend needs and this install lacks."""
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/clipvision/onnx``, or ``~/.cache/clipvision/onnx``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "clipvision" / "onnx"


@dataclass(frozen=True)
class OnnxImageRunner:
    """Runs the exported tower: uint8 (N, 3, H, W) pixels in, float32 (N, D) features out."""

    session: Any  # onnxruntime.InferenceSession (onnxruntime ships no type hints)
    path: Path
    threads: int

    def __call__(self, pixels: UInt8Array) -> FloatArray:
        """Embed one batch; ONNX Runtime releases the GIL while it runs."""
        (features,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(pixels)})
        result: FloatArray = features
        return result


class _ImageGraph(torch.nn.Module):
    """What is exported: the lookup table (uint8 to normalised float32), tower, projection."""

    table: torch.Tensor
    offsets: torch.Tensor

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__()
        self.model = checkpoint.model
        table = ClipPreprocessor(checkpoint.preprocess).lookup_table  # (3, 256) float32
        # One flat table and a per-channel offset: a single Gather in the graph.
        self.register_buffer("table", torch.from_numpy(table).reshape(-1).clone())
        self.register_buffer("offsets", (torch.arange(3) * table.shape[1]).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        values = self.table[pixels.long() + self.offsets]
        embeds: torch.Tensor = self.model(pixel_values=values).image_embeds
        return embeds


def content_hash(checkpoint: Checkpoint) -> str:
    """SHA-256 of what the graph computes: config, preprocessing table and every weight."""
    digest = hashlib.sha256()
    digest.update(checkpoint.model.config.to_json_string(use_diff=False).encode())
    digest.update(ClipPreprocessor(checkpoint.preprocess).lookup_table.tobytes())
    digest.update(str(checkpoint.dtype).encode())
    for name, tensor in sorted(checkpoint.model.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        # Viewed as bytes without a copy: the weights may be hundreds of megabytes.
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def cache_key(checkpoint: Checkpoint) -> str:
    """The cache entry's name: the checkpoint's content and the exporter's versions."""
    versions = ";".join(
        f"{package}={importlib.metadata.version(package)}" for package in EXPORTER_PACKAGES
    )
    digest = hashlib.sha256(f"{content_hash(checkpoint)};{versions};{EXPORT_FORMAT}".encode())
    return digest.hexdigest()[:32]


def export_image_graph(checkpoint: Checkpoint, directory: Path) -> Path:
    """Export the tower (dynamic batch axis) into ``directory``; returns the model file."""
    graph = _ImageGraph(checkpoint).eval()
    config = checkpoint.preprocess
    example = torch.zeros((2, 3, config.crop_height, config.crop_width), dtype=torch.uint8)
    path = directory / MODEL_FILE
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            # Weights beside the graph: protobuf caps one file at 2 GB (ViT-H and up).
            external_data=True,
            optimize=True,
            verbose=False,
        )
    return path


def cached_model(checkpoint: Checkpoint, cache_dir: Path) -> Path:
    """The exported model for this checkpoint, from the cache or exported into it now."""
    entry = cache_dir / cache_key(checkpoint)
    path = entry / MODEL_FILE
    if path.is_file():
        logger.info("ONNX export found in the cache: %s", entry)
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Exported into a private directory and renamed into place: a reader (another replica
    # sharing the cache) sees a whole entry or none.
    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=cache_dir))
    try:
        logger.info("exporting the image tower to ONNX (once per checkpoint): %s", entry)
        export_image_graph(checkpoint, scratch)
        try:
            scratch.rename(entry)
        except OSError:
            if not path.is_file():  # not another process's finished export: a real failure
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def open_session(path: Path, threads: int) -> OnnxImageRunner:
    """An ONNX Runtime CPU session on the exported model with ``threads`` intra-op threads."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    # The calling thread (the device thread) is one of the intra-op threads.
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle workers sleep instead of spinning: a spinning pool takes the cores the
    # preprocessing threads and any neighbour need (measured in docs/PERFORMANCE.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its warnings are about graph rewrites
    session = onnxruntime.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    return OnnxImageRunner(session=session, path=path, threads=threads)


def self_check_input(checkpoint: Checkpoint) -> UInt8Array:
    """The fixed batch both backends embed at start: two images of seeded noise."""
    config = checkpoint.preprocess
    rng = np.random.default_rng(0)
    pixels: UInt8Array = rng.integers(
        0, 256, size=(2, 3, config.crop_height, config.crop_width), dtype=np.uint8
    )
    return pixels


def max_difference(runner: OnnxImageRunner, checkpoint: Checkpoint) -> float:
    """Largest absolute difference between ONNX Runtime's features and torch's."""
    pixels = self_check_input(checkpoint)
    torch_encoder = ClipImageEncoder("self-check", "self-check", checkpoint, ImageLimits())
    expected = torch_encoder.to_host(torch_encoder.forward(pixels))
    return float(np.max(np.abs(runner(pixels) - expected)))


def build_onnx_runner(
    checkpoint: Checkpoint, cache_dir: Path, threads: int
) -> tuple[OnnxImageRunner, float]:
    """Export (or reuse), open and check; OnnxBackendError says why the backend is refused."""
    try:
        path = cached_model(checkpoint, cache_dir)
        runner = open_session(path, threads)
        difference = max_difference(runner, checkpoint)
    except Exception as exc:  # the exporter and runtime raise many kinds; all mean "no"
        raise OnnxBackendError(f"{exc.__class__.__name__}: {exc}") from exc
    if not difference <= SELF_CHECK_TOLERANCE:  # NaN is refused too
        raise OnnxBackendError(
            f"its embeddings differ from torch's by up to {difference:.3g} on the start-up "
            f"check (the limit is {SELF_CHECK_TOLERANCE:g})"
        )
    return runner, difference


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep the exporter's progress notes and deprecation notices out of the server's log."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [each.level for each in loggers]
    for each in loggers:
        each.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for each, level in zip(loggers, levels, strict=True):
            each.setLevel(level)
