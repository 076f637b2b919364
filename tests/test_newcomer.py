"""What a newcomer meets outside the docs: install scripts, --help, the commands' messages.

The docs' own examples are run by tests/test_docs.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from importlib.metadata import packages_distributions, requires
from pathlib import Path

import pytest

from clipvision.server.config.settings import Settings
from tests.live_server import LiveServer, live_server

ROOT = Path(__file__).parent.parent
RUN_TIMEOUT = 60.0


def _run(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> tuple[int, str]:
    done = subprocess.run(
        args,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def test_server_help_gives_the_model_default_once() -> None:
    code, out = _run(sys.executable, "-m", "clipvision.server.cli", "--help")
    assert code == 0, out
    model_help = " ".join(out.split("--model [NAME=]SOURCE", 2)[2].split("--address")[0].split())
    assert model_help.count("(default:") == 1, model_help
    assert "(default: ViT-B/32, which downloads openai/clip-vit-base-patch32)" in model_help


def _server_only_modules() -> list[str]:
    """Top-level modules of the distributions that only the ``server`` extra installs."""

    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    server = {
        canonical(match.group())
        for requirement in requires("clipvision") or []
        if 'extra == "server"' in requirement
        and (match := re.match(r"[A-Za-z0-9._-]+", requirement))
    }
    client = {
        canonical(match.group())
        for requirement in requires("clipvision") or []
        if "extra ==" not in requirement and (match := re.match(r"[A-Za-z0-9._-]+", requirement))
    }
    server -= client
    assert {"torch", "grpcio-health-checking", "httpcore"} <= server
    return sorted(
        module
        for module, dists in packages_distributions().items()
        if any(canonical(dist) in server for dist in dists)
    )


def _as_client_only_install(module: str, *argv: str) -> tuple[int, str]:
    """Run ``module``'s main() as its console script would, without the server extra."""
    script = (
        "import sys\n"
        f"for name in {_server_only_modules()!r}:\n"
        "    sys.modules[name] = None  # import raises ModuleNotFoundError\n"
        f"from {module} import main\n"
        f"sys.exit(main({list(argv)!r}))\n"
    )
    return _run(sys.executable, "-c", script)


@pytest.mark.parametrize(
    ("command", "module", "argv"),
    [
        ("clipvision-server", "clipvision.server.cli", ["--model", "ViT-B/32"]),
        ("clipvision-server", "clipvision.server.cli", ["--help"]),
        ("clipvision-healthcheck", "clipvision.server.healthcheck", []),
    ],
)
def test_server_commands_without_the_server_extra_say_what_to_install(
    command: str, module: str, argv: list[str]
) -> None:
    code, out = _as_client_only_install(module, *argv)
    assert code == 1, out
    assert "Traceback" not in out
    assert out.count("\n") == 1, out
    assert out.startswith(f"{command}: the server's dependencies are not installed")
    assert "pip install './[server]'" in out


def test_the_client_command_needs_no_server_extra() -> None:
    code, out = _as_client_only_install("clipvision.client.cli", "--help")
    assert code == 0, out
    assert "embed" in out


def _bootstrap(venv: Path, extras: str) -> list[str]:
    """Source scripts/bootstrap.sh against a fake venv; return the pip commands it ran."""
    calls = venv / "calls"
    calls.unlink(missing_ok=True)
    code, out = _run(
        "bash",
        "-c",
        '. scripts/bootstrap.sh "$1"',
        "bootstrap",
        extras,
        env={"CLIPVISION_VENV": str(venv)},
    )
    assert code == 0, out
    return calls.read_text().splitlines() if calls.exists() else []


@pytest.fixture
def fake_venv(tmp_path: Path) -> Path:
    """A venv whose python records what it is asked to do instead of installing."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> "{venv}/calls"\n')
    python.chmod(0o755)
    return venv


def test_bootstrap_installs_once_and_a_superset_of_extras_serves_a_subset(
    fake_venv: Path,
) -> None:
    pyproject = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    stamp = fake_venv / ".clipvision-installed"
    # First run: nothing installed yet.
    calls = _bootstrap(fake_venv, "server")
    assert any(call.endswith(f"-e {ROOT}[server]") for call in calls), calls
    assert stamp.read_text().splitlines() == [f"server {pyproject}"]
    assert _bootstrap(fake_venv, "server") == []
    # scripts/test after scripts/serve: dev is missing, so it installs.
    calls = _bootstrap(fake_venv, "server,dev")
    assert any(call.endswith(f"-e {ROOT}[server,dev]") for call in calls), calls
    # scripts/serve after scripts/test: server,dev holds server.
    stamp.write_text(f"server,dev {pyproject}\n")
    assert _bootstrap(fake_venv, "server") == []
    assert _bootstrap(fake_venv, "dev,server") == []
    # A changed pyproject.toml installs again, whatever was there.
    stamp.write_text(f"server,dev {'0' * 64}\n")
    assert _bootstrap(fake_venv, "server") != []


@pytest.fixture(scope="module")
async def live(base_settings: Settings) -> AsyncIterator[LiveServer]:
    async with live_server(base_settings) as server:
        yield server


async def test_the_embed_command_counts_one_file_as_one_file(
    live: LiveServer, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a JPEG")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clipvision.client.cli",
        "embed",
        str(ROOT / "tests" / "data" / "rocket.jpg"),
        str(bad),
        "--out",
        str(tmp_path / "out.npy"),
        "--server",
        live.address,
        "--no-progress",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
    log = err.decode()
    assert process.returncode == 1, log
    assert "2 files; 0 already in" in log
    assert "1 file cannot be embedded" in log
    assert "has 1 row," in log
    assert "1 files" not in log
