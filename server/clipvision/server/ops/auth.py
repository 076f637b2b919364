"""Optional bearer-token check: every call but health must carry the operator's token.

The gRPC call gate (wire.gate) and the HTTP routes (http.exchange) ask it from a call's
headers alone, before a call slot is taken or a byte of the request is read, so a caller
without the token costs nothing that callers with it need.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from clipvision.server.errors import Reason, UnauthenticatedError

MISSING = UnauthenticatedError(
    Reason.UNAUTHENTICATED,
    "This server needs a bearer token; send the header 'authorization: Bearer <token>'.",
)
WRONG = UnauthenticatedError(Reason.UNAUTHENTICATED, "The bearer token is not valid.")


class BearerToken:
    """Checks ``authorization: Bearer <token>`` against the operator's token in constant time."""

    def __init__(self, token: str) -> None:
        self._expected = token.encode()

    def refusal(self, metadata: Iterable[tuple[str, object]]) -> UnauthenticatedError | None:
        """None when the metadata carries the token, else the error to answer with."""
        values = [value for key, value in metadata if key == "authorization"]
        if not values:
            return MISSING
        scheme, _, token = str(values[0]).partition(" ")
        if scheme.lower() != "bearer":
            return MISSING
        # Constant time: the comparison must not reveal how much of a guess was right.
        if not hmac.compare_digest(token.strip().encode(), self._expected):
            return WRONG
        return None
