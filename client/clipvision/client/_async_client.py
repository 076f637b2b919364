"""The asyncio client, the twin of EmbeddingClient."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Literal, overload

import grpc

from clipvision.client._base import ClientBase
from clipvision.client._errors import ClipVisionError, error_from_rpc_error
from clipvision.client._images import ImageInput
from clipvision.client._messages import FloatArray, Result, embed_image_request, to_vector
from clipvision.client._ordering import StreamWindow
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    # Only the generated .pyi has the asyncio stub's type; at run time the stub
    # class adapts to the channel it is given.
    from clipvision.v1.embedding_service_pb2_grpc import EmbeddingServiceAsyncStub


_StreamCall = grpc.aio.StreamStreamCall[pb.EmbedImageStreamRequest, pb.EmbedImageStreamResponse]


class AsyncEmbeddingClient(ClientBase):
    """An asyncio client of ``clipvision.v1.EmbeddingService``; use it with ``async with``.

    The same methods as :class:`EmbeddingClient`, awaited. Create it inside a
    running event loop. Reading files and encoding PIL images happen in worker
    threads, so the loop is never blocked by them.
    """

    _stub: EmbeddingServiceAsyncStub

    def _connect(self) -> None:
        config = self._config
        credentials = config.credentials()
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(config.target, options=config.options())
        else:
            self._channel = grpc.aio.secure_channel(
                config.target, credentials, options=config.options()
            )
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)

    async def __aenter__(self) -> AsyncEmbeddingClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        if not self._closed:
            self._closed = True
            await self._channel.close(None)

    async def embed_image(
        self,
        image: ImageInput,
        *,
        model: str | None = None,
        normalize: bool | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (a gRPC deadline, sent to the server)
    ) -> FloatArray:
        """The embedding of one image, as a float32 vector (see EmbeddingClient.embed_image)."""
        self._check_open()
        message = await self._image_async(image)
        request = embed_image_request(message, model, normalize)
        try:
            response = await self._stub.EmbedImage(request, timeout=self._deadline(timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc_error(exc) from exc
        return to_vector(response.embedding)

    async def model_info(
        self,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (a gRPC deadline, sent to the server)
    ) -> pb.GetModelInfoResponse:
        """The served models (the first is the default), their preprocessing and the limits."""
        self._check_open()
        try:
            return await self._stub.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=self._deadline(timeout)
            )
        except grpc.RpcError as exc:
            raise error_from_rpc_error(exc) from exc

    @overload
    def embed_images(
        self,
        images: Iterable[ImageInput] | AsyncIterable[ImageInput],
        *,
        model: str | None = None,
        normalize: bool | None = None,
        timeout: float | None = None,
        return_exceptions: Literal[False] = False,
    ) -> AsyncGenerator[FloatArray, None]: ...

    @overload
    def embed_images(
        self,
        images: Iterable[ImageInput] | AsyncIterable[ImageInput],
        *,
        model: str | None = None,
        normalize: bool | None = None,
        timeout: float | None = None,
        return_exceptions: bool,
    ) -> AsyncGenerator[Result, None]: ...

    async def embed_images(
        self,
        images: Iterable[ImageInput] | AsyncIterable[ImageInput],
        *,
        model: str | None = None,
        normalize: bool | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (a gRPC deadline, sent to the server)
        return_exceptions: bool = False,
    ) -> AsyncGenerator[Result, None]:
        """Embed many images through one EmbedImageStream, yielding results in input order.

        ``images`` may be a plain or an async iterable; otherwise the same as
        EmbeddingClient.embed_images. Wrap the iterator in
        ``contextlib.aclosing`` when you may stop early, so the call ends at once.
        """
        self._check_open()
        window = StreamWindow(self._stream_window, model, normalize)
        outbox: asyncio.Queue[pb.EmbedImageStreamRequest | None] = asyncio.Queue()
        call: _StreamCall | None = None
        source = _aiter(images)
        exhausted = False
        try:
            while True:
                while not exhausted and not window.full:
                    try:
                        item = await anext(source)
                    except StopAsyncIteration:
                        exhausted = True
                        outbox.put_nowait(None)
                        break
                    request = window.add(await self._image_or_error_async(item))
                    if request is not None:
                        if call is None:
                            call = self._stub.EmbedImageStream(_drain(outbox), timeout=timeout)
                        outbox.put_nowait(request)
                result: Result | None = window.pop_refused()
                if result is None:
                    if not window:
                        return
                    assert call is not None  # a request is due, so one was sent
                    result = window.match(await _next_response(call, window))
                if isinstance(result, ClipVisionError) and not return_exceptions:
                    raise result
                yield result
        finally:
            outbox.put_nowait(None)
            if call is not None:
                call.cancel()
            await source.aclose()

    async def _image_async(self, image: ImageInput) -> pb.Image:
        if isinstance(image, bytes | pb.Image):
            return self._image(image)
        # Paths, file objects and PIL images block: read or encode them off the loop.
        return await asyncio.to_thread(self._image, image)

    async def _image_or_error_async(self, image: ImageInput) -> pb.Image | ClipVisionError:
        try:
            return await self._image_async(image)
        except ClipVisionError as error:
            return error


async def _aiter(
    items: Iterable[ImageInput] | AsyncIterable[ImageInput],
) -> AsyncGenerator[ImageInput, None]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


async def _drain(
    outbox: asyncio.Queue[pb.EmbedImageStreamRequest | None],
) -> AsyncIterator[pb.EmbedImageStreamRequest]:
    while (request := await outbox.get()) is not None:
        yield request


async def _next_response(
    call: _StreamCall,
    window: StreamWindow,
) -> pb.EmbedImageStreamResponse:
    try:
        response = await call.read()
    except grpc.RpcError as exc:
        raise error_from_rpc_error(exc) from exc
    if response is grpc.aio.EOF:  # type: ignore[attr-defined]
        raise window.unanswered()
    return response  # type: ignore[return-value]
