"""The Python client of clipvision: embeddings from a clipvision server, without torch.

```python
from clipvision.client import EmbeddingClient

with EmbeddingClient("127.0.0.1:50051") as client:
    vector = client.embed_image("cat.jpg")                   # numpy float32, unit length
    for path, result in zip(paths, client.embed_images(paths, return_exceptions=True)):
        ...                                                  # input order; errors in place
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
    ModelNotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    error_from_rpc_error,
    error_from_status,
)
from clipvision.client._images import ImageInput
from clipvision.client._messages import FloatArray, Result

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
    "ModelNotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "Result",
    "UnauthenticatedError",
    "UnavailableError",
    "error_from_rpc_error",
    "error_from_status",
]
