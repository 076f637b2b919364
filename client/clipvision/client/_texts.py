"""Check a caller's text before it is sent: a ``str`` that UTF-8 encodes and a message carries."""

from __future__ import annotations

import grpc

from clipvision.client._errors import TEXT_NOT_UTF8, ClipVisionError, error_from_status

# Room for the id, model name and framing of a stream request around the text.
_MESSAGE_OVERHEAD = 4096


def to_text(text: str, max_message_bytes: int) -> str:
    """``text`` itself, once it is known to be sendable.

    Raises InvalidTextError (before anything is sent, so that a stream can
    report it in place and go on) when the text holds a lone surrogate, which
    UTF-8 cannot encode, or is too large for one message; TypeError for
    anything but a ``str``. Empty and over-long texts are the server's to judge:
    it knows the model's limits.
    """
    if not isinstance(text, str):
        hint = "; decode it first (text.decode('utf-8'))" if isinstance(text, bytes) else ""
        raise TypeError(f"cannot embed a {type(text).__name__} as text{hint}")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise error_from_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            TEXT_NOT_UTF8,
            f"The text holds {text[exc.start : exc.end]!r} at character {exc.start}, a lone "
            "surrogate that UTF-8 cannot encode; decode the source with the right encoding.",
        ) from exc
    if size > max_message_bytes - _MESSAGE_OVERHEAD:
        raise error_from_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            "TEXT_TOO_LARGE",
            f"The text is {size} bytes and a message may be at most {max_message_bytes} bytes "
            "(the server's limit, or the client's max_message_bytes where less); shorten the "
            "text, or raise the server's --max-message-bytes (and the client's).",
        )
    return text


def text_or_error(text: str, max_message_bytes: int) -> str | ClipVisionError:
    """``to_text``, returning its InvalidTextError rather than raising it (TypeError raises)."""
    try:
        return to_text(text, max_message_bytes)
    except ClipVisionError as error:
        return error
