"""The job's stages, as Ray Data ``map_batches`` callables: read and prepare, then embed.

1. ``ShardReader`` (CPU actors): one shard number in, its rows out in chunks: the
   manifest shard read, each source's bytes read and, in the default mode, decoded and
   preprocessed to uint8 pixels. A row that cannot be read or decoded keeps the server's
   reason and message and goes on, so it still becomes a row of the output.
2. ``ImageEmbedder`` / ``TextEmbedder`` (model actors, a GPU each where the cluster has
   them): the model loaded once in ``__init__``, then the server's encoders on each batch.
   ``EndpointEmbedder`` (async actors) instead sends the batch to a running server through
   EmbedImageStream (EmbedTextStream), retrying what the fleet refuses for now.

Every batch carries ``shard`` and ``index`` (the row's place in its shard), so the driver
can put each row in its slot whatever order the engine delivers rows in. The reader is an
actor pool rather than tasks so that it keeps its object-store clients and preprocessing
tables between shards, and so Ray never fuses it into the model actors: decoding and the
model scale apart. It imports no torch (encoders.py loads the model's modules only in the
model actors), so a reader starts quickly and holds none of torch's memory.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import AsyncGenerator, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from clipvision.client import AsyncEmbeddingClient, ClipVisionError
from clipvision.client.cli import Security
from clipvision.server.batch.encoders import (
    ImagePreparer,
    ModelOptions,
    PreprocessConfig,
    load_image_model,
    load_text_model,
    normalized_rows,
)
from clipvision.server.batch.manifest import read_manifest_shard
from clipvision.server.batch.sources import SourceReader
from clipvision.server.batch.storage import JobDirectory
from clipvision.server.config.limits import ImageLimits
from clipvision.server.errors import ClipVisionError as ServerError
from clipvision.server.errors import Reason

logger = logging.getLogger(__name__)

Batch = dict[str, np.ndarray[Any, Any]]

# Statuses that say "not now" rather than "never": the rows are sent again, never recorded.
_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


@functools.lru_cache(maxsize=4)
def _job_directory(uri: str) -> JobDirectory:
    return JobDirectory(uri)


@dataclass(frozen=True)
class ReaderOptions:
    """What the reader stage needs: where the job is, what it reads and how to prepare it."""

    job: str
    kind: str
    roots: tuple[str, ...]
    limits: ImageLimits
    preprocess: PreprocessConfig | None
    """Decode and preprocess to pixels (the default mode); None: pass bytes on (--endpoint)."""
    chunk_rows: int


class ShardReader:
    """Reads one shard's inputs and prepares them; one shard number per call."""

    def __init__(self, options: ReaderOptions) -> None:
        self._options = options
        self._reader = SourceReader(options.roots, options.limits)
        self._preparer = (
            ImagePreparer(options.preprocess, options.limits)
            if options.preprocess is not None
            else None
        )

    def __call__(self, batch: Batch) -> Iterator[Batch]:
        directory = _job_directory(self._options.job)
        for shard in batch["shard"].tolist():
            ids, sources = read_manifest_shard(directory, int(shard))
            step = self._options.chunk_rows
            for start in range(0, len(ids), step):
                yield self._chunk(
                    int(shard), start, ids[start : start + step], sources[start : start + step]
                )

    def _chunk(self, shard: int, start: int, ids: list[str], sources: list[str]) -> Batch:
        count = len(ids)
        reasons = np.full(count, "", dtype=object)
        messages = np.full(count, "", dtype=object)
        out: Batch = {
            "shard": np.full(count, shard, dtype=np.int64),
            "index": np.arange(start, start + count, dtype=np.int64),
            "id": np.array(ids, dtype=object),
            "source": np.array(sources, dtype=object),
            "reason": reasons,
            "message": messages,
        }
        if self._options.kind == "text":
            return out
        preparer = self._preparer
        if preparer is None:
            out["content"] = np.full(count, b"", dtype=object)
        else:
            out["pixels"] = np.zeros((count, *preparer.shape), dtype=np.uint8)
        for row in range(count):
            try:
                data = self._reader.read(sources[row])
                if preparer is None:
                    out["content"][row] = data
                else:
                    out["pixels"][row] = preparer.pixels(data)
            except ServerError as error:
                reasons[row], messages[row] = error.reason.value, error.message
            except Exception:
                # As on the server: an unexpected fault is this item's INTERNAL error, with
                # the traceback in the worker's log, and the job goes on.
                logger.exception("preparing %s failed", sources[row])
                reasons[row] = Reason.INTERNAL.value
                messages[row] = "Preparing this image failed unexpectedly; the worker log says why."
        return out


