"""Which runtime runs each tower (torch or ONNX Runtime), with how many threads, and why.

``auto`` picks ONNX Runtime for float32 on the CPU where it is installed (measured
faster there for both towers: docs/PERFORMANCE.md) and torch elsewhere; a GPU
stays on torch. ONNX Runtime serves a tower only after its start-up check against
torch passes, and torch's copy of that tower's weights is then freed; if the export
or the check fails, torch serves that tower and the log says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from clipvision.server.config.cpu import cpu_budget
from clipvision.server.errors import CheckpointError
from clipvision.server.runtime import device_resize
from clipvision.server.runtime.checkpoint import Checkpoint
from clipvision.server.runtime.image_encoder import FloatArray
from clipvision.server.runtime.onnx_backend import (
    OnnxBackendError,
    build_onnx_runner,
    build_onnx_text_runner,
    default_cache_dir,
    missing_modules,
    release_weights,
)
from clipvision.server.runtime.preprocess import UInt8Array
from clipvision.server.runtime.text_encoder import TextRunner

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime")

ImageRunner = Callable[[UInt8Array], FloatArray]


def choose_backend(requested: str, checkpoint: Checkpoint) -> tuple[str, str]:
    """The backend to try for this checkpoint, and the reason, for the log.

    An explicit ``onnxruntime`` that cannot work here is a CheckpointError: the
    operator asked for something this process cannot do.
    """
    if requested not in BACKENDS:
        raise CheckpointError(f"--backend {requested!r} is not one of {', '.join(BACKENDS)}")
    device, dtype = checkpoint.device, checkpoint.dtype
    missing = missing_modules()
    if requested == "torch":
        return "torch", "--backend torch"
    if requested == "onnxruntime":
        if device.type != "cpu" or dtype != torch.float32:
            raise CheckpointError(
                f"--backend onnxruntime runs float32 on the CPU; this model is "
                f"{str(dtype).removeprefix('torch.')} on {device} (use --backend torch or auto)"
            )
        if missing:
            raise CheckpointError(
                f"--backend onnxruntime needs {', '.join(missing)}: install the onnx extra "
                "(pip install 'clipvision[onnx]')"
            )
        return "onnxruntime", "--backend onnxruntime"
    if device.type != "cpu":
        return "torch", f"auto: {device.type} stays on torch"
    if dtype != torch.float32:
        return "torch", f"auto: {str(dtype).removeprefix('torch.')} stays on torch"
    if missing:
        return "torch", f"auto: ONNX Runtime is not installed (no {', '.join(missing)})"
    return "onnxruntime", "auto: float32 on the CPU, where ONNX Runtime is faster"


def forward_threads(requested: int | None) -> int:
    """Intra-op threads for the forward pass: as asked, else the CPUs this process may use.

    torch's own default caps it too (it reads the host's cores, not the cgroup quota),
    so the default is never more threads than torch alone would have started.
    """
    if requested is not None:
        return requested
    return max(1, min(cpu_budget().count, torch.get_num_threads()))


def prepare_image_runner(
    name: str,
    checkpoint: Checkpoint,
    *,
    backend: str,
    threads: int | None,
    cache_dir: str | None,
) -> ImageRunner | None:
    """Run on the device thread: set its torch threads, then build the image tower's backend.

    Returns the ONNX Runtime runner, or None where torch serves (by choice or fallback).
    """
    if checkpoint.device.type == "cpu":
        # Per thread (OpenMP): this is the thread that runs every forward pass.
        torch.set_num_threads(forward_threads(threads))

    def build(directory: Path, count: int) -> tuple[ImageRunner, float]:
        return build_onnx_runner(checkpoint, directory, count)

    return _runner(name, "image", checkpoint, checkpoint.model, backend, threads, cache_dir, build)


def prepare_text_runner(
    name: str,
    checkpoint: Checkpoint,
    *,
    backend: str,
    threads: int | None,
    cache_dir: str | None,
) -> TextRunner | None:
    """Run on the device thread: build the text tower's backend, by the same rule as images.

    Returns the ONNX Runtime runner, or None where torch serves (or there is no text tower).
    """
    tower = checkpoint.text
    if tower is None:
        return None

    def build(directory: Path, count: int) -> tuple[TextRunner, float]:
        return build_onnx_text_runner(tower, directory, count)

    return _runner(name, "text", checkpoint, tower.model, backend, threads, cache_dir, build)


R = TypeVar("R")


def _runner(
    name: str,
    tower: str,
    checkpoint: Checkpoint,
    module: torch.nn.Module,
    backend: str,
    threads: int | None,
    cache_dir: str | None,
    build: Callable[[Path, int], tuple[R, float]],
) -> R | None:
    """ONNX Runtime's runner for one tower, torch's weights of it freed; None: torch serves."""
    choice, reason = choose_backend(backend, checkpoint)
    if choice == "torch":
        logger.info("model %s: %s tower on torch (%s)", name, tower, reason)
        return None
    count = forward_threads(threads)
    directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    try:
        runner, difference = build(directory, count)
    except OnnxBackendError as exc:
        logger.warning(
            "model %s: ONNX Runtime refused, torch serves the %s tower instead: %s",
            name,
            tower,
            exc,
        )
        return None
    logger.info(
        "model %s: %s tower on ONNX Runtime (%s), %d threads (CPUs: %s); start-up check "
        "against torch: max abs difference %.2g",
        name,
        tower,
        reason,
        count,
        cpu_budget().describe(),
        difference,
    )
    release_weights(module)
    return runner


def prepare_device_preprocess(name: str, checkpoint: Checkpoint, requested: str) -> bool:
    """Run on the device thread: whether this model's images are resized on its device.

    ``auto`` does it on a GPU, ``on`` everywhere (the CPU too: tests, benchmarks), ``off``
    never. It serves only after its start-up check finds Pillow's bytes exactly; a filter
    it cannot reproduce exactly, or any difference, keeps Pillow on the CPU.
    """
    device = checkpoint.device
    if requested == "off" or (requested == "auto" and device.type != "cuda"):
        return False
    config = checkpoint.preprocess
    if not device_resize.supports(config):
        logger.warning(
            "model %s: its resampling filter (%d) is not reproduced exactly on a device; "
            "images are resized with Pillow on the CPU",
            name,
            config.resample,
        )
        return False
    try:
        differing = device_resize.self_check(config, device)
    except Exception as exc:  # a device without float64 (MPS), say
        logger.warning(
            "model %s: resizing on %s failed its start-up check (%s); images are resized "
            "on the CPU",
            name,
            device,
            exc,
        )
        return False
    if differing:
        logger.warning(
            "model %s: resizing on %s differed from Pillow in %d bytes of the start-up check "
            "(a Pillow release that resizes differently?); images are resized on the CPU",
            name,
            device,
            differing,
        )
        return False
    logger.info("model %s: images resized and cropped on %s (start-up check: exact)", name, device)
    return True
