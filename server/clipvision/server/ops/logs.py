"""Log output for people (text) or for log collectors (one JSON object per line).

Only the entry point calls :func:`configure_logging`; modules log through
``logging.getLogger(__name__)`` and put structured fields in ``extra=``,
which the JSON form carries as keys of their own.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the ``extra`` fields,
    and the traceback (as one string) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a single line of JSON."""
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


class RateLimitedLog:
    """At most ``burst`` lines per key in each ``interval_s``; the rest are counted, not written.

    What a client can trigger at will (refused or malformed calls) must not let it
    fill the log: the first lines of a burst are written, the next line after the
    interval says how many similar ones were suppressed.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, burst: int = 5) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._burst = burst
        # key -> (window start, lines written in it, lines suppressed since the last written)
        self._windows: dict[str, tuple[float, int, int]] = {}

    def log(self, level: int, key: str, message: str, *args: object, **kwargs: Any) -> bool:
        """Log ``message % args`` unless ``key`` is over its rate; True if it was written."""
        now = time.monotonic()
        start, written, suppressed = self._windows.get(key, (now, 0, 0))
        if now - start >= self._interval_s:
            start, written = now, 0
        if written >= self._burst:
            self._windows[key] = (start, written, suppressed + 1)
            return False
        if len(self._windows) > 1024 and key not in self._windows:
            self._windows.clear()  # keys come from a bounded set; this only guards a mistake
        if suppressed:
            message += " (%d similar lines suppressed)"
            args = (*args, suppressed)
        self._windows[key] = (start, written + 1, 0)
        self._logger.log(level, message, *args, **kwargs)
        return True


class RateLimitFilter(logging.Filter):
    """A logging filter that lets through at most ``burst`` records per message and interval.

    Installed on grpc's own loggers, which log a traceback for some faults that a
    client can cause on every call (undecodable metadata, for one).
    """

    def __init__(self, interval_s: float = 10.0, burst: int = 5) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._burst = burst
        self._windows: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` is within its rate."""
        # grpc logs some exceptions as the message itself: key them by type, not by text a
        # client chose; text messages by their first line (asyncio's carry a task's repr).
        msg = record.msg
        text = msg.partition("\n")[0][:80] if isinstance(msg, str) else type(msg).__name__
        key = (record.name, text)
        now = time.monotonic()
        start, count = self._windows.get(key, (now, 0))
        if now - start >= self._interval_s:
            start, count = now, 0
        if len(self._windows) > 1024 and key not in self._windows:
            self._windows.clear()
        self._windows[key] = (start, count + 1)
        return count < self._burst


# What grpc logs at ERROR, with a traceback, about what a client sent: metadata values that
# are not UTF-8 (the call goes on, or the gate refuses it with its own status and line).
CLIENT_FAULTS = ("Invalid encoding on ",)


class ClientFaultFilter(logging.Filter):
    """Demotes grpc's records of a client's own faults (CLIENT_FAULTS) to INFO, without the
    traceback: the server is fine, and an ERROR is what an operator is paged for."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite such a record's level; False if that level is below the logger's."""
        msg = record.msg
        if record.levelno <= logging.INFO or not isinstance(msg, str):
            return True
        if not msg.startswith(CLIENT_FAULTS):
            return True
        record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        record.exc_info = record.exc_text = None
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)


# Loggers that log per call on faults a client controls (asyncio: "Task exception was never
# retrieved" from grpc's own tasks).
GRPC_LOGGERS = ("grpc._cython.cygrpc", "grpc.aio._server", "grpc._server", "asyncio")


def configure_logging(level: str, log_format: str) -> None:
    """Send logs to stderr at ``level``, as ``text`` or ``json``; grpc's own logs rate-limited."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for name in GRPC_LOGGERS:
        logging.getLogger(name).addFilter(ClientFaultFilter())
        logging.getLogger(name).addFilter(RateLimitFilter())
