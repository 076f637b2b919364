"""A job's directory on any file system pyarrow reaches (a local folder, ``s3://``, ``gs://``).

::

    OUT/job.json                    what the job is: input, model, dimension, shard count
    OUT/manifest/part-000000.parquet  one shard's inputs (id, source), listed once
    OUT/shards/part-000000.parquet    that shard's rows, committed whole or not at all
    OUT/runs/<run>.json             when each run started, for the rate ``status`` shows

Every file is written under a temporary name beside its final one and then moved into
place: a rename on a local disk, and on an object store a server-side copy, which makes
the final object appear whole or not at all. A file under its final name is therefore
complete; what a killed run leaves is temporary names, removed by the next run.
``job.json`` is written last when a job is created, so a manifest without it is a listing
that did not finish, and is listed again.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

JOB_FILE = "job.json"
MANIFEST = "manifest"
SHARDS = "shards"
RUNS = "runs"
FORMAT = "clipvision-batch/1"
_PART = re.compile(r"part-(\d{6,})\.parquet")
_TEMPORARY = ".tmp-"


class StorageError(Exception):
    """The output (or input) location cannot be used; the message is one sentence for the user."""


@dataclass(frozen=True)
class JobRecord:
    """What a job is; a rerun must match it (same model, same kind of input)."""

    input: str
    kind: str
    """``image`` or ``text``."""
    model: str
    """The model's name, as rows carry it."""
    dim: int
    normalized: bool
    shards: int
    rows: int
    shard_size: int
    created: str
    roots: tuple[str, ...] = ()
    """Local folders the job may read files below: a folder or glob input's own."""
    format: str = FORMAT

    def shard_rows(self, shard: int) -> int:
        """How many inputs shard ``shard`` holds."""
        return min(self.shard_size, self.rows - shard * self.shard_size)

    def to_json(self) -> bytes:
        """The record as job.json holds it."""
        return (json.dumps(asdict(self), indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> JobRecord:
        """Parse job.json; StorageError when it is not one of ours."""
        try:
            raw = json.loads(data)
            if raw.get("format") != FORMAT:
                raise ValueError(f"format {raw.get('format')!r}")
            raw["roots"] = tuple(raw.get("roots", ()))
            return cls(**raw)
        except (ValueError, TypeError, AttributeError) as exc:
            raise StorageError(f"{where} is not a clipvision batch job record ({exc})") from exc


def part_name(shard: int) -> str:
    """The file name of a shard, in the manifest and in the output alike."""
    return f"part-{shard:06d}.parquet"


def open_location(uri: str) -> tuple[pafs.FileSystem, str]:
    """The file system and path of a local path or a URI (``s3://``, ``gs://``, ``file://``).

    StorageError when the scheme is unknown or, for an object store, the bucket is missing.
    """
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
        raise StorageError(f"{uri}: cannot open this location ({_first_line(exc)})") from exc
    except OSError as exc:
        raise StorageError(f"{uri}: {_first_line(exc)}") from exc
    if not isinstance(filesystem, pafs.LocalFileSystem):
        bucket = path.split("/", 1)[0]
        if _info(filesystem, bucket, uri).type == pafs.FileType.NotFound:
            raise StorageError(f"{uri}: the bucket {bucket!r} does not exist (or is not visible)")
    return filesystem, path.rstrip("/")


def _info(filesystem: pafs.FileSystem, path: str, uri: str) -> pafs.FileInfo:
    try:
        return filesystem.get_file_info(path)
    except OSError as exc:
        raise StorageError(f"{uri}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class JobDirectory:
    """The output location of one job, and the commit protocol of its files."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/") if "://" in uri else uri
        self.fs, self.root = open_location(uri)

    @property
    def location(self) -> str:
        """The root as any process can open it: an absolute path, or the URI."""
        return self.root if isinstance(self.fs, pafs.LocalFileSystem) else self.uri

    def path(self, *parts: str) -> str:
        """A path below the job's root."""
        return "/".join((self.root, *parts))

    def shown(self, *parts: str) -> str:
        """A path below the job's root as the user wrote the root, for messages."""
        return "/".join((self.uri, *parts))

    def read_bytes(self, *parts: str) -> bytes | None:
        """A file's content, or None when it does not exist."""
        try:
            with self.fs.open_input_stream(self.path(*parts)) as stream:
                data: bytes = stream.read()
                return data
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {self.shown(*parts)}: {_first_line(exc)}") from exc

    def write_atomic(self, data: bytes, *parts: str) -> None:
        """Write a file under a temporary name, then move it to its name in one step."""
        final = self.path(*parts)
        folder, _, name = final.rpartition("/")
        temporary = f"{folder}/.{name}{_TEMPORARY}{uuid.uuid4().hex}"
        try:
            self.fs.create_dir(folder, recursive=True)
            with self.fs.open_output_stream(temporary) as stream:
                stream.write(data)
            self.fs.move(temporary, final)
        except OSError as exc:
            raise StorageError(f"cannot write {self.shown(*parts)}: {_first_line(exc)}") from exc

    def read_job(self) -> JobRecord | None:
        """The job record, or None when there is no job here yet."""
        data = self.read_bytes(JOB_FILE)
        return None if data is None else JobRecord.from_json(data, self.shown(JOB_FILE))

    def entries(self) -> list[str]:
        """The names directly below the root (empty when the root does not exist)."""
        selector = pafs.FileSelector(self.root, allow_not_found=True)
        try:
            infos = self.fs.get_file_info(selector)
        except OSError as exc:
            raise StorageError(f"cannot list {self.uri}: {_first_line(exc)}") from exc
        return sorted(info.base_name for info in infos)

    def parts(self, folder: str) -> dict[int, pafs.FileInfo]:
        """The committed files of ``manifest`` or ``shards``, by shard number."""
        selector = pafs.FileSelector(self.path(folder), allow_not_found=True)
        try:
            infos = self.fs.get_file_info(selector)
        except OSError as exc:
            raise StorageError(f"cannot list {self.shown(folder)}: {_first_line(exc)}") from exc
        found: dict[int, pafs.FileInfo] = {}
        for info in infos:
            match = _PART.fullmatch(info.base_name)
            if match is not None and info.type == pafs.FileType.File:
                found[int(match.group(1))] = info
        return found

    def committed(self) -> set[int]:
        """The shards whose output file is committed."""
        return set(self.parts(SHARDS))

    def remove_temporaries(self) -> int:
        """Delete what killed runs left under temporary names; returns how many."""
        removed = 0
        for folder in (MANIFEST, SHARDS, RUNS, ""):
            path = self.path(folder) if folder else self.root
            selector = pafs.FileSelector(path, allow_not_found=True)
            try:
                infos = self.fs.get_file_info(selector)
            except OSError:
                continue
            for info in infos:
                if info.type == pafs.FileType.File and _TEMPORARY in info.base_name:
                    self.fs.delete_file(info.path)
                    removed += 1
        return removed

    def clear_manifest(self) -> None:
        """Remove an unfinished listing before listing again."""
        info = self.fs.get_file_info(self.path(MANIFEST))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(MANIFEST))

    def write_run(self, run: str, record: dict[str, Any]) -> None:
        """Record one run's start (for status's rate)."""
        self.write_atomic((json.dumps(record) + "\n").encode(), RUNS, f"{run}.json")

    def runs(self) -> dict[str, dict[str, Any]]:
        """Every run's start record, by run id."""
        selector = pafs.FileSelector(self.path(RUNS), allow_not_found=True)
        found: dict[str, dict[str, Any]] = {}
        for info in self.fs.get_file_info(selector):
            if info.base_name.endswith(".json") and _TEMPORARY not in info.base_name:
                data = self.read_bytes(RUNS, info.base_name)
                if data is not None:
                    found[info.base_name.removesuffix(".json")] = json.loads(data)
        return found
