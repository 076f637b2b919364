"""The pieces of admission on their own: sizes, the container's limit, fair pools, fair
decode scheduling, round-robin batches and the decode estimate."""

from __future__ import annotations

import asyncio
import contextvars
import io
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import grpc
import numpy as np
import pytest
from PIL import Image

from clipvision.server.api.call_context import caller_of
from clipvision.server.app import gate_limits
from clipvision.server.config.flags import parse_settings
from clipvision.server.config.limits import MIN_BUDGET, ImageLimits, byte_size
from clipvision.server.config.settings import ModelSpec, Settings, TlsFiles
from clipvision.server.errors import InvalidImageError, OverloadedError, Reason
from clipvision.server.pipelines.texts import TextPipeline, TextVector
from clipvision.server.resources.admission import FairPool, ItemCost, MemoryBudget
from clipvision.server.resources.dispatch import FairDispatcher
from clipvision.server.resources.memory import container_limit, default_budget
from clipvision.server.runtime import preprocess
from clipvision.server.runtime.batcher import MicroBatcher
from clipvision.server.runtime.image_encoder import FloatArray
from clipvision.server.runtime.models import ServedModel
from clipvision.server.runtime.preprocess import (
    PreprocessConfig,
    UInt8Array,
    decode_working_set,
    probe_image,
)
from clipvision.server.runtime.text_encoder import TokenizedText


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1000", 1000),
        ("4GiB", 4 << 30),
        ("512MiB", 512 << 20),
        ("512Mi", 512 << 20),
        ("1.5G", 1_500_000_000),
        ("2 gb", 2_000_000_000),
        ("64k", 64_000),
    ],
)
def test_sizes_are_read_as_operators_write_them(text: str, expected: int) -> None:
    assert byte_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "4XB", "-1", "0", "1e9"])
def test_a_size_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        byte_size(text)


def test_the_options_and_their_environment_variables(capsys: pytest.CaptureFixture[str]) -> None:
    settings = parse_settings(["--memory-limit", "4GiB", "--memory-budget", "1GiB"], {})
    assert (settings.memory_limit, settings.memory_budget) == (4 << 30, 1 << 30)
    env = {"CLIPVISION_MEMORY_LIMIT": "2Gi", "CLIPVISION_MEMORY_BUDGET": "300MiB"}
    settings = parse_settings([], env)
    assert (settings.memory_limit, settings.memory_budget) == (2 << 30, 300 << 20)
    assert (parse_settings([], {}).memory_limit, parse_settings([], {}).memory_budget) == (
        None,
        None,
    )
    with pytest.raises(SystemExit):
        parse_settings(["--memory-budget", "lots"], {})
    assert "--memory-budget" in capsys.readouterr().err


def test_the_container_limit_is_read_from_cgroup_v2_then_v1(tmp_path: Path) -> None:
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    assert container_limit(v2, v1) is None  # neither file: no container limit
    v1.write_text("9223372036854771712\n")  # v1's way of saying unlimited
    assert container_limit(v2, v1) is None
    v1.write_text("2147483648\n")
    assert container_limit(v2, v1) == 2 << 30
    v2.write_text("max\n")  # a v2 cgroup without a limit wins over a stale v1 file
    assert container_limit(v2, v1) is None
    v2.write_text("4294967296\n")
    assert container_limit(v2, v1) == 4 << 30


def test_the_default_budget_is_30_percent_of_what_the_models_leave() -> None:
    assert default_budget(4 << 30, 1 << 30) == int((3 << 30) * 0.3)
    assert default_budget(1 << 30, 2 << 30) == MIN_BUDGET  # a limit under the resident size


async def test_a_pool_grants_the_least_holding_caller_first_and_nobody_passes_it() -> None:
    pool = FairPool(10)
    assert pool.try_take("greedy", 9)
    granted: list[str] = []

    async def take(caller: str, amount: int) -> None:
        await pool.take(caller, amount)
        granted.append(caller)

    greedy = asyncio.ensure_future(take("greedy", 2))
    await asyncio.sleep(0)
    polite = asyncio.ensure_future(take("polite", 3))
    small = asyncio.ensure_future(take("small", 1))
    await asyncio.sleep(0)
    # 1 unit is free and small's 1 would fit, but it does not pass polite's 3, which holds
    # as little and came first (a large request is never starved by small ones).
    assert granted == []
    pool.give("greedy", 2)
    await polite
    assert granted == ["polite"]
    pool.give("greedy", 1)  # 1 free: small holds less than greedy, so small gets it
    await small
    assert granted == ["polite", "small"]
    assert not greedy.done()  # greedy holds 6, more than the others: it waits its turn
    pool.give("polite", 3)
    await greedy
    assert granted == ["polite", "small", "greedy"]
    assert pool.used == 8 + 1
    assert pool.largest_share() == 8 / 9


