"""One ``clipvision embed`` run: stream the inputs the output lacks, commit results in chunks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import grpc
from tqdm import tqdm

from clipvision.client._errors import ClipVisionError, ImageReadError
from clipvision.client._messages import FloatArray, TextEmbedding
from clipvision.client._store import EmbeddingStore

Outcome = FloatArray | TextEmbedding | ClipVisionError
"""One input's result: an image's vector, a text's embedding, or why it has none."""

Embed = Callable[[list[str]], Generator[Outcome, None, None]]
"""Streams the inputs given (paths or texts), yielding one outcome each, in order."""


@dataclass
class IngestReport:
    """What a run did, for the summary at its end."""

    skipped: int = 0
    """Inputs the output already held when the run started."""
    embedded: int = 0
    truncated: int = 0
    """Texts embedded after being cut to the model's context."""
    failed: list[tuple[str, ClipVisionError]] = field(default_factory=list)
    """Inputs that cannot be embedded (bad images or texts); recorded in the index, not retried."""
    not_done: list[tuple[str, ClipVisionError]] = field(default_factory=list)
    """Inputs that failed for a passing reason (unreadable, server busy); a rerun retries them."""
    stream_error: ClipVisionError | None = None
    interrupted: bool = False


def is_permanent(error: ClipVisionError) -> bool:
    """Whether an input's failure is its own fault, so that retrying it would fail the same way."""
    return error.code is grpc.StatusCode.INVALID_ARGUMENT and not isinstance(error, ImageReadError)


def ingest(
    embed: Embed,
    store: EmbeddingStore,
    keys: Sequence[str],
    *,
    commit_every: int,
    commit_interval_s: float = 2.0,
    progress: bool | None = None,
    unit: str = "img",
    stop: threading.Event | None = None,
) -> IngestReport:
    """Embed the ``keys`` (paths or texts) the store does not hold yet, in order, and append
    them to it.

    ``embed`` streams them (``EmbeddingClient.embed_images`` or
    ``embed_text_stream`` with ``return_exceptions=True``). Results are
    committed every ``commit_every`` inputs or ``commit_interval_s`` seconds,
    whichever comes first, and when the run ends for any reason: a failed
    stream or a set ``stop`` event (a signal) keeps what was received.
    """
    report = IngestReport()
    todo = [key for key in keys if key not in store.entries]
    report.skipped = len(keys) - len(todo)
    chunk: list[tuple[str, Outcome]] = []
    last_commit = time.monotonic()
    bar = tqdm(total=len(todo), unit=unit, disable=None if progress is None else not progress)
    results = embed(todo)
    try:
        for key, result in zip(todo, results, strict=False):
            if isinstance(result, ClipVisionError) and not is_permanent(result):
                report.not_done.append((key, result))
            else:
                chunk.append((key, result))
                if isinstance(result, ClipVisionError):
                    report.failed.append((key, result))
                else:
                    report.embedded += 1
                    report.truncated += isinstance(result, TextEmbedding) and result.truncated
            bar.update(1)
            if len(chunk) >= commit_every or time.monotonic() - last_commit >= commit_interval_s:
                # Emptied first: a chunk whose write was interrupted must not be written again.
                ready, chunk = chunk, []
                store.append(ready)
                last_commit = time.monotonic()
            if stop is not None and stop.is_set():
                report.interrupted = True
                break
    except ClipVisionError as error:
        report.stream_error = error
    finally:
        results.close()  # ends the call if the loop stopped early
        store.append(chunk)
        bar.close()
    return report
