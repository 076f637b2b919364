"""How a ``clipvision batch`` command ends: its exit statuses, and the error that stops it."""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class JobError(Exception):
    """The command cannot go on; ``message`` is one line for the user, ``status`` the exit."""

    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
