"""The towers on ONNX Runtime: exported from the loaded checkpoint, cached on disk, checked.

Each tower (image, text) is exported on its own, with the inputs its batcher
already produces, so nothing upstream changes: the image graph takes the uint8
(N, 3, H, W) pixels the queue carries and does the rescale and mean/std by the
same exact lookup table as the torch path; the text graph takes the padded
(N, T) token ids and their attention mask, or the ids alone for a family whose
texts are padded to the context without a mask (SigLIP). Each computes what the
family's get_image_features or get_text_features returns (runtime.families).
An export runs once per tower content and exporter version (offline: it only
traces the loaded module) and is cached; the session is then checked against
torch on a fixed input before it serves.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from clipvision.server.config.limits import ImageLimits
from clipvision.server.runtime.checkpoint import Checkpoint, TextTower
from clipvision.server.runtime.families import TextPadding
from clipvision.server.runtime.image_encoder import ClipImageEncoder, FloatArray
from clipvision.server.runtime.preprocess import ClipPreprocessor, UInt8Array
from clipvision.server.runtime.text_encoder import IdArray

logger = logging.getLogger(__name__)

# Raise when the exported graphs change for the same checkpoint (inputs, ops, options).
EXPORT_FORMAT = 2
# The start-up check's limit: above it the backend is refused (torch serves instead).
SELF_CHECK_TOLERANCE = 1e-4
# What the export needs beside torch: onnxruntime to run it, onnx and onnxscript to write
# it (torch.onnx's exporter, torch.export-based; the TorchScript one is deprecated).
REQUIRED_MODULES = ("onnxruntime", "onnx", "onnxscript")
# Part of the cache key: a new version of any of these may export a different graph.
EXPORTER_PACKAGES = ("torch", "transformers", "onnx", "onnxscript")
IMAGE_INPUTS = ("pixels",)
TEXT_INPUTS = ("input_ids", "attention_mask")
UNMASKED_TEXT_INPUTS = ("input_ids",)
IMAGE_OUTPUT = "image_embeds"
TEXT_OUTPUT = "text_embeds"


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
    """Runs the exported image tower: uint8 (N, 3, H, W) pixels in, float32 (N, D) out."""

    session: Any  # onnxruntime.InferenceSession (onnxruntime ships no type hints)
    path: Path
    threads: int

    def __call__(self, pixels: UInt8Array) -> FloatArray:
        """Embed one batch; ONNX Runtime releases the GIL while it runs."""
        (features,) = self.session.run(
            [IMAGE_OUTPUT], {IMAGE_INPUTS[0]: np.ascontiguousarray(pixels)}
        )
        result: FloatArray = features
        return result


@dataclass(frozen=True)
class OnnxTextRunner:
    """Runs the exported text tower: int64 (N, T) ids and mask in, float32 (N, D) out; the
    mask is not fed to a graph that takes the ids alone."""

    session: Any
    path: Path
    threads: int

    def __call__(self, ids: IdArray, mask: IdArray) -> FloatArray:
        """Embed one padded batch; ONNX Runtime releases the GIL while it runs."""
        wanted = {each.name for each in self.session.get_inputs()}
        feed = {name: value for name, value in zip(TEXT_INPUTS, (ids, mask), strict=True)}
        (features,) = self.session.run(
            [TEXT_OUTPUT], {name: value for name, value in feed.items() if name in wanted}
        )
        result: FloatArray = features
        return result


class _ImageGraph(torch.nn.Module):
    """What is exported: the lookup table (uint8 to normalised float32), tower, projection."""

    table: torch.Tensor
    offsets: torch.Tensor

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__()
        self.model = checkpoint.model
        self.family = checkpoint.family
        table = ClipPreprocessor(checkpoint.preprocess).lookup_table  # (3, 256) float32
        # One flat table and a per-channel offset: a single Gather in the graph.
        self.register_buffer("table", torch.from_numpy(table).reshape(-1).clone())
        self.register_buffer("offsets", (torch.arange(3) * table.shape[1]).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        values = self.table[pixels.long() + self.offsets]
        return self.family.image_features(self.model, values)


class _TextGraph(torch.nn.Module):
    """What is exported: the text tower and its projection or head, pooled as it pools."""

    def __init__(self, tower: TextTower) -> None:
        super().__init__()
        self.model = tower.model
        self.family = tower.family

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.family.text_features(self.model, ids, mask)


class _UnmaskedTextGraph(_TextGraph):
    """The text graph of a family padded to the context with no mask: ids in."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.family.text_features(self.model, ids, None)


