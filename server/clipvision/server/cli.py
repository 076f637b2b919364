"""``clipvision-server``: the process entry point; the only place logging is configured."""

from __future__ import annotations

import asyncio
import logging
import resource
import sys
from collections.abc import Callable, Sequence

from clipvision.server.ops.logs import configure_logging


def raise_file_limit() -> int:
    """Raise the soft limit on open files to the hard limit; returns the limit now in force.

    Every client connection is a file descriptor: with the common soft limit of
    1,024, a thousand idle connections would leave none for the next one (or for
    the model files). The hard limit is what the operator allows.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # keep what we have; --max-connections is checked against it below
    return soft


def missing_server_extra(command: str, error: ModuleNotFoundError) -> int:
    """Say in one line which extra to install, for a client-only install; returns status 1."""
    if error.name is None or error.name.partition(".")[0] == "clipvision":
        raise error  # our own module missing is a bug, not a missing extra
    print(
        f"{command}: the server's dependencies are not installed (no module {error.name!r}); "
        "install the server extra: pip install './[server]' in the repository (or scripts/serve)",
        file=sys.stderr,
    )
    return 1


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``--loop`` asks for: uvloop's (auto, where installed) or asyncio's (None).

    uvloop runs the loop's own work (callbacks, timers, wake-ups from the worker
    threads) in C on libuv: bench/overhead.py measured 7-20 % less of the server's CPU
    per item than on asyncio's loop (docs/PERFORMANCE.md). grpc.aio and uvicorn run on
    either.
    """
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ModuleNotFoundError:
        if choice == "uvloop":
            raise
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and environment, configure logging, serve until signalled."""
    try:
        # Two of the server extra's quick imports (torch comes later, after logging is set
        # up), so that a client-only install says what to install even for --help.
        import grpc_health  # noqa: F401
        import PIL  # noqa: F401

        from clipvision.server.config.flags import parse_settings
    except ModuleNotFoundError as error:
        return missing_server_extra("clipvision-server", error)
    settings = parse_settings(argv)
    configure_logging(settings.log_level, settings.log_format)
    files = raise_file_limit()
    if settings.max_connections > files - 256:
        logging.getLogger(__name__).warning(
            "--max-connections %d is close to the open-file limit %d: connections past it "
            "would fail to be accepted; raise the limit (ulimit -n) or lower the option",
            settings.max_connections,
            files,
        )
    # Import after logging is set up: torch and transformers are slow to import.
    try:
        from clipvision.server.app import serve
    except ModuleNotFoundError as error:
        return missing_server_extra("clipvision-server", error)

    try:
        factory = loop_factory(settings.event_loop)
    except ModuleNotFoundError:
        print(
            "clipvision-server: --loop uvloop, but uvloop is not installed "
            "(pip install uvloop, or --loop auto)",
            file=sys.stderr,
        )
        return 2
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
