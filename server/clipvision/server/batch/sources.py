"""Read one input's encoded bytes under the server's rules, or raise the server's error.

- ``s3://``, ``gs://`` (and any scheme pyarrow.fs knows): read through pyarrow.fs with the
  job's credentials; a missing or unreadable object is URI_UNREADABLE.
- a local path or ``file://`` URI: read only below a root, exactly as the server reads
  ``file://`` under ``--allow-file-root`` (symlinks resolved, regular files only, size
  checked before reading). The roots are the input folder of a folder or glob job, and
  the ``--allow-root`` folders for paths a manifest names.
- ``data:`` URIs: decoded by the server's own code, with its limits.
- ``http(s)://``: refused (URI_SCHEME_REFUSED), as on a server without fetching enabled.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from clipvision.server.config.limits import FetchPolicy, ImageLimits
from clipvision.server.errors import InvalidImageError, Reason, UriRefusedError
from clipvision.server.pipelines.fetch import read_file_uri
from clipvision.server.pipelines.sources import ImageSources
from clipvision.v1 import embedding_service_pb2 as pb

_OBJECT_STORES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss")


class SourceReader:
    """Reads sources for one task; file systems are opened once per bucket."""

    def __init__(self, roots: tuple[str, ...], limits: ImageLimits) -> None:
        self._limits = limits
        self._policy = FetchPolicy(file_roots=tuple(Path(root) for root in roots))
        self._stores: dict[str, tuple[pafs.FileSystem, str]] = {}
        self._inline: ImageSources | None = None

    def read(self, source: str) -> bytes:
        """The encoded bytes of ``source``; the server's InvalidImageError or UriRefusedError."""
        scheme, sep, _ = source.partition("://")
        scheme = scheme.lower() if sep else ""
        if scheme in _OBJECT_STORES:
            return self._object(source, scheme)
        if source.startswith("/"):
            return self._file(Path(source).as_uri())
        if scheme == "file":
            return self._file(source)
        if scheme in ("http", "https"):
            raise UriRefusedError(
                Reason.URI_SCHEME_REFUSED,
                f"{scheme}:// sources are not fetched by the batch job; copy them to a bucket "
                "(s3://, gs://) or a folder first.",
            )
        if source[:5].lower() == "data:":
            return self._data(source)
        raise InvalidImageError(
            Reason.URI_INVALID,
            "The source is not a URI this job reads (s3://, gs://, file://, data:, or an "
            "absolute path).",
        )

    def _file(self, uri: str) -> bytes:
        if not self._policy.file_roots:
            raise UriRefusedError(
                Reason.URI_SCHEME_REFUSED,
                "Local paths in a manifest are read only below a folder named with "
                "--allow-root; pass --allow-root FOLDER.",
            )
        return read_file_uri(uri, self._policy, self._limits.max_image_bytes)

    def _object(self, source: str, scheme: str) -> bytes:
        bucket, _, key = source.split("://", 1)[1].partition("/")
        store = f"{scheme}://{bucket}"
        if store not in self._stores:
            try:
                self._stores[store] = pafs.FileSystem.from_uri(store)
            except (OSError, pa.ArrowException, ValueError) as exc:
                raise _unreadable(source, exc) from exc
        filesystem, root = self._stores[store]
        path = f"{root.rstrip('/')}/{key}"
        try:
            with filesystem.open_input_file(path) as file:
                size = file.size()
                if size > self._limits.max_image_bytes:
                    raise InvalidImageError(
                        Reason.IMAGE_TOO_LARGE,
                        f"The image is {size} bytes, over the limit of "
                        f"{self._limits.max_image_bytes} bytes.",
                    )
                data: bytes = file.read()
                return data
        except (OSError, pa.ArrowException) as exc:
            raise _unreadable(source, exc) from exc

    def _data(self, source: str) -> bytes:
        if self._inline is None:
            self._inline = ImageSources(self._limits)
        return asyncio.run(self._inline.resolve(pb.Image(uri=source)))


def _unreadable(source: str, exc: BaseException) -> InvalidImageError:
    missing = isinstance(exc, FileNotFoundError)
    what = "does not exist" if missing else f"cannot be read ({str(exc).strip()[:200]})"
    return InvalidImageError(Reason.URI_UNREADABLE, f"{source} {what}.")