@dataclass(frozen=True)
class TowerGraph:
    """One tower as the exporter sees it: the module, an example batch and its dynamic axes."""

    kind: str
    """``image`` or ``text``: the cache entry's file name, and part of its key."""
    module: torch.nn.Module
    example: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_name: str
    dynamic_shapes: tuple[dict[int, Any], ...]
    config: str
    """The tower's transformers config as JSON, part of the cache key."""

    @property
    def file_name(self) -> str:
        """The graph's file in its cache entry (its weights are beside it, in ``.data``)."""
        return f"{self.kind}.onnx"


def image_graph(checkpoint: Checkpoint) -> TowerGraph:
    """The image tower with the lookup table in front: (N, 3, H, W) uint8 in."""
    config = checkpoint.preprocess
    example = torch.zeros((2, 3, config.crop_height, config.crop_width), dtype=torch.uint8)
    return TowerGraph(
        "image",
        _ImageGraph(checkpoint).eval(),
        (example,),
        IMAGE_INPUTS,
        IMAGE_OUTPUT,
        ({0: torch.export.Dim("batch", min=1)},),
        checkpoint.model.config.to_json_string(use_diff=False),
    )


def text_graph(tower: TextTower) -> TowerGraph:
    """The text tower: (N, T) ids and mask (or the ids alone) in, T up to the context."""
    # Example shapes other than 1 and the context, so that neither axis is specialised.
    length = max(2, tower.context_length // 2)
    ids = torch.zeros((2, length), dtype=torch.int64)
    batch = torch.export.Dim("batch", min=1)
    tokens = torch.export.Dim("tokens", min=1, max=tower.context_length)
    config = tower.model.config.to_json_string(use_diff=False)
    if tower.family.padding is TextPadding.CONTEXT:
        return TowerGraph(
            "text",
            _UnmaskedTextGraph(tower).eval(),
            (ids,),
            UNMASKED_TEXT_INPUTS,
            TEXT_OUTPUT,
            ({0: batch, 1: tokens},),
            config,
        )
    return TowerGraph(
        "text",
        _TextGraph(tower).eval(),
        (ids, torch.ones_like(ids)),
        TEXT_INPUTS,
        TEXT_OUTPUT,
        ({0: batch, 1: tokens}, {0: batch, 1: tokens}),
        config,
    )


def content_hash(graph: TowerGraph) -> str:
    """SHA-256 of what the graph computes: its kind, the config and every weight and buffer.

    The image graph's buffers include the preprocessing table, so a checkpoint with
    other mean/std values gets another entry.
    """
    digest = hashlib.sha256(graph.kind.encode())
    digest.update(graph.config.encode())
    for name, tensor in sorted(graph.module.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        # Viewed as bytes without a copy: the weights may be hundreds of megabytes.
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def cache_key(graph: TowerGraph) -> str:
    """The cache entry's name: the tower's content and the exporter's versions."""
    versions = ";".join(
        f"{package}={importlib.metadata.version(package)}" for package in EXPORTER_PACKAGES
    )
    digest = hashlib.sha256(f"{content_hash(graph)};{versions};{EXPORT_FORMAT}".encode())
    return digest.hexdigest()[:32]


def export_graph(graph: TowerGraph, directory: Path) -> Path:
    """Export the tower (dynamic axes) into ``directory``; returns the model file."""
    path = directory / graph.file_name
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(
            graph.module,
            graph.example,
            str(path),
            dynamo=True,
            input_names=list(graph.input_names),
            output_names=[graph.output_name],
            dynamic_shapes=graph.dynamic_shapes,
            # Weights beside the graph: protobuf caps one file at 2 GB (ViT-H and up).
            external_data=True,
            optimize=True,
            verbose=False,
        )
    return path


def cached_model(graph: TowerGraph, cache_dir: Path) -> Path:
    """The exported model for this tower, from the cache or exported into it now."""
    entry = cache_dir / cache_key(graph)
    path = entry / graph.file_name
    if path.is_file():
        logger.info("ONNX export of the %s tower found in the cache: %s", graph.kind, entry)
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Exported into a private directory and renamed into place: a reader (another replica
    # sharing the cache) sees a whole entry or none.
    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=cache_dir))
    try:
        logger.info("exporting the %s tower to ONNX (once per checkpoint): %s", graph.kind, entry)
        export_graph(graph, scratch)
        try:
            scratch.rename(entry)
        except OSError:
            if not path.is_file():  # not another process's finished export: a real failure
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def open_session(path: Path, threads: int) -> Any:
    """An ONNX Runtime CPU session on an exported model with ``threads`` intra-op threads."""
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
    return onnxruntime.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )


