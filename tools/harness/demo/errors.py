"""The demo's one error: :class:`DemoError`, a component that did not start or died (the message names it)."""

from __future__ import annotations

from tools.support.procs import ProcessError

__all__ = ["DemoError"]


class DemoError(ProcessError):
    """A component did not start or died; the message says which and why."""