async def test_a_caller_under_its_share_may_wait_for_one_over_it() -> None:
    pool = FairPool(4)
    assert pool.try_take("greedy", 4)
    assert pool.starved("polite", 1)  # share 2: greedy holds 4, polite 0
    assert not pool.starved("greedy", 1)
    assert not pool.starved("polite", 3)  # 3 is over polite's share
    assert not await pool.take_within("polite", 1, 0.05)  # timed out, and left the queue
    assert not pool.waiting
    waiting = asyncio.ensure_future(pool.take_within("polite", 1, 5.0))
    await asyncio.sleep(0)
    pool.give("greedy", 1)
    assert await waiting
    assert (pool.held("polite"), pool.held("greedy")) == (1, 3)


async def test_a_cancelled_waiter_gives_way() -> None:
    pool = FairPool(2)
    assert pool.try_take("a", 2)
    big = asyncio.ensure_future(pool.take("b", 2))
    small = asyncio.ensure_future(pool.take("c", 1))
    await asyncio.sleep(0)
    pool.give("a", 1)
    await asyncio.sleep(0)
    assert not small.done()  # behind b's 2
    big.cancel()
    await asyncio.sleep(0)
    await small
    assert pool.used == 2
    assert not pool.waiting


async def test_the_budget_prices_refuses_and_returns_its_parts() -> None:
    budget = MemoryBudget(100, largest_read=4)
    # The read room is an eighth (12 bytes: room for two reads of 4 is less), health checks
    # read in a room of one read (4) of their own, and 84 admit items.
    limits = (budget.reads.limit, budget.probe_reads.limit, budget.pool.limit, budget.total)
    assert limits == (12, 4, 84, 100)
    with pytest.raises(InvalidImageError) as caught:
        budget.check(ItemCost(resident=10, decode=91), 10, 10)
    assert caught.value.reason == Reason.IMAGE_OVER_MEMORY_BUDGET
    ticket = await budget.admit("a", ItemCost(resident=10, decode=60), wait_s=0)
    with pytest.raises(OverloadedError) as overloaded:
        await budget.admit("b", ItemCost(resident=10, decode=30), wait_s=0.05)
    assert overloaded.value.reason == Reason.MEMORY_BUDGET_FULL
    assert overloaded.value.retry_after_s > 0
    done = ticket.start_decode()
    ticket.release()  # the caller left; its worker still decodes, so the decode part stays
    assert budget.used == 60
    done()
    assert budget.used == 0
    ticket.release()
    done()
    assert budget.used == 0  # each part is given back once


async def test_health_checks_read_in_a_room_others_cannot_fill() -> None:
    budget = MemoryBudget(100, largest_read=4)
    # Streams waiting for their next message fill the read room (12: three reads of 4).
    streams = [budget.try_reserve_read(f"stream-{n}") for n in range(4)]
    assert None not in streams[:3]
    assert streams[3] is None
    probe = budget.try_reserve_read("kubelet", probe=True)
    assert probe is not None
    assert budget.probe_reads.used == 4
    # A second probe at once waits for the first (the room holds one message), and never
    # for the streams; refused with the usual reason if the first keeps it too long.
    with pytest.raises(OverloadedError) as full:
        await budget.reserve_read("kubelet-2", 0.05, probe=True)
    assert full.value.reason == Reason.MEMORY_BUDGET_FULL
    probe.shrink(0)  # read: an empty HealthCheckRequest holds nothing
    assert budget.probe_reads.used == 0
    assert (await budget.reserve_read("kubelet-2", 0.05, probe=True)).amount == 4
    assert budget.used == budget.reads.used + 4


