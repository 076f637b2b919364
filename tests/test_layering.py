"""The server's folders are its architecture: imports run downward only.

wire -> api | batch | http -> pipelines -> runtime -> resources, each room importing only
its own modules and the rooms below it; rooms of one tier (api, batch and http, the
surfaces over the pipelines and runtime) import none of each other, and batch, reached from the
command line, is imported by no room at all; every room may use errors, config and ops,
which import no room (config only errors, ops only errors and config). app.py and cli.py,
at the top, compose everything. A new module goes into a room, not beside app.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parent.parent / "server" / "clipvision" / "server"
PACKAGE = "clipvision.server"

# Top to bottom, tier by tier: a room may import its own modules and the rooms of the tiers
# after its own; the rooms of one tier are siblings and import none of each other.
TIERS = (("wire",), ("api", "batch", "http"), ("pipelines",), ("runtime",), ("resources",))
LAYERS = tuple(room for tier in TIERS for room in tier)
# Surfaces of their own, reached from the entry points only: no room imports them.
ENTRY_ONLY = frozenset({"batch"})
# What each shared part may import besides itself.
SHARED = {"errors": frozenset(), "config": frozenset({"errors"}), "ops": {"errors", "config"}}
# The composition root and the two console scripts (the healthcheck imports only grpc).
TOP = frozenset({"__init__", "app", "cli", "healthcheck"})


def room_of(module: str) -> str:
    """The room of a dotted module under clipvision.server: its first part below the package."""
    return module.removeprefix(PACKAGE + ".").split(".")[0]


def imported(source: str, module: str) -> list[tuple[int, str]]:
    """(line, module) of every clipvision.server import in ``source``, function-local ones too."""
    found: list[tuple[int, str]] = []
    package = module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base == PACKAGE:  # from clipvision.server import wire, errors
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, base))
    return [(line, name) for line, name in found if name.startswith(PACKAGE + ".")]


def allowed(importer: str, target: str) -> bool:
    """Whether a module of room ``importer`` may import one of room ``target``."""
    if importer in TOP or importer == target:
        return True
    if importer in SHARED:
        return target in SHARED[importer]
    if target in SHARED:
        return True
    if target in ENTRY_ONLY:
        return False
    if importer in LAYERS and target in LAYERS:
        return tier_of(target) > tier_of(importer)
    return False


def tier_of(room: str) -> int:
    """The index of the tier ``room`` belongs to, from the top."""
    return next(index for index, tier in enumerate(TIERS) if room in tier)


def violations(sources: dict[str, str]) -> list[str]:
    """Every import against the rule, as 'importer:line imports target'."""
    found = []
    for module, source in sorted(sources.items()):
        room = room_of(module)
        for line, target in imported(source, module):
            if not allowed(room, room_of(target)):
                found.append(f"{module}:{line} imports {target}")
    return found


def server_sources() -> dict[str, str]:
    sources = {}
    for path in SERVER.rglob("*.py"):
        parts = path.relative_to(SERVER).with_suffix("").parts
        sources[".".join((PACKAGE, *parts))] = path.read_text()
    return sources


def test_imports_run_downward_only() -> None:
    assert violations(server_sources()) == []


def test_every_module_lives_in_a_room() -> None:
    rooms = set(LAYERS) | set(SHARED)
    strays = [
        module
        for module in server_sources()
        if room_of(module) not in rooms | TOP
        or (room_of(module) in rooms and module.count(".") < 3 and room_of(module) != "errors")
    ]
    assert strays == []
    present = {
        path.name for path in SERVER.iterdir() if path.is_dir() and path.name != "__pycache__"
    }
    assert present == rooms - {"errors"}


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        # A room importing a room above it, at module level and inside a function.
        (
            "clipvision.server.runtime.models",
            "from clipvision.server.pipelines.images import ImagePipeline\n",
            ["clipvision.server.runtime.models:1 imports clipvision.server.pipelines.images"],
        ),
        (
            "clipvision.server.resources.admission",
            "def f():\n    from clipvision.server.runtime import batcher\n",
            ["clipvision.server.resources.admission:2 imports clipvision.server.runtime"],
        ),
        # Shared parts import no room: ops naming a wire module, config a runtime one.
        (
            "clipvision.server.ops.health",
            "import clipvision.server.wire.interceptors\n",
            ["clipvision.server.ops.health:1 imports clipvision.server.wire.interceptors"],
        ),
        (
            "clipvision.server.config.settings",
            "from ..runtime.preprocess import ImageLimits\n",
            ["clipvision.server.config.settings:1 imports clipvision.server.runtime.preprocess"],
        ),
        # The two surfaces are siblings: neither imports the other, and no room (the
        # listener included) imports the batch job.
        (
            "clipvision.server.batch.stages",
            "from clipvision.server.api.item_errors import item_error\n",
            ["clipvision.server.batch.stages:1 imports clipvision.server.api.item_errors"],
        ),
        (
            "clipvision.server.api.embedding_service",
            "from clipvision.server.batch import job\n",
            ["clipvision.server.api.embedding_service:1 imports clipvision.server.batch"],
        ),
        (
            "clipvision.server.wire.listener",
            "import clipvision.server.batch.cli\n",
            ["clipvision.server.wire.listener:1 imports clipvision.server.batch.cli"],
        ),
        # The batch job over the rooms below it, and the entry point over the batch job.
        (
            "clipvision.server.batch.encoders",
            "from clipvision.server.runtime.models import ModelRegistry\n"
            "from clipvision.server.pipelines.sources import ImageSources\n"
            "from clipvision.server.resources.admission import ItemCost\n"
            "from clipvision.server.batch.storage import JobDirectory\n"
            "from clipvision.server.config.limits import ImageLimits\n",
            [],
        ),
        ("clipvision.server.cli", "from clipvision.server.batch.cli import main\n", []),
        # Downward, sideways within a room, and to the shared parts: all fine.
        (
            "clipvision.server.api.inference_service",
            "from clipvision.server.api import streams\n"
            "from clipvision.server.resources.admission import FairPool\n"
            "from clipvision.server.ops.metrics import ServerMetrics\n"
            "from clipvision.server import errors\n",
            [],
        ),
    ],
)
def test_the_rule_catches_upward_imports(module: str, source: str, expected: list[str]) -> None:
    assert violations({module: source}) == expected
