"""The command line: flags and ``CLIPVISION_*`` environment variables -> one Settings.

argparse lives here, with the command-line entry point (cli.py) as its only
caller; the rest of the server receives Settings (or the part of it it uses).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from clipvision.server.config.limits import BUDGET_FRACTION, FetchPolicy, ImageLimits, byte_size
from clipvision.server.config.presets import PRESETS
from clipvision.server.config.settings import DEFAULT_MODEL, ModelSpec, Settings, TlsFiles


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _listed(values: list[str] | None, environ: Mapping[str, str], name: str, sep: str) -> list[str]:
    """A repeated flag's values, or else the environment variable's, split on ``sep``."""
    if values:
        return values
    return [part.strip() for part in environ.get(name, "").split(sep) if part.strip()]


def _read_token(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    if args.auth_token_file:
        token = Path(args.auth_token_file).read_text().strip()
        if not token:
            raise ValueError(f"--auth-token-file {args.auth_token_file} is empty")
        return token
    return environ.get("CLIPVISION_AUTH_TOKEN", "").strip() or None


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The command line of ``clipvision-server``; every default can come from the environment."""
    env = os.environ if environ is None else environ
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="clipvision-server",
        description="Serve CLIP embeddings of images and texts, and zero-shot classification, "
        "over gRPC: clipvision.v1.EmbeddingService, and the Open Inference Protocol "
        "(inference.GRPCInferenceService) on the same port; and over HTTP with --http-address.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    def option(flag: str, default: object, help_text: str, **kwargs: object) -> None:
        var = "CLIPVISION_" + flag.lstrip("-").upper().replace("-", "_")
        value = env.get(var, default)
        parser.add_argument(flag, default=value, help=f"{help_text} [env {var}]", **kwargs)  # type: ignore[arg-type]

    parser.add_argument(
        "--model",
        action="append",
        metavar="[NAME=]SOURCE",
        help=(
            "a checkpoint to serve: a local directory, a Hugging Face hub id or a preset "
            f"({', '.join(PRESETS)}); repeat to serve several, the first is the default. "
            "NAME is what requests use; a preset as NAME checks the checkpoint has that "
            f"architecture [env CLIPVISION_MODEL, comma-separated] (default: {DEFAULT_MODEL}, "
            f"which downloads {PRESETS[DEFAULT_MODEL].hub_id})"
            # Prints nothing, but its presence stops ArgumentDefaultsHelpFormatter from
            # appending "(default: None)": None only means "no --model given".
            "%(default).0s"
        ),
    )
    option("--address", defaults.address, "HOST:PORT to listen on; port 0 picks a free one")
    option(
        "--metrics-address",
        defaults.metrics_address,
        "HOST:PORT for Prometheus /metrics over HTTP; off unless given",
    )
    option(
        "--http-address",
        defaults.http_address,
        "HOST:PORT for HTTP beside gRPC: OpenAI's /v1/embeddings, KServe v2 REST, Weaviate's "
        "multi2vec-clip API and JSON for EmbeddingService; off unless given",
    )
    parser.add_argument(
        "--http-cors-origin",
        action="append",
        metavar="ORIGIN",
        help="let browser pages from ORIGIN (https://app.example.com, or * for any) call the "
        "HTTP routes (repeatable); CORS is off unless given [env CLIPVISION_HTTP_CORS_ORIGIN, "
        "comma-separated]",
    )
    option(
        "--http-timeout",
        defaults.http_timeout_s,
        "seconds an HTTP call may take in all (DEADLINE_EXCEEDED, 504, past it); a "
        "Connect-Timeout-Ms header may ask for less",
        type=_positive_float,
    )
    option("--device", defaults.device, "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    option(
        "--dtype",
        defaults.dtype,
        "auto (float16 on CUDA, float32 elsewhere), float32, float16 or bfloat16",
        choices=["auto", "float32", "float16", "bfloat16"],
    )
    option(
        "--backend",
        defaults.backend,
        "runtime of the image and text towers: auto (ONNX Runtime for float32 on the CPU "
        "where it is installed, else torch), torch or onnxruntime; ONNX Runtime serves a "
        "tower only after its start-up check against torch (max abs difference 1e-4)",
        choices=["auto", "torch", "onnxruntime"],
    )
    option(
        "--device-preprocess",
        defaults.device_preprocess,
        "where images are resized, cropped and normalised: auto (on the model's device when "
        "it is a GPU, else with Pillow on the CPU), on (the model's device, even the CPU) or "
        "off (Pillow on the CPU); the device's result is Pillow's byte for byte (checked at "
        "start: a difference keeps the CPU path), for bicubic, bilinear and box resizing",
        choices=["auto", "on", "off"],
    )
    option(
        "--threads",
        defaults.threads,
        "intra-op threads of the forward pass, torch's and ONNX Runtime's (default: the CPUs "
        "this process may use: its affinity, capped by the cgroup CPU quota, and by torch's "
        "own default)",
        type=_positive_int,
    )
    option(
        "--onnx-cache-dir",
        defaults.onnx_cache_dir,
        "where ONNX exports are kept, one per checkpoint content and exporter version "
        "(default: $XDG_CACHE_HOME/clipvision/onnx, else ~/.cache/clipvision/onnx)",
    )
    parser.add_argument(
        "--gpu-decode",
        action="store_true",
        default=_flag(env, "CLIPVISION_GPU_DECODE"),
        help="decode JPEGs on the GPU with nvJPEG (torchvision) instead of Pillow: faster, but "
        "not bit-exact (nvJPEG's inverse DCT is not libjpeg's: bench/gpu_feed.py measures the "
        "difference); needs a CUDA "
        "device and images resized on it; other formats, and JPEGs nvJPEG refuses, are "
        "decoded on the CPU [env CLIPVISION_GPU_DECODE=1]",
    )
    parser.add_argument(
        "--dummy-weights",
        action="store_true",
        default=_flag(env, "CLIPVISION_DUMMY_WEIGHTS"),
        help="serve random weights of a preset's architecture (smoke tests and benchmarks only; "
        "the embeddings mean nothing) [env CLIPVISION_DUMMY_WEIGHTS=1]",
    )
    parser.add_argument(
        "--lazy",
        action="store_true",
        default=_flag(env, "CLIPVISION_LAZY"),
        help="load each model on its first request instead of at start; health reports SERVING "
        "from the start [env CLIPVISION_LAZY=1]",
    )
    option("--cache-dir", defaults.cache_dir, "Hugging Face cache directory (default: HF_HOME's)")
    option(
        "--max-batch-size",
        defaults.max_batch_size,
        "most images (or texts) per forward pass of a tower",
        type=_positive_int,
    )
    option(
        "--max-batch-delay-ms",
        defaults.max_batch_delay_ms,
        "how long a forming batch may wait for more images or texts",
        type=_non_negative_float,
    )
    option(
        "--max-batch-images",
        defaults.max_batch_images,
        "most images in one EmbedImages request",
        type=_positive_int,
    )
    option(
        "--max-batch-texts",
        defaults.max_batch_texts,
        "most texts in one EmbedTexts request",
        type=_positive_int,
    )
    option(
        "--max-text-bytes",
        defaults.max_text_bytes,
        "largest text in UTF-8 bytes, refused whole even where it would be truncated",
        type=_positive_int,
    )
    option(
        "--max-classify-labels",
        defaults.max_classify_labels,
        "most labels in one Classify request",
        type=_positive_int,
    )
    option(
        "--label-cache-size",
        defaults.label_cache_size,
        "text vectors of Classify labels kept per model, least recently used dropped first "
        "(0: none)",
        type=_non_negative_int,
    )
    option(
        "--max-queue-size",
        defaults.max_queue_size,
        "images per model admitted and not yet answered (and texts, apart, at least "
        "--max-batch-texts and --max-classify-labels); past it unary calls get "
        "RESOURCE_EXHAUSTED and streams wait",
        type=_positive_int,
    )
    option(
        "--memory-limit",
        defaults.memory_limit,
        "bytes the process may use (4GiB, 512MiB, ...; default: the container's cgroup limit, "
        "else the RAM); sizes the default --memory-budget",
        type=byte_size,
    )
    option(
        "--memory-budget",
        defaults.memory_budget,
        "bytes that images and texts in flight may hold, shared fairly between callers: "
        "encoded bytes and crops until answered, decode working sets (priced from the header) "
        "while "
        f"decoding; past it unary calls get RESOURCE_EXHAUSTED and streams wait (default: "
        f"{BUDGET_FRACTION:g} x (--memory-limit - resident size once models are loaded))",
        type=byte_size,
    )
    option(
        "--stream-window",
        defaults.stream_window,
        "items one stream (EmbedImageStream, EmbedTextStream, ModelStreamInfer) may have in "
        "flight before the server stops reading it",
        type=_positive_int,
    )
    option(
        "--max-message-bytes",
        defaults.max_message_bytes,
        "largest gRPC message received or sent (default: the largest image, --max-image-bytes, "
        "as a data: URI with its framing, about 26.7 MiB); the memory budget reserves this "
        "much before each request message is read, since its size is known only once read",
        type=_positive_int,
    )
    limits = defaults.image_limits
    option("--max-image-bytes", limits.max_image_bytes, "largest encoded image", type=_positive_int)
    option(
        "--max-image-pixels",
        limits.max_image_pixels,
        "largest decoded image in pixels, checked before decoding",
        type=_positive_int,
    )
    option(
        "--min-image-side",
        limits.min_image_side,
        "smallest accepted width or height in pixels",
        type=_positive_int,
    )
    option(
        "--allowed-formats",
        ",".join(sorted(limits.allowed_formats)),
        "comma-separated image formats accepted (Pillow names)",
    )
    parser.add_argument(
        "--allow-file-root",
        action="append",
        metavar="DIR",
        help="allow file:// image URIs below DIR (repeatable; symlinks and .. are resolved "
        "before the check); off by default [env CLIPVISION_ALLOW_FILE_ROOT, "
        f"{os.pathsep!r}-separated]",
    )
    parser.add_argument(
        "--allow-fetch-domain",
        action="append",
        metavar="DOMAIN",
        help="allow https:// image URIs on DOMAIN (exact, *.suffix, or * for any public host; "
        "repeatable); off by default [env CLIPVISION_ALLOW_FETCH_DOMAIN, comma-separated]",
    )
    parser.add_argument(
        "--allow-http",
        action="store_true",
        default=_flag(env, "CLIPVISION_ALLOW_HTTP"),
        help="also fetch plain http:// URIs on the allowed domains [env CLIPVISION_ALLOW_HTTP=1]",
    )
    parser.add_argument(
        "--allow-private-fetch",
        action="store_true",
        default=_flag(env, "CLIPVISION_ALLOW_PRIVATE_FETCH"),
        help="let allowed domains resolve to private and loopback addresses (internal image "
        "stores); link-local and metadata addresses stay refused "
        "[env CLIPVISION_ALLOW_PRIVATE_FETCH=1]",
    )
    option(
        "--fetch-timeout",
        FetchPolicy().timeout_s,
        "seconds a URI fetch may take in all",
        type=_non_negative_float,
    )
    option(
        "--max-concurrent-fetches",
        FetchPolicy().max_concurrent_fetches,
        "http(s) image URIs fetched at once; later ones wait within their call's deadline",
        type=_positive_int,
    )
    option("--tls-cert", None, "PEM certificate chain: serve over TLS (with --tls-key)")
    option("--tls-key", None, "PEM private key of --tls-cert")
    option(
        "--tls-client-ca",
        None,
        "PEM CA bundle: require every client to present a certificate it signed (mutual TLS)",
    )
    option(
        "--auth-token-file",
        None,
        "file holding a bearer token that calls must send as 'authorization: Bearer TOKEN' "
        "(health stays open for probes); CLIPVISION_AUTH_TOKEN gives the token itself",
    )
    option(
        "--max-concurrent-rpcs",
        defaults.max_concurrent_rpcs,
        "unary calls (embedding, model info, reflection) in progress at once; more get "
        "RESOURCE_EXHAUSTED (TOO_MANY_CALLS); health checks are never counted",
        type=_positive_int,
    )
    option(
        "--max-calls-per-connection",
        defaults.max_calls_per_connection,
        "unary calls in progress at once on one connection",
        type=_positive_int,
    )
    option(
        "--max-streams",
        defaults.max_streams,
        "streaming calls (EmbedImageStream, reflection) open at once; when full, the stream "
        "idle the longest (10 s at least) is ended to make room, else RESOURCE_EXHAUSTED",
        type=_positive_int,
    )
    option(
        "--max-streams-per-connection",
        defaults.max_streams_per_connection,
        "streaming calls open at once on one connection",
        type=_positive_int,
    )
    option(
        "--request-read-timeout",
        defaults.request_read_timeout_s,
        "seconds a unary call may take to deliver its request message after it starts",
        type=_positive_float,
    )
    option(
        "--stream-idle-timeout",
        defaults.stream_idle_timeout_s,
        "seconds a stream may go without a message either way before it is ended "
        "(UNAVAILABLE, STREAM_IDLE); 0 turns it off",
        type=_non_negative_float,
    )
    option(
        "--max-connections",
        defaults.max_connections,
        "client connections accepted at once; past it new ones wait in the kernel's queue (the "
        "server raises its open-file limit to the hard limit at start; keep this under it)",
        type=_positive_int,
    )
    option(
        "--max-http2-streams",
        defaults.max_http2_streams,
        "HTTP/2 streams (calls of any kind) one connection may have open at once",
        type=_positive_int,
    )
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        default=_flag(env, "CLIPVISION_REUSE_PORT"),
        help="let other processes listen on the same port (SO_REUSEPORT); off, starting on a "
        "port in use fails [env CLIPVISION_REUSE_PORT=1]",
    )
    option(
        "--watchdog-timeout",
        defaults.watchdog_timeout_s,
        "seconds a batch may run on the device before health turns NOT_SERVING",
        type=_non_negative_float,
    )
    option(
        "--preprocess-workers",
        defaults.preprocess_workers,
        "threads that decode and preprocess images (default: the CPUs this process may use)",
        type=_positive_int,
    )
    option(
        "--loop",
        defaults.event_loop,
        "the event loop: auto (uvloop where installed, as the server extra installs it, else "
        "asyncio's), uvloop or asyncio; on uvloop's the server spent 7-20 %% less CPU per "
        "item (docs/PERFORMANCE.md)",
        choices=["auto", "uvloop", "asyncio"],
    )
    option(
        "--grace-period",
        defaults.grace_period_s,
        "seconds in-flight calls get to finish on SIGTERM",
        type=_non_negative_float,
    )
    option(
        "--keepalive-time",
        defaults.keepalive_time_s,
        "seconds between the server's pings on an idle connection (finds dead clients)",
        type=_positive_float,
    )
    option(
        "--keepalive-timeout",
        defaults.keepalive_timeout_s,
        "seconds a ping may go unanswered before the connection is closed",
        type=_positive_float,
    )
    option(
        "--min-ping-interval",
        defaults.min_ping_interval_s,
        "shortest interval between a client's pings the server accepts; faster pings get "
        "GOAWAY (the Python client pings every 60 s)",
        type=_positive_float,
    )
    option(
        "--max-connection-age",
        defaults.max_connection_age_s,
        "seconds after which a connection is sent GOAWAY, so clients reconnect and new "
        "replicas get traffic; 0 turns it off",
        type=_non_negative_float,
    )
    option(
        "--max-connection-age-grace",
        defaults.max_connection_age_grace_s,
        "seconds calls on an aged connection get to finish before it is closed (a stream "
        "cut there is resumed by the Python client)",
        type=_non_negative_float,
    )
    option(
        "--log-level",
        defaults.log_level,
        "logging level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )
    option(
        "--log-format",
        defaults.log_format,
        "text (for people) or json (one object per line, for log collectors)",
        choices=["text", "json"],
    )
    return parser


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build the settings from command-line arguments and the environment (flags win)."""
    env = os.environ if environ is None else environ
    parser = build_parser(env)
    args = parser.parse_args(argv)
    texts: list[str] = args.model or [
        part for part in env.get("CLIPVISION_MODEL", DEFAULT_MODEL).split(",") if part.strip()
    ]
    try:
        models = tuple(ModelSpec.parse(text) for text in texts)
    except ValueError as exc:
        parser.error(str(exc))
    if args.max_queue_size < args.max_batch_images:
        parser.error(
            f"--max-queue-size ({args.max_queue_size}) must be at least --max-batch-images "
            f"({args.max_batch_images}), or a full EmbedImages request could never be admitted"
        )
    names = [spec.name for spec in models]
    if len(set(names)) != len(names):
        parser.error(f"--model names must be unique, got {names}")
    tls: TlsFiles | None = None
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_cert:
        tls = TlsFiles(
            Path(args.tls_cert),
            Path(args.tls_key),
            Path(args.tls_client_ca) if args.tls_client_ca else None,
        )
    elif args.tls_client_ca:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    try:
        token = _read_token(args, env)
    except (OSError, ValueError) as exc:
        parser.error(f"cannot read the auth token: {exc}")
    roots = _listed(args.allow_file_root, env, "CLIPVISION_ALLOW_FILE_ROOT", os.pathsep)
    missing = [root for root in roots if not Path(root).is_dir()]
    if missing:
        parser.error(f"--allow-file-root {', '.join(missing)}: not a directory")
    formats = frozenset(f.strip().upper() for f in args.allowed_formats.split(",") if f.strip())
    if args.dummy_weights:
        not_presets = [spec.source for spec in models if spec.source not in PRESETS]
        if not_presets:
            parser.error(
                f"--dummy-weights builds a preset's architecture ({', '.join(PRESETS)}); "
                f"{', '.join(not_presets)} is not one"
            )
    return Settings(
        models=models,
        address=args.address,
        metrics_address=args.metrics_address,
        http_address=args.http_address,
        http_cors_origins=tuple(
            _listed(args.http_cors_origin, env, "CLIPVISION_HTTP_CORS_ORIGIN", ",")
        ),
        http_timeout_s=args.http_timeout,
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
        device_preprocess=args.device_preprocess,
        gpu_decode=args.gpu_decode,
        threads=args.threads,
        onnx_cache_dir=args.onnx_cache_dir,
        dummy_weights=args.dummy_weights,
        lazy_load=args.lazy,
        cache_dir=args.cache_dir,
        max_batch_size=args.max_batch_size,
        max_batch_delay_ms=args.max_batch_delay_ms,
        max_batch_images=args.max_batch_images,
        max_batch_texts=args.max_batch_texts,
        max_text_bytes=args.max_text_bytes,
        max_classify_labels=args.max_classify_labels,
        label_cache_size=args.label_cache_size,
        max_queue_size=args.max_queue_size,
        memory_limit=args.memory_limit,
        memory_budget=args.memory_budget,
        stream_window=args.stream_window,
        max_message_bytes=args.max_message_bytes,
        image_limits=ImageLimits(
            max_image_bytes=args.max_image_bytes,
            max_image_pixels=args.max_image_pixels,
            min_image_side=args.min_image_side,
            allowed_formats=formats,
        ),
        fetch_policy=FetchPolicy(
            file_roots=tuple(Path(root) for root in roots),
            fetch_domains=tuple(
                _listed(args.allow_fetch_domain, env, "CLIPVISION_ALLOW_FETCH_DOMAIN", ",")
            ),
            allow_http=args.allow_http,
            allow_private_addresses=args.allow_private_fetch,
            timeout_s=args.fetch_timeout,
            max_concurrent_fetches=args.max_concurrent_fetches,
        ),
        tls=tls,
        auth_token=token,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_calls_per_connection=args.max_calls_per_connection,
        max_streams=args.max_streams,
        max_streams_per_connection=args.max_streams_per_connection,
        request_read_timeout_s=args.request_read_timeout,
        stream_idle_timeout_s=args.stream_idle_timeout,
        max_connections=args.max_connections,
        max_http2_streams=args.max_http2_streams,
        reuse_port=args.reuse_port,
        watchdog_timeout_s=args.watchdog_timeout,
        preprocess_workers=args.preprocess_workers,
        event_loop=args.loop,
        grace_period_s=args.grace_period,
        keepalive_time_s=args.keepalive_time,
        keepalive_timeout_s=args.keepalive_timeout,
        min_ping_interval_s=args.min_ping_interval,
        max_connection_age_s=args.max_connection_age,
        max_connection_age_grace_s=args.max_connection_age_grace,
        log_level=args.log_level,
        log_format=args.log_format,
    )