async def test_decodes_are_started_least_served_caller_first() -> None:
    started: list[str] = []
    gate = threading.Event()

    def job(name: str) -> str:
        started.append(name)
        if name == "greedy-0":
            gate.wait(5)
        return name

    finished: list[str] = []
    with ThreadPoolExecutor(4) as executor:
        dispatcher = FairDispatcher(executor, slots=1)

        def run(caller: str, index: int, weight: int) -> asyncio.Future[str]:
            return asyncio.ensure_future(
                dispatcher.run(
                    caller, weight, lambda: job(f"{caller}-{index}"), lambda: finished.append("x")
                )
            )

        calls = [run("greedy", i, 100) for i in range(4)]
        await asyncio.sleep(0.05)
        calls += [run("polite", i, 10) for i in range(2)]
        await asyncio.sleep(0.05)
        # One slot, and greedy's four jobs went to it in one chunk: the worker stops after
        # the slow first one (its time slice is over) and hands the other three back.
        assert started == ["greedy-0"]
        gate.set()
        assert await asyncio.gather(*calls)
    # Polite joins level with what greedy had finished (nothing: greedy-0 was running), so
    # it is served first, until it has been served more than greedy (100).
    assert started == ["greedy-0", "polite-0", "polite-1", "greedy-1", "greedy-2", "greedy-3"]
    assert len(finished) == 6


async def test_a_cancelled_caller_does_not_cut_its_decode_short() -> None:
    gate = threading.Event()
    ran: list[str] = []
    ended: list[str] = []

    def job(name: str, wait: bool) -> None:
        ran.append(name)
        if wait:
            gate.wait(5)

    with ThreadPoolExecutor(1) as executor:
        dispatcher = FairDispatcher(executor, slots=1)
        running = asyncio.ensure_future(
            dispatcher.run("a", 1, lambda: job("running", True), lambda: ended.append("running"))
        )
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(
            dispatcher.run("b", 1, lambda: job("queued", False), lambda: ended.append("queued"))
        )
        await asyncio.sleep(0.05)
        running.cancel()
        queued.cancel()
        await asyncio.sleep(0.05)
        assert ended == ["queued"]  # dropped before it started; the other still runs
        assert dispatcher.running == 1
        gate.set()
        for _ in range(100):
            if len(ended) == 2:
                break
            await asyncio.sleep(0.01)
    assert ended == ["queued", "running"]
    assert ran == ["running"]
    assert dispatcher.running == 0


async def test_a_cancelled_job_in_a_running_chunk_never_starts() -> None:
    gate = threading.Event()
    ran: list[str] = []
    ended: list[str] = []

    def job(name: str, wait: bool) -> None:
        ran.append(name)
        if wait:
            gate.wait(5)

    with ThreadPoolExecutor(1) as executor:
        dispatcher = FairDispatcher(executor, slots=1)
        # Submitted in one turn of the loop: both go to the worker in one chunk.
        running = asyncio.ensure_future(
            dispatcher.run("a", 1, lambda: job("running", True), lambda: ended.append("running"))
        )
        queued = asyncio.ensure_future(
            dispatcher.run("b", 1, lambda: job("queued", False), lambda: ended.append("queued"))
        )
        await asyncio.sleep(0.05)
        assert ran == ["running"]
        queued.cancel()
        await asyncio.sleep(0.05)
        gate.set()
        await running
        for _ in range(100):
            if len(ended) == 2:
                break
            await asyncio.sleep(0.01)
    assert ran == ["running"], "a job whose caller left is not started"
    assert sorted(ended) == ["queued", "running"]
    assert dispatcher.running == 0