def _result(
    batch: Batch, embeddings: np.ndarray[Any, Any], truncated: np.ndarray[Any, Any]
) -> Batch:
    """The model stage's output: the row's place, its outcome, no pixels or bytes."""
    return {
        "shard": batch["shard"],
        "index": batch["index"],
        "id": batch["id"],
        "source": batch["source"],
        "reason": batch["reason"],
        "message": batch["message"],
        "embedding": embeddings,
        "truncated": truncated,
    }


class ImageEmbedder:
    """A model actor: the checkpoint loaded once, then batches of pixels embedded."""

    def __init__(self, options: ModelOptions, limits: ImageLimits, normalize: bool) -> None:
        self._encoder = load_image_model(options, limits)
        self._normalize = normalize
        self._dim = self._encoder.checkpoint.embedding_dim

    def __call__(self, batch: Batch) -> Batch:
        count = len(batch["index"])
        embeddings = np.zeros((count, self._dim), dtype=np.float32)
        ready = np.flatnonzero(batch["reason"] == "")
        if len(ready):
            pixels = batch["pixels"]
            features = self._encoder.embed_batch([pixels[row] for row in ready])
            embeddings[ready] = normalized_rows(features, self._normalize)
        return _result(batch, embeddings, np.zeros(count, dtype=bool))


class TextEmbedder:
    """A model actor for texts: the text tower loaded once; check, tokenize, embed."""

    def __init__(self, options: ModelOptions, normalize: bool) -> None:
        self._model = load_text_model(options)
        self._normalize = normalize

    def __call__(self, batch: Batch) -> Batch:
        encoder = self._model.encoder
        count = len(batch["index"])
        reasons, messages = batch["reason"].copy(), batch["message"].copy()
        embeddings = np.zeros((count, self._model.embedding_dim), dtype=np.float32)
        truncated = np.zeros(count, dtype=bool)
        ready, ids = [], []
        for row, text in enumerate(batch["source"].tolist()):
            try:
                encoder.check(text)
                tokenized = encoder.tokenize(text, truncate=True)
            except ServerError as error:
                reasons[row], messages[row] = error.reason.value, error.message
                continue
            ready.append(row)
            ids.append(tokenized.ids)
            truncated[row] = tokenized.truncated
        if ready:
            features = encoder.embed_batch(ids)
            embeddings[ready] = normalized_rows(features, self._normalize)
        batch = {**batch, "reason": reasons, "message": messages}
        return _result(batch, embeddings, truncated)


@dataclass(frozen=True)
class EndpointOptions:
    """How endpoint actors call the fleet."""

    address: str
    security: Security
    """TLS and token of its calls."""
    model: str
    dim: int
    kind: str
    normalize: bool
    window: int
    """Items in flight on one stream; each actor runs at most ``streams`` streams."""
    streams: int
    timeout_s: float
    """The deadline of one batch's stream."""
    max_attempts: int
    """Tries of a batch's refused items before the job stops (a rerun resumes it)."""


class EndpointUnavailableError(RuntimeError):
    """The fleet kept refusing or stayed unreachable; the job stops, a rerun resumes it."""


