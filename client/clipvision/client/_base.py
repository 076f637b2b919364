"""What the sync and the async client share: their options and how inputs become messages."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from clipvision.client._channel import (
    DEFAULT_KEEPALIVE_TIME_S,
    DEFAULT_KEEPALIVE_TIMEOUT_S,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TARGET,
    ChannelConfig,
)
from clipvision.client._errors import (
    CallCancelledError,
    ClipVisionError,
    DeadlineExceededError,
    ResourceExhaustedError,
    UnavailableError,
)
from clipvision.client._images import ImageInput, to_image
from clipvision.client._messages import image_stream_request, text_stream_request
from clipvision.client._texts import text_or_error, to_text
from clipvision.v1 import embedding_service_pb2 as pb

_T = TypeVar("_T")

DEFAULT_TIMEOUT_S = 60.0
# Consecutive stream restarts without an answer in between (see StreamRestarts).
DEFAULT_MAX_STREAM_RESTARTS = 3
# The server's default --stream-window: more in flight only waits in its queue.
DEFAULT_STREAM_WINDOW = 64


class ClientBase:
    """The options both clients take; the subclasses open the channel."""

    def __init__(
        self,
        address: str = DEFAULT_TARGET,
        *,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        token: str | None = None,
        server_name: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        stream_window: int = DEFAULT_STREAM_WINDOW,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        max_stream_restarts: int = DEFAULT_MAX_STREAM_RESTARTS,
        keepalive_time_s: float = DEFAULT_KEEPALIVE_TIME_S,
        keepalive_timeout_s: float = DEFAULT_KEEPALIVE_TIMEOUT_S,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """Configure the connection; nothing is dialled until the first call.

        ``address`` is ``HOST:PORT``, a gRPC URI such as ``dns:///HOST:PORT``
        (balanced round-robin over every address the name resolves to), or a
        comma-separated list of ``IP:PORT``. ``tls`` turns on TLS, verified
        against ``root_certificates`` (PEM; the system roots when None), with
        ``private_key`` and ``certificate_chain`` for mutual TLS and
        ``server_name`` to override the name checked in the server's
        certificate. ``token`` is sent as ``authorization: Bearer`` on every
        call, over TLS (or in plaintext to a loopback address or unix socket
        only). ``timeout`` is the deadline, in seconds, of each unary call
        (None: no deadline). ``stream_window`` bounds the images (texts)
        ``embed_images`` (``embed_text_stream``) has in flight.
        ``max_message_bytes`` bounds what is sent and received; before the first
        stream or batch call the client also asks the server's limit (one
        GetModelInfo) and sends nothing larger than the lesser of the two.
        Calls that fail with UNAVAILABLE are retried, up to ``max_attempts``
        attempts in all; an ``embed_images`` or ``embed_text_stream`` stream
        that breaks with UNAVAILABLE is resumed on a new stream, up to
        ``max_stream_restarts`` times in a row (0: never). ``keepalive_time_s``
        must not be below the server's minimum ping interval (30 s for
        clipvision-server; 5 minutes for a gRPC server that sets none).
        ``options`` are extra gRPC channel arguments.
        """
        self._config = ChannelConfig(
            address=address,
            tls=tls,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            token=token,
            server_name=server_name,
            max_message_bytes=max_message_bytes,
            max_attempts=max_attempts,
            keepalive_time_s=keepalive_time_s,
            keepalive_timeout_s=keepalive_timeout_s,
            extra_options=tuple(options),
        )
        if stream_window < 1:
            raise ValueError("stream_window must be at least 1")
        if max_stream_restarts < 0:
            raise ValueError("max_stream_restarts must not be negative")
        self._max_stream_restarts = max_stream_restarts
        # The server's own message limit, from GetModelInfo (None: not known): a message over
        # it is refused by gRPC for the whole call, a stream's other images with it.
        self._server_message_bytes: int | None = None
        self._limits_learned = False
        self._timeout = timeout
        self._stream_window = stream_window
        self._closed = False
        self._connect()

    def _connect(self) -> None:
        """Create the channel and the stub (the subclass knows which kind)."""
        raise NotImplementedError

    @property
    def address(self) -> str:
        """The address the client was given."""
        return self._config.address

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"this {type(self).__name__} is closed")

    def _deadline(self, timeout: float | None) -> float | None:
        return self._timeout if timeout is None else timeout

    def _message_limit(self) -> int:
        """The largest message to send: ours, or the server's where it is less."""
        own = self._config.max_message_bytes
        server = self._server_message_bytes
        return own if server is None else min(own, server)

    def _learn_limits(self, info: pb.GetModelInfoResponse) -> None:
        self._server_message_bytes = info.limits.max_receive_message_bytes or None
        self._limits_learned = True

    def _limits_unknowable(self, error: ClipVisionError) -> None:
        """GetModelInfo failed before a stream: a server that lacks or refuses it is not asked
        again (our own limit holds); one that could not be reached or was too busy to answer
        is, before the next."""
        transient = (
            UnavailableError | DeadlineExceededError | CallCancelledError | ResourceExhaustedError
        )
        if not isinstance(error, transient):
            self._limits_learned = True

    def _image(self, image: ImageInput) -> pb.Image:
        return to_image(image, self._message_limit())

    def _image_or_error(self, image: ImageInput) -> pb.Image | ClipVisionError:
        try:
            return self._image(image)
        except ClipVisionError as error:
            return error

    def _image_stream_request(
        self, image: ImageInput, model: str | None, normalize: bool | None
    ) -> pb.EmbedImageStreamRequest | ClipVisionError:
        message = self._image_or_error(image)
        if isinstance(message, ClipVisionError):
            return message
        return image_stream_request(message, model, normalize)

    def _text(self, text: str) -> str:
        return to_text(text, self._message_limit())

    def _text_or_error(self, text: str) -> str | ClipVisionError:
        return text_or_error(text, self._message_limit())

    def _text_stream_request(
        self, text: str, model: str | None, normalize: bool | None, truncate: bool | None
    ) -> pb.EmbedTextStreamRequest | ClipVisionError:
        checked = self._text_or_error(text)
        if isinstance(checked, ClipVisionError):
            return checked
        return text_stream_request(checked, model, normalize, truncate)

    def _labels(self, labels: Iterable[str]) -> list[str]:
        if isinstance(labels, str):
            raise TypeError("labels must be an iterable of str, not one str; pass [label]")
        return [self._text(label) for label in labels]


def raise_first_error(results: Iterable[_T | ClipVisionError]) -> list[_T]:
    """The values of ``results``, or the first error among them raised."""
    values: list[_T] = []
    for result in results:
        if isinstance(result, ClipVisionError):
            raise result
        values.append(result)
    return values