async def test_light_jobs_run_one_chunk_at_a_time_heavy_ones_side_by_side() -> None:
    # Small images for a small crop, and texts, are mostly Python: two threads would only
    # take turns on the GIL. Decodes that let go of it spread (and light jobs beside them).
    gate = threading.Event()
    inside = 0
    most = 0
    lock = threading.Lock()

    def job() -> None:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        gate.wait(5)
        with lock:
            inside -= 1

    async def peak(light: list[bool], slice_s: float = 10.0) -> tuple[int, int]:
        nonlocal most
        most = 0
        gate.clear()
        with ThreadPoolExecutor(2) as executor:
            dispatcher = FairDispatcher(executor, slots=2, max_chunk=1, slice_s=slice_s)
            jobs = []
            for index, flag in enumerate(light):
                jobs.append(dispatcher.submit(f"c{index}", 1, job, lambda _: None, light=flag))
                await asyncio.sleep(0.02)  # each in its own turn of the loop
            running = dispatcher.running
            gate.set()
            for _ in range(200):
                if not dispatcher.running:
                    break
                await asyncio.sleep(0.01)
        assert not any(queued.queued for queued in jobs)
        return running, most

    assert await peak([True, True, True]) == (1, 1)
    assert await peak([False, False, True]) == (2, 2)
    assert await peak([False, True]) == (2, 2), "a light job may run beside a heavy one"
    assert await peak([True, False]) == (2, 2), "and a heavy one beside a light one"
    # A light job that turns out slow (a large image in few bytes) holds the others back
    # for one time slice at most: then a second chunk goes out beside it.
    assert await peak([True, True], slice_s=0.005) == (2, 2)


def test_a_small_image_for_a_small_crop_is_light_work(clip_dir: Path) -> None:
    import torch

    from clipvision.server.runtime.checkpoint import load_checkpoint
    from clipvision.server.runtime.image_encoder import ClipImageEncoder

    spec = ModelSpec.parse(f"tiny={clip_dir}")  # a 32 px crop
    loaded = load_checkpoint(spec, device=torch.device("cpu"), dtype=torch.float32)
    tiny = ClipImageEncoder("tiny", str(clip_dir), loaded, ImageLimits())
    assert tiny.light_job(1500)
    assert not tiny.light_job(6000), "a larger image: the decode lets go of the GIL"


