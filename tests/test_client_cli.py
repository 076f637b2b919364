"""The ``clipvision`` command against a real server: ingestion, failures, kill and resume.

The command runs as a child process (as a user runs it) while the server runs
on this test's event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipvision.client import AsyncEmbeddingClient
from clipvision.client._store import EmbeddingStore
from clipvision.server.config.settings import Settings
from tests.conftest import encode, photo_bytes
from tests.live_server import LiveServer, live_server

RUN_TIMEOUT = 60.0
DISTINCT = 40


@pytest.fixture(scope="module")
async def live(base_settings: Settings) -> AsyncIterator[LiveServer]:
    async with live_server(base_settings) as server:
        yield server


@dataclass(frozen=True)
class Corpus:
    """A folder tree of 1,000 image files, some corrupt, plus files that are not images."""

    root: Path
    good: list[str]
    """Absolute paths of the decodable images, in the order the command walks them."""
    bad: dict[str, str]
    """Absolute path of each corrupt image -> the reason the server gives."""
    source: dict[str, int]
    """Absolute path of each good image -> which of the DISTINCT images it holds."""
    distinct: list[bytes]


def distinct_image(index: int) -> Image.Image:
    image = Image.new("RGB", (16, 16), ((index * 37) % 256, (index * 91) % 256, 128))
    image.putpixel((index % 16, index // 16), (255, 255, 255))
    return image


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("corpus")
    # A few dozen different pictures, repeated under different names (PNG and JPEG files
    # of one picture decode to different pixels, so each encoding is its own reference).
    pictures = [distinct_image(i) for i in range(DISTINCT // 2)]
    distinct = [encode(p, "PNG") for p in pictures] + [encode(p, "JPEG") for p in pictures]
    truncated_jpeg = photo_bytes("rocket.jpg")[:600]
    corrupt = [
        (b"this is not an image", "IMAGE_FORMAT_UNSUPPORTED"),
        (truncated_jpeg, "IMAGE_DECODE_FAILED"),
        (b"", "IMAGE_EMPTY"),
    ]
    good: list[str] = []
    bad: dict[str, str] = {}
    source: dict[str, int] = {}
    for number in range(1000):
        folder = root / f"batch_{number // 100:02d}"
        if number // 100 == 5 and number % 100 >= 50:
            folder = folder / "nested"  # walked after batch_05's own files
        folder.mkdir(parents=True, exist_ok=True)
        which = number % DISTINCT
        path = folder / f"img_{number:04d}{'.png' if which < DISTINCT // 2 else '.jpg'}"
        if number % 37 == 11:
            content, reason = corrupt[number % len(corrupt)]
            bad[str(path)] = reason
        else:
            content = distinct[which]
            good.append(str(path))
            source[str(path)] = which
        path.write_bytes(content)
    (root / "batch_00" / "notes.txt").write_text("not an image, not embedded")
    (root / "batch_03" / "thumbs.db").write_bytes(b"\x00" * 64)
    # The walk order is the sorted order of the paths, by construction of the names.
    good.sort()
    return Corpus(root, good, bad, source, distinct)


@pytest.fixture(scope="module")
async def references(live: LiveServer, corpus: Corpus) -> list[np.ndarray]:
    """The embedding of each distinct image, from the Python client."""
    async with AsyncEmbeddingClient(live.address) as client:
        return [await client.embed_image(content, model="tiny") for content in corpus.distinct]


async def start_cli(*args: str | Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clipvision.client.cli",
        *map(str, args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(process: asyncio.subprocess.Process) -> tuple[int, str, str]:
    try:
        out, err = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def run_cli(*args: str | Path) -> tuple[int, str, str]:
    return await finish(await start_cli(*args))


def count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


async def wait_for_lines(index: Path, count: int, process: asyncio.subprocess.Process) -> None:
    """Wait until ``index`` has ``count`` lines; the run must still be going by then."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while count_lines(index) < count:
        assert process.returncode is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "the run made no progress"
        await asyncio.sleep(0.005)


def read_output(out: Path) -> tuple[np.ndarray, list[dict[str, object]]]:
    lines = out.with_suffix(".jsonl").read_text().splitlines()
    return np.load(out), [json.loads(line) for line in lines[1:]]


