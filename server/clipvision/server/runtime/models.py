"""The served models: loaded once (at start or on first use) and looked up by name."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

import torch

from clipvision.server.config.settings import ModelSpec, Settings
from clipvision.server.errors import (
    CheckpointError,
    ModalityNotServedError,
    ModelNotFoundError,
    Reason,
    ServiceUnavailableError,
)
from clipvision.server.resources.admission import BudgetObserver, MemoryBudget
from clipvision.server.resources.allocator import release_free_memory
from clipvision.server.resources.memory import default_budget, default_limit, resident_bytes
from clipvision.server.runtime.backends import (
    prepare_device_preprocess,
    prepare_image_runner,
    prepare_text_runner,
)
from clipvision.server.runtime.batcher import BatchObserver, MicroBatcher
from clipvision.server.runtime.checkpoint import (
    Checkpoint,
    load_checkpoint,
    resolve_device,
    resolve_dtype,
)
from clipvision.server.runtime.gpu_decode import GpuJpegDecoder
from clipvision.server.runtime.image_encoder import ClipImageEncoder, ImagePayload
from clipvision.server.runtime.label_cache import LabelCache
from clipvision.server.runtime.preprocess import PreprocessConfig, largest_image_cost
from clipvision.server.runtime.text_encoder import ClipTextEncoder, IdArray

logger = logging.getLogger(__name__)


class ModelObserver(BatchObserver, BudgetObserver, Protocol):
    """Receives what the registry and its batchers do, for metrics."""

    def on_model_loaded(self, model: str, seconds: float) -> None:
        """A model finished loading and warming up in ``seconds``."""


@dataclass(frozen=True)
class TextModel:
    """A loaded text tower, the batcher in front of it and its cache of label vectors."""

    encoder: ClipTextEncoder
    batcher: MicroBatcher[IdArray]
    labels: LabelCache


@dataclass(frozen=True)
class ServedModel:
    """A loaded model: its image tower and batcher, and its text tower where it has one."""

    encoder: ClipImageEncoder
    batcher: MicroBatcher[ImagePayload]
    text: TextModel | None = None
    text_missing: str = ""
    """Why there is no text tower, for the FAILED_PRECONDITION message."""

    @property
    def name(self) -> str:
        """The name requests use to select this model."""
        return self.encoder.name

    def batchers(self) -> list[MicroBatcher[ImagePayload] | MicroBatcher[IdArray]]:
        """Every batcher of this model: the image one, and the text one if any."""
        if self.text is None:
            return [self.batcher]
        return [self.batcher, self.text.batcher]

    def text_tower(self) -> TextModel:
        """The text tower, or ModalityNotServedError naming what is missing."""
        if self.text is None:
            raise ModalityNotServedError(
                Reason.MODALITY_NOT_SERVED,
                f"Model {self.name!r} is served without a text tower ({self.text_missing}); "
                "serve a full checkpoint (both towers) with its tokenizer for texts and Classify.",
            )
        return self.text


class _Slot:
    """One ``--model`` entry and its load state."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.model: ServedModel | None = None
        self.loading: asyncio.Task[ServedModel] | None = None
        self.error: CheckpointError | None = None


