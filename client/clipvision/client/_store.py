"""The output of ``clipvision embed``: an append-only ``.npy`` matrix and a JSON-lines index.

``OUT.npy`` is a float32 matrix with one row per embedded file (or text),
loadable with ``numpy.load`` (memory-mapped if you like) at any moment, even
mid-run. ``OUT.jsonl`` starts with one line describing the run (model,
normalisation, and ``"input": "text"`` for texts) and then holds one line per
file, in the order they were embedded::

    {"path": "/data/a.jpg", "status": "ok", "row": 0}
    {"path": "/data/b.jpg", "status": "failed", "code": "INVALID_ARGUMENT",
     "reason": "IMAGE_DECODE_FAILED", "message": "..."}

or, for texts, one line per distinct text::

    {"text": "a photo of a cat", "status": "ok", "row": 0, "truncated": false}

Crash safety comes from the order of writes for each chunk of results:

1. the chunk's vectors are appended to ``OUT.npy`` and flushed to disk;
2. the chunk's index lines are appended to ``OUT.jsonl`` and flushed: a file
   counts as done once its complete line is on disk, and an ``ok`` line is
   only written after its row;
3. the row count in the ``.npy`` header is updated.

A run killed at any point leaves at worst a torn last line in the index and
rows past the last indexed one; opening the store again cuts both off, so
resuming never writes a file's row twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np

from clipvision.client._errors import ClipVisionError
from clipvision.client._messages import FloatArray, TextEmbedding

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks
    fcntl = None  # type: ignore[assignment]

FORMAT = "clipvision-embeddings"
VERSION = 1
# A fixed-size .npy header, so that the row count can be rewritten in place.
HEADER_BYTES = 128
_MAGIC = b"\x93NUMPY\x01\x00"
_ROW_DTYPE = np.dtype("<f4")

InputKind = Literal["image", "text"]
"""What an output holds: embeddings of image files (keyed by path) or of texts (keyed by text)."""
_KEY_FIELD: dict[InputKind, str] = {"image": "path", "text": "text"}


class StoreError(Exception):
    """The output cannot be created or resumed as asked; the message says what to do."""


@dataclass(frozen=True)
class IndexEntry:
    """One file's (or text's) line in the index."""

    key: str
    """The file's absolute path, or the text itself."""
    status: Literal["ok", "failed"]
    row: int | None = None
    code: str = ""
    reason: str = ""
    message: str = ""
    truncated: bool | None = None
    """Texts only: whether the text was cut to the model's context."""

    def to_json(self, key_field: str = "path") -> dict[str, Any]:
        """The JSON object of this line; ``key_field`` names the key ("path" or "text")."""
        if self.status == "ok":
            line: dict[str, Any] = {key_field: self.key, "status": "ok", "row": self.row}
            if self.truncated is not None:
                line["truncated"] = self.truncated
            return line
        return {
            key_field: self.key,
            "status": "failed",
            "code": self.code,
            "reason": self.reason,
            "message": self.message,
        }


def index_path_for(npy_path: Path) -> Path:
    """The index that goes with an embeddings file: ``OUT.npy`` -> ``OUT.jsonl``."""
    return npy_path.with_suffix(".jsonl")