class _FakeDevice:
    """Stands in for the model's batch function: records each batch's images' tags."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()

    def embed_batch(self, pixels: list[UInt8Array]) -> FloatArray:
        self.gate.wait(5)
        self.batches.append([int(image[0, 0, 0]) for image in pixels])
        return np.zeros((len(pixels), 2), dtype=np.float32)


async def test_batches_take_callers_in_turn() -> None:
    encoder = _FakeDevice()
    with ThreadPoolExecutor(1) as executor:
        batcher: MicroBatcher[UInt8Array] = MicroBatcher(
            "fake", encoder.embed_batch, executor, max_batch_size=4
        )
        batcher.start()

        def image(tag: int) -> UInt8Array:
            return np.full((3, 2, 2), tag, dtype=np.uint8)

        first = asyncio.ensure_future(batcher.submit(image(0), "greedy"))
        await asyncio.sleep(0.05)  # the device is now busy with it
        greedy = [asyncio.ensure_future(batcher.submit(image(1), "greedy")) for _ in range(8)]
        polite = [asyncio.ensure_future(batcher.submit(image(2), "polite")) for _ in range(2)]
        await asyncio.sleep(0)
        encoder.gate.set()
        await asyncio.gather(first, *greedy, *polite)
        await batcher.stop()
    # The polite caller's images ride in the next batch, not after greedy's backlog.
    assert encoder.batches[0] == [0]
    assert sorted(encoder.batches[1]) == [1, 1, 2, 2]
    assert sum(len(batch) for batch in encoder.batches) == 11


def _encoded(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def test_the_decode_estimate_follows_the_pipeline_from_the_header() -> None:
    config = PreprocessConfig.openai_clip(224)
    limits = ImageLimits()
    side = 2000
    rgb = probe_image(_encoded(Image.new("RGB", (side, side)), "JPEG"), limits)
    rgba = probe_image(_encoded(Image.new("RGBA", (side, side)), "PNG"), limits)
    palette = Image.new("P", (side, side))
    keyed = probe_image(_encoded(palette, "PNG", transparency=0), limits)
    opaque = probe_image(_encoded(palette, "PNG"), limits)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = probe_image(_encoded(Image.new("RGB", (side, side)), "JPEG", exif=exif), limits)
    per_pixel = {
        name: decode_working_set(probed, config) / (side * side)
        for name, probed in [
            ("rgb", rgb),
            ("rgba", rgba),
            ("keyed", keyed),
            ("opaque", opaque),
            ("rotated", rotated),
        ]
    }
    # What Pillow holds a pixel (bench/decode_peak.py measures 4.15 for RGB JPEG, 8.0 for a
    # rotated one) and the resize's intermediate and a slack, under a byte a pixel here...
    assert 4.15 < per_pixel["rgb"] < 5.15
    assert 8 < per_pixel["rotated"] < 9
    # ...transparency composited onto white strip by strip: the image and one RGB copy, 8 and
    # 5 bytes a pixel, and 16 MiB for the strip (4 and 3.25 bytes a pixel at 4 Mpx)...
    assert 12 < per_pixel["rgba"] < 13 + 1
    assert 8.25 < per_pixel["keyed"] < 9.25 + 1
    # ...and an opaque palette only its RGB copy.
    assert per_pixel["opaque"] < per_pixel["keyed"] - 3


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "P-transparency", "RGB-transparency"])
def test_compositing_in_strips_gives_the_bytes_of_compositing_at_once(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (97, 61, 4), dtype=np.uint8)  # odd sizes: a short last strip
    rgba = Image.fromarray(pixels, "RGBA")
    if mode == "P-transparency":
        image = rgba.convert("RGB").quantize(32)
        image.info["transparency"] = 3
    elif mode == "RGB-transparency":
        image = rgba.convert("RGB")
        image.info["transparency"] = image.getpixel((5, 5))
    else:
        image = rgba.convert(mode)
    monkeypatch.setattr(preprocess, "_STRIP_PIXELS", 61 * 10)  # ten rows a strip
    in_strips = preprocess._to_rgb(image)
    at_once = preprocess._composite_on_white(image)
    assert in_strips.mode == "RGB"
    assert np.array_equal(np.asarray(in_strips), np.asarray(at_once))
    assert not np.array_equal(np.asarray(at_once), np.asarray(image.convert("RGB")))


class _Context:
    """The two things caller_of reads from a grpc.aio.ServicerContext."""

    def __init__(self, identities: list[bytes] | None, peer: str) -> None:
        self._identities = identities
        self._peer = peer

    def peer_identities(self) -> list[bytes] | None:
        return self._identities

    def peer(self) -> str:
        return self._peer


def test_a_caller_is_its_certificate_identity_else_its_connection() -> None:
    def caller(identities: list[bytes] | None, peer: str) -> str:
        return caller_of(cast(grpc.aio.ServicerContext[object, object], _Context(identities, peer)))

    # Two connections of one mutual-TLS client are one caller; without TLS, two callers.
    assert caller([b"client-a"], "ipv4:10.0.0.1:5000") == caller(
        [b"client-a"], "ipv4:10.0.0.1:6000"
    )
    assert caller([b"client-a"], "ipv4:10.0.0.1:5000") != caller(
        [b"client-b"], "ipv4:10.0.0.1:5000"
    )
    assert caller(None, "ipv4:10.0.0.1:5000") != caller(None, "ipv4:10.0.0.1:6000")
    assert caller(None, "ipv4:10.0.0.1:5000") != caller([b"ipv4:10.0.0.1:5000"], "x")


class _CountingContext(_Context):
    asked = 0

    def peer_identities(self) -> list[bytes] | None:
        self.asked += 1
        return super().peer_identities()


def test_a_call_asks_grpc_for_its_caller_once_and_never_without_client_certificates() -> None:
    # Asking gRPC core for identities lets go of the GIL on the event loop: the gate asks
    # before each message and the servicer once more, so a call's answer is kept.
    def in_a_call(context: _CountingContext, certificates: bool) -> list[str]:
        seen = cast(grpc.aio.ServicerContext[object, object], context)
        return [caller_of(seen, certificates) for _ in range(3)] + [caller_of(seen)]

    tls = _CountingContext([b"client-a"], "ipv4:10.0.0.1:5000")
    answers = contextvars.copy_context().run(in_a_call, tls, True)
    assert answers == ["identity:client-a"] * 4
    assert tls.asked == 1
    plain = _CountingContext(None, "ipv4:10.0.0.1:5000")
    answers = contextvars.copy_context().run(in_a_call, plain, False)
    assert answers == ["peer:ipv4:10.0.0.1:5000"] * 4
    assert plain.asked == 0
    # Another call (another context object) is never given the first one's answer.
    other = _CountingContext([b"client-b"], "ipv4:10.0.0.2:5000")
    assert contextvars.copy_context().run(in_a_call, other, True) == ["identity:client-b"] * 4


def test_the_gate_asks_for_certificates_only_where_clients_present_them(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("not read here")
    assert not gate_limits(Settings()).client_certificates
    assert not gate_limits(Settings(tls=TlsFiles(pem, pem))).client_certificates
    assert gate_limits(Settings(tls=TlsFiles(pem, pem, pem))).client_certificates


async def test_a_decode_on_a_stopped_pool_fails_and_gives_back_what_it_held() -> None:
    executor = ThreadPoolExecutor(1)
    executor.shutdown()
    dispatcher = FairDispatcher(executor, slots=1)
    ended: list[str] = []
    with pytest.raises(RuntimeError):
        await dispatcher.run("a", 1, lambda: None, lambda: ended.append("a"))
    assert ended == ["a"]
    assert dispatcher.running == 0


class _Waits:
    """Counts the memory budget's waits (a BudgetObserver)."""

    def __init__(self) -> None:
        self.memory = 0

    def on_budget(self, total: int) -> None:
        pass

    def on_admission_wait(self, resource: str) -> None:
        self.memory += resource == "memory"

    def on_admission_refused(self, reason: str) -> None:
        pass


