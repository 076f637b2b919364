"""One run of a job: check the output, list the input once, then embed the shards not yet
committed on Ray Data and commit each shard's file as soon as all its rows are back.

The driver does the bookkeeping only: Ray Data reads, decodes and embeds; the driver puts
each returned row into its shard's slot (ShardAssembler) and writes a shard the moment it
is complete. A run killed at any point leaves committed shards whole and nothing else
(temporary names are removed by the next run), so a rerun embeds exactly the rest.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow.fs as pafs
from tqdm import tqdm

from clipvision.client import (
    ClipVisionError,
    DeadlineExceededError,
    EmbeddingClient,
    UnavailableError,
)
from clipvision.client.cli import PLAINTEXT, Security
from clipvision.server.batch.encoders import (
    CheckpointError,
    ModelOptions,
    PreprocessConfig,
    read_model_config,
)
from clipvision.server.batch.manifest import InputOptions, list_input, write_manifest
from clipvision.server.batch.outcomes import EXIT_FAILED, JobError
from clipvision.server.batch.shards import ShardAssembler
from clipvision.server.batch.stages import (
    EndpointEmbedder,
    EndpointOptions,
    ImageEmbedder,
    ReaderOptions,
    ShardReader,
    TextEmbedder,
)
from clipvision.server.batch.storage import (
    JOB_FILE,
    MANIFEST,
    SHARDS,
    JobDirectory,
    JobRecord,
    StorageError,
    part_name,
)
from clipvision.server.config.limits import ImageLimits
from clipvision.v1 import embedding_service_pb2 as pb

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """Everything ``clipvision batch run`` is asked to do."""

    input: str
    output: str
    inputs: InputOptions = field(default_factory=InputOptions)
    model: ModelOptions = field(default_factory=lambda: ModelOptions("ViT-B/32"))
    endpoint: str | None = None
    """Call this server instead of hosting the model (``model.model`` then names a served
    model, empty for its default)."""
    security: Security = field(default_factory=lambda: PLAINTEXT)
    """TLS and token of the calls to ``endpoint``."""
    normalize: bool = True
    shard_size: int = 1000
    batch_size: int = 32
    actors: int | None = None
    """Model (or endpoint) actors at most; None: one per GPU, else one."""
    readers: int | None = None
    """Reader actors at most; None: the CPUs the model actors leave."""
    cpus_per_actor: float = 1.0
    window: int = 32
    streams: int = 2
    timeout_s: float = 120.0
    max_attempts: int = 8
    allow_roots: tuple[str, ...] = ()
    limits: ImageLimits = field(default_factory=ImageLimits)


@dataclass(frozen=True)
class ModelIdentity:
    """The model rows are embedded with: what a job's output is tied to."""

    name: str
    dim: int
    preprocess: PreprocessConfig | None = None


@dataclass
class RunReport:
    """What one run did."""

    shards_total: int
    shards_before: int
    shards_committed: int = 0
    rows: int = 0
    ok: int = 0
    errors: int = 0
    seconds: float = 0.0
    stopped: str | None = None
    interrupted: bool = False

    @property
    def complete(self) -> bool:
        """Whether every shard of the job is committed now."""
        return self.shards_before + self.shards_committed == self.shards_total


def identify_model(options: RunOptions) -> ModelIdentity:
    """The model's name and size, from its configs or from the endpoint; no Ray yet."""
    kind = "text" if options.inputs.texts else "image"
    if options.endpoint is None:
        try:
            config = read_model_config(options.model)
        except CheckpointError as exc:
            raise JobError(f"cannot use model {options.model.model!r}: {exc}") from exc
        return ModelIdentity(options.model.spec.name, config.embedding_dim, config.preprocess)
    try:
        with EmbeddingClient(
            options.endpoint, **options.security, timeout=10.0, max_attempts=2
        ) as client:
            info = client.model_info()
    except (UnavailableError, DeadlineExceededError) as error:
        raise JobError(
            f"cannot reach the endpoint {options.endpoint}: {error.message}", EXIT_FAILED
        ) from error
    except ClipVisionError as error:  # a token or certificate refused, say: the flags are wrong
        raise JobError(
            f"the endpoint {options.endpoint} refused the job's first call: {error.message}"
        ) from error
    except ValueError as exc:
        raise JobError(f"--endpoint {options.endpoint}: {exc}") from exc
    wanted = options.model.model or None
    served = next(
        (m for m in info.models if m.name == wanted or (wanted is None and m.is_default)),
        None,
    )
    if served is None:
        names = ", ".join(m.name for m in info.models)
        raise JobError(f"{options.endpoint} does not serve model {wanted!r}; it serves: {names}")
    if not served.loaded:
        raise JobError(f"{options.endpoint} has not loaded {served.name} yet; retry", EXIT_FAILED)
    if kind == "text" and pb.MODALITY_TEXT not in served.modalities:
        raise JobError(f"{options.endpoint} serves {served.name} without its text tower")
    return ModelIdentity(served.name, served.embedding_dimension)