class EndpointEmbedder:
    """An async actor that embeds through a running clipvision server (or fleet)."""

    def __init__(self, options: EndpointOptions) -> None:
        self._options = options
        self._client: AsyncEmbeddingClient | None = None
        self._streams: asyncio.Semaphore | None = None

    async def __call__(self, batch: Batch) -> Batch:
        options = self._options
        if self._client is None:
            # Created on the actor's event loop, as the async client must be.
            self._client = AsyncEmbeddingClient(
                options.address,
                **options.security,
                stream_window=options.window,
                timeout=options.timeout_s,
            )
            self._streams = asyncio.Semaphore(options.streams)
        assert self._streams is not None
        count = len(batch["index"])
        out = _Outcomes(
            batch["reason"].copy(),
            batch["message"].copy(),
            np.zeros((count, options.dim), dtype=np.float32),
            np.zeros(count, dtype=bool),
        )
        todo = [row for row in range(count) if not out.reasons[row]]
        inputs = batch["content"] if options.kind == "image" else batch["source"]
        attempt = 0
        async with self._streams:
            while todo:
                todo, delay, why = await self._send(inputs, todo, out, attempt)
                if not todo:
                    break
                attempt += 1
                if attempt >= options.max_attempts:
                    raise EndpointUnavailableError(
                        f"{options.address} refused or dropped {len(todo)} items "
                        f"{attempt} times in a row (last: {why}); rerun to resume"
                    )
                logger.info("retrying %d items in %.1f s: %s", len(todo), delay, why)
                await asyncio.sleep(delay)
        batch = {**batch, "reason": out.reasons, "message": out.messages}
        return _result(batch, out.embeddings, out.truncated)

    async def _send(
        self, inputs: np.ndarray[Any, Any], todo: list[int], out: _Outcomes, attempt: int
    ) -> tuple[list[int], float, str]:
        """One stream over the rows in ``todo``; returns the rows to send again, when, why."""
        assert self._client is not None
        options = self._options
        retry: list[int] = []
        delay, why = 0.0, ""
        answered = 0
        try:
            async with aclosing(self._results([inputs[row] for row in todo])) as results:
                async for result in results:
                    row = todo[answered]
                    answered += 1
                    if isinstance(result, ClipVisionError):
                        if result.code in _TRANSIENT:
                            retry.append(row)
                            delay = max(delay, _delay(result, attempt))
                            why = str(result)
                        else:
                            out.reasons[row], out.messages[row] = result.reason, result.message
                    else:
                        vector, truncated = result
                        if vector.shape != (options.dim,):
                            raise EndpointUnavailableError(
                                f"{options.address} answered a {vector.shape} vector for a "
                                f"{options.dim}-d model; is it serving another model now?"
                            )
                        out.embeddings[row] = vector
                        out.truncated[row] = truncated
        except ClipVisionError as error:
            if error.code not in _TRANSIENT:
                raise
            retry.extend(todo[answered:])
            delay, why = max(delay, _delay(error, attempt)), str(error)
        return retry, delay, why

    async def _results(
        self, items: list[Any]
    ) -> AsyncGenerator[tuple[np.ndarray[Any, Any], bool] | ClipVisionError, None]:
        assert self._client is not None
        options = self._options
        if options.kind == "image":
            images = self._client.embed_images(
                items, model=options.model, normalize=options.normalize, return_exceptions=True
            )
            async with aclosing(images) as results:
                async for result in results:
                    yield result if isinstance(result, ClipVisionError) else (result, False)
        else:
            texts = self._client.embed_text_stream(
                items, model=options.model, normalize=options.normalize, return_exceptions=True
            )
            async with aclosing(texts) as results:
                async for text in results:
                    yield (
                        text if isinstance(text, ClipVisionError) else (text.vector, text.truncated)
                    )


@dataclass(frozen=True)
class _Outcomes:
    reasons: np.ndarray[Any, Any]
    messages: np.ndarray[Any, Any]
    embeddings: np.ndarray[Any, Any]
    truncated: np.ndarray[Any, Any]


def _delay(error: ClipVisionError, attempt: int) -> float:
    """The server's RetryInfo delay when it sent one, else a jittered backoff."""
    if error.retry_after_s is not None and error.retry_after_s > 0:
        return error.retry_after_s
    backoff = min(10.0, 0.25 * 2.0 ** min(attempt, 6))
    return backoff * (0.5 + random.random() / 2)  # noqa: S311 (jitter, not a secret)
