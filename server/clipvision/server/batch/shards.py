"""One shard's output file: a row per input, in manifest order, as one Parquet table.

Columns: ``id`` and ``source`` (from the manifest), ``model``, ``dim``, ``embedding``
(a fixed-size list of float32; null for an error), ``status`` (``ok`` or ``error``),
``reason`` and ``message`` (the server's ItemError fields; null when ok), and for texts
``truncated``. The file's metadata says which run committed it, when, and its counts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

OK, ERROR = "ok", "error"
METADATA_KEY = b"clipvision"

FloatArray = npt.NDArray[np.float32]


def output_schema(dim: int, kind: str) -> pa.Schema:
    """The columns of every shard file of a job."""
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("dim", pa.int32(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32(), dim)),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("message", pa.string()),
    ]
    if kind == "text":
        fields.append(pa.field("truncated", pa.bool_(), nullable=False))
    return pa.schema(fields)


@dataclass(frozen=True)
class ShardSummary:
    """What a committed shard file says about itself (its footer's metadata)."""

    shard: int
    rows: int
    ok: int
    errors: int
    run: str
    committed_at: float


class ShardAssembler:
    """Collects one shard's rows as they come back in any order; each slot is filled once.

    A row that arrives twice (a retried task) lands in the slot it already filled, so the
    shard holds each input exactly once whatever the engine delivers.
    """

    def __init__(self, shard: int, count: int, dim: int, kind: str) -> None:
        self.shard = shard
        self.count = count
        self.dim = dim
        self.kind = kind
        self._filled = np.zeros(count, dtype=bool)
        self._embeddings = np.zeros((count, dim), dtype=np.float32)
        self._ids: list[str] = [""] * count
        self._sources: list[str] = [""] * count
        self._status: list[str] = [ERROR] * count
        self._reasons: list[str | None] = [None] * count
        self._messages: list[str | None] = [None] * count
        self._truncated = np.zeros(count, dtype=bool)

    @property
    def filled(self) -> int:
        """Slots filled so far."""
        return int(self._filled.sum())

    @property
    def ok(self) -> int:
        """Rows filled with an embedding."""
        return sum(
            status == OK
            for status, filled in zip(self._status, self._filled, strict=True)
            if filled
        )

    @property
    def complete(self) -> bool:
        """Whether every input of the shard has its row."""
        return bool(self._filled.all())

    def add(
        self,
        index: int,
        row_id: str,
        source: str,
        embedding: FloatArray | None,
        reason: str | None,
        message: str | None,
        truncated: bool = False,
    ) -> bool:
        """Fill slot ``index``: an embedding, or the reason and message of an error.

        Returns whether the slot was new.
        """
        if not 0 <= index < self.count:
            raise ValueError(f"shard {self.shard} has no row {index}")
        new = not self._filled[index]
        self._filled[index] = True
        self._ids[index] = row_id
        self._sources[index] = source
        self._truncated[index] = truncated
        if embedding is None:
            self._status[index] = ERROR
            self._reasons[index] = reason or "INTERNAL"
            self._messages[index] = message or ""
        else:
            if embedding.shape != (self.dim,):
                raise ValueError(
                    f"shard {self.shard} row {index}: a {embedding.shape} vector, not {self.dim}-d"
                )
            self._embeddings[index] = embedding
            self._status[index] = OK
            self._reasons[index] = self._messages[index] = None
        return new

    def table(self, model: str) -> pa.Table:
        """The shard's rows as the output schema's table (call once it is complete)."""
        ok = np.array([status == OK for status in self._status], dtype=bool)
        values = pa.array(self._embeddings.reshape(-1), type=pa.float32())
        embeddings = pa.FixedSizeListArray.from_arrays(values, self.dim, mask=pa.array(~ok))
        columns: dict[str, Any] = {
            "id": self._ids,
            "source": self._sources,
            "model": [model] * self.count,
            "dim": np.full(self.count, self.dim, dtype=np.int32),
            "embedding": embeddings,
            "status": self._status,
            "reason": self._reasons,
            "message": self._messages,
        }
        if self.kind == "text":
            columns["truncated"] = self._truncated
        schema = output_schema(self.dim, self.kind)
        return pa.table(columns, schema=schema)

    def parquet(self, model: str, run: str) -> bytes:
        """The shard file's bytes, with its summary in the footer."""
        table = self.table(model)
        ok = sum(status == OK for status in self._status)
        summary = {
            "shard": self.shard,
            "rows": self.count,
            "ok": ok,
            "errors": self.count - ok,
            "run": run,
            "committed_at": time.time(),
        }
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(summary).encode()})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data: bytes = sink.getvalue().to_pybytes()
        return data


def read_summary(metadata: dict[bytes, bytes] | None, shard: int) -> ShardSummary | None:
    """The summary a shard file's footer holds, or None if it has none."""
    raw = (metadata or {}).get(METADATA_KEY)
    if raw is None:
        return None
    fields = json.loads(raw)
    if fields.get("shard") != shard:
        return None
    return ShardSummary(
        shard=shard,
        rows=int(fields["rows"]),
        ok=int(fields["ok"]),
        errors=int(fields["errors"]),
        run=str(fields["run"]),
        committed_at=float(fields["committed_at"]),
    )