def open_job(
    options: RunOptions, identity: ModelIdentity, say: Callable[[str], None]
) -> tuple[JobDirectory, JobRecord]:
    """The job at ``options.output``: resumed if it is this job, else created by listing the
    input once. Raises JobError, having written nothing, when the output cannot be used."""
    kind = "text" if options.inputs.texts else "image"
    try:
        directory = JobDirectory(options.output)
        record = directory.read_job()
    except StorageError as exc:
        raise JobError(str(exc)) from exc
    source = _canonical_input(options.input)
    if record is not None:
        _check_same_job(directory, record, source, kind, identity, options.normalize)
        return directory, record
    strays = [name for name in directory.entries() if name != MANIFEST]
    if strays:
        raise JobError(
            f"{options.output} holds other files ({', '.join(strays[:3])}) and no "
            f"{JOB_FILE}; give a new or empty folder to --output"
        )
    try:
        listing = list_input(source, options.inputs)
        directory.clear_manifest()
        rows = write_manifest(directory, listing.rows, options.shard_size)
    except StorageError as exc:
        _remove_listing(directory)
        raise JobError(str(exc)) from exc
    if rows == 0:
        _remove_listing(directory)
        raise JobError(f"{options.input}: nothing to embed in {listing.description}")
    left_out = listing.left_out[0]
    say(
        f"listed {rows:,} inputs ({listing.description})"
        + (
            f"; {left_out:,} files without an image suffix left out (--all-files)"
            if left_out
            else ""
        )
    )
    record = JobRecord(
        input=source,
        kind=kind,
        model=identity.name,
        dim=identity.dim,
        normalized=options.normalize,
        shards=-(-rows // options.shard_size),
        rows=rows,
        shard_size=options.shard_size,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        roots=listing.roots,
    )
    try:
        directory.write_atomic(record.to_json(), JOB_FILE)
    except StorageError as exc:
        raise JobError(str(exc)) from exc
    return directory, record


def _canonical_input(uri: str) -> str:
    if "://" in uri:
        return uri
    from pathlib import Path

    return str(Path(uri).expanduser().absolute())


def _remove_listing(directory: JobDirectory) -> None:
    """Take back what an unfinished listing wrote: its manifest, and the root if left empty."""
    try:
        directory.clear_manifest()
        root = directory.fs.get_file_info(directory.root)
        if root.type == pafs.FileType.Directory and not directory.entries():
            directory.fs.delete_dir(directory.root)
    except OSError:
        logger.warning("could not remove the unfinished listing in %s", directory.uri)


def _check_same_job(
    directory: JobDirectory,
    record: JobRecord,
    source: str,
    kind: str,
    identity: ModelIdentity,
    normalized: bool,
) -> None:
    this = f"{identity.name} ({identity.dim}-d{'' if normalized else ', raw'})"
    held = f"{record.model} ({record.dim}-d{'' if record.normalized else ', raw'})"
    if (record.model, record.dim, record.normalized) != (identity.name, identity.dim, normalized):
        raise JobError(
            f"{directory.uri} holds the shards of model {held}, and this run embeds with {this}; "
            "give another --output"
        )
    if record.kind != kind:
        raise JobError(f"{directory.uri} holds a job of {record.kind}s; give another --output")
    if record.input != source:
        raise JobError(
            f"{directory.uri} holds the job of {record.input}, not {source}; rerun with that "
            "input, or give another --output"
        )


def run_shards(
    directory: JobDirectory,
    record: JobRecord,
    options: RunOptions,
    identity: ModelIdentity,
    progress: bool,
    start_engine: Callable[[], None],
) -> RunReport:
    """Embed every shard not yet committed, committing each as it completes.

    ``start_engine`` connects to (or starts) Ray, only when there is something to embed.
    """
    removed = directory.remove_temporaries()
    if removed:
        logger.info("removed %d temporary files an interrupted run left", removed)
    done = directory.committed()
    pending = [shard for shard in range(record.shards) if shard not in done]
    report = RunReport(shards_total=record.shards, shards_before=len(done))
    if not pending:
        return report
    start_engine()
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    hosted = options.endpoint is None
    use_gpus = hosted and gpus > 0 and options.model.device in ("auto", "cuda")
    actors = options.actors or (gpus if use_gpus else 1)
    actor_cpus = options.cpus_per_actor if hosted else 0.25
    readers = options.readers or max(1, cpus - (0 if use_gpus else int(actors * actor_cpus)))
    if not use_gpus and actors * actor_cpus + 1 > cpus:
        raise JobError(
            f"{actors} model actors of {actor_cpus:g} CPUs leave no CPU for reading on a "
            f"cluster of {cpus}; lower --actors or --cpus-per-actor"
        )
    run = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    started = time.time()
    directory.write_run(
        run,
        {
            "started_at": started,
            "mode": "endpoint" if options.endpoint else "model",
            "endpoint": options.endpoint,
            "shards": len(pending),
        },
    )

    text = record.kind == "text"
    reader_options = ReaderOptions(
        job=directory.location,
        kind=record.kind,
        roots=(*record.roots, *options.allow_roots),
        limits=options.limits,
        preprocess=identity.preprocess if hosted and not text else None,
        chunk_rows=options.batch_size,
    )
    dataset = ray.data.from_items(
        [{"shard": shard} for shard in pending], override_num_blocks=len(pending)
    ).map_batches(
        ShardReader,
        fn_constructor_kwargs={"options": reader_options},
        batch_size=1,
        compute=ActorPoolStrategy(min_size=1, max_size=readers),
        num_cpus=1,
    )
    embed_kwargs: dict[str, Any]
    if hosted:
        model = dataclasses.replace(
            options.model, threads=options.model.threads or max(1, int(actor_cpus))
        )
        embedder: type[Any] = TextEmbedder if text else ImageEmbedder
        embed_kwargs = {"options": model, "normalize": options.normalize}
        if not text:
            embed_kwargs["limits"] = options.limits
    else:
        assert options.endpoint is not None
        embedder = EndpointEmbedder
        embed_kwargs = {
            "options": EndpointOptions(
                address=options.endpoint,
                security=options.security,
                model=identity.name,
                dim=identity.dim,
                kind=record.kind,
                normalize=options.normalize,
                window=options.window,
                streams=options.streams,
                timeout_s=options.timeout_s,
                max_attempts=options.max_attempts,
            )
        }
    dataset = dataset.map_batches(
        embedder,
        fn_constructor_kwargs=embed_kwargs,
        batch_size=options.batch_size,
        compute=ActorPoolStrategy(min_size=1, max_size=actors),
        num_cpus=actor_cpus,
        num_gpus=1 if use_gpus else None,
    )
    logger.info(
        "run %s: %d shards, %d model actors (%s), %d readers",
        run,
        len(pending),
        actors,
        "GPU each" if use_gpus else f"{actor_cpus:g} CPU each",
        readers,
    )
    pending_rows = sum(record.shard_rows(shard) for shard in pending)
    assemblers: dict[int, ShardAssembler] = {}
    bar = tqdm(
        total=pending_rows,
        unit=record.kind,
        disable=not progress,
        file=sys.stderr,
        smoothing=0.05,
        dynamic_ncols=True,
    )
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            added = _collect(batch, assemblers, record)
            bar.update(added)
            for shard in [s for s, assembler in assemblers.items() if assembler.complete]:
                assembler = assemblers.pop(shard)
                data = assembler.parquet(record.model, run)
                directory.write_atomic(data, SHARDS, part_name(shard))
                report.shards_committed += 1
                report.rows += assembler.count
                report.ok += assembler.ok
                report.errors += assembler.count - assembler.ok
                bar.set_postfix_str(
                    f"shards {report.shards_before + report.shards_committed}/{record.shards}",
                    refresh=False,
                )
    except KeyboardInterrupt:
        report.interrupted = True
    except StorageError as exc:
        report.stopped = str(exc)
    except Exception as exc:  # the engine's failure, with our actors' cause inside
        logger.debug("the run stopped", exc_info=True)
        report.stopped = cause_line(exc)
    finally:
        bar.close()
        report.seconds = time.time() - started
    if report.stopped is None and not report.interrupted and not report.complete:
        missing = sorted(assemblers)[:5]
        report.stopped = f"the engine returned no rows for some inputs (shards {missing})"
    return report


def _collect(
    batch: dict[str, Any], assemblers: dict[int, ShardAssembler], record: JobRecord
) -> int:
    """Put each row of ``batch`` into its shard's slot; returns how many slots were new."""
    added = 0
    rows = zip(
        batch["shard"].tolist(),
        batch["index"].tolist(),
        batch["id"].tolist(),
        batch["source"].tolist(),
        batch["reason"].tolist(),
        batch["message"].tolist(),
        batch["embedding"],
        batch["truncated"].tolist(),
        strict=True,
    )
    for shard, index, row_id, source, reason, message, embedding, truncated in rows:
        assembler = assemblers.get(shard)
        if assembler is None:
            assembler = assemblers[shard] = ShardAssembler(
                shard, record.shard_rows(shard), record.dim, record.kind
            )
        failed = bool(reason)
        added += assembler.add(
            index,
            row_id,
            source,
            None if failed else embedding,
            reason or None,
            message or None,
            truncated,
        )
    return added


def cause_line(exc: BaseException) -> str:
    """The innermost cause of an engine error, in one line (Ray wraps our exceptions)."""
    seen: set[int] = set()
    inner: BaseException = exc
    while id(inner) not in seen:
        seen.add(id(inner))
        nested = getattr(inner, "cause", None) or inner.__cause__
        if not isinstance(nested, BaseException):
            break
        inner = nested
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return f"{type(inner).__name__}: {text}" if text else type(inner).__name__
