"""``clipvision batch`` on a real local Ray cluster, as a user runs it.

One Ray cluster (2 CPUs, on 127.0.0.1) serves the whole module; each job runs as a
``clipvision batch`` child process that connects to it, so a test can SIGKILL the driver
or one of its actors. The reference vectors come from a real server's EmbedImages and
EmbedTexts on this test's event loop; an S3 emulator (moto's server) runs on loopback.
"""

from __future__ import annotations

import os

# Before Ray is imported: a one-machine cluster whose processes listen on 127.0.0.1 only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import psutil
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray

from clipvision.server.batch.cli import main as batch_main
from clipvision.server.batch.storage import JobRecord
from clipvision.server.config.settings import Settings, TlsFiles
from clipvision.v1 import embedding_service_pb2 as pb
from clipvision.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import DATA, settings_with
from tests.live_server import LiveServer, live_server
from tests.pki import Pki

RUN_TIMEOUT = 100.0
TOLERANCE = 1e-6


@dataclass(frozen=True)
class Done:
    """A finished ``clipvision batch`` command."""

    status: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class S3:
    """The S3 emulator: its endpoint, and a client of it for the test's own reads."""

    endpoint: str
    fs: pafs.S3FileSystem


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    """moto's S3 server on 127.0.0.1, and the AWS_* variables that point jobs at it."""
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from moto.server import ThreadedMotoServer\n"
            "server = ThreadedMotoServer('127.0.0.1', 0, verbose=False)\n"
            "server.start()\n"
            "print(server.get_host_and_port()[1], flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert server.stdout is not None
    assert server.stdin is not None
    endpoint = f"http://127.0.0.1:{int(server.stdout.readline())}"
    variables = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield S3(
            endpoint,
            pafs.S3FileSystem(
                endpoint_override=endpoint,
                access_key="testing",
                secret_key="testing",
                region="us-east-1",
                allow_bucket_creation=True,
            ),
        )
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stdin.close()
        server.wait(timeout=10)
        server.stdout.close()


@pytest.fixture(scope="module")
def ray_address(s3: S3) -> Iterator[str]:
    """One local Ray cluster for the module; its workers see the S3 emulator's variables."""
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
    )
    try:
        address = ray.get_runtime_context().gcs_address
        assert address.startswith("127.0.0.1:"), address
        yield address
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class Corpus:
    """A folder of the test photographs plus files that are not (or no longer) images."""

    root: Path
    files: list[str]
    """Ids (paths relative to root) in the order the job lists them."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("photos")
    for photo in sorted(DATA.glob("*.*g")):
        shutil.copy(photo, root / photo.name)
    rocket = (DATA / "rocket.jpg").read_bytes()
    (root / "broken").mkdir()
    (root / "broken" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    (root / "broken" / "truncated.jpg").write_bytes(rocket[: len(rocket) // 2])
    (root / "broken" / "empty.webp").write_bytes(b"")
    (root / "broken" / "notes.txt").write_text("not an image\n")
    files = sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())
    return Corpus(root, files)


@pytest.fixture(scope="module")
async def server(base_settings: Settings) -> AsyncIterator[LiveServer]:
    async with live_server(base_settings) as live:
        yield live


async def batch(*args: str, limit_s: float = RUN_TIMEOUT) -> Done:
    """Run ``clipvision batch ARGS`` to the end."""
    process = await start_batch(*args)
    try:
        async with asyncio.timeout(limit_s):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Done(process.returncode, stdout.decode(), stderr.decode())


async def start_batch(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clipvision.client.cli",
        "batch",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


def read_rows(location: str, fs: pafs.FileSystem | None = None) -> dict[str, dict[str, object]]:
    """Every output row of a job, by id (asserting each id appears once)."""
    filesystem = fs or pafs.LocalFileSystem()
    table = pq.read_table(location, filesystem=filesystem)
    rows = table.to_pylist()
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)), "an id appears twice"
    return {str(row["id"]): row for row in rows}


async def server_results(
    server: LiveServer, corpus: Corpus, model: str = "tiny"
) -> dict[str, pb.EmbedImagesResult]:
    """The server's EmbedImages answer for every file of the corpus."""
    images = [pb.Image(content=(corpus.root / name).read_bytes()) for name in corpus.files]
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        response = await stub.EmbedImages(pb.EmbedImagesRequest(images=images, model=model))
    return dict(zip(corpus.files, response.results, strict=True))


