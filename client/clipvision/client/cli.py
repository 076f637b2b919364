"""The ``clipvision`` command: ``embed`` files, folders or texts into .npy + index, ``info``.

Exit status: 0 when every file (text) is embedded; 1 when some failed, the
stream broke or the server cannot be reached (what was done is kept; rerun the
same command to resume); 2 for a usage error or an output that cannot be used;
130 when interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Generator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TypedDict

from google.protobuf import json_format

from clipvision.client._base import DEFAULT_STREAM_WINDOW, DEFAULT_TIMEOUT_S
from clipvision.client._channel import DEFAULT_TARGET
from clipvision.client._client import EmbeddingClient
from clipvision.client._discovery import image_files
from clipvision.client._errors import ClipVisionError
from clipvision.client._ingest import Embed, IngestReport, Outcome, ingest
from clipvision.client._store import EmbeddingStore, StoreError
from clipvision.v1 import embedding_service_pb2 as pb

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_COMMIT_EVERY = 256


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``clipvision``."""
    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("connection")
    group.add_argument(
        "--server",
        default=os.environ.get("CLIPVISION_SERVER", DEFAULT_TARGET),
        metavar="ADDRESS",
        help="HOST:PORT, dns:///NAME:PORT or IP:PORT,IP:PORT (round-robin) "
        f"[env CLIPVISION_SERVER] (default: {DEFAULT_TARGET})",
    )
    add_security_arguments(group)
    group.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="deadline in seconds of each single call (default: %(default)s)",
    )

    parser = argparse.ArgumentParser(
        prog="clipvision", description="Client of a clipvision embedding server."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = commands.add_parser(
        "embed",
        parents=[connection],
        help="embed image files and folders, or texts, into OUT.npy with an OUT.jsonl index",
        description="Embed image files, and the image files found recursively in folders, "
        "through one stream; or, with --text FILE, the texts of FILE, one per line. Writes "
        "OUT.npy (float32, one row per embedded file or text) and OUT.jsonl (one line per file "
        "or text: its path or text and row, or why it failed). Rerunning the same command "
        "resumes: what the output already holds is skipped.",
    )
    embed.add_argument("paths", nargs="*", metavar="PATH", help="image files and folders")
    embed.add_argument(
        "--text",
        type=Path,
        metavar="FILE",
        help="embed the texts of FILE (UTF-8, one text per line, empty lines skipped; - for "
        "stdin) with the model's text tower, instead of images",
    )
    embed.add_argument(
        "--no-truncate",
        action="store_true",
        help="with --text: record texts longer than the model's context as failed "
        "(TEXT_TOO_LONG) instead of embedding their first tokens",
    )
    embed.add_argument("--out", required=True, type=Path, help="the embeddings file, OUT.npy")
    embed.add_argument("--model", help="a served model (default: the server's default model)")
    embed.add_argument(
        "--raw",
        action="store_true",
        help="store the raw projected features instead of L2-normalised vectors",
    )
    embed.add_argument(
        "--window",
        type=_positive_int,
        default=DEFAULT_STREAM_WINDOW,
        help="images (texts) in flight at once (default: %(default)s)",
    )
    embed.add_argument(
        "--commit-every",
        type=_positive_int,
        default=DEFAULT_COMMIT_EVERY,
        help="write results to disk every N inputs (and at least every 2 s) (default: %(default)s)",
    )
    embed.add_argument(
        "--overwrite", action="store_true", help="start OUT afresh instead of resuming it"
    )
    embed.add_argument(
        "--no-progress", action="store_true", help="no progress bar (default: on a terminal)"
    )

    info = commands.add_parser(
        "info",
        parents=[connection],
        help="describe the served models and the server's limits",
        description="Describe the served models, their preprocessing and the server's limits.",
    )
    info.add_argument("--json", action="store_true", help="print the GetModelInfo response as JSON")

    # Only listed here; main() hands `batch ...` to the batch job's own parser.
    commands.add_parser(
        "batch",
        help="embed a whole archive on Ray Data into Parquet shards (run, status, verify; "
        "needs the server and ray extras)",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["batch"]:
        return _batch(arguments[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "embed" and (args.text is None) == (not args.paths):
        parser.error("embed takes image PATHs or --text FILE, one or the other")
    try:
        client = _client(args)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    with client:
        try:
            if args.command == "info":
                return _info(client, args)
            return _embed(client, args)
        except KeyboardInterrupt:
            _say("interrupted; rerun the same command to resume")
            return EXIT_INTERRUPTED


def _batch(argv: list[str]) -> int:
    """``clipvision batch``: the bulk job, which needs torch and Ray, not only the client."""
    try:
        from clipvision.server.batch.cli import main as batch_main
    except ModuleNotFoundError as error:
        if error.name is not None and error.name.partition(".")[0] == "clipvision":
            raise  # our own module missing is a bug, not a missing extra
        _say(
            f"batch needs the server and ray extras (no module {error.name!r}): "
            "pip install 'clipvision[server,ray]'"
        )
        return EXIT_USAGE
    return batch_main(argv)


class Security(TypedDict):
    """The client's TLS and token options, as read from the command line."""

    tls: bool
    root_certificates: bytes | None
    certificate_chain: bytes | None
    private_key: bytes | None
    server_name: str | None
    token: str | None


PLAINTEXT = Security(
    tls=False,
    root_certificates=None,
    certificate_chain=None,
    private_key=None,
    server_name=None,
    token=None,
)


# The flags add_security_arguments adds, for a command that takes them only in one mode.
SECURITY_FLAGS = (
    "--tls",
    "--ca-cert",
    "--client-cert",
    "--client-key",
    "--server-name",
    "--token-file",
)


def security_flags_given(args: argparse.Namespace) -> list[str]:
    """Which of SECURITY_FLAGS the command line set."""
    return [flag for flag in SECURITY_FLAGS if getattr(args, flag[2:].replace("-", "_"))]


def add_security_arguments(group: argparse._ArgumentGroup) -> None:
    """TLS and token flags (SECURITY_FLAGS), the same wherever a command calls a server."""
    group.add_argument("--tls", action="store_true", help="connect with TLS")
    group.add_argument("--ca-cert", type=Path, help="PEM roots to verify the server (with --tls)")
    group.add_argument("--client-cert", type=Path, help="PEM certificate chain for mutual TLS")
    group.add_argument("--client-key", type=Path, help="PEM private key for mutual TLS")
    group.add_argument("--server-name", help="the name to verify in the server's certificate")
    group.add_argument(
        "--token-file",
        type=Path,
        help="a file holding a bearer token, sent over --tls (or in plaintext to a loopback "
        "address) [env CLIPVISION_TOKEN holds the token itself]",
    )


def security_of(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Security:
    """The flags of add_security_arguments, files read; OSError names a file it cannot read."""

    def read(path: Path | None) -> bytes | None:
        return path.read_bytes() if path is not None else None

    token = environ.get("CLIPVISION_TOKEN") or None
    if args.token_file is not None:
        token = args.token_file.read_text().strip()
    return Security(
        tls=args.tls,
        root_certificates=read(args.ca_cert),
        certificate_chain=read(args.client_cert),
        private_key=read(args.client_key),
        server_name=args.server_name,
        token=token,
    )


def _client(args: argparse.Namespace) -> EmbeddingClient:
    return EmbeddingClient(
        args.server,
        **security_of(args),
        timeout=args.timeout,
        stream_window=getattr(args, "window", DEFAULT_STREAM_WINDOW),
    )


def _info(client: EmbeddingClient, args: argparse.Namespace) -> int:
    try:
        info = client.model_info()
    except ClipVisionError as error:
        _say(f"cannot get the model info from {args.server}: {error}")
        return EXIT_FAILED
    if args.json:
        print(json_format.MessageToJson(info, preserving_proto_field_name=True))
        return EXIT_OK
    print(f"server {args.server}")
    for model in info.models:
        print(_describe_model(model))
    limits = info.limits
    print(
        f"limits: {limits.max_batch_images} images per EmbedImages call, messages up to "
        f"{_mib(limits.max_receive_message_bytes)}, images up to "
        f"{_mib(limits.max_image_bytes)} and {limits.max_image_pixels:,} pixels"
    )
    if limits.max_batch_texts:
        print(
            f"limits: {limits.max_batch_texts} texts per EmbedTexts call, texts up to "
            f"{limits.max_text_bytes:,} bytes, {limits.max_classify_labels} labels per "
            "Classify call"
        )
    return EXIT_OK


def _describe_model(model: pb.ModelInfo) -> str:
    flags = [
        flag
        for flag, on in (("default", model.is_default), ("dummy weights", model.dummy_weights))
        if on
    ]
    name = f"model {model.name}" + (f" ({', '.join(flags)})" if flags else "")
    if not model.loaded:
        return f"{name}: not loaded yet; source {model.source}"
    pre = model.preprocessing
    interpolation = pb.Interpolation.Name(pre.interpolation).removeprefix("INTERPOLATION_")
    family = f"; family {model.family}" if model.family else ""
    # SigLIP resizes straight to a size; CLIP resizes the shortest edge, then crops.
    if pre.resize_height:
        resize = f"resize to {pre.resize_width}x{pre.resize_height} px"
    else:
        resize = f"shortest edge {pre.resize_shortest_edge} px"
    crop = f"centre crop {pre.crop_width}x{pre.crop_height}" if pre.crop_height else "no crop"
    return (
        f"{name}: {model.embedding_dimension}-d, {model.image_size} px, {model.dtype} on "
        f"{model.device}{_runtime(model.image_runtime)}; source {model.source}{family}\n"
        f"  preprocessing: {resize} ({interpolation.lower()}), {crop}, "
        f"mean {_floats(pre.mean)}, std {_floats(pre.std)}\n" + _describe_text(model)
    )


def _describe_text(model: pb.ModelInfo) -> str:
    if pb.MODALITY_TEXT not in model.modalities:
        return "  texts: not served (no text tower)"
    bias = f", logit bias {model.logit_bias:.4g}" if model.HasField("logit_bias") else ""
    scores = ", sigmoid scores" if model.score_type == pb.SCORE_TYPE_SIGMOID else ""
    return (
        f"  texts: context {model.text_context_length} tokens, vocabulary "
        f"{model.vocab_size:,}, logit scale {model.logit_scale:.4g}{bias}{scores}"
        f"{_runtime(model.text_runtime)}"
    )


def _runtime(runtime: str) -> str:
    """`` (onnxruntime)``; nothing where an older server does not say."""
    return f" ({runtime})" if runtime else ""


def _embed(client: EmbeddingClient, args: argparse.Namespace) -> int:
    texts = args.text is not None
    try:
        files = _read_texts(args.text) if texts else image_files(args.paths)
    except FileNotFoundError as exc:
        _say(str(exc))
        return EXIT_USAGE
    except (OSError, ValueError) as exc:
        _say(f"cannot read {args.text}: {exc}")
        return EXIT_USAGE
    try:
        info = client.model_info()
    except ClipVisionError as error:
        _say(f"cannot reach the server at {args.server}: {error}")
        return EXIT_FAILED
    served = _served_model(info, args.model)
    if served is None:
        names = ", ".join(m.name for m in info.models)
        _say(f"the server does not serve model {args.model!r}; it serves: {names}")
        return EXIT_USAGE
    model = served.name
    if texts and pb.MODALITY_TEXT not in served.modalities:
        _say(f"model {model!r} is served without its text tower, so it cannot embed texts")
        return EXIT_USAGE
    try:
        store = EmbeddingStore.open(
            args.out,
            model=model,
            normalized=not args.raw,
            overwrite=args.overwrite,
            kind="text" if texts else "image",
        )
    except StoreError as exc:
        _say(str(exc))
        return EXIT_USAGE
    except OSError as exc:
        _say(f"cannot open {args.out}: {exc.strerror or exc}")
        return EXIT_USAGE
    stop = threading.Event()
    restore = _stop_on_signals(stop)
    try:
        if store.repaired:
            _say(f"{args.out}: cut off the partial write of an interrupted run")
        done = sum(path in store.entries for path in files)
        noun = "text" if texts else "file"
        _say(
            f"{_count(len(files), noun)}; {done} already in {args.out}; "
            f"embedding {len(files) - done}"
        )
        embed: Embed
        if texts:
            truncate = False if args.no_truncate else None

            def embed(todo: list[str]) -> Generator[Outcome, None, None]:
                return client.embed_text_stream(
                    todo,
                    model=model,
                    normalize=not args.raw,
                    truncate=truncate,
                    return_exceptions=True,
                )
        else:

            def embed(todo: list[str]) -> Generator[Outcome, None, None]:
                return client.embed_images(
                    todo, model=model, normalize=not args.raw, return_exceptions=True
                )

        try:
            report = ingest(
                embed,
                store,
                files,
                commit_every=args.commit_every,
                progress=False if args.no_progress else None,
                unit=noun,
                stop=stop,
            )
        except OSError as exc:  # a full disk, say: what was committed stays valid
            _say(f"cannot write {args.out}: {exc.strerror or exc}; fix that and rerun to resume")
            return EXIT_FAILED
        return _summarise(report, store, files, noun)
    finally:
        restore()
        store.close()


def _read_texts(path: Path) -> list[str]:
    """The distinct texts of ``path`` (``-``: stdin), one per line, in order; empty lines skipped.

    Only a line feed ends a line (a carriage return before it is dropped), so no other
    character splits a text; a UTF-8 byte order mark is ignored. Raises ValueError when the
    file is not UTF-8.
    """
    if str(path) == "-":
        data = sys.stdin.buffer.read()
    else:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        data = path.read_bytes()
    try:
        content = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(
            f"line {line} is not UTF-8 ({exc.reason}); save the file as UTF-8"
        ) from None
    lines = (line.removesuffix("\r") for line in content.split("\n"))
    return list(dict.fromkeys(line for line in lines if line))


def _served_model(info: pb.GetModelInfoResponse, wanted: str | None) -> pb.ModelInfo | None:
    for model in info.models:
        if model.name == wanted or (wanted is None and model.is_default):
            return model
    if wanted is None and info.models:
        return info.models[0]
    return None


def _summarise(
    report: IngestReport, store: EmbeddingStore, files: Sequence[str], noun: str = "file"
) -> int:
    failed = [
        (path, entry)
        for path in files
        if (entry := store.entries.get(path)) is not None and entry.status == "failed"
    ]
    _say(
        f"embedded {report.embedded}, failed {len(report.failed)}, skipped {report.skipped} "
        f"(already done); {store.npy_path} has {_count(store.rows, 'row')}, "
        f"indexed in {store.index_path}"
    )
    if failed:
        _say(f'{_count(len(failed), noun)} cannot be embedded (status "failed" in the index):')
        for path, entry in failed:
            _say(f"  {_shown(path, noun)}: {entry.reason}: {entry.message}")
    if report.not_done:
        _say(f"{_count(len(report.not_done), noun)} not embedded this time; rerun to retry them:")
        for path, error in report.not_done:
            _say(f"  {_shown(path, noun)}: {error}")
    if report.truncated:
        _say(
            f"{_count(report.truncated, noun)} longer than the model's context embedded only "
            'in part ("truncated": true in the index; --no-truncate refuses them instead)'
        )
    if report.interrupted:
        _say("interrupted; rerun the same command to resume")
        return EXIT_INTERRUPTED
    if report.stream_error is not None:
        _say(f"the stream failed: {report.stream_error}; rerun the same command to resume")
        return EXIT_FAILED
    return EXIT_FAILED if failed or report.not_done else EXIT_OK


def _stop_on_signals(stop: threading.Event) -> Callable[[], None]:
    """First SIGINT or SIGTERM: finish the current file, save and stop. Second: stop at once."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        _say("stopping after the current file (again to stop at once)")

    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, handler)

    def restore() -> None:
        for signum, old in previous.items():
            signal.signal(signum, old)

    return restore


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB"


def _floats(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{value:.4g}" for value in values) + ")"


def _count(count: int, noun: str) -> str:
    return f"1 {noun}" if count == 1 else f"{count} {noun}s"


def _shown(key: str, noun: str) -> str:
    """A path as it is; a text quoted, and shortened when long."""
    if noun == "file":
        return key
    return repr(key if len(key) <= 60 else key[:57] + "...")


def _say(message: str) -> None:
    print(f"clipvision: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
