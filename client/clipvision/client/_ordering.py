"""The bookkeeping of an EmbedImageStream: what is in flight, in input order.

Both clients drive a stream the same way: pull inputs until the window is full,
then hand out results oldest first. An input the client refused before sending
(an unreadable file) holds its place in the window as an error, so results come
out in input order whatever happened to each one.
"""

from __future__ import annotations

from collections import deque

import grpc

from clipvision.client._errors import ClipVisionError, error_from_item, error_from_status
from clipvision.client._messages import Result, to_vector
from clipvision.v1 import embedding_service_pb2 as pb


class StreamWindow:
    """The inputs of one stream that have no result yet, oldest first, at most ``size`` of them."""

    def __init__(self, size: int, model: str | None, normalize: bool | None) -> None:
        if size < 1:
            raise ValueError("the stream window must be at least 1")
        self._size = size
        self._model = model or ""
        self._normalize = normalize
        self._pending: deque[str | ClipVisionError] = deque()
        self._sent = 0

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def full(self) -> bool:
        """Whether the window holds as many inputs as it may."""
        return len(self._pending) >= self._size

    def add(self, image: pb.Image | ClipVisionError) -> pb.EmbedImageStreamRequest | None:
        """Take the next input; returns the request to send, or None for a refused input."""
        if isinstance(image, ClipVisionError):
            self._pending.append(image)
            return None
        request_id = str(self._sent)
        self._sent += 1
        self._pending.append(request_id)
        request = pb.EmbedImageStreamRequest(id=request_id, image=image, model=self._model)
        if self._normalize is not None:
            request.normalize = self._normalize
        return request

    def pop_refused(self) -> ClipVisionError | None:
        """The oldest input's error if the client refused it; it leaves the window."""
        head = self._pending[0] if self._pending else None
        if isinstance(head, ClipVisionError):
            self._pending.popleft()
            return head
        return None

    def match(self, response: pb.EmbedImageStreamResponse) -> Result:
        """The result of the oldest input, which ``response`` must answer."""
        expected = self._pending.popleft() if self._pending else None
        if response.id != expected:
            raise error_from_status(
                grpc.StatusCode.INTERNAL,
                "STREAM_OUT_OF_ORDER",
                f"The server answered request {response.id!r} when {expected!r} was due; it "
                "breaks the EmbedImageStream contract.",
            )
        if response.HasField("error"):
            return error_from_item(response.error)
        return to_vector(response.embedding)

    def unanswered(self) -> ClipVisionError:
        """The error for a stream that ended while requests were still due."""
        return error_from_status(
            grpc.StatusCode.INTERNAL,
            "STREAM_INCOMPLETE",
            f"The server closed the stream with {len(self._pending)} images unanswered; it "
            "breaks the EmbedImageStream contract.",
        )