def self_check_input(checkpoint: Checkpoint) -> UInt8Array:
    """The fixed batch both image backends embed at start: two images of seeded noise."""
    config = checkpoint.preprocess
    rng = np.random.default_rng(0)
    pixels: UInt8Array = rng.integers(
        0, 256, size=(2, 3, config.crop_height, config.crop_width), dtype=np.uint8
    )
    return pixels


def text_self_check_input(tower: TextTower) -> tuple[IdArray, IdArray]:
    """The fixed batch both text backends embed at start: seeded ids, one row padded.

    A full-context row and a shorter one padded behind its end token, so that every
    position embedding and the padding mask are exercised.
    """
    tokenizer = tower.tokenizer
    end = int(tokenizer.eos_token_id)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end)
    context = tower.context_length
    rng = np.random.default_rng(0)
    # Any ids but the end token (CLIP's is its last, Gemma's and XLM-R's among the first).
    ids = rng.integers(0, tower.vocab_size - 1, size=(2, context), dtype=np.int64)
    ids[ids >= end] += 1
    mask = np.ones((2, context), dtype=np.int64)
    ids[0, -1] = end
    short = max(2, context // 3)
    ids[1, short - 1] = end
    ids[1, short:] = pad
    mask[1, short:] = 0
    return ids, mask


def image_difference(runner: OnnxImageRunner, checkpoint: Checkpoint) -> float:
    """Largest absolute difference between ONNX Runtime's image features and torch's."""
    pixels = self_check_input(checkpoint)
    torch_encoder = ClipImageEncoder("self-check", "self-check", checkpoint, ImageLimits())
    expected = torch_encoder.to_host(torch_encoder.forward(pixels))
    return float(np.max(np.abs(runner(pixels) - expected)))


def text_difference(runner: OnnxTextRunner, tower: TextTower) -> float:
    """Largest absolute difference between ONNX Runtime's text features and torch's."""
    ids, mask = text_self_check_input(tower)
    unmasked = tower.family.padding is TextPadding.CONTEXT
    with torch.inference_mode():
        expected = tower.features(
            torch.from_numpy(ids), None if unmasked else torch.from_numpy(mask)
        ).numpy()
    return float(np.max(np.abs(runner(ids, mask) - expected)))


def build_onnx_runner(
    checkpoint: Checkpoint, cache_dir: Path, threads: int
) -> tuple[OnnxImageRunner, float]:
    """The image tower: export (or reuse), open and check; OnnxBackendError says why not."""

    def check(path: Path) -> tuple[OnnxImageRunner, float]:
        runner = OnnxImageRunner(open_session(path, threads), path, threads)
        return runner, image_difference(runner, checkpoint)

    return _built(lambda: image_graph(checkpoint), cache_dir, check)


def build_onnx_text_runner(
    tower: TextTower, cache_dir: Path, threads: int
) -> tuple[OnnxTextRunner, float]:
    """The text tower: export (or reuse), open and check; OnnxBackendError says why not."""

    def check(path: Path) -> tuple[OnnxTextRunner, float]:
        runner = OnnxTextRunner(open_session(path, threads), path, threads)
        return runner, text_difference(runner, tower)

    return _built(lambda: text_graph(tower), cache_dir, check)


R = TypeVar("R")


def _built(
    graph: Callable[[], TowerGraph], cache_dir: Path, check: Callable[[Path], tuple[R, float]]
) -> tuple[R, float]:
    try:
        runner, difference = check(cached_model(graph(), cache_dir))
    except Exception as exc:  # the exporter and runtime raise many kinds; all mean "no"
        raise OnnxBackendError(f"{exc.__class__.__name__}: {exc}") from exc
    if not difference <= SELF_CHECK_TOLERANCE:  # NaN is refused too
        raise OnnxBackendError(
            f"its embeddings differ from torch's by up to {difference:.3g} on the start-up "
            f"check (the limit is {SELF_CHECK_TOLERANCE:g})"
        )
    return runner, difference


def release_weights(module: torch.nn.Module) -> None:
    """Free a tower's torch weights once ONNX Runtime serves it with its own copy.

    The module keeps its structure and config on the ``meta`` device; calling it
    would fail loudly, and nothing does: the encoder runs the ONNX Runtime session.
    """
    module.to("meta")


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
