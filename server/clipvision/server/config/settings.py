"""One frozen settings object; flags.py fills it from the command line and ``CLIPVISION_*``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from clipvision.server.config.cpu import available_cpus
from clipvision.server.config.limits import FetchPolicy, ImageLimits, largest_request_bytes
from clipvision.server.config.presets import PRESETS, Preset

DEFAULT_MODEL = "ViT-B/32"
MIB = 1024 * 1024


@dataclass(frozen=True)
class ModelSpec:
    """One ``--model`` entry: the name callers use and where the weights come from."""

    name: str
    source: str
    preset: Preset | None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """Parse ``SOURCE`` or ``NAME=SOURCE``; a preset name as NAME pins the architecture."""
        name, sep, source = text.partition("=")
        if not sep:
            name, source = "", text
        name, source = name.strip(), source.strip()
        if not source:
            raise ValueError(
                f"--model {text!r} names no checkpoint; give a directory, hub id or preset"
            )
        preset = PRESETS.get(name) or PRESETS.get(source)
        if not name:
            name = source if source in PRESETS or not Path(source).is_dir() else Path(source).name
        return cls(name=name, source=source, preset=preset)

    @property
    def hub_or_path(self) -> str:
        """The directory or hub id to load: a preset source stands for its published weights."""
        preset = PRESETS.get(self.source)
        return preset.hub_id if preset else self.source


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS; with ``client_ca`` every client must present a certificate it signed."""

    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass(frozen=True)
class Settings:
    """Everything the server is configured with; built once at start and passed in."""

    models: tuple[ModelSpec, ...] = (ModelSpec.parse(DEFAULT_MODEL),)
    address: str = "127.0.0.1:50051"
    metrics_address: str | None = None
    # HTTP beside gRPC (OpenAI, KServe v2 REST, Weaviate, JSON): off unless an address is given.
    http_address: str | None = None
    http_cors_origins: tuple[str, ...] = ()
    # The longest an HTTP call may take; a Connect-Timeout-Ms header may ask for less.
    http_timeout_s: float = 60.0
    device: str = "auto"
    dtype: str = "auto"
    # Both towers' runtime: auto (ONNX Runtime for float32 on the CPU where installed).
    backend: str = "auto"
    # Where images are resized and cropped: auto (the model's device when it is a GPU), on, off.
    device_preprocess: str = "auto"
    # JPEGs decoded by nvJPEG on the GPU (not bit-exact; needs CUDA and device resizing).
    gpu_decode: bool = False
    # Intra-op threads of the forward pass; None: the CPUs the process may use (cgroup, affinity).
    threads: int | None = None
    # Where exported ONNX models are cached; None: ~/.cache/clipvision/onnx (XDG_CACHE_HOME).
    onnx_cache_dir: str | None = None
    dummy_weights: bool = False
    lazy_load: bool = False
    cache_dir: str | None = None
    max_batch_size: int = 32
    max_batch_delay_ms: float = 0.0
    max_batch_images: int = 64
    max_batch_texts: int = 256
    max_text_bytes: int = 65536
    max_classify_labels: int = 256
    label_cache_size: int = 4096
    max_queue_size: int = 256
    # Bytes; None: the container's memory limit (cgroup), else the RAM.
    memory_limit: int | None = None
    # Bytes for images in flight; None: 30 % of what the limit leaves once models are loaded.
    memory_budget: int | None = None
    stream_window: int = 64
    # Bytes; None: the largest legal image as a data: URI with its framing (about 26.7 MiB).
    max_message_bytes: int | None = None
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    fetch_policy: FetchPolicy = field(default_factory=FetchPolicy)
    tls: TlsFiles | None = None
    # repr=False: the token must never reach a log line.
    auth_token: str | None = field(default=None, repr=False)
    max_concurrent_rpcs: int = 256
    max_calls_per_connection: int = 64
    max_streams: int = 128
    max_streams_per_connection: int = 16
    request_read_timeout_s: float = 10.0
    stream_idle_timeout_s: float = 300.0
    max_connections: int = 4096
    max_http2_streams: int = 100
    reuse_port: bool = False
    watchdog_timeout_s: float = 60.0
    # The CPUs the process may use (cgroup quota, affinity), not the host's core count.
    preprocess_workers: int = available_cpus()
    event_loop: str = "auto"  # auto (uvloop where installed), uvloop or asyncio
    grace_period_s: float = 10.0
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    min_ping_interval_s: float = 30.0
    max_connection_age_s: float = 300.0
    max_connection_age_grace_s: float = 30.0
    log_level: str = "INFO"
    log_format: str = "text"

    @property
    def message_limit(self) -> int:
        """The largest gRPC message received or sent, in bytes (--max-message-bytes)."""
        if self.max_message_bytes is not None:
            return self.max_message_bytes
        return largest_request_bytes(self.image_limits)

    @property
    def default_model(self) -> str:
        """The model that requests with an empty model name use."""
        return self.models[0].name
