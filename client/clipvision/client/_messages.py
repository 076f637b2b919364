"""Requests out, numpy vectors back: the conversions both clients share."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from clipvision.client._errors import ClipVisionError
from clipvision.v1 import embedding_service_pb2 as pb

FloatArray = npt.NDArray[np.float32]
"""A 1-D float32 embedding vector."""

Result = FloatArray | ClipVisionError
"""One image's outcome in a stream: its embedding or why it has none."""


def to_vector(embedding: pb.Embedding) -> FloatArray:
    """The embedding's values as a float32 vector."""
    return np.asarray(embedding.values, dtype=np.float32)


def embed_image_request(
    image: pb.Image, model: str | None, normalize: bool | None
) -> pb.EmbedImageRequest:
    """The EmbedImage request for one image; None leaves the server's default."""
    request = pb.EmbedImageRequest(image=image, model=model or "")
    if normalize is not None:
        request.normalize = normalize
    return request
