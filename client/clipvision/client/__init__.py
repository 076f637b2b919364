"""The Python client of clipvision: embeddings from a clipvision server, without torch.

```python
from clipvision.client import EmbeddingClient

with EmbeddingClient("127.0.0.1:50051") as client:
    vector = client.embed_image("cat.jpg")                   # numpy float32, unit length
    for path, result in zip(paths, client.embed_images(paths, return_exceptions=True)):
        ...                                                  # input order; errors in place
    query = client.embed_text("a photo of a cat").vector     # same space as the images
    scores = client.classify("cat.jpg", ["cat", "dog"], prompt_template="a photo of a {}")
```
"""

from clipvision.client._async_client import AsyncEmbeddingClient
from clipvision.client._client import EmbeddingClient
from clipvision.client._errors import (
    CallCancelledError,
    ClipVisionError,
    DeadlineExceededError,
    ImageReadError,
    InternalError,
    InvalidImageError,
    InvalidRequestError,
    InvalidTextError,
    ModalityNotServedError,
    ModelNotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    error_from_rpc_error,
    error_from_status,
)
from clipvision.client._images import ImageInput
from clipvision.client._messages import FloatArray, LabelScore, Result, TextEmbedding, TextResult

__all__ = [
    "AsyncEmbeddingClient",
    "CallCancelledError",
    "ClipVisionError",
    "DeadlineExceededError",
    "EmbeddingClient",
    "FloatArray",
    "ImageInput",
    "ImageReadError",
    "InternalError",
    "InvalidImageError",
    "InvalidRequestError",
    "InvalidTextError",
    "LabelScore",
    "ModalityNotServedError",
    "ModelNotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "Result",
    "TextEmbedding",
    "TextResult",
    "UnauthenticatedError",
    "UnavailableError",
    "error_from_rpc_error",
    "error_from_status",
]
