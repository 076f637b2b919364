"""The batch job's own protocol, without Ray: listing, shards, commits and what verify catches.

A job is built here as a run would leave it (manifest, committed shards) and then damaged
the ways a lossy job would be; verify must name each difference and exit 1.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipvision.server.batch.cli import main
from clipvision.server.batch.manifest import InputOptions, list_input, write_manifest
from clipvision.server.batch.shards import ShardAssembler
from clipvision.server.batch.storage import (
    SHARDS,
    JobDirectory,
    JobRecord,
    StorageError,
    part_name,
)
from clipvision.server.batch.verify import verify

DIM = 4


def make_job(root: Path, rows: int = 10, shard_size: int = 4) -> tuple[JobDirectory, JobRecord]:
    """A complete job of ``rows`` inputs, as a run commits it."""
    directory = JobDirectory(str(root))
    listed = [(f"img-{n:02d}.jpg", f"/photos/img-{n:02d}.jpg") for n in range(rows)]
    assert write_manifest(directory, listed, shard_size) == rows
    record = JobRecord("/photos", "image", "tiny", DIM, True, -(-rows // shard_size), rows,
                       shard_size, "now")  # fmt: skip
    directory.write_atomic(record.to_json(), "job.json")
    for shard in range(record.shards):
        assembler = ShardAssembler(shard, record.shard_rows(shard), DIM, "image")
        for index in range(assembler.count):
            row_id, source = listed[shard * shard_size + index]
            if index == 1:
                assembler.add(index, row_id, source, None, "IMAGE_DECODE_FAILED", "corrupt")
            else:
                assembler.add(index, row_id, source, np.full(DIM, 0.5, np.float32), None, None)
        directory.write_atomic(assembler.parquet("tiny", "run-1"), SHARDS, part_name(shard))
    return directory, record


def rewrite(root: Path, shard: int, change: object) -> None:
    """Replace a committed shard's table with ``change(table)``."""
    path = root / SHARDS / part_name(shard)
    table = pq.read_table(path)
    pq.write_table(change(table), path)  # type: ignore[operator]


def test_a_complete_job_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory, record = make_job(tmp_path)
    assert verify(directory, record).problems == []
    assert main(["verify", str(tmp_path)]) == 0
    assert "10 rows (7 ok, 3 error)" in capsys.readouterr().out
    assert main(["status", str(tmp_path)]) == 0
    assert "shards  3/3 committed" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda t: t.slice(0, 3), "part-000000.parquet: 3 rows for 4 inputs"),
        (
            lambda t: pa.concat_tables([t, t.slice(0, 1)]),
            "part-000000.parquet: 1 rows repeated (first: 'img-00.jpg')",
        ),
        (
            lambda t: t.set_column(0, "id", pa.array(["x", *t.column("id").to_pylist()[1:]])),
            "part-000000.parquet: 1 inputs without a row (first: 'img-00.jpg')",
        ),
        (
            lambda t: t.set_column(2, "model", pa.array(["other"] * t.num_rows)),
            "part-000000.parquet: model ['other'], the job's is 'tiny'",
        ),
        (
            lambda t: t.set_column(5, "status", pa.array(["ok"] * t.num_rows)),
            "part-000000.parquet: 1 ok rows without an embedding (first: 'img-01.jpg')",
        ),
    ],
)
def test_verify_names_each_difference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: object, expected: str
) -> None:
    directory, record = make_job(tmp_path)
    rewrite(tmp_path, 0, damage)
    assert expected in verify(directory, record).problems
    assert main(["verify", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert f"DIFFERENCE {expected}" in captured.out
    assert "verify FAILED" in captured.err


def test_verify_finds_missing_and_stray_shards(tmp_path: Path) -> None:
    directory, record = make_job(tmp_path)
    (tmp_path / SHARDS / part_name(1)).rename(tmp_path / SHARDS / part_name(7))
    assert verify(directory, record).problems == [
        "part-000007.parquet: a shard file outside the manifest",
        "part-000001.parquet: not committed (4 inputs without rows)",
    ]


def test_a_temporary_file_is_never_taken_for_a_committed_shard(tmp_path: Path) -> None:
    directory, _ = make_job(tmp_path)
    (tmp_path / SHARDS / part_name(2)).rename(tmp_path / SHARDS / ".part-000002.parquet.tmp-x")
    assert directory.committed() == {0, 1}
    assert directory.remove_temporaries() == 1
    assert not list((tmp_path / SHARDS).glob(".*"))


def test_a_row_delivered_twice_fills_its_slot_once() -> None:
    assembler = ShardAssembler(0, 2, DIM, "image")
    vector = np.ones(DIM, np.float32)
    assert assembler.add(0, "a", "s3://b/a", vector, None, None)
    assert not assembler.add(0, "a", "s3://b/a", vector, None, None)
    assert not assembler.complete
    assert assembler.add(1, "b", "s3://b/b", None, "IMAGE_EMPTY", "empty")
    assert assembler.complete
    table = assembler.table("tiny")
    assert table.column("id").to_pylist() == ["a", "b"]
    assert table.column("embedding").to_pylist()[1] is None


def test_listing_a_folder_keeps_image_files_in_a_stable_order(tmp_path: Path) -> None:
    for name in ("b/2.png", "a.jpg", "b/1.JPEG", "notes.txt", "c/d/e.webp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    listing = list_input(str(tmp_path), InputOptions())
    assert [row_id for row_id, _ in listing.rows] == ["a.jpg", "b/1.JPEG", "b/2.png", "c/d/e.webp"]
    assert listing.left_out == [1]
    assert listing.roots == (str(tmp_path),)
    everything = list_input(str(tmp_path), InputOptions(all_files=True))
    assert len(list(everything.rows)) == 5
    globbed = list_input(f"{tmp_path}/**/*.png", InputOptions())
    assert [(row_id, source) for row_id, source in globbed.rows] == [
        ("b/2.png", f"{tmp_path}/b/2.png")
    ]


def test_a_manifest_that_repeats_an_id_is_refused(tmp_path: Path) -> None:
    manifest = tmp_path / "list.txt"
    manifest.write_text("s3://b/1.jpg\n# a comment\ns3://b/2.jpg\n\ns3://b/1.jpg\n")
    directory = JobDirectory(str(tmp_path / "out"))
    with pytest.raises(StorageError, match=r"lists id 's3://b/1.jpg' more than once"):
        write_manifest(directory, list_input(str(manifest), InputOptions()).rows, 2)


def test_the_reader_stage_and_verify_import_no_torch() -> None:
    # Reader actors (one per spare CPU) and status/verify never run the model: without
    # torch they start in a fraction of the time and hold none of its memory.
    code = (
        "import sys\n"
        "import clipvision.server.batch.stages, clipvision.server.batch.cli\n"
        "print(sorted(name for name in ('torch', 'transformers') if name in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
