"""The job's input, listed once into fixed shards of (id, source) rows with stable ids.

An input is one of:

- a folder, local or in a bucket (``s3://bucket/photos/``), walked recursively in sorted
  order; ids are paths relative to it; files without an image suffix are left out (and
  counted) unless ``--all-files``;
- a glob (``photos/**/*.jpg``, ``s3://bucket/2024-*/*.png``); ids are relative to the
  folder before its first wildcard;
- a manifest: a ``.txt`` file of one URI per line, or a ``.parquet`` file with a ``uri``
  column and optionally an ``id`` column (otherwise the URI is the id);
- with ``--texts``, a ``.parquet`` or ``.jsonl`` file with a ``text`` column and optionally
  an ``id`` column (otherwise the row number is the id).

Ids must be unique: the job refuses an input that repeats one rather than embed it twice.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from clipvision.client._discovery import is_image_name
from clipvision.server.batch.storage import (
    MANIFEST,
    JobDirectory,
    StorageError,
    open_location,
    part_name,
)

_WILDCARDS = "*?["
_BATCH_ROWS = 65536


@dataclass(frozen=True)
class InputOptions:
    """How to read the input: images or texts, and the columns of a manifest."""

    texts: bool = False
    all_files: bool = False
    uri_column: str = "uri"
    id_column: str = "id"
    text_column: str = "text"


@dataclass
class Listing:
    """The rows of an input, and what its listing found besides them."""

    rows: Iterator[tuple[str, str]]
    description: str
    roots: tuple[str, ...] = ()
    """Local folders the listed files lie in: the job may read files below them."""
    left_out: list[int] = field(default_factory=lambda: [0])
    """Files without an image suffix that a folder walk left out (filled while listing)."""


def list_input(uri: str, options: InputOptions) -> Listing:
    """List ``uri`` as the options say; StorageError when it cannot be read."""
    lowered = uri.lower()
    if options.texts:
        if not lowered.endswith((".parquet", ".jsonl", ".json")):
            raise StorageError(
                f"{uri}: --texts reads a .parquet or .jsonl file with a "
                f"{options.text_column!r} column"
            )
        return Listing(_texts(uri, options), f"texts of {uri}")
    if any(char in uri.split("://", 1)[-1] for char in _WILDCARDS):
        return _glob(uri, options)
    if lowered.endswith(".parquet"):
        return Listing(_parquet_uris(uri, options), f"the URIs of {uri}")
    if lowered.endswith(".txt"):
        return Listing(_text_uris(uri), f"the URIs of {uri}")
    return _folder(uri, options)


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _folder(uri: str, options: InputOptions) -> Listing:
    filesystem, root = open_location(uri)
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{uri}: no such folder, file or prefix")
    if info.type == pafs.FileType.File:
        raise StorageError(
            f"{uri}: a single file; give a folder, a glob, or a .txt or .parquet manifest"
        )
    listing = Listing(iter(()), f"the files below {uri}")
    if _is_local(uri):
        listing.roots = (root,)
    listing.rows = _walk(filesystem, root, uri, lambda _: True, options, listing)
    return listing


def _glob(uri: str, options: InputOptions) -> Listing:
    scheme, sep, rest = uri.rpartition("://")
    parts = rest.split("/")
    static = next(i for i, part in enumerate(parts) if any(c in part for c in _WILDCARDS))
    base = "/".join(parts[:static]) or ("/" if rest.startswith("/") else ".")
    base_uri = f"{scheme}{sep}{base}"
    filesystem, root = open_location(base_uri)
    if filesystem.get_file_info(root).type != pafs.FileType.Directory:
        raise StorageError(f"{uri}: the folder {base_uri} does not exist")
    pattern = "/".join(parts[static:])
    listing = Listing(iter(()), f"the files matching {uri}")
    if _is_local(uri):
        listing.roots = (root,)

    def matches(relative: str) -> bool:
        # ``**/`` also matches no folder at all, as in a shell with globstar.
        return fnmatch.fnmatchcase(relative, pattern) or (
            pattern.startswith("**/") and fnmatch.fnmatchcase(relative, pattern[3:])
        )

    listing.rows = _walk(filesystem, root, uri, matches, options, listing)
    return listing


def _walk(
    filesystem: pafs.FileSystem,
    root: str,
    uri: str,
    keep: Callable[[str], bool],
    options: InputOptions,
    listing: Listing,
) -> Iterator[tuple[str, str]]:
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as exc:
        raise StorageError(f"{uri}: cannot list it ({exc})") from exc
    local = isinstance(filesystem, pafs.LocalFileSystem)
    prefix = "" if local else uri[: len(uri) - len(uri.split("://", 1)[1])]
    for info in sorted(infos, key=lambda info: info.path):
        if info.type != pafs.FileType.File:
            continue
        relative = info.path[len(root) :].lstrip("/")
        if not keep(relative):
            continue
        if not options.all_files and not is_image_name(info.base_name):
            listing.left_out[0] += 1
            continue
        yield relative, info.path if local else prefix + info.path


def _read_file(uri: str) -> bytes:
    filesystem, path = open_location(uri)
    try:
        with filesystem.open_input_stream(path) as stream:
            data: bytes = stream.read()
            return data
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: no such file") from exc
    except OSError as exc:
        raise StorageError(f"{uri}: cannot read it ({exc})") from exc


def _absolute(source: str, manifest: str) -> str:
    """A manifest's relative local path, made absolute against the manifest's folder."""
    if "://" in source or source.startswith(("/", "data:")) or not _is_local(manifest):
        return source
    _, path = open_location(manifest)
    return f"{path.rpartition('/')[0]}/{source}"


def _text_uris(uri: str) -> Iterator[tuple[str, str]]:
    content = _read_file(uri)
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise StorageError(f"{uri}: not UTF-8 text ({exc.reason})") from exc
    for line in text.splitlines():
        source = line.strip()
        if source and not source.startswith("#"):
            yield source, _absolute(source, uri)


def _parquet_batches(uri: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
    filesystem, path = open_location(uri)
    try:
        parquet = pq.ParquetFile(filesystem.open_input_file(path))
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: no such file") from exc
    except (OSError, pa.ArrowInvalid) as exc:
        raise StorageError(f"{uri}: not a readable Parquet file ({exc})") from exc
    names = parquet.schema_arrow.names
    missing = [name for name in columns[:1] if name not in names]
    if missing:
        raise StorageError(f"{uri}: no {missing[0]!r} column (it has {', '.join(names)})")
    wanted = [name for name in columns if name in names]
    yield from parquet.iter_batches(batch_size=_BATCH_ROWS, columns=wanted)


def _parquet_uris(uri: str, options: InputOptions) -> Iterator[tuple[str, str]]:
    for batch in _parquet_batches(uri, [options.uri_column, options.id_column]):
        sources = batch.column(options.uri_column).to_pylist()
        has_ids = options.id_column in batch.schema.names
        ids = batch.column(options.id_column).to_pylist() if has_ids else sources
        for row_id, source in zip(ids, sources, strict=True):
            if source is None or row_id is None:
                raise StorageError(f"{uri}: a row has no {options.uri_column} or id")
            yield str(row_id), _absolute(str(source), uri)


def _texts(uri: str, options: InputOptions) -> Iterator[tuple[str, str]]:
    if uri.lower().endswith(".parquet"):
        batches: Iterable[pa.RecordBatch] = _parquet_batches(
            uri, [options.text_column, options.id_column]
        )
    else:
        batches = _jsonl_batches(uri, options)
    number = 0
    for batch in batches:
        texts = batch.column(options.text_column).to_pylist()
        has_ids = options.id_column in batch.schema.names
        ids = batch.column(options.id_column).to_pylist() if has_ids else None
        for offset, text in enumerate(texts):
            row_id = ids[offset] if ids is not None else number
            if row_id is None:
                raise StorageError(f"{uri}: row {number} has no id")
            yield str(row_id), "" if text is None else str(text)
            number += 1


def _jsonl_batches(uri: str, options: InputOptions) -> Iterator[pa.RecordBatch]:
    column, id_column = options.text_column, options.id_column
    texts: list[object] = []
    ids: list[object] = []
    for number, line in enumerate(io.TextIOWrapper(io.BytesIO(_read_file(uri)), "utf-8"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise StorageError(f"{uri}: line {number} is not JSON ({exc})") from exc
        if not isinstance(record, dict) or column not in record:
            raise StorageError(f"{uri}: line {number} has no {column!r} field")
        texts.append(record[column])
        ids.append(record.get(id_column, len(ids)))
    yield pa.record_batch({column: pa.array(texts), id_column: pa.array(map(str, ids))})


def write_manifest(
    directory: JobDirectory, rows: Iterable[tuple[str, str]], shard_size: int
) -> int:
    """Write the listed rows as manifest shards of ``shard_size``; returns the row count.

    StorageError when an id repeats (checked on 64-bit hashes, so memory stays 8 bytes per
    input, and confirmed on the ids themselves before refusing).
    """
    hashes: list[np.ndarray] = []
    chunk_ids: list[str] = []
    chunk_sources: list[str] = []
    shard = count = 0

    def flush() -> None:
        nonlocal shard
        table = pa.table({"id": chunk_ids, "source": chunk_sources})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        directory.write_atomic(sink.getvalue().to_pybytes(), MANIFEST, part_name(shard))
        hashes.append(np.array([_hash(row_id) for row_id in chunk_ids], dtype=np.uint64))
        chunk_ids.clear()
        chunk_sources.clear()
        shard += 1

    for row_id, source in rows:
        chunk_ids.append(row_id)
        chunk_sources.append(source)
        count += 1
        if len(chunk_ids) == shard_size:
            flush()
    if chunk_ids:
        flush()
    if hashes:
        _refuse_repeated_ids(directory, np.concatenate(hashes))
    return count


def _hash(row_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(row_id.encode(), digest_size=8).digest(), "little")


def _refuse_repeated_ids(directory: JobDirectory, hashes: np.ndarray) -> None:
    ordered = np.sort(hashes)
    suspects = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    if not suspects:
        return
    seen: set[str] = set()
    for shard in sorted(directory.parts(MANIFEST)):
        for row_id in read_manifest_shard(directory, shard)[0]:
            if _hash(row_id) in suspects:
                if row_id in seen:
                    raise StorageError(
                        f"the input lists id {row_id!r} more than once; ids must be unique"
                    )
                seen.add(row_id)


def read_manifest_shard(directory: JobDirectory, shard: int) -> tuple[list[str], list[str]]:
    """The ids and sources of one manifest shard, in order."""
    data = directory.read_bytes(MANIFEST, part_name(shard))
    if data is None:
        raise StorageError(f"{directory.shown(MANIFEST, part_name(shard))} is missing")
    table = pq.read_table(pa.BufferReader(data))
    return table.column("id").to_pylist(), table.column("source").to_pylist()