class ModelRegistry:
    """Holds every served model; each is loaded exactly once however many requests wait for it."""

    def __init__(
        self,
        settings: Settings,
        device_executor: Executor,
        observer: ModelObserver | None = None,
    ) -> None:
        self._settings = settings
        self._executor = device_executor
        self._observer = observer
        self._slots = {spec.name: _Slot(spec) for spec in settings.models}
        self._drained = asyncio.Event()
        self.memory_limit = settings.memory_limit or default_limit()
        # The largest image accepted, in pixels: --max-image-pixels, or less where the memory
        # budget cannot hold even the cheapest image that large (_fit_pixel_limit).
        self.pixel_limit = settings.image_limits.max_image_pixels
        # One budget for every model: they share the process's memory.
        self.budget = MemoryBudget(
            self._budget_bytes(), observer, largest_read=settings.message_limit
        )

    @property
    def specs(self) -> list[ModelSpec]:
        """The configured models, default first."""
        return [slot.spec for slot in self._slots.values()]

    def served(self) -> list[ServedModel]:
        """The models loaded so far."""
        return [slot.model for slot in self._slots.values() if slot.model is not None]

    def loaded(self, name: str) -> ServedModel | None:
        """The model called ``name`` if it is loaded, else None."""
        return self._slots[name].model

    async def load_all(self) -> None:
        """Load and warm every model; raises CheckpointError for the first that cannot load."""
        for slot in self._slots.values():
            await self._load(slot)

    def drain(self) -> None:
        """Refuse new work from now on: requests get UNAVAILABLE (SERVER_DRAINING)."""
        self._drained.set()

    @property
    def dummy_weights(self) -> bool:
        """Whether the models are built with random weights (--dummy-weights)."""
        return self._settings.dummy_weights

    @property
    def draining(self) -> bool:
        """Whether the server has started to drain."""
        return self._drained.is_set()

    async def wait_draining(self) -> None:
        """Return once the server starts to drain."""
        await self._drained.wait()

    def busy_batches(self) -> list[tuple[str, float]]:
        """Each batch on the device now: its model and modality, and when it began (monotonic)."""
        return [
            (f"{model.name} ({batcher.modality}s)", batcher.busy_since)
            for model in self.served()
            for batcher in model.batchers()
            if batcher.busy_since is not None
        ]

    def queue_depths(self) -> list[tuple[str, str, int]]:
        """Items admitted and not yet answered, per loaded model and modality."""
        return [
            (model.name, batcher.modality, batcher.capacity.used)
            for model in self.served()
            for batcher in model.batchers()
        ]

    def devices(self) -> list[torch.device]:
        """The devices of the models loaded so far."""
        return [model.encoder.checkpoint.device for model in self.served()]

    def ready(self, name: str) -> ServedModel | None:
        """The model called ``name`` (empty: the default) when it is loaded and the server
        is not draining, without waiting; None otherwise (``get`` then says why, or loads it)."""
        if self._drained.is_set():
            return None
        slot = self._slots.get(name or self._settings.default_model)
        return None if slot is None else slot.model

    async def get(self, name: str) -> ServedModel:
        """Find a model by name (empty means the default), loading it first in lazy mode."""
        if self.draining:
            raise ServiceUnavailableError(
                Reason.SERVER_DRAINING,
                "The server is shutting down; retry on another replica.",
            )
        slot = self._slots.get(name or self._settings.default_model)
        if slot is None:
            raise ModelNotFoundError(
                Reason.MODEL_NOT_FOUND,
                f"Model {name!r} is not served here; GetModelInfo lists the served models "
                f"({', '.join(self._slots)}).",
            )
        if slot.model is not None:
            return slot.model
        if self._settings.lazy_load:
            try:
                return await self._load(slot)
            except CheckpointError as exc:
                raise ServiceUnavailableError(
                    Reason.MODEL_LOAD_FAILED,
                    f"Model {slot.spec.name!r} could not be loaded; the server log says why.",
                ) from exc
        if slot.error is not None:
            raise ServiceUnavailableError(
                Reason.MODEL_LOAD_FAILED,
                f"Model {slot.spec.name!r} could not be loaded; the server log says why.",
            )
        raise ServiceUnavailableError(
            Reason.MODEL_LOADING,
            f"Model {slot.spec.name!r} is still loading; retry in a few seconds.",
        )

    async def _load(self, slot: _Slot) -> ServedModel:
        if slot.model is not None:
            return slot.model
        # Every concurrent caller awaits the same task, so the load happens once.
        if slot.loading is None:
            slot.loading = asyncio.get_running_loop().create_task(self._load_once(slot))
        try:
            return await asyncio.shield(slot.loading)
        except CheckpointError as exc:
            slot.error = exc
            slot.loading = None  # a later request may try again (lazy mode)
            raise

    async def _load_once(self, slot: _Slot) -> ServedModel:
        settings = self._settings
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        logger.info("loading model %s from %s", slot.spec.name, slot.spec.source)
        checkpoint: Checkpoint = await loop.run_in_executor(
            self._executor, self._load_checkpoint, slot.spec
        )
        # On the device thread: it sets that thread's torch threads, and exports and checks
        # ONNX Runtime's graph where that backend is chosen (None: torch serves).
        runner = await loop.run_in_executor(
            self._executor,
            functools.partial(
                prepare_image_runner,
                slot.spec.name,
                checkpoint,
                backend=settings.backend,
                threads=settings.threads,
                cache_dir=settings.onnx_cache_dir,
            ),
        )
        on_device = await loop.run_in_executor(
            self._executor,
            prepare_device_preprocess,
            slot.spec.name,
            checkpoint,
            settings.device_preprocess,
        )
        encoder = ClipImageEncoder(
            slot.spec.name,
            slot.spec.source,
            checkpoint,
            settings.image_limits,
            runner,
            device_preprocess=on_device,
            gpu_decoder=self._gpu_decoder(slot.spec.name, checkpoint, on_device),
        )
        await loop.run_in_executor(self._executor, encoder.warm_up, (1, settings.max_batch_size))
        batcher = MicroBatcher(
            slot.spec.name,
            encoder.embed_batch,
            self._executor,
            max_batch_size=settings.max_batch_size,
            max_batch_delay_s=settings.max_batch_delay_ms / 1000,
            max_queue_size=settings.max_queue_size,
            observer=self._observer,
            admission_observer=self._observer,
        )
        text = await self._text_model(slot.spec, checkpoint)
        batcher.start()
        if text is not None:
            text.batcher.start()
        slot.model = ServedModel(encoder, batcher, text, checkpoint.text_missing)
        slot.error = None
        if self._settings.memory_budget is None:
            # What is resident now includes the model, and not the export's or the freed
            # torch weights' peak.
            await loop.run_in_executor(self._executor, release_free_memory)
            self.budget.resize(self._budget_bytes())
        self._fit_pixel_limit()
        seconds = time.perf_counter() - started
        if self._observer is not None:
            self._observer.on_model_loaded(slot.spec.name, seconds)
        logger.info(
            "model %s ready in %.1f s: %s, %s, %d-d, %s on %s%s",
            slot.spec.name,
            seconds,
            checkpoint.family.name,
            "images and texts" if text is not None else "images",
            checkpoint.embedding_dim,
            str(checkpoint.dtype).removeprefix("torch."),
            checkpoint.device,
            " (DUMMY RANDOM WEIGHTS: embeddings mean nothing)" if checkpoint.dummy_weights else "",
        )
        return slot.model

    async def _text_model(self, spec: ModelSpec, checkpoint: Checkpoint) -> TextModel | None:
        """The text tower's encoder and batcher, warmed up; None without a text tower."""
        settings = self._settings
        if checkpoint.text is None:
            logger.info("model %s serves images only: %s", spec.name, checkpoint.text_missing)
            return None
        loop = asyncio.get_running_loop()
        runner = await loop.run_in_executor(
            self._executor,
            functools.partial(
                prepare_text_runner,
                spec.name,
                checkpoint,
                backend=settings.backend,
                threads=settings.threads,
                cache_dir=settings.onnx_cache_dir,
            ),
        )
        encoder = ClipTextEncoder(
            spec.name, checkpoint.text, checkpoint.device, settings.max_text_bytes, runner
        )
        await loop.run_in_executor(self._executor, encoder.warm_up, (1, settings.max_batch_size))
        batcher: MicroBatcher[IdArray] = MicroBatcher(
            spec.name,
            encoder.embed_batch,
            self._executor,
            modality="text",
            max_batch_size=settings.max_batch_size,
            max_batch_delay_s=settings.max_batch_delay_ms / 1000,
            # Texts are small: room for a full EmbedTexts or Classify call at least.
            max_queue_size=max(
                settings.max_queue_size, settings.max_batch_texts, settings.max_classify_labels
            ),
            observer=self._observer,
            admission_observer=self._observer,
        )
        return TextModel(encoder, batcher, LabelCache(settings.label_cache_size))

    def _gpu_decoder(
        self, name: str, checkpoint: Checkpoint, on_device: bool
    ) -> GpuJpegDecoder | None:
        """nvJPEG for --gpu-decode; CheckpointError (the server does not start) where it
        cannot be: no CUDA, no torchvision, or images not resized on the device."""
        if not self._settings.gpu_decode:
            return None
        decoder = GpuJpegDecoder(checkpoint.device)
        if not on_device:
            raise CheckpointError(
                f"--gpu-decode needs model {name}'s images resized on its device, which "
                "--device-preprocess off, its resampling filter, or the start-up check "
                "prevents (the log says which); drop --gpu-decode"
            )
        logger.info(
            "model %s: JPEGs decoded on %s with nvJPEG (not bit-exact)", name, decoder.device
        )
        return decoder

    def _fit_pixel_limit(self) -> None:
        """Check that the largest legal image fits what the budget admits for one image; if
        even the cheapest kind does not, lower every model's pixel limit to what fits, so
        that larger images are refused from their header (IMAGE_TOO_MANY_PIXELS, the limit
        in the message) instead of waiting for room that never comes. One line says so."""
        limits = self._settings.image_limits
        configured = limits.max_image_pixels
        admits = self.budget.pool.limit
        fits = {}
        for kind in ("cheapest", "dearest"):
            # Pixels alone (a small file): a large file as well is priced per image, and one
            # over the budget is refused then (IMAGE_OVER_MEMORY_BUDGET).
            fits[kind] = min(
                _largest_fitting(configured, admits, model.encoder.checkpoint.preprocess, kind, 0)
                for model in self.served()
            )
        limit = min(configured, fits["cheapest"])
        if fits["dearest"] < configured:
            logger.warning(
                "the memory budget admits %d MiB for one image: up to %d pixels of an opaque "
                "JPEG, %d of a transparent WebP, under --max-image-pixels %d; larger images are "
                "refused%s (raise --memory-limit or --memory-budget to accept them)",
                admits >> 20,
                fits["cheapest"],
                fits["dearest"],
                configured,
                f", beyond {limit} pixels from their header" if limit < configured else "",
            )
        self.pixel_limit = limit
        for model in self.served():
            model.encoder.limits = dataclasses.replace(model.encoder.limits, max_image_pixels=limit)

    def _budget_bytes(self) -> int:
        """The configured budget, or the default for the memory limit and what is resident."""
        if self._settings.memory_budget is not None:
            return self._settings.memory_budget
        budget = default_budget(self.memory_limit, resident_bytes())
        logger.info("memory budget %d MiB (limit %d MiB)", budget >> 20, self.memory_limit >> 20)
        return budget

    def _load_checkpoint(self, spec: ModelSpec) -> Checkpoint:
        settings = self._settings
        device = resolve_device(settings.device)
        return load_checkpoint(
            spec,
            device=device,
            dtype=resolve_dtype(settings.dtype, device),
            dummy_weights=settings.dummy_weights,
            cache_dir=settings.cache_dir,
        )

    async def close(self) -> None:
        """Stop every batcher and any load still running."""
        for slot in self._slots.values():
            if slot.loading is not None and not slot.loading.done():
                slot.loading.cancel()
            if slot.model is not None:
                await slot.model.batcher.stop()
                if slot.model.text is not None:
                    await slot.model.text.batcher.stop()


def _largest_fitting(
    configured: int, admits: int, config: PreprocessConfig, kind: str, encoded_bytes: int
) -> int:
    """The most pixels (up to ``configured``) an image of ``kind`` may have to fit ``admits``."""
    if largest_image_cost(configured, config, kind, encoded_bytes) <= admits:
        return configured
    low, high = 0, configured  # low fits (or is 0), high does not
    while high - low > 1:
        middle = (low + high) // 2
        if largest_image_cost(middle, config, kind, encoded_bytes) <= admits:
            low = middle
        else:
            high = middle
    return low
