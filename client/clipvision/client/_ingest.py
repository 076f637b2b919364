"""One ``clipvision embed`` run: stream the files the output lacks, commit results in chunks."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from tqdm import tqdm

from clipvision.client._client import EmbeddingClient
from clipvision.client._errors import ClipVisionError, ImageReadError
from clipvision.client._messages import Result
from clipvision.client._store import EmbeddingStore


@dataclass
class IngestReport:
    """What a run did, for the summary at its end."""

    skipped: int = 0
    """Files the output already held when the run started."""
    embedded: int = 0
    failed: list[tuple[str, ClipVisionError]] = field(default_factory=list)
    """Files that cannot be embedded (bad images); recorded in the index, not retried."""
    not_done: list[tuple[str, ClipVisionError]] = field(default_factory=list)
    """Files that failed for a passing reason (unreadable, server busy); a rerun retries them."""
    stream_error: ClipVisionError | None = None
    interrupted: bool = False


def is_permanent(error: ClipVisionError) -> bool:
    """Whether a file's failure is its own fault, so that retrying it would fail the same way."""
    return error.code is grpc.StatusCode.INVALID_ARGUMENT and not isinstance(error, ImageReadError)


def ingest(
    client: EmbeddingClient,
    store: EmbeddingStore,
    paths: Sequence[str],
    *,
    model: str | None,
    normalize: bool | None,
    commit_every: int,
    commit_interval_s: float = 2.0,
    progress: bool | None = None,
    stop: threading.Event | None = None,
) -> IngestReport:
    """Embed the ``paths`` the store does not hold yet, in order, and append them to it.

    Results are committed every ``commit_every`` files or ``commit_interval_s``
    seconds, whichever comes first, and when the run ends for any reason: a
    failed stream or a set ``stop`` event (a signal) keeps what was received.
    """
    report = IngestReport()
    todo = [path for path in paths if path not in store.entries]
    report.skipped = len(paths) - len(todo)
    chunk: list[tuple[str, Result]] = []
    last_commit = time.monotonic()
    bar = tqdm(total=len(todo), unit="img", disable=None if progress is None else not progress)
    results = client.embed_images(todo, model=model, normalize=normalize, return_exceptions=True)
    try:
        for path, result in zip(todo, results, strict=False):
            if isinstance(result, ClipVisionError) and not is_permanent(result):
                report.not_done.append((path, result))
            else:
                chunk.append((path, result))
                if isinstance(result, ClipVisionError):
                    report.failed.append((path, result))
                else:
                    report.embedded += 1
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