def assert_rows_match(
    rows: dict[str, dict[str, object]], expected: dict[str, pb.EmbedImagesResult]
) -> None:
    """One row per input; the server's vector within 1e-6, or the server's reason."""
    assert sorted(rows) == sorted(expected)
    for name, result in expected.items():
        row = rows[name]
        if result.HasField("error"):
            assert (row["status"], row["reason"]) == ("error", result.error.reason), name
            assert row["embedding"] is None
        else:
            assert row["status"] == "ok", (name, row["reason"], row["message"])
            vector = np.asarray(row["embedding"], dtype=np.float32)
            np.testing.assert_allclose(vector, result.embedding.values, rtol=0, atol=TOLERANCE)


def model_flags(settings: Settings, name: str = "tiny") -> list[str]:
    (spec,) = [spec for spec in settings.models if spec.name == name]
    return ["--model", f"{name}={spec.source}"]


async def test_a_folder_gives_one_row_per_file_equal_to_the_server(
    ray_address: str,
    corpus: Corpus,
    server: LiveServer,
    base_settings: Settings,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    done = await batch(
        "run", str(corpus.root), "--output", str(out), *model_flags(base_settings),
        "--all-files", "--shard-size", "4", "--batch-size", "4", "--ray-address", ray_address,
    )  # fmt: skip
    assert done.status == 0, done.stderr
    assert "complete: 3/3 shards" in done.stderr
    expected = await server_results(server, corpus)
    assert_rows_match(read_rows(str(out / "shards")), expected)
    # Corrupt, truncated, empty and non-image files are rows with the server's reasons.
    reasons = {name: r.error.reason for name, r in expected.items() if r.HasField("error")}
    assert reasons == {
        "broken/corrupt.png": "IMAGE_DECODE_FAILED",
        "broken/truncated.jpg": "IMAGE_DECODE_FAILED",
        "broken/empty.webp": "IMAGE_EMPTY",
        "broken/notes.txt": "IMAGE_FORMAT_UNSUPPORTED",
    }
    verified = await batch("verify", str(out))
    assert verified.status == 0, verified.stdout + verified.stderr
    assert f"{len(corpus.files)} rows (8 ok, 4 error)" in verified.stdout
    shown = await batch("status", str(out), "--json")
    state = json.loads(shown.stdout)
    assert (state["shards_done"], state["ok"], state["error"]) == (3, 8, 4)
    assert state["complete"]
    assert state["rate"] > 0
    # A rerun of a complete job has nothing to do and changes nothing.
    before = {path: path.stat().st_mtime_ns for path in (out / "shards").iterdir()}
    again, lines = run_main(capsys, "run", str(corpus.root), "--output", str(out),
                            *model_flags(base_settings), "--all-files")  # fmt: skip
    assert again == 0, lines
    assert lines[-1].startswith("clipvision batch: complete: 3/3 shards")
    assert {path: path.stat().st_mtime_ns for path in (out / "shards").iterdir()} == before


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    """``clipvision batch ARGS`` in this process (for what fails before Ray starts)."""
    capsys.readouterr()
    status = batch_main(list(args))
    return status, capsys.readouterr().err.splitlines()


def refusals(live: LiveServer, code: str) -> float:
    """Calls the server's gate refused with ``code``, whatever the method and reason."""
    total = 0.0
    for metric in live.server.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "clipvision_refused_calls_total" and sample.labels["code"] == code:
                total += sample.value
    return total


async def test_endpoint_mode_retries_what_a_full_server_refuses_and_loses_nothing(
    ray_address: str, corpus: Corpus, server: LiveServer, base_settings: Settings, tmp_path: Path
) -> None:
    # One stream at a time and a small queue: the actor's second stream is refused with
    # RESOURCE_EXHAUSTED (TOO_MANY_CALLS, RetryInfo 1 s) until the first one ends.
    settings = settings_with(base_settings, max_queue_size=2, max_streams=1)
    async with live_server(settings) as live:
        out = tmp_path / "out"
        done = await batch(
            "run", str(corpus.root), "--output", str(out), "--endpoint", live.address,
            "--model", "tiny", "--all-files", "--shard-size", "4", "--batch-size", "3",
            "--window", "2", "--streams", "2", "--ray-address", ray_address,
        )  # fmt: skip
        assert done.status == 0, done.stderr
        assert refusals(live, "RESOURCE_EXHAUSTED") >= 1
    # The same checkpoint on a server with room for a whole EmbedImages call.
    expected = await server_results(server, corpus)
    assert_rows_match(read_rows(str(out / "shards")), expected)
    verified = await batch("verify", str(out))
    assert verified.status == 0, verified.stdout + verified.stderr


async def test_endpoint_mode_calls_a_server_that_wants_tls_and_a_token(
    ray_address: str,
    corpus: Corpus,
    server: LiveServer,
    base_settings: Settings,
    pki: Pki,
    tmp_path: Path,
) -> None:
    token = "batch-job-token"
    settings = settings_with(
        base_settings, auth_token=token, tls=TlsFiles(pki.server_cert, pki.server_key)
    )
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    async with live_server(settings) as live:
        run = (
            "run", str(corpus.root), "--endpoint", live.address, "--model", "tiny",
            "--all-files", "--shard-size", "4", "--ray-address", ray_address,
            "--tls", "--ca-cert", str(pki.ca),
        )  # fmt: skip
        # Without the token the server's refusal stops the job before it writes anything.
        refused = await batch(*run, "--output", str(tmp_path / "refused"))
        assert refused.status == 2, refused.stderr
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1, refused.stderr
        assert lines[0].startswith(f"clipvision batch: the endpoint {live.address} refused")
        assert not (tmp_path / "refused").exists()
        out = tmp_path / "out"
        done = await batch(*run, "--output", str(out), "--token-file", str(token_file))
        assert done.status == 0, done.stderr
    expected = await server_results(server, corpus)
    assert_rows_match(read_rows(str(out / "shards")), expected)


def test_connection_flags_without_an_endpoint_are_a_usage_error(
    capsys: pytest.CaptureFixture[str], corpus: Corpus, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    status, lines = run_main(capsys, "run", str(corpus.root), "-o", str(out), "--tls")
    assert (status, lines) == (
        2,
        ["clipvision batch: --tls is for --endpoint: the job hosts the model itself otherwise"],
    )
    missing = tmp_path / "no-such-token"
    status, lines = run_main(
        capsys, "run", str(corpus.root), "-o", str(out), "--endpoint", "127.0.0.1:1",
        "--token-file", str(missing),
    )  # fmt: skip
    assert (status, lines) == (
        2,
        [f"clipvision batch: cannot read {missing}: No such file or directory"],
    )
    assert not out.exists()


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """120 copies of the photographs: a job that runs long enough to be killed midway."""
    root = tmp_path_factory.mktemp("many")
    photos = sorted(DATA.glob("*.*g"))
    for number in range(120):
        photo = photos[number % len(photos)]
        shutil.copy(photo, root / f"{number:03d}-{photo.name}")
    return Corpus(root, sorted(path.name for path in root.iterdir()))


async def many_results(server: LiveServer, many: Corpus) -> dict[str, pb.EmbedImagesResult]:
    """The server's answer for each of the 200 files (one call per distinct photograph)."""
    photos = Corpus(DATA, sorted(path.name for path in DATA.glob("*.*g")))
    by_photo = await server_results(server, photos)
    return {name: by_photo[name.partition("-")[2]] for name in many.files}


def committed(out: Path) -> int:
    """Shard files committed under ``out``."""
    return len(list((out / "shards").glob("part-*.parquet")))


async def wait_for_shards(process: asyncio.subprocess.Process, out: Path, count: int) -> None:
    """Wait until ``count`` shards are committed."""
    async with asyncio.timeout(RUN_TIMEOUT):
        while committed(out) < count:
            assert process.returncode is None, "the job ended before the test could act"
            await asyncio.sleep(0.05)


async def test_a_killed_driver_is_resumed_by_a_rerun_without_loss_or_duplicates(
    ray_address: str, many: Corpus, server: LiveServer, base_settings: Settings, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = [
        "run", str(many.root), "--output", str(out), *model_flags(base_settings),
        "--shard-size", "8", "--batch-size", "8", "--ray-address", ray_address,
    ]  # fmt: skip
    process = await start_batch(*args)
    await wait_for_shards(process, out, 2)
    process.send_signal(signal.SIGKILL)
    await process.communicate()
    before = committed(out)
    assert 2 <= before < 15, "the job was not killed midway"
    half = await batch("status", str(out), "--json")
    assert json.loads(half.stdout)["shards_done"] == before
    assert (await batch("verify", str(out))).status == 1  # not complete yet
    done = await batch(*args)
    assert done.status == 0, done.stderr
    assert f"committed {15 - before} shards this run" in done.stderr
    verified = await batch("verify", str(out))
    assert verified.status == 0, verified.stdout + verified.stderr
    assert_rows_match(read_rows(str(out / "shards")), await many_results(server, many))
    assert not [path for path in out.rglob("*") if ".tmp-" in path.name]


def model_actor_pids(since: float) -> list[int]:
    """Processes of this machine's Ray workers that host ImageEmbedder actors, started
    after ``since`` (a job's actors outlive it briefly while Ray cleans up)."""
    pids = []
    for process in psutil.process_iter(["pid", "cmdline", "create_time"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        ours = "ImageEmbedder" in cmdline and cmdline.startswith("ray::")
        if ours and process.info["create_time"] >= since:
            pids.append(process.info["pid"])
    return pids


async def test_a_killed_model_actor_is_replaced_and_nothing_is_lost(
    ray_address: str, many: Corpus, server: LiveServer, base_settings: Settings, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = [
        "run", str(many.root), "--output", str(out), *model_flags(base_settings),
        "--shard-size", "8", "--batch-size", "8", "--ray-address", ray_address,
    ]  # fmt: skip
    started = time.time()
    process = await start_batch(*args)
    await wait_for_shards(process, out, 1)
    (pid,) = model_actor_pids(since=started)
    os.kill(pid, signal.SIGKILL)
    async with asyncio.timeout(RUN_TIMEOUT):
        _, stderr = await process.communicate()
    # Ray restarts the actor and retries its batch: the run ends complete by itself.
    assert process.returncode == 0, stderr.decode()
    verified = await batch("verify", str(out))
    assert verified.status == 0, verified.stdout + verified.stderr
    assert_rows_match(read_rows(str(out / "shards")), await many_results(server, many))


async def test_s3_input_and_output_through_a_local_emulator(
    ray_address: str,
    s3: S3,
    corpus: Corpus,
    server: LiveServer,
    base_settings: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s3.fs.create_dir("photos")
    s3.fs.create_dir("embeddings")
    for name in corpus.files:
        with s3.fs.open_output_stream(f"photos/set/{name}") as stream:
            stream.write((corpus.root / name).read_bytes())
    done = await batch(
        "run", "s3://photos/set/", "--output", "s3://embeddings/job", *model_flags(base_settings),
        "--all-files", "--shard-size", "4", "--batch-size", "4", "--ray-address", ray_address,
    )  # fmt: skip
    assert done.status == 0, done.stderr
    verified = await batch("verify", "s3://embeddings/job")
    assert verified.status == 0, verified.stdout + verified.stderr
    rows = read_rows("embeddings/job/shards", s3.fs)
    assert_rows_match(rows, await server_results(server, corpus))
    assert rows["camera.png"]["source"] == "s3://photos/set/camera.png"
    # A bucket that does not exist, as input or as output: one line, nothing written.
    for input_uri, output in (("s3://nowhere/set/", "s3://embeddings/job2"),
                              ("s3://photos/set/", "s3://nowhere/job")):  # fmt: skip
        missing = input_uri if "nowhere" in input_uri else output
        status, lines = run_main(
            capsys, "run", input_uri, "-o", output, *model_flags(base_settings)
        )
        assert status == 2
        assert lines == [
            f"clipvision batch: {missing}: the bucket 'nowhere' does not exist (or is not visible)"
        ]
    assert s3.fs.get_file_info("embeddings/job2").type == pafs.FileType.NotFound


async def test_texts_from_jsonl_equal_the_servers_embed_texts(
    ray_address: str, server: LiveServer, base_settings: Settings, tmp_path: Path
) -> None:
    texts = ["a photo of a cat", "", "a diagram of a rocket " * 40, "Ünïcödé"]
    source = tmp_path / "texts.jsonl"
    source.write_text(
        "".join(json.dumps({"id": f"t{n}", "text": text}) + "\n" for n, text in enumerate(texts))
    )
    out = tmp_path / "out"
    done = await batch(
        "run", str(source), "--texts", "--output", str(out), *model_flags(base_settings),
        "--ray-address", ray_address,
    )  # fmt: skip
    assert done.status == 0, done.stderr
    rows = read_rows(str(out / "shards"))
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        response = await stub.EmbedTexts(pb.EmbedTextsRequest(texts=texts, model="tiny"))
    for number, result in enumerate(response.results):
        row = rows[f"t{number}"]
        if result.HasField("error"):
            assert (row["status"], row["reason"]) == ("error", result.error.reason)
        else:
            assert row["truncated"] == result.embedding.truncated
            np.testing.assert_allclose(
                np.asarray(row["embedding"]), result.embedding.values, rtol=0, atol=TOLERANCE
            )
    assert rows["t1"]["reason"] == "TEXT_EMPTY"
    assert rows["t2"]["truncated"] is True


def test_bad_input_says_so_in_one_line_and_writes_nothing(
    corpus: Corpus, base_settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = model_flags(base_settings)
    out = tmp_path / "out"
    missing = tmp_path / "nowhere"
    assert run_main(capsys, "run", str(missing), "-o", str(out), *model) == (
        2,
        [f"clipvision batch: {missing}: no such folder, file or prefix"],
    )
    not_parquet = tmp_path / "list.parquet"
    not_parquet.write_text("uri\n/a.jpg\n")
    status, lines = run_main(capsys, "run", str(not_parquet), "-o", str(out), *model)
    assert status == 2
    assert len(lines) == 1
    assert lines[0].startswith(f"clipvision batch: {not_parquet}: not a readable Parquet file")
    status, lines = run_main(
        capsys, "run", str(corpus.root), "-o", str(out), "--endpoint", "127.0.0.1:1"
    )
    assert status == 1
    assert len(lines) == 1
    assert lines[0].startswith("clipvision batch: cannot reach the endpoint 127.0.0.1:1: ")
    assert not out.exists()
    # An output that holds another model's job, or files of something else: untouched.
    other = tmp_path / "other"
    other.mkdir()
    record = JobRecord(str(corpus.root), "image", "other-model", 16, True, 1, 12, 1000, "now")
    (other / "job.json").write_bytes(record.to_json())
    assert run_main(capsys, "run", str(corpus.root), "-o", str(other), *model) == (
        2,
        [
            f"clipvision batch: {other} holds the shards of model other-model (16-d), and this "
            "run embeds with tiny (16-d); give another --output"
        ],
    )
    assert [path.name for path in other.iterdir()] == ["job.json"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine\n")
    status, lines = run_main(capsys, "run", str(corpus.root), "-o", str(tmp_path / "notes"), *model)
    assert status == 2
    assert lines == [
        f"clipvision batch: {tmp_path / 'notes'} holds other files (todo.txt) and no job.json; "
        "give a new or empty folder to --output"
    ]
    assert [path.name for path in (tmp_path / "notes").iterdir()] == ["todo.txt"]