class EmbeddingStore:
    """An open output: what it already holds, and a way to append committed chunks."""

    def __init__(
        self,
        npy_path: Path,
        index: IO[bytes],
        entries: dict[str, IndexEntry],
        rows: int,
        dimension: int | None,
        repaired: bool,
        kind: InputKind = "image",
    ) -> None:
        self.npy_path = npy_path
        self.kind = kind
        self.index_path = index_path_for(npy_path)
        self._index = index
        self._entries = entries
        self._rows = rows
        self._dimension = dimension
        self._npy: IO[bytes] | None = npy_path.open("r+b") if dimension is not None else None
        self.repaired = repaired
        """True when opening found the traces of an interrupted write and cut them off."""

    @classmethod
    def open(
        cls,
        npy_path: Path,
        *,
        model: str,
        normalized: bool,
        overwrite: bool = False,
        kind: InputKind = "image",
    ) -> EmbeddingStore:
        """Create the output, or reopen it to add to it (resume), checking it is compatible.

        Raises StoreError when the output belongs to another model,
        normalisation or kind of input, is damaged beyond a torn tail, or is
        being written by another process.
        """
        if npy_path.suffix != ".npy":
            raise StoreError(f"--out must name a .npy file, got {npy_path}")
        index_path = index_path_for(npy_path)
        if overwrite:
            for path in (npy_path, index_path):
                path.unlink(missing_ok=True)
        meta: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "model": model,
            "normalized": normalized,
        }
        if kind != "image":  # image outputs predate the field: its absence means images
            meta["input"] = kind
        if not index_path.exists():
            if npy_path.exists():
                raise StoreError(
                    f"{npy_path} exists without its index {index_path.name}; remove it, pass "
                    "--overwrite, or choose another --out"
                )
            _create_index(index_path, meta)
        index = index_path.open("r+b")
        try:
            _lock(index, index_path)
            entries, rows, cut = _read_index(index, index_path, meta, kind)
            dimension, extra_rows = _repair_npy(npy_path, rows)
        except BaseException:
            index.close()
            raise
        index.seek(0, os.SEEK_END)
        return cls(npy_path, index, entries, rows, dimension, cut or extra_rows, kind)

    @property
    def entries(self) -> Mapping[str, IndexEntry]:
        """Every file (text) the output holds, embedded or failed, by absolute path (text)."""
        return self._entries

    @property
    def rows(self) -> int:
        """How many embeddings the .npy file holds."""
        return self._rows

    def append(
        self, results: Sequence[tuple[str, FloatArray | TextEmbedding | ClipVisionError]]
    ) -> None:
        """Write one chunk of results durably (see the module docstring for the order)."""
        if not results:
            return
        vectors = [
            result.vector if isinstance(result, TextEmbedding) else result
            for _, result in results
            if not isinstance(result, ClipVisionError)
        ]
        if vectors:
            matrix = np.ascontiguousarray(np.stack(vectors), dtype=_ROW_DTYPE)
            npy = self._npy_for(matrix.shape[1])
            npy.seek(HEADER_BYTES + self._rows * matrix.shape[1] * _ROW_DTYPE.itemsize)
            npy.write(matrix.tobytes())
            _sync(npy)
        lines: list[bytes] = []
        added: list[IndexEntry] = []
        row = self._rows
        key_field = _KEY_FIELD[self.kind]
        for key, result in results:
            if isinstance(result, ClipVisionError):
                entry = IndexEntry(
                    key, "failed", None, result.code.name, result.reason, result.message
                )
            else:
                truncated = result.truncated if isinstance(result, TextEmbedding) else None
                entry = IndexEntry(key, "ok", row, truncated=truncated)
                row += 1
            added.append(entry)
            lines.append(json.dumps(entry.to_json(key_field)).encode() + b"\n")
        self._index.write(b"".join(lines))
        _sync(self._index)
        self._rows = row
        for entry in added:
            self._entries.setdefault(entry.key, entry)
        if vectors and self._npy is not None and self._dimension is not None:
            self._npy.seek(0)
            self._npy.write(_npy_header(self._rows, self._dimension))
            _sync(self._npy)

    def close(self) -> None:
        """Close both files (everything appended is already on disk)."""
        if self._npy is not None:
            self._npy.close()
        self._index.close()

    def _npy_for(self, dimension: int) -> IO[bytes]:
        if self._dimension is None:
            with self.npy_path.open("wb") as npy:
                npy.write(_npy_header(0, dimension))
                _sync(npy)
            self._dimension = dimension
            self._npy = self.npy_path.open("r+b")
        elif dimension != self._dimension:
            raise StoreError(
                f"the server returned {dimension}-d embeddings but {self.npy_path} holds "
                f"{self._dimension}-d ones"
            )
        assert self._npy is not None
        return self._npy


def _sync(file: IO[bytes]) -> None:
    file.flush()
    os.fsync(file.fileno())


def _npy_header(rows: int, dimension: int) -> bytes:
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dimension}), }}"
    length = HEADER_BYTES - len(_MAGIC) - 2
    return _MAGIC + struct.pack("<H", length) + (text.ljust(length - 1) + "\n").encode("latin1")


