"""``clipvision batch run|status|verify``: the bulk job's command line (needs clipvision[ray]).

Exit status: 0 when the job is complete (``run``), or its output matches its manifest
(``verify``); 1 when a run stopped before the end (rerun the same command to resume), or
verify found a difference, or the endpoint cannot be reached; 2 for a usage error or an
input or output that cannot be used (nothing is written then); 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from clipvision.client.cli import (
    PLAINTEXT,
    add_security_arguments,
    security_flags_given,
    security_of,
)
from clipvision.server.batch.manifest import InputOptions
from clipvision.server.batch.outcomes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, JobError
from clipvision.server.batch.storage import JobDirectory, JobRecord, StorageError
from clipvision.server.batch.verify import format_duration, status, verify
from clipvision.server.config.settings import DEFAULT_MODEL

PROG = "clipvision batch"


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``clipvision batch``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Embed an archive of images (or texts) on Ray Data into Parquet shards, "
        "losslessly and resumably: one row per input, each shard committed whole.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="embed INPUT into Parquet shards under --output (rerun to resume)",
        description="List INPUT once into fixed shards, then embed every shard not yet "
        "committed under OUT. Rerunning the same command resumes where it stopped.",
    )
    run.add_argument(
        "input",
        metavar="INPUT",
        help="a folder or bucket prefix (walked recursively), a glob, a .txt or .parquet "
        "manifest of URIs, or with --texts a .parquet or .jsonl file of texts",
    )
    run.add_argument("--output", "-o", required=True, metavar="OUT", help="folder or s3:// gs://")
    mode = run.add_argument_group("model (default: hosted by the job's actors)")
    mode.add_argument(
        "--model",
        help=f"checkpoint to host: a preset, hub id or directory (default: {DEFAULT_MODEL}); "
        "with --endpoint, a served model (default: the server's default)",
    )
    mode.add_argument("--dummy-weights", action="store_true", help="random weights (tests)")
    mode.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    mode.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    mode.add_argument(
        "--backend", default="auto", help="auto, torch or onnxruntime, as the server's flag"
    )
    mode.add_argument("--cache-dir", help="Hugging Face cache directory")
    mode.add_argument(
        "--endpoint",
        metavar="HOST:PORT",
        help="call this running clipvision server (or fleet) instead of hosting the model",
    )
    mode.add_argument(
        "--window",
        type=_positive_int,
        default=32,
        help="--endpoint: items in flight on one stream (default: %(default)s)",
    )
    mode.add_argument(
        "--streams",
        type=_positive_int,
        default=2,
        help="--endpoint: streams open at once per actor (default: %(default)s)",
    )
    mode.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="--endpoint: deadline in seconds of one batch's stream (default: %(default)s)",
    )
    add_security_arguments(
        run.add_argument_group(
            "endpoint connection (with --endpoint: TLS, mutual TLS, a bearer token)"
        )
    )
    inputs = run.add_argument_group("input")
    inputs.add_argument("--texts", action="store_true", help="INPUT holds texts, not images")
    inputs.add_argument("--text-column", default="text", help="(default: %(default)s)")
    inputs.add_argument("--uri-column", default="uri", help="(default: %(default)s)")
    inputs.add_argument(
        "--id-column", default="id", help="optional; else the URI or row (default: %(default)s)"
    )
    inputs.add_argument(
        "--all-files",
        action="store_true",
        help="take every file of a folder, not only those with an image suffix",
    )
    inputs.add_argument(
        "--allow-root",
        action="append",
        default=[],
        metavar="FOLDER",
        help="local paths a manifest names are read only below these folders (repeatable)",
    )
    run.add_argument(
        "--raw", action="store_true", help="raw projected features, not L2-normalised vectors"
    )
    engine = run.add_argument_group("engine")
    engine.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="the Ray cluster to run on (default: RAY_ADDRESS, else a local one on 127.0.0.1)",
    )
    engine.add_argument(
        "--shard-size",
        type=_positive_int,
        default=1000,
        help="inputs per shard, fixed when the job is created (default: %(default)s)",
    )
    engine.add_argument(
        "--batch-size", type=_positive_int, default=32, help="(default: %(default)s)"
    )
    engine.add_argument(
        "--actors", type=_positive_int, help="model actors at most (default: one per GPU, or 1)"
    )
    engine.add_argument(
        "--readers", type=_positive_int, help="read-and-decode actors at most (default: the rest)"
    )
    engine.add_argument(
        "--cpus-per-actor",
        type=float,
        default=1.0,
        help="CPUs each model actor reserves and runs on (default: %(default)s)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--verbose", "-v", action="store_true", help="log what the job does")

    show = commands.add_parser(
        "status", help="shards done, rows ok and error, rate", description="Show a job's progress."
    )
    show.add_argument("output", metavar="OUT")
    show.add_argument("--json", action="store_true", help="as one JSON object")
    check = commands.add_parser(
        "verify",
        help="prove every manifest id has exactly one row",
        description="Check every shard against the manifest; exit 1 on any difference.",
    )
    check.add_argument("output", metavar="OUT")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``clipvision batch``; returns the exit status."""
    args = build_parser().parse_args(argv)
    level = logging.INFO if getattr(args, "verbose", False) else logging.WARNING
    logging.basicConfig(level=level, format=f"{PROG}: %(message)s", stream=sys.stderr)
    try:
        if args.command == "run":
            return _run(args)
        directory, record = _existing(args.output)
        if args.command == "status":
            return _status(directory, record, args.json)
        return _verify(directory, record)
    except JobError as error:
        _say(error.message)
        return error.status
    except KeyboardInterrupt:
        _say("interrupted; rerun the same command to resume")
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    # Imported here: the model stage needs torch, which status and verify do without.
    from clipvision.server.batch.encoders import ModelOptions
    from clipvision.server.batch.job import RunOptions, identify_model, open_job, run_shards

    model = args.model if args.model is not None else ("" if args.endpoint else DEFAULT_MODEL)
    secured = security_flags_given(args)
    if secured and not args.endpoint:
        raise JobError(f"{secured[0]} is for --endpoint: the job hosts the model itself otherwise")
    try:
        security = security_of(args) if args.endpoint else PLAINTEXT
    except OSError as error:
        raise JobError(f"cannot read {error.filename}: {error.strerror}") from error
    options = RunOptions(
        input=args.input,
        output=args.output,
        inputs=InputOptions(
            texts=args.texts,
            all_files=args.all_files,
            uri_column=args.uri_column,
            id_column=args.id_column,
            text_column=args.text_column,
        ),
        model=ModelOptions(
            model=model,
            device=args.device,
            dtype=args.dtype,
            backend=args.backend,
            dummy_weights=args.dummy_weights,
            cache_dir=args.cache_dir,
        ),
        endpoint=args.endpoint,
        security=security,
        normalize=not args.raw,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        actors=args.actors,
        readers=args.readers,
        cpus_per_actor=args.cpus_per_actor,
        window=args.window,
        streams=args.streams,
        timeout_s=args.timeout,
        allow_roots=tuple(str(Path(root).resolve()) for root in args.allow_root),
    )
    identity = identify_model(options)
    directory, record = open_job(options, identity, _say)
    address = args.ray_address or os.environ.get("RAY_ADDRESS") or None
    progress = not args.no_progress and sys.stderr.isatty()
    report = run_shards(directory, record, options, identity, progress, lambda: _start_ray(address))
    done = report.shards_before + report.shards_committed
    if report.shards_committed:
        rate = report.rows / report.seconds if report.seconds > 0 else 0.0
        _say(
            f"committed {report.shards_committed} shards this run: {report.rows:,} {record.kind}s "
            f"({report.ok:,} ok, {report.errors:,} error) in {format_duration(report.seconds)}, "
            f"{rate:,.1f} {record.kind}s/s"
        )
    if report.interrupted:
        _say(f"interrupted with {done}/{record.shards} shards committed; rerun to resume")
        return EXIT_INTERRUPTED
    if report.stopped is not None:
        _say(f"the run stopped: {report.stopped}")
        _say(f"{done}/{record.shards} shards committed; rerun the same command to resume")
        return EXIT_FAILED
    _say(
        f"complete: {record.shards}/{record.shards} shards, {record.rows:,} rows in "
        f"{directory.shown('shards')}; `{PROG} verify {args.output}` proves it"
    )
    return EXIT_OK


