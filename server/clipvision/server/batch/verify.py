"""``verify`` proves a job's output against its manifest; ``status`` says how far it got.

verify reads every shard and checks, against the manifest listed at the start: each shard
is committed, holds the manifest's ids exactly (same order, none missing, none extra, none
twice), says the job's model and dimension, has a finite vector of that dimension in every
``ok`` row and a reason in every ``error`` row, and no shard file lies outside the
manifest. Since the manifest's ids are unique, every input then has exactly one row.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipvision.server.batch.manifest import read_manifest_shard
from clipvision.server.batch.shards import ERROR, OK, ShardSummary, output_schema, read_summary
from clipvision.server.batch.storage import MANIFEST, SHARDS, JobDirectory, JobRecord, part_name

# Shards read at once: object stores answer many small reads in parallel.
_READERS = 8


@dataclass
class Verification:
    """The outcome of verify: rows seen and every difference found."""

    shards: int = 0
    rows: int = 0
    ok: int = 0
    errors: int = 0
    problems: list[str] = field(default_factory=list)


def verify(directory: JobDirectory, record: JobRecord) -> Verification:
    """Check every shard of the job against its manifest shard."""
    result = Verification()
    committed = directory.parts(SHARDS)
    listed = directory.parts(MANIFEST)
    for shard in sorted(set(committed) - set(range(record.shards))):
        result.problems.append(f"{part_name(shard)}: a shard file outside the manifest")
    for shard in sorted(set(range(record.shards)) - set(listed)):
        result.problems.append(f"manifest {part_name(shard)}: missing")
    with ThreadPoolExecutor(_READERS) as pool:
        for shard, outcome in pool.map(
            lambda shard: (shard, _check_shard(directory, record, shard, shard in committed)),
            range(record.shards),
        ):
            rows, ok, problems = outcome
            result.rows += rows
            result.ok += ok
            result.errors += rows - ok
            result.shards += rows > 0 and not problems
            result.problems += [f"{part_name(shard)}: {problem}" for problem in problems]
    return result


def _check_shard(
    directory: JobDirectory, record: JobRecord, shard: int, committed: bool
) -> tuple[int, int, list[str]]:
    """(rows, ok rows, problems) of one shard."""
    try:
        ids, _ = read_manifest_shard(directory, shard)
    except Exception as exc:
        return 0, 0, [f"its manifest cannot be read ({exc})"]
    if len(ids) != record.shard_rows(shard):
        return 0, 0, [f"the manifest holds {len(ids)} ids, the job says {record.shard_rows(shard)}"]
    if not committed:
        return 0, 0, [f"not committed ({len(ids)} inputs without rows)"]
    data = directory.read_bytes(SHARDS, part_name(shard))
    if data is None:
        return 0, 0, ["vanished while verifying"]
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        return 0, 0, [f"not a readable Parquet file ({exc})"]
    problems = list(_differences(table, ids, record))
    status = table.column("status") if "status" in table.column_names else None
    ok = int(pc.sum(pc.equal(status, OK)).as_py() or 0) if status is not None else 0
    return table.num_rows, ok, problems


def _differences(table: pa.Table, ids: list[str], record: JobRecord) -> Iterator[str]:
    expected = output_schema(record.dim, record.kind)
    missing = [name for name in expected.names if name not in table.column_names]
    if missing:
        yield f"no {', '.join(missing)} column"
        return
    if table.schema.field("embedding").type != expected.field("embedding").type:
        yield f"embedding is {table.schema.field('embedding').type}, not {record.dim}-d float32"
        return
    got = table.column("id").to_pylist()
    if got != ids:
        yield from _id_differences(got, ids)
    models = set(table.column("model").to_pylist())
    if models != {record.model}:
        yield f"model {sorted(map(str, models))}, the job's is {record.model!r}"
    dims = set(table.column("dim").to_pylist())
    if dims != {record.dim}:
        yield f"dim {sorted(dims)}, the job's is {record.dim}"
    status = table.column("status").to_pylist()
    unknown = set(status) - {OK, ERROR}
    if unknown:
        yield f"status {sorted(map(str, unknown))} is neither ok nor error"
    embeddings = table.column("embedding").combine_chunks()
    valid = np.asarray(embeddings.is_valid())
    is_ok = np.array([value == OK for value in status], dtype=bool)
    if (bad := np.flatnonzero(is_ok & ~valid)).size:
        yield f"{bad.size} ok rows without an embedding (first: {got[bad[0]]!r})"
    if (bad := np.flatnonzero(~is_ok & valid)).size:
        yield f"{bad.size} error rows with an embedding (first: {got[bad[0]]!r})"
    values = embeddings.flatten().to_numpy(zero_copy_only=False)
    if values.size and not np.isfinite(values).all():
        yield "an embedding holds NaN or infinity"
    reasons = table.column("reason").to_pylist()
    if any(not reasons[row] for row in np.flatnonzero(~is_ok)):
        yield "an error row has no reason"


def _id_differences(got: list[str], ids: list[str]) -> Iterator[str]:
    expected, found = set(ids), set(got)
    if len(got) != len(ids):
        yield f"{len(got)} rows for {len(ids)} inputs"
    if lost := [row_id for row_id in ids if row_id not in found]:
        yield f"{len(lost)} inputs without a row (first: {lost[0]!r})"
    if extra := [row_id for row_id in got if row_id not in expected]:
        yield f"{len(extra)} rows of no input (first: {extra[0]!r})"
    if len(found) != len(got):
        twice = next(row_id for row_id in got if got.count(row_id) > 1)
        yield f"{len(got) - len(found)} rows repeated (first: {twice!r})"
    if not (lost or extra) and len(found) == len(got) == len(ids):
        yield "rows out of the manifest's order"


@dataclass
class Status:
    """How far a job got: shards and rows committed, and the rate of its latest run."""

    record: JobRecord
    shards_done: int
    rows_done: int
    ok: int
    errors: int
    rate: float | None
    """Inputs per second of the latest run that committed anything."""
    eta_s: float | None

    @property
    def complete(self) -> bool:
        """Whether every shard is committed."""
        return self.shards_done == self.record.shards


def status(directory: JobDirectory, record: JobRecord) -> Status:
    """Sum the committed shards' footers and time the latest run."""
    committed = sorted(shard for shard in directory.parts(SHARDS) if shard < record.shards)
    with ThreadPoolExecutor(_READERS) as pool:
        summaries = [
            summary
            for summary in pool.map(lambda shard: _summary(directory, shard), committed)
            if summary is not None
        ]
    rows = sum(summary.rows for summary in summaries)
    ok = sum(summary.ok for summary in summaries)
    runs = directory.runs()
    rate = eta = None
    latest = max(
        (s for s in summaries if s.run in runs), key=lambda s: s.committed_at, default=None
    )
    if latest is not None:
        mine = [s for s in summaries if s.run == latest.run]
        elapsed = max(s.committed_at for s in mine) - float(runs[latest.run]["started_at"])
        if elapsed > 0:
            rate = sum(s.rows for s in mine) / elapsed
            remaining = record.rows - rows
            eta = remaining / rate if remaining and rate else None
    return Status(record, len(committed), rows, ok, rows - ok, rate, eta)


def _summary(directory: JobDirectory, shard: int) -> ShardSummary | None:
    path = directory.path(SHARDS, part_name(shard))
    with directory.fs.open_input_file(path) as file:
        metadata = pq.read_metadata(file).metadata
    return read_summary(metadata, shard)


def format_duration(seconds: float) -> str:
    """``1 h 02 min``, ``3 min 05 s`` or ``12 s``."""
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
