"""The errors the tools share. :class:`CliError`: what every ``ida`` command raises for something the user can
fix (a bad option, a missing file, a busy port); the dispatcher (:mod:`tools.cli`) prints it without a traceback
and exits with its code, and the command modules turn library errors into it. :class:`HintedError`: the base of
the library errors that say what to try next (``ida flash``'s, the console's)."""

from __future__ import annotations

__all__ = ["CliError", "HintedError"]


class CliError(Exception):
    """An error the user can fix; printed without a traceback, exit code 2 unless given."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class HintedError(RuntimeError):
    """Raised on purpose, not a bug: ``hint`` says what to try next (the one given, else :meth:`default_hint`)
    and follows the message in parentheses, after ``hint_label``."""

    hint_label = ""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint if hint is not None else self.default_hint()

    def default_hint(self) -> str:
        return ""

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} ({self.hint_label}{self.hint})" if self.hint else text