def _start_ray(address: str | None) -> None:
    """Connect to the cluster at ``address``, or start one on this machine only."""
    host = (address or "").rpartition(":")[0]
    if address is None or host in ("localhost", "::1", "[::1]") or host.startswith("127."):
        # A one-machine cluster: Ray's processes then listen on 127.0.0.1, not every
        # interface, and a loopback address is dialled as such rather than swapped for
        # this host's outward one (Ray reads this when imported, so before the import).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    import ray.data  # configures its own loggers when imported: quieted after that

    # Ray's own notices (token authentication, progress bars, its executor's INFO lines)
    # are not the job's business unless asked for with --verbose; its errors still show.
    quiet = logging.root.level > logging.INFO
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR if quiet else logging.INFO)
    if ray.is_initialized():
        return
    extra = {"include_dashboard": False} if address is None else {}
    try:
        ray.init(
            address=address,
            configure_logging=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            **extra,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise JobError(
            f"cannot connect to the Ray cluster at {address}: {exc}", EXIT_FAILED
        ) from exc


def _existing(output: str) -> tuple[JobDirectory, JobRecord]:
    try:
        directory = JobDirectory(output)
        record = directory.read_job()
    except StorageError as exc:
        raise JobError(str(exc)) from exc
    if record is None:
        raise JobError(f"{output} holds no clipvision batch job (no job.json)")
    return directory, record


def _status(directory: JobDirectory, record: JobRecord, as_json: bool) -> int:
    try:
        state = status(directory, record)
    except (StorageError, OSError) as exc:
        raise JobError(f"cannot read {directory.uri}: {exc}", EXIT_FAILED) from exc
    if as_json:
        print(
            json.dumps(
                {
                    "input": record.input,
                    "model": record.model,
                    "dim": record.dim,
                    "kind": record.kind,
                    "shards_done": state.shards_done,
                    "shards": record.shards,
                    "rows_done": state.rows_done,
                    "rows": record.rows,
                    "ok": state.ok,
                    "error": state.errors,
                    "rate": state.rate,
                    "eta_s": state.eta_s,
                    "complete": state.complete,
                }
            )
        )
        return EXIT_OK
    noun = record.kind
    print(f"job     {directory.uri}: {noun}s of {record.input}")
    print(f"model   {record.model}, {record.dim}-d{'' if record.normalized else ' (raw)'}")
    print(f"shards  {state.shards_done}/{record.shards} committed")
    print(f"rows    {state.rows_done:,}/{record.rows:,}: {state.ok:,} ok, {state.errors:,} error")
    if state.rate is not None:
        eta = f", about {format_duration(state.eta_s)} to go" if state.eta_s else ""
        print(f"rate    {state.rate:,.1f} {noun}s/s in the latest run{eta}")
    return EXIT_OK


def _verify(directory: JobDirectory, record: JobRecord) -> int:
    try:
        result = verify(directory, record)
    except (StorageError, OSError) as exc:
        raise JobError(f"cannot read {directory.uri}: {exc}", EXIT_FAILED) from exc
    if result.problems:
        for problem in result.problems[:20]:
            print(f"DIFFERENCE {problem}")
        if len(result.problems) > 20:
            print(f"... and {len(result.problems) - 20} more")
        _say(
            f"verify FAILED: {len(result.problems)} differences between {directory.uri} and "
            "its manifest"
        )
        return EXIT_FAILED
    print(
        f"verified {directory.uri}: {record.shards} shards, {result.rows:,} rows "
        f"({result.ok:,} ok, {result.errors:,} error): every one of the manifest's "
        f"{record.rows:,} ids exactly once, {record.dim}-d {record.model}"
    )
    return EXIT_OK


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
