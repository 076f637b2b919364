"""Raw gRPC over HTTP/2 for what grpcio's client cannot send: odd paths, lies, resets, floods.

A :class:`WireConnection` is one plaintext HTTP/2 connection (prior knowledge)
to 127.0.0.1, driven by the ``h2`` state machine with header validation off, so
that a test or the attack bench can send any ``:path`` bytes, any metadata,
gRPC messages whose 5-byte prefix lies, partial messages, RST_STREAM bursts and
many streams at once, and then read back what the server answered on each
stream (headers, trailers, ``grpc-status``, ``grpc-message``,
``grpc-status-details-bin``) and on the connection (GOAWAY, close).

Frames are queued by the synchronous methods and written with :meth:`flush`,
so a burst of thousands of frames leaves in one write. Everything is asyncio:
the server under test may share the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

Header = tuple[bytes, bytes]

DEFAULT_TIMEOUT_S = 5.0
READ_CHUNK = 65536
# A generous receive window, so that a test that reads nothing back stalls no one.
RECEIVE_WINDOW = 16 * 1024 * 1024

FRAME_HEADER = 9
GOAWAY_FRAME = 0x7
CANCEL = h2.errors.ErrorCodes.CANCEL
NO_ERROR = h2.errors.ErrorCodes.NO_ERROR


def grpc_message(
    payload: bytes, *, compressed: bool = False, declared_length: int | None = None
) -> bytes:
    """A gRPC length-prefixed message; ``declared_length`` may lie about the payload's size."""
    length = len(payload) if declared_length is None else declared_length
    return struct.pack(">BI", 1 if compressed else 0, length) + payload


def split_messages(data: bytes) -> list[bytes]:
    """The payloads of the complete length-prefixed messages in ``data`` (not a partial tail)."""
    messages = []
    offset = 0
    while offset + 5 <= len(data):
        (length,) = struct.unpack_from(">I", data, offset + 1)
        if offset + 5 + length > len(data):
            break
        messages.append(data[offset + 5 : offset + 5 + length])
        offset += 5 + length
    return messages


@dataclass
class StreamResult:
    """What the server sent on one stream, as far as it got."""

    stream_id: int
    headers: list[Header] = field(default_factory=list)
    trailers: list[Header] = field(default_factory=list)
    data: bytes = b""
    ended: bool = False
    reset_code: int | None = None
    """The error code of a RST_STREAM the server sent, if any."""
    reset_by_us: bool = False

    def _header(self, name: bytes) -> bytes | None:
        # A trailers-only response carries grpc-status in its only HEADERS frame.
        for key, value in (*self.trailers, *self.headers):
            if key == name:
                return value
        return None

    @property
    def finished(self) -> bool:
        """The stream is over: the server ended or reset it, or we reset it."""
        return self.ended or self.reset_code is not None or self.reset_by_us

    @property
    def http_status(self) -> int | None:
        """The ``:status`` of the response headers."""
        value = self._header(b":status")
        return None if value is None else int(value)

    @property
    def grpc_status(self) -> int | None:
        """The numeric ``grpc-status``, or None if the server sent none (yet)."""
        value = self._header(b"grpc-status")
        return None if value is None else int(value)

    @property
    def grpc_message(self) -> str | None:
        """The percent-decoded ``grpc-message``."""
        value = self._header(b"grpc-message")
        return None if value is None else unquote(value.decode("ascii", "replace"))

    @property
    def status_details(self) -> bytes | None:
        """The decoded ``grpc-status-details-bin`` (a serialized ``google.rpc.Status``)."""
        value = self._header(b"grpc-status-details-bin")
        if value is None:
            return None
        return base64.b64decode(value + b"=" * (-len(value) % 4))

    @property
    def messages(self) -> list[bytes]:
        """The complete response messages received."""
        return split_messages(self.data)

    def metadata(self, name: bytes) -> bytes | None:
        """One header or trailer by name (headers looked up after trailers)."""
        return self._header(name)


@dataclass(frozen=True)
class GoAway:
    """A GOAWAY the server sent."""

    error_code: int
    last_stream_id: int
    additional_data: bytes


