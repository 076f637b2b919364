"""The blocking client."""

from __future__ import annotations

import queue
import time
from collections.abc import Generator, Iterable, Iterator
from types import TracebackType
from typing import Literal, overload

import grpc

from clipvision.client._base import ClientBase
from clipvision.client._errors import ClipVisionError, error_from_rpc_error
from clipvision.client._images import ImageInput
from clipvision.client._messages import FloatArray, Result, embed_image_request, to_vector
from clipvision.client._ordering import StreamRestarts, StreamWindow, stream_error
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc


class EmbeddingClient(ClientBase):
    """A blocking client of ``clipvision.v1.EmbeddingService``; use it as a context manager.

    Every failure raises a :class:`ClipVisionError` subclass, never a bare
    ``grpc.RpcError``. ``help(EmbeddingClient.__init__)`` describes the
    connection options (address forms, TLS, token, deadlines, retries).
    """

    def _connect(self) -> None:
        config = self._config
        credentials = config.credentials()
        if credentials is None:
            self._channel = grpc.insecure_channel(config.target, options=config.options())
        else:
            self._channel = grpc.secure_channel(
                config.target, credentials, options=config.options()
            )
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        if not self._closed:
            self._closed = True
            self._channel.close()

    def embed_image(
        self,
        image: ImageInput,
        *,
        model: str | None = None,
        normalize: bool | None = None,
        timeout: float | None = None,
    ) -> FloatArray:
        """The embedding of one image, as a float32 vector.

        ``model`` selects a served model (None: the server's default);
        ``normalize=False`` returns the raw projected features instead of the
        unit vector; ``timeout`` overrides the client's deadline for this call.
        """
        self._check_open()
        request = embed_image_request(self._image(image), model, normalize)
        try:
            response = self._stub.EmbedImage(request, timeout=self._deadline(timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc_error(exc) from exc
        return to_vector(response.embedding)

    def model_info(self, *, timeout: float | None = None) -> pb.GetModelInfoResponse:
        """The served models (the first is the default), their preprocessing and the limits."""
        self._check_open()
        try:
            response: pb.GetModelInfoResponse = self._stub.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=self._deadline(timeout)
            )
        except grpc.RpcError as exc:
            raise error_from_rpc_error(exc) from exc
        return response

    @overload
    def embed_images(
        self,
        images: Iterable[ImageInput],
        *,
        model: str | None = None,
        normalize: bool | None = None,
        timeout: float | None = None,
        return_exceptions: Literal[False] = False,
    ) -> Generator[FloatArray, None, None]: ...

    @overload
    def embed_images(
        self,
        images: Iterable[ImageInput],
        *,
        model: str | None = None,
        normalize: bool | None = None,
        timeout: float | None = None,
        return_exceptions: bool,
    ) -> Generator[Result, None, None]: ...

    def embed_images(
        self,
        images: Iterable[ImageInput],
        *,
        model: str | None = None,
        normalize: bool | None = None,
        timeout: float | None = None,
        return_exceptions: bool = False,
    ) -> Generator[Result, None, None]:
        """Embed many images through one EmbedImageStream, yielding results in input order.

        ``images`` is read lazily: at most ``stream_window`` images are in
        flight, so memory stays bounded however long the input. A bad image
        raises its ClipVisionError when its turn comes (the stream is then
        cancelled), or with ``return_exceptions=True`` is yielded in its place
        and the stream goes on. A failure of the stream itself always raises.
        ``timeout`` is a deadline for the whole stream (none by default). Close
        the generator, or exhaust it, to end the call.
        """
        self._check_open()
        window = StreamWindow(self._stream_window, model, normalize)
        restarts = StreamRestarts(self._max_stream_restarts)
        deadline = None if timeout is None else time.monotonic() + timeout
        stream: _Stream | None = None
        source = iter(images)
        exhausted = False
        try:
            while True:
                while not exhausted and not window.full:
                    try:
                        item = next(source)
                    except StopIteration:
                        exhausted = True
                        if stream is not None:
                            stream.close_sending()
                        break
                    request = window.add(self._image_or_error(item))
                    if request is not None:
                        if stream is None:
                            stream = _Stream(self._stub, [], _remaining(deadline), done=False)
                        stream.send(request)
                result: Result | None = window.pop_refused()
                if result is None:
                    if not window:
                        return
                    assert stream is not None  # a request is due, so one was sent
                    try:
                        response = stream.next_response(window)
                    except grpc.RpcError as exc:
                        delay = restarts.next_delay(exc, window)
                        if delay is None:
                            raise stream_error(exc) from exc
                        stream.cancel()
                        time.sleep(delay)
                        stream = _Stream(
                            self._stub,
                            window.unanswered_requests(),
                            _remaining(deadline),
                            done=exhausted,
                        )
                        continue
                    restarts.answered()
                    result = window.match(response)
                if isinstance(result, ClipVisionError) and not return_exceptions:
                    raise result
                yield result
        finally:
            if stream is not None:
                stream.cancel()


class _Stream:
    """One EmbedImageStream call: a queue that a gRPC thread sends from, and its responses.

    The caller's iterable is only ever touched from the caller's thread; the
    queue hands its requests over.
    """

    def __init__(
        self,
        stub: pb_grpc.EmbeddingServiceStub,
        requests: list[pb.EmbedImageStreamRequest],
        timeout: float | None,
        *,
        done: bool,
    ) -> None:
        self._outbox: queue.SimpleQueue[pb.EmbedImageStreamRequest | None] = queue.SimpleQueue()
        for request in requests:
            self._outbox.put(request)
        if done:
            self._outbox.put(None)
        self._call: grpc.CallIterator[pb.EmbedImageStreamResponse] = stub.EmbedImageStream(
            iter(self._outbox.get, None), timeout=timeout
        )
        self._responses: Iterator[pb.EmbedImageStreamResponse] = iter(self._call)

    def send(self, request: pb.EmbedImageStreamRequest) -> None:
        """Queue one request for sending."""
        self._outbox.put(request)

    def close_sending(self) -> None:
        """Half-close: no more requests follow."""
        self._outbox.put(None)

    def next_response(self, window: StreamWindow) -> pb.EmbedImageStreamResponse:
        """The next response; raises grpc.RpcError when the call fails."""
        try:
            return next(self._responses)
        except StopIteration:
            raise window.unanswered() from None

    def cancel(self) -> None:
        """End the call (a no-op on a finished one)."""
        self._outbox.put(None)
        self._call.cancel()  # type: ignore[no-untyped-call]


def _remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (time.monotonic()), for a call resumed part-way."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())