def check_complete(
    out: Path, corpus: Corpus, references: list[np.ndarray]
) -> list[dict[str, object]]:
    """Every good file exactly once, in order, with its own embedding; every bad one failed."""
    matrix, entries = read_output(out)
    ok = [e for e in entries if e["status"] == "ok"]
    failed = {str(e["path"]): e["reason"] for e in entries if e["status"] == "failed"}
    assert [e["path"] for e in ok] == corpus.good
    assert [e["row"] for e in ok] == list(range(len(corpus.good)))
    assert failed == corpus.bad
    assert matrix.shape == (len(corpus.good), 16)
    expected = np.stack([references[corpus.source[path]] for path in corpus.good])
    np.testing.assert_allclose(matrix, expected, atol=1e-5)
    return entries


async def test_ingests_1000_files_keeping_order_and_listing_every_failure(
    live: LiveServer, corpus: Corpus, references: list[np.ndarray], tmp_path: Path
) -> None:
    out = tmp_path / "embeddings.npy"
    code, _, err = await run_cli(
        "embed", corpus.root, "--server", live.address, "--out", out, "--model", "tiny"
    )
    assert code == 1, err  # some files failed
    check_complete(out, corpus, references)
    assert f"embedded {len(corpus.good)}, failed {len(corpus.bad)}" in err
    for path, reason in corpus.bad.items():
        assert f"{path}: {reason}" in err

    # A rerun finds everything done, embeds nothing and changes nothing.
    before = out.read_bytes(), out.with_suffix(".jsonl").read_bytes()
    code, _, err = await run_cli("embed", corpus.root, "--server", live.address, "--out", out)
    assert code == 1
    assert f"1000 already in {out}; embedding 0" in err
    assert (out.read_bytes(), out.with_suffix(".jsonl").read_bytes()) == before


@dataclass(frozen=True)
class Gate:
    """A named pipe posing as the last image: a run cannot finish until the test feeds it,
    so a test can interrupt a run that is certainly still going."""

    folder: Path
    path: Path
    content: bytes
    which: int

    async def feed_until_exit(self, process: asyncio.subprocess.Process) -> None:
        """Give the run the image if it opens the pipe, however long it takes to get there."""
        fed = False
        while process.returncode is None:
            if not fed:
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:  # no reader yet
                    pass
                else:
                    with os.fdopen(fd, "wb") as pipe:
                        pipe.write(self.content)
                    fed = True
            await asyncio.sleep(0.01)


@pytest.fixture
def gate(corpus: Corpus, tmp_path: Path) -> Gate:
    folder = tmp_path / "zz_gate"
    folder.mkdir()
    path = folder / "last.png"
    os.mkfifo(path)
    return Gate(folder, path, corpus.distinct[7], 7)


async def run_through_gate(gate: Gate, *args: str | Path) -> tuple[int, str, str]:
    process = await start_cli(*args)
    feeding = asyncio.create_task(gate.feed_until_exit(process))
    try:
        return await finish(process)
    finally:
        await feeding


def with_gate(corpus: Corpus, gate: Gate) -> Corpus:
    good = [*corpus.good, str(gate.path)]
    return Corpus(corpus.root, good, corpus.bad, {**corpus.source, str(gate.path): gate.which},
                  corpus.distinct)  # fmt: skip


async def test_a_killed_run_resumes_without_embedding_any_file_twice(
    live: LiveServer, corpus: Corpus, gate: Gate, references: list[np.ndarray], tmp_path: Path
) -> None:
    out = tmp_path / "embeddings.npy"
    args = ("embed", corpus.root, gate.folder, "--server", live.address, "--out", out,
            "--commit-every", "7")  # fmt: skip
    process = await start_cli(*args)
    await wait_for_lines(out.with_suffix(".jsonl"), 300, process)
    process.kill()  # SIGKILL: no chance to tidy up, wherever it was
    await process.wait()

    code, _, err = await run_through_gate(gate, *args)
    assert code == 1, err
    done_before = int(err.split(" already in ")[0].rsplit("; ", 1)[1])
    assert 300 <= done_before < 1000
    check_complete(out, with_gate(corpus, gate), references)