class _TextTower:
    """A text tower's stand-in: its ids are the text's bytes, its vector their sum; a real
    MicroBatcher on a device thread of its own; gates that hold its batches and its tokenizing."""

    def __init__(self, device: ThreadPoolExecutor) -> None:
        self.encoder = self
        self.gate = threading.Event()
        self.tokenizing = threading.Event()
        self.tokenizing.set()
        self.batcher: MicroBatcher[np.ndarray] = MicroBatcher(
            "words", self._run, device, modality="text", max_batch_size=8
        )

    def check(self, text: str) -> int:
        return len(text.encode())

    def tokenize(self, text: str, truncate: bool) -> TokenizedText:
        self.tokenizing.wait(5)
        return TokenizedText(np.frombuffer(text.encode(), np.uint8).astype(np.int64), False)

    def _run(self, batch: list[np.ndarray]) -> FloatArray:
        self.gate.wait(5)
        return np.array([[float(ids.sum()), 1.0] for ids in batch], dtype=np.float32)


class _TextModel:
    name = "words"

    def __init__(self, tower: _TextTower) -> None:
        self.tower = tower

    def text_tower(self) -> _TextTower:
        return self.tower


async def test_texts_admitted_by_the_worker_or_after_a_wait_all_give_back_their_bytes() -> None:
    # 8 bytes of text cost 80 (twice the text, eight 8-byte ids); the pool admits 84: one
    # text at a time, so the second and third wait for the first to be answered.
    waits = _Waits()
    budget = MemoryBudget(100, waits, largest_read=4)
    with ThreadPoolExecutor(2) as workers, ThreadPoolExecutor(1) as device:
        tower = _TextTower(device)
        tower.batcher.start()
        pipeline = TextPipeline(budget, FairDispatcher(workers, slots=2))
        model = cast(ServedModel, _TextModel(tower))
        texts = ["abcdefgh", "bcdefghi", "cdefghij"]
        call = asyncio.ensure_future(
            pipeline.embed_many(model, "a", texts, False, True, deadline=None)
        )
        await asyncio.sleep(0.1)
        assert budget.pool.used == 80  # the first, admitted by its worker, on the device
        tower.gate.set()
        outcomes = await call
        # A caller that leaves while its text is admitted and waits for the device.
        tower.gate.clear()
        gone = pipeline.start(model, "b", "defghijk", False, True, deadline=None)
        await asyncio.sleep(0.1)
        assert budget.pool.used == 80
        gone.cancel()
        await asyncio.sleep(0)
        assert budget.pool.used == 0
        # One that leaves while its worker tokenizes: the worker admits it, the loop gives
        # that back.
        tower.tokenizing.clear()
        late = pipeline.start(model, "c", "efghijkl", False, True, deadline=None)
        await asyncio.sleep(0.1)
        late.cancel()
        tower.tokenizing.set()
        await asyncio.sleep(0.1)
        assert budget.pool.used == 0
        tower.gate.set()
        await tower.batcher.stop()
    assert [cast(TextVector, o).vector.tolist() for o in outcomes] == [
        [float(sum(text.encode())), 1.0] for text in texts
    ]
    assert waits.memory == 2
    assert budget.used == 0
