"""The blocking client."""

from __future__ import annotations

import queue
import time
from collections.abc import Generator, Iterable, Iterator
from types import TracebackType
from typing import Generic, Literal, overload

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
        self._learn_limits(response)
        return response

    def _know_limits(self) -> None:
        """Before the first stream or batch call: the server's message limit, so that a message
        over it is this item's error (IMAGE_TOO_LARGE, TEXT_TOO_LARGE) and not gRPC's
        RESOURCE_EXHAUSTED for the whole call. One GetModelInfo per client."""
        if self._limits_learned:
            return
        try:
            self.model_info()
        except ClipVisionError as error:
            self._limits_unknowable(error)

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
        self._know_limits()
        window: StreamWindow[pb.EmbedImageStreamRequest, pb.EmbedImageStreamResponse, FloatArray]
        window = StreamWindow(self._stream_window, "EmbedImageStream", "images", to_vector)
        requests = (self._image_stream_request(image, model, normalize) for image in images)
        yield from self._run_stream(
            self._stub.EmbedImageStream, window, requests, timeout, return_exceptions
        )

    def embed_text(
        self,
        text: str,
        *,
        model: str | None = None,
        normalize: bool | None = None,
        truncate: bool | None = None,
        timeout: float | None = None,
    ) -> TextEmbedding:
        """The embedding of one text, with whether it was truncated.

        ``model``, ``normalize`` and ``timeout`` are as for ``embed_image``.
        A text longer than the model's context is cut to its first tokens
        (``truncated`` says so); ``truncate=False`` makes the server refuse it
        instead (InvalidTextError, ``TEXT_TOO_LONG``). A model served without
        its text tower raises ModalityNotServedError.
        """
        self._check_open()
        request = embed_text_request(self._text(text), model, normalize, truncate)
        try:
            response = self._stub.EmbedText(request, timeout=self._deadline(timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc_error(exc) from exc
        return to_text_embedding(response.embedding)

    @overload
    def embed_texts(
        self,
        texts: Iterable[str],
        *,
        model: str | None = None,
        normalize: bool | None = None,
        truncate: bool | None = None,
        timeout: float | None = None,
        return_exceptions: Literal[False] = False,
    ) -> list[TextEmbedding]: ...

    @overload
    def embed_texts(
        self,
        texts: Iterable[str],
        *,
        model: str | None = None,
        normalize: bool | None = None,
        truncate: bool | None = None,
        timeout: float | None = None,
        return_exceptions: bool,
    ) -> list[TextResult]: ...

    def embed_texts(
        self,
        texts: Iterable[str],
        *,
        model: str | None = None,
        normalize: bool | None = None,
        truncate: bool | None = None,
        timeout: float | None = None,
        return_exceptions: bool = False,
    ) -> list[TextEmbedding] | list[TextResult]:
        """Embed a few texts in one EmbedTexts call; one result per text, in order.

        At most the server's ``limits.max_batch_texts`` texts (see
        ``model_info``); more raise InvalidRequestError (``TOO_MANY_TEXTS``):
        use ``embed_text_stream`` for any number. A bad text raises its
        InvalidTextError, or with ``return_exceptions=True`` takes its place in
        the list. Options are as for ``embed_text``.
        """
        self._check_open()
        self._know_limits()
        checked = [self._text_or_error(text) for text in texts]
        sendable = [text for text in checked if isinstance(text, str)]
        response = pb.EmbedTextsResponse()
        if sendable:
            request = embed_texts_request(sendable, model, normalize, truncate)
            try:
                response = self._stub.EmbedTexts(request, timeout=self._deadline(timeout))
            except grpc.RpcError as exc:
                raise error_from_rpc_error(exc) from exc
        results = texts_results(checked, response)
        return results if return_exceptions else raise_first_error(results)

    @overload
    def embed_text_stream(
        self,
        texts: Iterable[str],
        *,
        model: str | None = None,
        normalize: bool | None = None,
        truncate: bool | None = None,
        timeout: float | None = None,
        return_exceptions: Literal[False] = False,
    ) -> Generator[TextEmbedding, None, None]: ...

    @overload
    def embed_text_stream(
        self,
        texts: Iterable[str],
        *,
        model: str | None = None,
        normalize: bool | None = None,
        truncate: bool | None = None,
        timeout: float | None = None,
        return_exceptions: bool,
    ) -> Generator[TextResult, None, None]: ...

    def embed_text_stream(
        self,
        texts: Iterable[str],
        *,
        model: str | None = None,
        normalize: bool | None = None,
        truncate: bool | None = None,
        timeout: float | None = None,
        return_exceptions: bool = False,
    ) -> Generator[TextResult, None, None]:
        """Embed any number of texts through one EmbedTextStream, yielding results in input order.

        The same stream as ``embed_images``: ``texts`` is read lazily with at
        most ``stream_window`` in flight, a bad text raises (or is yielded, with
        ``return_exceptions=True``) in its place, a stream broken by
        UNAVAILABLE is resumed, ``timeout`` bounds the whole stream. Options are
        as for ``embed_text``.
        """
        self._check_open()
        self._know_limits()
        window: StreamWindow[pb.EmbedTextStreamRequest, pb.EmbedTextStreamResponse, TextEmbedding]
        window = StreamWindow(self._stream_window, "EmbedTextStream", "texts", to_text_embedding)
        requests = (self._text_stream_request(text, model, normalize, truncate) for text in texts)
        yield from self._run_stream(
            self._stub.EmbedTextStream, window, requests, timeout, return_exceptions
        )

    def classify(
        self,
        image: ImageInput,
        labels: Iterable[str],
        *,
        prompt_template: str | None = None,
        model: str | None = None,
        truncate: bool | None = None,
        timeout: float | None = None,
    ) -> list[LabelScore]:
        """Zero-shot classification: how well each label describes ``image``, in label order.

        Each label is put into ``prompt_template`` (one ``{}``, for example
        ``"a photo of a {}"``) and embedded; the probabilities are the softmax
        of the model's logit scale times the cosines, as CLIP computes them,
        and sum to 1. ``truncate=False`` refuses a prompt longer than the
        model's context instead of cutting it.
        """
        self._check_open()
        request = classify_request(
            self._image(image), self._labels(labels), prompt_template, model, truncate
        )
        try:
            response = self._stub.Classify(request, timeout=self._deadline(timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc_error(exc) from exc
        return to_label_scores(response)

    def _run_stream(
        self,
        method: grpc.StreamStreamMultiCallable[RequestT, ResponseT],
        window: StreamWindow[RequestT, ResponseT, ValueT],
        requests: Iterator[RequestT | ClipVisionError],
        timeout: float | None,
        return_exceptions: bool,
    ) -> Generator[ValueT | ClipVisionError, None, None]:
        """Drive one stream: fill the window from ``requests``, yield results oldest first,
        resume on a new stream when it breaks with UNAVAILABLE."""
        restarts = StreamRestarts(self._max_stream_restarts)
        deadline = None if timeout is None else time.monotonic() + timeout
        stream: _Stream[RequestT, ResponseT] | None = None
        exhausted = False
        try:
            while True:
                while not exhausted and not window.full:
                    try:
                        item = next(requests)
                    except StopIteration:
                        exhausted = True
                        if stream is not None:
                            stream.close_sending()
                        break
                    request = window.add(item)
                    if request is not None:
                        if stream is None:
                            stream = _Stream(method, [], _remaining(deadline), done=False)
                        stream.send(request)
                result: ValueT | ClipVisionError | None = window.pop_refused()
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
                            method,
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


class _Stream(Generic[RequestT, ResponseT]):
    """One stream call: a queue that a gRPC thread sends from, and its responses.

    The caller's iterable is only ever touched from the caller's thread; the
    queue hands its requests over.
    """

    def __init__(
        self,
        method: grpc.StreamStreamMultiCallable[RequestT, ResponseT],
        requests: list[RequestT],
        timeout: float | None,
        *,
        done: bool,
    ) -> None:
        self._outbox: queue.SimpleQueue[RequestT | None] = queue.SimpleQueue()
        for request in requests:
            self._outbox.put(request)
        if done:
            self._outbox.put(None)
        self._call: grpc.CallIterator[ResponseT] = method(
            iter(self._outbox.get, None), timeout=timeout
        )
        self._responses: Iterator[ResponseT] = iter(self._call)

    def send(self, request: RequestT) -> None:
        """Queue one request for sending."""
        self._outbox.put(request)

    def close_sending(self) -> None:
        """Half-close: no more requests follow."""
        self._outbox.put(None)

    def next_response(self, window: StreamWindow[RequestT, ResponseT, ValueT]) -> ResponseT:
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