class WireConnection:
    """One raw HTTP/2 connection to a gRPC server, for tests and the attack bench.

    Use :meth:`open` (or ``async with await WireConnection.open(port)``); queue
    frames with :meth:`start_call`, :meth:`send_data`, :meth:`send_message`,
    :meth:`reset`, :meth:`ping`; write them with :meth:`flush`; read answers with
    :meth:`result`. :attr:`goaways` and :attr:`closed` report the connection.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config)
        """The underlying state machine, for frames this class has no method for."""
        self._reader = reader
        self._writer = writer
        self._streams: dict[int, StreamResult] = {}
        self._changed = asyncio.Condition()
        self.goaways: list[GoAway] = []
        """Every GOAWAY received, in order."""
        self.closed = False
        """True once the server closed the connection (or it failed)."""
        self.close_reason: str | None = None
        self.pings_acked = 0
        self._pump: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        port: int,
        host: str = "127.0.0.1",
        *,
        settings: dict[h2.settings.SettingCodes, int] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> WireConnection:
        """Connect, send the preface and SETTINGS (``settings`` adds or overrides some)."""
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
        connection = cls(reader, writer)
        connection.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: RECEIVE_WINDOW,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                **(settings or {}),
            },
        )
        connection.h2.initiate_connection()
        connection.h2.increment_flow_control_window(RECEIVE_WINDOW)
        connection._write()
        connection._pump = asyncio.get_running_loop().create_task(connection._read_loop())
        return connection

    async def __aenter__(self) -> WireConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- queueing frames -------------------------------------------------------------

    def start_call(
        self,
        path: bytes | str,
        metadata: Iterable[tuple[bytes | str, bytes | str]] = (),
        *,
        authority: bytes = b"127.0.0.1",
        grpc_timeout: str | None = None,
        end_stream: bool = False,
        content_type: bytes = b"application/grpc",
    ) -> int:
        """Queue a gRPC request HEADERS frame on a new stream; returns its id.

        ``path`` is sent as given (any bytes); ``timeout_s`` is a raw ``grpc-timeout``
        value such as ``"5S"``; ``metadata`` goes after the standard headers.
        """
        stream_id = self.h2.get_next_available_stream_id()
        headers: list[Header] = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", _bytes(path)),
            (b":authority", authority),
            (b"content-type", content_type),
            (b"te", b"trailers"),
        ]
        if grpc_timeout is not None:
            headers.append((b"grpc-timeout", grpc_timeout.encode()))
        headers += [(_bytes(key), _bytes(value)) for key, value in metadata]
        self.h2.send_headers(stream_id, headers, end_stream=end_stream)
        self._streams[stream_id] = StreamResult(stream_id)
        self._write()
        return stream_id

    def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """Queue raw DATA bytes on a stream, in frames the peer's frame size allows.

        Raises ``h2.exceptions.FlowControlError`` if the peer's window is too small:
        tests send small bodies; use :meth:`send_data_flowing` for large ones.
        """
        size = self.h2.max_outbound_frame_size
        chunks = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
        for index, chunk in enumerate(chunks):
            last = index == len(chunks) - 1
            self.h2.send_data(stream_id, chunk, end_stream=end_stream and last)
        self._write()

    async def send_data_flowing(
        self, stream_id: int, data: bytes, *, end_stream: bool = False, timeout_s: float = 10.0
    ) -> None:
        """Send DATA of any size, waiting for the peer's flow-control window to open."""
        async with asyncio.timeout(timeout_s):
            view = memoryview(data)
            while view:
                window = min(
                    self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size
                )
                if window <= 0:
                    await self._wait(lambda: self.closed or self._window_open(stream_id))
                    if self.closed:
                        raise ConnectionError("connection closed while sending")
                    continue
                chunk, view = bytes(view[:window]), view[window:]
                self.h2.send_data(stream_id, chunk, end_stream=end_stream and not view)
                self._write()
                await self.flush()
            if not data:
                self.send_data(stream_id, b"", end_stream=end_stream)

    def send_message(
        self,
        stream_id: int,
        payload: bytes,
        *,
        end_stream: bool = True,
        compressed: bool = False,
        declared_length: int | None = None,
    ) -> None:
        """Queue one length-prefixed gRPC message (see :func:`grpc_message` for the lies)."""
        message = grpc_message(payload, compressed=compressed, declared_length=declared_length)
        self.send_data(stream_id, message, end_stream=end_stream)

    def end_stream(self, stream_id: int) -> None:
        """Queue an empty DATA frame with END_STREAM (half-close)."""
        self.h2.end_stream(stream_id)
        self._write()

    def reset(self, stream_id: int, error_code: int = CANCEL) -> None:
        """Queue RST_STREAM (CANCEL by default) on a stream."""
        self.h2.reset_stream(stream_id, error_code)
        if stream_id in self._streams:
            self._streams[stream_id].reset_by_us = True
        self._write()

    def ping(self, payload: bytes = b"\0" * 8) -> None:
        """Queue a PING (8 bytes of opaque data)."""
        self.h2.ping(payload)
        self._write()

    def write_pending(self) -> None:
        """Queue what the state machine has to send, after using :attr:`h2` directly."""
        self._write()

    async def round_trip(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """Send a PING and wait for its ACK: the server has then read every frame sent before."""
        acked = self.pings_acked
        self.ping()
        await self.flush()
        async with asyncio.timeout(timeout_s):
            await self._wait(lambda: self.pings_acked > acked or self.closed)
        if self.closed:
            raise ConnectionError(f"connection closed: {self.close_reason}")

    async def flush(self) -> None:
        """Write what is queued; returns when the socket has taken it (or the peer left)."""
        if self.closed:
            return
        try:
            await self._writer.drain()
        except ConnectionError as error:
            self._mark_closed(f"write failed: {error!r}")

    # -- reading answers -------------------------------------------------------------

    def stream(self, stream_id: int) -> StreamResult:
        """What has arrived so far on a stream this connection started."""
        return self._streams[stream_id]

    async def result(self, stream_id: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> StreamResult:
        """Wait until the server ends the stream (or the connection closes) and return it.

        Raises ``TimeoutError`` if neither happens within ``timeout_s``.
        """
        state = self._streams[stream_id]
        async with asyncio.timeout(timeout_s):
            await self._wait(lambda: state.finished or self.closed)
        return state

    async def results(
        self, stream_ids: Sequence[int], timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> list[StreamResult]:
        """:meth:`result` for several streams, under one overall ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            await self._wait(
                lambda: self.closed or all(self._streams[i].finished for i in stream_ids)
            )
        return [self._streams[i] for i in stream_ids]

    async def call(
        self,
        path: bytes | str,
        payload: bytes = b"",
        metadata: Iterable[tuple[bytes | str, bytes | str]] = (),
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> StreamResult:
        """A whole unary call: HEADERS, one message with END_STREAM, then the answer."""
        stream_id = self.start_call(path, metadata)
        self.send_message(stream_id, payload)
        await self.flush()
        return await self.result(stream_id, timeout_s)

    async def wait_closed(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
        """Whether the server closes the connection within ``timeout_s``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._wait(lambda: self.closed)
        return self.closed

    async def wait_goaway(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> GoAway | None:
        """The first GOAWAY, waiting up to ``timeout_s`` for one; None if none came."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._wait(lambda: bool(self.goaways) or self.closed)
        return self.goaways[0] if self.goaways else None

    async def close(self) -> None:
        """Close the socket and stop reading."""
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
        self._mark_closed("closed by us")

    # -- internals -------------------------------------------------------------------

    def _window_open(self, stream_id: int) -> bool:
        return self.h2.local_flow_control_window(stream_id) > 0

    def _write(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed and not self._writer.is_closing():
            self._writer.write(data)

    async def _wait(self, predicate: Callable[[], bool]) -> None:
        async with self._changed:
            await self._changed.wait_for(predicate)

    def _mark_closed(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = reason

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _read_loop(self) -> None:
        pending = bytearray()
        try:
            while True:
                try:
                    data = await self._reader.read(READ_CHUNK)
                except ConnectionError as error:
                    self._mark_closed(f"read failed: {error!r}")
                    break
                if not data:
                    self._mark_closed("closed by the server")
                    break
                pending += data
                try:
                    self._receive(pending)
                except h2.exceptions.ProtocolError as error:
                    self._mark_closed(f"protocol error: {error!r}")
                    break
                self._write()
                await self._notify()
        except Exception as error:
            # A bug here must end every wait at once, not leave them to time out.
            self._mark_closed(f"reader failed: {error!r}")
            raise
        finally:
            await self._notify()

    def _receive(self, pending: bytearray) -> None:
        """Feed the complete frames in ``pending`` to h2, keeping GOAWAY frames for ourselves.

        h2 treats a received GOAWAY as the end of the connection and refuses every
        later frame, but a server keeps answering the streams it accepted: so GOAWAY
        is recorded here and never shown to h2.
        """
        chunk = bytearray()
        while len(pending) >= FRAME_HEADER:
            length = int.from_bytes(pending[:3], "big")
            if len(pending) < FRAME_HEADER + length:
                break
            frame = bytes(pending[: FRAME_HEADER + length])
            del pending[: FRAME_HEADER + length]
            if frame[3] == GOAWAY_FRAME and length >= 8:
                last_stream_id, error_code = struct.unpack_from(">II", frame, FRAME_HEADER)
                self.goaways.append(
                    GoAway(error_code, last_stream_id & 0x7FFFFFFF, frame[FRAME_HEADER + 8 :])
                )
            else:
                chunk += frame
        if chunk:
            for event in self.h2.receive_data(bytes(chunk)):
                self._on_event(event)

    def _on_event(self, event: h2.events.Event) -> None:
        stream_id = getattr(event, "stream_id", None)
        state = self._streams.get(stream_id) if stream_id else None
        if isinstance(event, h2.events.ResponseReceived) and state is not None:
            state.headers = _pairs(event.headers)
        elif isinstance(event, h2.events.TrailersReceived) and state is not None:
            state.trailers = _pairs(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            if state is not None:
                state.data += event.data
            # Give the window back at once: the reader never applies back-pressure.
            if event.flow_controlled_length and stream_id is not None:
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self.h2.acknowledge_received_data(event.flow_controlled_length, stream_id)
        elif isinstance(event, h2.events.StreamEnded) and state is not None:
            state.ended = True
        elif isinstance(event, h2.events.StreamReset) and state is not None:
            if event.remote_reset:
                state.reset_code = int(event.error_code or 0)
            else:
                state.ended = True
        elif isinstance(event, h2.events.PingAckReceived):
            self.pings_acked += 1


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _pairs(headers: Iterable[tuple[bytes | str, bytes | str]] | None) -> list[Header]:
    return [(_bytes(key), _bytes(value)) for key, value in headers or ()]
