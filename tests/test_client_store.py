"""The embed output (.npy + .jsonl index): always loadable, and repaired after a torn write.

A real kill lands wherever it lands (tests/test_client_cli.py does that); here
the torn states a kill can leave are made on purpose, one by one.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from clipvision.client import ClipVisionError, FloatArray, error_from_status
from clipvision.client._store import EmbeddingStore, StoreError

DIM = 8


def vector(seed: int) -> FloatArray:
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


def bad_image(path: str) -> tuple[str, ClipVisionError]:
    error = error_from_status(
        grpc.StatusCode.INVALID_ARGUMENT, "IMAGE_DECODE_FAILED", "The image is corrupt."
    )
    return path, error


def open_store(out: Path, **changes: object) -> EmbeddingStore:
    options: dict[str, object] = {"model": "tiny", "normalized": True, **changes}
    return EmbeddingStore.open(out, **options)  # type: ignore[arg-type]


def index_lines(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]


def written(tmp_path: Path) -> Path:
    """An output holding a, b (failed), c, d."""
    out = tmp_path / "emb.npy"
    store = open_store(out)
    store.append([("/a", vector(0)), bad_image("/b")])
    store.append([("/c", vector(2)), ("/d", vector(3))])
    store.close()
    return out


def test_the_output_is_a_loadable_matrix_and_an_index_in_order(tmp_path: Path) -> None:
    out = tmp_path / "emb.npy"
    store = open_store(out)
    store.append([("/a", vector(0)), bad_image("/b")])
    assert np.load(out).shape == (1, DIM)  # loadable between chunks, mid-run
    store.append([("/c", vector(2))])
    store.close()
    np.testing.assert_array_equal(np.load(out), np.stack([vector(0), vector(2)]))
    np.testing.assert_array_equal(np.load(out, mmap_mode="r")[1], vector(2))
    meta, *entries = index_lines(out)
    assert meta == {
        "format": "clipvision-embeddings",
        "version": 1,
        "model": "tiny",
        "normalized": True,
    }
    assert entries == [
        {"path": "/a", "status": "ok", "row": 0},
        {
            "path": "/b",
            "status": "failed",
            "code": "INVALID_ARGUMENT",
            "reason": "IMAGE_DECODE_FAILED",
            "message": "The image is corrupt.",
        },
        {"path": "/c", "status": "ok", "row": 1},
    ]


@pytest.mark.parametrize(
    "torn_tail",
    [
        b'{"path": "/e", "sta',  # killed mid-line
        b'{"path": "/e", "status": "ok", "row": 3}',  # complete JSON, but no newline yet
        b"\x00" * 40 + b"\n",  # a power cut can leave zeros
        b'{"path": "/e", "status": "ok", "row": 9}\n',  # a row the .npy cannot vouch for
    ],
)
def test_a_torn_index_tail_and_unindexed_rows_are_cut_off_on_reopen(
    tmp_path: Path, torn_tail: bytes
) -> None:
    out = written(tmp_path)
    with out.open("ab") as npy:  # rows written, then killed before their index lines
        npy.write(vector(4).tobytes() + vector(5).tobytes()[:5])
    with out.with_suffix(".jsonl").open("ab") as index:
        index.write(torn_tail)

    store = open_store(out)
    assert store.repaired
    assert sorted(store.entries) == ["/a", "/b", "/c", "/d"]
    assert store.rows == 3
    store.append([("/e", vector(4))])
    store.close()

    np.testing.assert_array_equal(
        np.load(out), np.stack([vector(0), vector(2), vector(3), vector(4)])
    )
    paths = [entry["path"] for entry in index_lines(out)[1:]]
    assert paths == ["/a", "/b", "/c", "/d", "/e"]
    assert [e["row"] for e in index_lines(out)[1:] if e["status"] == "ok"] == [0, 1, 2, 3]


def test_a_clean_output_reopens_untouched(tmp_path: Path) -> None:
    out = written(tmp_path)
    before = (out.read_bytes(), out.with_suffix(".jsonl").read_bytes())
    store = open_store(out)
    store.close()
    assert not store.repaired
    assert (out.read_bytes(), out.with_suffix(".jsonl").read_bytes()) == before


def test_an_output_of_another_model_or_normalisation_is_refused(tmp_path: Path) -> None:
    out = written(tmp_path)
    with pytest.raises(StoreError, match="model 'tiny'"):
        open_store(out, model="other")
    with pytest.raises(StoreError, match="normalized=True"):
        open_store(out, normalized=False)
    open_store(out, model="other", overwrite=True).close()
    assert index_lines(out)[0]["model"] == "other"
    assert not out.exists()  # nothing embedded yet: the matrix comes with the first row


def test_a_second_writer_is_refused(tmp_path: Path) -> None:
    out = written(tmp_path)
    first = open_store(out)
    try:
        with pytest.raises(StoreError, match="another process"):
            open_store(out)
    finally:
        first.close()


def test_outputs_that_are_not_ours_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"\.npy"):
        open_store(tmp_path / "emb.parquet")
    stray = tmp_path / "stray.npy"
    np.save(stray, np.zeros((2, DIM), np.float32))
    with pytest.raises(StoreError, match="without its index"):
        open_store(stray)
    foreign = tmp_path / "foreign.npy"
    foreign.with_suffix(".jsonl").write_text('{"hello": 1}\n')
    with pytest.raises(StoreError, match="not a clipvision index"):
        open_store(foreign)