async def test_an_interrupted_run_saves_what_it_has_and_resumes(
    live: LiveServer, corpus: Corpus, gate: Gate, references: list[np.ndarray], tmp_path: Path
) -> None:
    out = tmp_path / "embeddings.npy"
    args = ("embed", corpus.root, gate.folder, "--server", live.address, "--out", out,
            "--commit-every", "7")  # fmt: skip
    process = await start_cli(*args)
    await wait_for_lines(out.with_suffix(".jsonl"), 300, process)
    process.send_signal(signal.SIGINT)
    feeding = asyncio.create_task(gate.feed_until_exit(process))
    code, _, err = await finish(process)
    await feeding
    assert code == 130, err
    assert "rerun the same command to resume" in err

    # A clean stop leaves nothing to repair: the results it had were saved whole.
    matrix, entries = read_output(out)
    assert matrix.shape[0] == sum(e["status"] == "ok" for e in entries)
    store = EmbeddingStore.open(out, model="tiny", normalized=True)
    store.close()
    assert not store.repaired

    code, _, err = await run_through_gate(gate, *args)
    assert code == 1, err
    check_complete(out, with_gate(corpus, gate), references)


async def test_an_output_of_another_model_is_not_mixed_into(
    live: LiveServer, corpus: Corpus, tmp_path: Path
) -> None:
    out = tmp_path / "embeddings.npy"
    picture = corpus.root / "batch_00" / "img_0000.png"
    code, _, err = await run_cli("embed", picture, "--server", live.address, "--out", out)
    assert code == 0, err
    code, _, err = await run_cli(
        "embed", picture, "--server", live.address, "--out", out, "--model", "tiny-vision"
    )
    assert code == 2
    assert "holds embeddings of model 'tiny'" in err
    code, _, err = await run_cli(
        "embed", picture, "--server", live.address, "--out", out, "--raw", "--overwrite"
    )
    assert code == 0, err
    assert np.linalg.norm(np.load(out)[0]) != pytest.approx(1.0, abs=1e-3)


async def test_usage_errors_say_what_is_wrong(live: LiveServer, tmp_path: Path) -> None:
    code, _, err = await run_cli(
        "embed", tmp_path / "absent", "--server", live.address, "--out", tmp_path / "e.npy"
    )
    assert (code, "absent: no such file or folder" in err) == (2, True)
    picture = tmp_path / "a.png"
    picture.write_bytes(encode(distinct_image(1), "PNG"))
    code, _, err = await run_cli(
        "embed", picture, "--server", live.address, "--out", tmp_path / "e.npy", "--model", "x"
    )
    assert (code, "does not serve model 'x'; it serves: tiny, tiny-vision" in err) == (2, True)
    code, _, err = await run_cli(
        "embed", picture, "--server", live.address, "--out", tmp_path / "e.parquet"
    )
    assert (code, "--out must name a .npy file" in err) == (2, True)
    code, _, err = await run_cli(
        "embed", picture, "--server", live.address, "--out", tmp_path / "no" / "e.npy"
    )
    assert (code, "cannot open" in err, "Traceback" in err) == (2, True, False)


async def test_an_unreachable_server_fails_with_a_message(tmp_path: Path) -> None:
    picture = tmp_path / "a.png"
    picture.write_bytes(encode(distinct_image(1), "PNG"))
    code, _, err = await run_cli(
        "embed", picture, "--server", "127.0.0.1:1", "--out", tmp_path / "e.npy"
    )
    assert code == 1
    assert "cannot reach the server at 127.0.0.1:1" in err
    assert "Traceback" not in err


async def test_info_describes_the_server(live: LiveServer) -> None:
    code, out, err = await run_cli("info", "--server", live.address)
    assert code == 0, err
    assert "model tiny (default): 16-d, 32 px, float32 on cpu" in out
    assert "model tiny-vision: 24-d, 40 px" in out
    assert "16 images per EmbedImages call" in out
    code, out, err = await run_cli("info", "--json", "--server", live.address)
    assert code == 0, err
    info = json.loads(out)
    assert [m["embedding_dimension"] for m in info["models"]] == [16, 24]


async def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "clipvision"
    assert script.exists(), "pip install -e . installs the clipvision command"
    process = await asyncio.create_subprocess_exec(script, "--help", stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
    assert process.returncode == 0
    assert b"embed" in out
    assert b"info" in out
