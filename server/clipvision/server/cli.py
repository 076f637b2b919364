"""``clipvision-server``: the process entry point; the only place logging is configured."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from clipvision.server.logs import configure_logging
from clipvision.server.settings import parse_settings


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and environment, configure logging, serve until signalled."""
    settings = parse_settings(argv)
    configure_logging(settings.log_level, settings.log_format)
    # Import after logging is set up: torch and transformers are slow to import.
    from clipvision.server.app import serve

    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
