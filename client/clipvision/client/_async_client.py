"""The asyncio client, the twin of EmbeddingClient."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable
from contextlib import aclosing
from types import TracebackType
from typing import TYPE_CHECKING, Generic, Literal, TypeVar, overload

import grpc

from clipvision.client._base import ClientBase, raise_first_error
from clipvision.client._errors import ClipVisionError, error_from_rpc_error
from clipvision.client._images import ImageInput
from clipvision.client._messages import (
    FloatArray,
    LabelScore,
    Result,
    TextEmbedding,
    TextResult,
    classify_request,
    embed_image_request,
    embed_text_request,
    embed_texts_request,
    image_stream_request,
    texts_results,
    to_label_scores,
    to_text_embedding,
    to_vector,
)
from clipvision.client._ordering import (
    RequestT,
    ResponseT,
    StreamRestarts,
    StreamWindow,
    ValueT,
    stream_error,
)
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    # Only the generated .pyi has the asyncio stub's type; at run time the stub
    # class adapts to the channel it is given.
    from clipvision.v1.embedding_service_pb2_grpc import EmbeddingServiceAsyncStub


_T = TypeVar("_T")


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
            response: pb.GetModelInfoResponse = await self._stub.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=self._deadline(timeout)
            )
        except grpc.RpcError as exc:
            raise error_from_rpc_error(exc) from exc
        self._learn_limits(response)
        return response

    async def _know_limits(self) -> None:
        """Before the first stream or batch call: the server's message limit (see
        EmbeddingClient._know_limits). One GetModelInfo per client."""
        if self._limits_learned:
            return
        try:
            await self.model_info()
        except ClipVisionError as error:
            self._limits_unknowable(error)

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
        EmbeddingClient.embed_images (streams broken by UNAVAILABLE are resumed
        the same way). Wrap the iterator in
        ``contextlib.aclosing`` when you may stop early, so the call ends at once.
        """
        self._check_open()
        await self._know_limits()
        window: StreamWindow[pb.EmbedImageStreamRequest, pb.EmbedImageStreamResponse, FloatArray]
        window = StreamWindow(self._stream_window, "EmbedImageStream", "images", to_vector)

        async def requests() -> AsyncGenerator[pb.EmbedImageStreamRequest | ClipVisionError, None]:
            async with aclosing(_aiter(images)) as source:
                async for image in source:
                    message = await self._image_or_error_async(image)
                    if isinstance(message, ClipVisionError):
                        yield message
                    else:
                        yield image_stream_request(message, model, normalize)

        stream = self._run_stream(
            self._stub.EmbedImageStream, window, requests(), timeout, return_exceptions
        )
        async with aclosing(stream) as results:
            async for result in results:
                yield result

    async def embed_text(
        self,
        text: str,
        *,
        model: str | None = None,
        normalize: bool | None = None,
        truncate: bool | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (a gRPC deadline, sent to the server)
    ) -> TextEmbedding:
        """The embedding of one text (see EmbeddingClient.embed_text)."""
        self._check_open()
        request = embed_text_request(self._text(text), model, normalize, truncate)
        try:
            response = await self._stub.EmbedText(request, timeout=self._deadline(timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc_error(exc) from exc
        return to_text_embedding(response.embedding)

    @overload
    async def embed_texts(
        self,
        texts: Iterable[str],
        *,
        model: str | None = None,
        normalize: bool | None = None,
        truncate: bool | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (a gRPC deadline, sent to the server)
        return_exceptions: Literal[False] = False,
    ) -> list[TextEmbedding]: ...

    @overload
    async def embed_texts(
        self,
        texts: Iterable[str],
        *,
        model: str | None = None,
        normalize: bool | None = None,
        truncate: bool | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (a gRPC deadline, sent to the server)
        return_exceptions: bool,
    ) -> list[TextResult]: ...

    async def embed_texts(
        self,
        texts: Iterable[str],
        *,
        model: str | None = None,
        normalize: bool | None = None,
        truncate: bool | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (a gRPC deadline, sent to the server)
        return_exceptions: bool = False,
    ) -> list[TextEmbedding] | list[TextResult]:
        """Embed a few texts in one EmbedTexts call (see EmbeddingClient.embed_texts)."""
        self._check_open()
        await self._know_limits()
        checked = [self._text_or_error(text) for text in texts]
        sendable = [text for text in checked if isinstance(text, str)]
        response = pb.EmbedTextsResponse()
        if sendable:
            request = embed_texts_request(sendable, model, normalize, truncate)
            try:
                response = await self._stub.EmbedTexts(request, timeout=self._deadline(timeout))
            except grpc.RpcError as exc:
                raise error_from_rpc_error(exc) from exc
        results = texts_results(checked, response)
        return results if return_exceptions else raise_first_error(results)

    @overload
    def embed_text_stream(
        self,
        texts: Iterable[str] | AsyncIterable[str],
        *,
        model: str | None = None,
        normalize: bool | None = None,
        truncate: bool | None = None,
        timeout: float | None = None,
        return_exceptions: Literal[False] = False,
    ) -> AsyncGenerator[TextEmbedding, None]: ...

    @overload
    def embed_text_stream(
        self,
        texts: Iterable[str] | AsyncIterable[str],
        *,
        model: str | None = None,
        normalize: bool | None = None,
        truncate: bool | None = None,
        timeout: float | None = None,
        return_exceptions: bool,
    ) -> AsyncGenerator[TextResult, None]: ...

    async def embed_text_stream(
        self,
        texts: Iterable[str] | AsyncIterable[str],
        *,
        model: str | None = None,
        normalize: bool | None = None,
        truncate: bool | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (a gRPC deadline, sent to the server)
        return_exceptions: bool = False,
    ) -> AsyncGenerator[TextResult, None]:
        """Embed any number of texts through one EmbedTextStream, yielding results in input
        order (see EmbeddingClient.embed_text_stream); ``texts`` may be an async iterable."""
        self._check_open()
        await self._know_limits()
        window: StreamWindow[pb.EmbedTextStreamRequest, pb.EmbedTextStreamResponse, TextEmbedding]
        window = StreamWindow(self._stream_window, "EmbedTextStream", "texts", to_text_embedding)

        async def requests() -> AsyncGenerator[pb.EmbedTextStreamRequest | ClipVisionError, None]:
            async with aclosing(_aiter(texts)) as source:
                async for text in source:
                    yield self._text_stream_request(text, model, normalize, truncate)

        stream = self._run_stream(
            self._stub.EmbedTextStream, window, requests(), timeout, return_exceptions
        )
        async with aclosing(stream) as results:
            async for result in results:
                yield result

    async def classify(
        self,
        image: ImageInput,
        labels: Iterable[str],
        *,
        prompt_template: str | None = None,
        model: str | None = None,
        truncate: bool | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (a gRPC deadline, sent to the server)
    ) -> list[LabelScore]:
        """Zero-shot classification of ``image`` (see EmbeddingClient.classify)."""
        self._check_open()
        message = await self._image_async(image)
        request = classify_request(message, self._labels(labels), prompt_template, model, truncate)
        try:
            response = await self._stub.Classify(request, timeout=self._deadline(timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc_error(exc) from exc
        return to_label_scores(response)

    async def _run_stream(
        self,
        method: grpc.aio.StreamStreamMultiCallable[RequestT, ResponseT],
        window: StreamWindow[RequestT, ResponseT, ValueT],
        requests: AsyncGenerator[RequestT | ClipVisionError, None],
        timeout: float | None,  # noqa: ASYNC109 (a gRPC deadline, sent to the server)
        return_exceptions: bool,
    ) -> AsyncGenerator[ValueT | ClipVisionError, None]:
        """Drive one stream (see EmbeddingClient._run_stream)."""
        restarts = StreamRestarts(self._max_stream_restarts)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        stream: _AsyncStream[RequestT, ResponseT] | None = None
        exhausted = False

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - loop.time())

        try:
            while True:
                while not exhausted and not window.full:
                    try:
                        item = await anext(requests)
                    except StopAsyncIteration:
                        exhausted = True
                        if stream is not None:
                            stream.close_sending()
                        break
                    request = window.add(item)
                    if request is not None:
                        if stream is None:
                            stream = _AsyncStream(method, [], remaining(), done=False)
                        stream.send(request)
                result: ValueT | ClipVisionError | None = window.pop_refused()
                if result is None:
                    if not window:
                        return
                    assert stream is not None  # a request is due, so one was sent
                    try:
                        response = await stream.next_response(window)
                    except grpc.RpcError as exc:
                        delay = restarts.next_delay(exc, window)
                        if delay is None:
                            raise stream_error(exc) from exc
                        stream.cancel()
                        await asyncio.sleep(delay)
                        stream = _AsyncStream(
                            method, window.unanswered_requests(), remaining(), done=exhausted
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
            await requests.aclose()

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


async def _aiter(items: Iterable[_T] | AsyncIterable[_T]) -> AsyncGenerator[_T, None]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


class _AsyncStream(Generic[RequestT, ResponseT]):
    """One stream call, fed from a queue, and its responses."""

    def __init__(
        self,
        method: grpc.aio.StreamStreamMultiCallable[RequestT, ResponseT],
        requests: list[RequestT],
        timeout: float | None,
        *,
        done: bool,
    ) -> None:
        self._outbox: asyncio.Queue[RequestT | None] = asyncio.Queue()
        for request in requests:
            self._outbox.put_nowait(request)
        if done:
            self._outbox.put_nowait(None)
        self._call: grpc.aio.StreamStreamCall[RequestT, ResponseT] = method(
            _drain(self._outbox), timeout=timeout
        )

    def send(self, request: RequestT) -> None:
        """Queue one request for sending."""
        self._outbox.put_nowait(request)

    def close_sending(self) -> None:
        """Half-close: no more requests follow."""
        self._outbox.put_nowait(None)

    async def next_response(self, window: StreamWindow[RequestT, ResponseT, ValueT]) -> ResponseT:
        """The next response; raises grpc.RpcError when the call fails."""
        response = await self._call.read()
        if response is grpc.aio.EOF:  # type: ignore[attr-defined]
            raise window.unanswered()
        return response  # type: ignore[return-value]

    def cancel(self) -> None:
        """End the call (a no-op on a finished one)."""
        self._outbox.put_nowait(None)
        self._call.cancel()


async def _drain(outbox: asyncio.Queue[_T | None]) -> AsyncIterator[_T]:
    while (request := await outbox.get()) is not None:
        yield request
