"""The blocking client."""

from __future__ import annotations

import queue
from collections.abc import Generator, Iterable, Iterator
from types import TracebackType
from typing import Literal, overload

import grpc

from clipvision.client._base import ClientBase
from clipvision.client._errors import ClipVisionError, error_from_rpc_error
from clipvision.client._images import ImageInput
from clipvision.client._messages import FloatArray, Result, embed_image_request, to_vector
from clipvision.client._ordering import StreamWindow
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
        # The gRPC thread sends from this queue; this generator fills it, so the
        # caller's iterable is only ever touched from the caller's thread.
        outbox: queue.SimpleQueue[pb.EmbedImageStreamRequest | None] = queue.SimpleQueue()
        call: grpc.CallIterator[pb.EmbedImageStreamResponse] | None = None
        responses: Iterator[pb.EmbedImageStreamResponse] = iter(())
        source = iter(images)
        exhausted = False
        try:
            while True:
                while not exhausted and not window.full:
                    try:
                        item = next(source)
                    except StopIteration:
                        exhausted = True
                        outbox.put(None)
                        break
                    request = window.add(self._image_or_error(item))
                    if request is not None:
                        if call is None:
                            call = self._stub.EmbedImageStream(
                                iter(outbox.get, None), timeout=timeout
                            )
                            responses = iter(call)
                        outbox.put(request)
                result: Result | None = window.pop_refused()
                if result is None:
                    if not window:
                        return
                    result = window.match(self._next_response(responses, window))
                if isinstance(result, ClipVisionError) and not return_exceptions:
                    raise result
                yield result
        finally:
            outbox.put(None)
            if call is not None:
                call.cancel()  # type: ignore[no-untyped-call]

    @staticmethod
    def _next_response(
        responses: Iterator[pb.EmbedImageStreamResponse], window: StreamWindow
    ) -> pb.EmbedImageStreamResponse:
        try:
            return next(responses)
        except StopIteration:
            raise window.unanswered() from None
        except grpc.RpcError as exc:
            raise error_from_rpc_error(exc) from exc
