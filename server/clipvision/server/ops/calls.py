"""What the server knows about the call it is answering: its request id and where its time went.

The interceptor opens a :class:`CallRecord` for each EmbeddingService call and
puts it in a context variable; handlers add each image's stage timings to it
with :func:`record_image`, and the interceptor turns it into trailing metadata
and the failed-call log line. Tasks that a handler spawns (EmbedImages' gather,
stream items) copy the context, so they add to the same record.
"""

from __future__ import annotations

import contextvars
import logging
import random
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

REQUEST_ID_KEY = "x-request-id"
QUEUE_MS_KEY = "clipvision-queue-ms"
PREPROCESS_MS_KEY = "clipvision-preprocess-ms"
INFERENCE_MS_KEY = "clipvision-inference-ms"
IMAGES_KEY = "clipvision-images"

# A caller's id is echoed into logs and metadata: printable, short, no spaces.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


@dataclass(frozen=True)
class StageTimes:
    """Seconds one image spent in each stage of the server."""

    preprocess_s: float
    queue_s: float
    inference_s: float


@dataclass
class CallRecord:
    """One call's request id and the stage timings of the images it embedded.

    In trailing metadata, preprocessing is the sum over the call's images (CPU
    time spent on them), queue wait and inference the maximum (the images of one
    call wait and run side by side, so a sum would overstate what the caller waited).
    """

    method: str
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    images: int = 0
    preprocess_s: float = 0.0
    queue_s: float = 0.0
    inference_s: float = 0.0

    def add(self, times: StageTimes) -> None:
        """Count one embedded image of this call."""
        self.images += 1
        self.preprocess_s += times.preprocess_s
        self.queue_s = max(self.queue_s, times.queue_s)
        self.inference_s = max(self.inference_s, times.inference_s)

    @property
    def elapsed_s(self) -> float:
        """Seconds since the call reached the interceptor."""
        return time.perf_counter() - self.started

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """The request id, and the timings when the call embedded any image."""
        metadata: list[tuple[str, str]] = [(REQUEST_ID_KEY, self.request_id)]
        if self.images:
            metadata += [
                (IMAGES_KEY, str(self.images)),
                (QUEUE_MS_KEY, f"{self.queue_s * 1000:.3f}"),
                (PREPROCESS_MS_KEY, f"{self.preprocess_s * 1000:.3f}"),
                (INFERENCE_MS_KEY, f"{self.inference_s * 1000:.3f}"),
            ]
        return tuple(metadata)


_current: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar(
    "clipvision_call", default=None
)


# Seeded from os.urandom once, at import; request ids correlate logs, they guard nothing.
_request_ids = random.Random()  # noqa: S311


def request_id_from(metadata: Iterable[tuple[str, object]] | None) -> str:
    """The caller's ``x-request-id`` when it is a sane token, else a new random one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    # 128 random bits from a generator that stays under the GIL: uuid4 reads os.urandom,
    # a system call that lets go of the GIL on the event loop once per call.
    return f"{_request_ids.getrandbits(128):032x}"


def open_call(method: str, request_id: str) -> CallRecord:
    """Start the record of a call in the current context.

    grpc.aio runs each call in a task of its own, whose context dies with it, so
    the record is never reset (an async generator's cleanup may run in another
    context, where a reset would fail).
    """
    record = CallRecord(method, request_id)
    _current.set(record)
    return record


def record_image(times: StageTimes) -> None:
    """Add one image's timings to the current call, if there is one."""
    record = _current.get()
    if record is not None:
        record.add(times)


def current_call() -> CallRecord | None:
    """The record of the call being answered in this context, if any.

    Work that finishes in callbacks (an item's stages) runs outside the call's
    context: it keeps the record it was started with and adds to it directly.
    """
    return _current.get()


class HeldBytes(Protocol):
    """Memory budget held for a message (resources.admission.ReadHold)."""

    @property
    def amount(self) -> int:
        """Bytes held now."""

    def release_part(self, amount: int) -> None:
        """Give back up to ``amount`` bytes."""

    def release(self) -> None:
        """Give back everything still held."""


@dataclass
class GateMark:
    """The call gate's mark on the current call.

    ``ended_by_gate`` is set when the gate itself ends the call: the gate counts and
    logs it as refused, so the books of the service's interceptor must not count it a
    second time as cancelled. ``read_hold`` is the memory budget the message just read
    holds, until the handler takes it over (``take_read_hold``) or the gate gives it
    back (at the next read, or when the call ends).
    """

    ended_by_gate: bool = False
    read_hold: HeldBytes | None = None


_gate_mark: contextvars.ContextVar[GateMark | None] = contextvars.ContextVar(
    "clipvision_gate_mark", default=None
)


def open_gate_mark() -> GateMark:
    """Start the gate's mark of a call in the current context."""
    mark = GateMark()
    _gate_mark.set(mark)
    return mark


def ended_by_gate() -> bool:
    """Whether the call gate ended the current call."""
    mark = _gate_mark.get()
    return mark is not None and mark.ended_by_gate


def take_read_hold() -> HeldBytes | None:
    """Take over the budget held for the message the current call just read: its items give
    it back as they are admitted (their admission counts those bytes). None outside a call
    the gate read (tests calling a servicer directly)."""
    mark = _gate_mark.get()
    if mark is None:
        return None
    hold, mark.read_hold = mark.read_hold, None
    return hold


# Failures the caller caused are routine (INFO); capacity and availability are the
# operator's concern (WARNING); INTERNAL is a bug, logged with its traceback.
CALLER_FAULTS = frozenset(
    {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "CANCELLED",
        "DEADLINE_EXCEEDED",
        "FAILED_PRECONDITION",
        "UNIMPLEMENTED",
    }
)


def log_failed_call(
    log: logging.Logger,
    record: CallRecord,
    method: str,
    code: str,
    reason: str,
    exc: BaseException | None = None,
    protocol: str | None = None,
) -> None:
    """The one line a failed call leaves, gRPC's or (``protocol="http"``) HTTP's: its
    level from who is at fault, its request id and duration, and the same as fields."""
    if exc is not None:
        level = logging.ERROR
    elif code in CALLER_FAULTS:
        level = logging.INFO
    else:
        level = logging.WARNING
    duration_ms = record.elapsed_s * 1000
    fields = {
        "method": method,
        "code": code,
        "reason": reason,
        "request_id": record.request_id,
        "duration_ms": round(duration_ms, 3),
    }
    if protocol is not None:
        fields["protocol"] = protocol
    log.log(
        level,
        "%s%s failed: %s %s after %.1f ms (request id %s)",
        f"{protocol.upper()} " if protocol is not None else "",
        method,
        code,
        reason or "-",
        duration_ms,
        record.request_id,
        exc_info=exc,
        extra=fields,
    )
