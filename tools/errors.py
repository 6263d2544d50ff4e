"""The error every ``ida`` command raises for something the user can fix (a bad option, a missing file, a busy
port): :class:`CliError`. The dispatcher (:mod:`tools.cli`) prints it without a traceback and exits with its
code; library code raises its own errors and the command modules turn them into this one."""

from __future__ import annotations

__all__ = ["CliError"]


class CliError(Exception):
    """An error the user can fix; printed without a traceback, exit code 2 unless given."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
