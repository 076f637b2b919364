"""Per-item faults answered in-band: the ItemError of any exception, counted, bugs logged."""

from __future__ import annotations

import logging
from typing import Protocol

from clipvision.server.errors import ClipVisionError, InternalError, Reason
from clipvision.v1 import embedding_service_pb2 as pb

logger = logging.getLogger(__name__)

INTERNAL_ITEM_ERROR = InternalError(
    Reason.INTERNAL, "The server failed on this item because of a bug; it has been logged."
)


class ItemErrorObserver(Protocol):
    """Counts items answered in-band with an error, for metrics."""

    def on_item_error(self, reason: str) -> None:
        """One item was answered with an ItemError of ``reason``."""


def item_error(exc: Exception) -> pb.ItemError:
    """The in-band form of a per-item fault; bugs are logged and reported without detail."""
    if not isinstance(exc, ClipVisionError):
        logger.error("unexpected failure on one item", exc_info=exc)
        exc = INTERNAL_ITEM_ERROR
    return pb.ItemError(code=int(exc.code), reason=exc.reason.value, message=exc.message)