def _create_index(index_path: Path, meta: dict[str, Any]) -> None:
    # Written whole under a temporary name and renamed, so an index never lacks its first line.
    partial = index_path.with_name(index_path.name + ".partial")
    with partial.open("wb") as file:
        file.write(json.dumps(meta).encode() + b"\n")
        _sync(file)
    os.replace(partial, index_path)
    with contextlib.suppress(OSError):  # directories cannot be fsync'd everywhere
        directory = os.open(index_path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _lock(index: IO[bytes], index_path: Path) -> None:
    if fcntl is None:  # pragma: no cover
        return
    try:
        fcntl.flock(index.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StoreError(f"another process is writing {index_path}; wait for it to end") from None


def _read_index(
    index: IO[bytes], index_path: Path, meta: dict[str, Any], kind: InputKind
) -> tuple[dict[str, IndexEntry], int, bool]:
    """The entries and row count of the index's intact prefix; cuts off anything after it."""
    data = index.read()
    lines = data.split(b"\n")
    # The part after the last newline is incomplete by definition (empty when all is well).
    complete = lines[:-1]
    if not complete:
        raise StoreError(f"{index_path} is not a clipvision index; use another --out")
    try:
        found = json.loads(complete[0])
    except ValueError:
        found = None
    if not isinstance(found, dict) or found.get("format") != FORMAT:
        raise StoreError(f"{index_path} is not a clipvision index; use another --out")
    held = found.get("input", "image")
    if held != kind:
        raise StoreError(
            f"{index_path} holds embeddings of {held}s, not of {kind}s; use another --out"
        )
    if (found.get("model"), found.get("normalized")) != (meta["model"], meta["normalized"]):
        raise StoreError(
            f"{index_path} holds embeddings of model {found.get('model')!r} "
            f"(normalized={found.get('normalized')}), not {meta['model']!r} "
            f"(normalized={meta['normalized']}); use another --out, or --overwrite"
        )
    entries: dict[str, IndexEntry] = {}
    rows = 0
    intact = len(complete[0]) + 1
    for line in complete[1:]:
        entry = _parse_entry(line, rows, _KEY_FIELD[kind])
        if entry is None:
            break  # a torn write: this line and all after it are cut off
        entries.setdefault(entry.key, entry)
        rows += entry.status == "ok"
        intact += len(line) + 1
    cut = intact < len(data)
    if cut:
        index.truncate(intact)
        _sync(index)
    return entries, rows, cut


def _parse_entry(line: bytes, next_row: int, key_field: str) -> IndexEntry | None:
    try:
        found = json.loads(line)
    except ValueError:
        return None
    if not isinstance(found, dict) or not isinstance(found.get(key_field), str):
        return None
    key = found[key_field]
    if found.get("status") == "ok":
        # Rows are assigned in order; anything else is not a line this module wrote.
        if found.get("row") != next_row:
            return None
        truncated = found.get("truncated")
        return IndexEntry(
            key, "ok", next_row, truncated=None if truncated is None else truncated is True
        )
    if found.get("status") == "failed":
        return IndexEntry(
            key,
            "failed",
            None,
            str(found.get("code", "")),
            str(found.get("reason", "")),
            str(found.get("message", "")),
        )
    return None


def _repair_npy(npy_path: Path, rows: int) -> tuple[int | None, bool]:
    """Cut the .npy file to the rows the index vouches for; returns its dimension and
    whether there was anything to cut."""
    if not npy_path.exists():
        if rows:
            raise StoreError(
                f"{npy_path} is missing but its index lists {rows} embeddings; use --overwrite"
            )
        return None, False
    with npy_path.open("r+b") as npy:
        try:
            version = np.lib.format.read_magic(npy)
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(npy)
        except ValueError as exc:
            raise StoreError(f"{npy_path} is not a readable .npy file; use --overwrite") from exc
        ours = version == (1, 0) and npy.tell() == HEADER_BYTES and dtype == _ROW_DTYPE
        if not ours or fortran or len(shape) != 2:
            raise StoreError(f"{npy_path} was not written by clipvision embed; use --overwrite")
        dimension = int(shape[1])
        needed = HEADER_BYTES + rows * dimension * _ROW_DTYPE.itemsize
        size = os.fstat(npy.fileno()).st_size
        if size < needed:
            raise StoreError(
                f"{npy_path} holds fewer embeddings than its index lists; use --overwrite"
            )
        npy.truncate(needed)
        npy.seek(0)
        npy.write(_npy_header(rows, dimension))
        _sync(npy)
    return dimension, size > needed
