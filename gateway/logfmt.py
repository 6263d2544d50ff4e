"""Structured log lines: ``<time> <LEVEL> <logger>: <event> key=value key=value``.

Call sites write ``log.info("report stored %s", kv(device=ident, boot=3, seq=7))``; values with spaces,
quotes or ``=`` are quoted, so a line splits back into fields with ``shlex.split``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/+@%[],")


def _value(v: Any) -> str:
    s = v.hex() if isinstance(v, bytes) else str(v)
    if s and all(c in _PLAIN for c in s):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def kv(**fields: Any) -> str:
    """``key=value`` pairs in the order given; None values are left out."""
    return " ".join(f"{k}={_value(v)}" for k, v in fields.items() if v is not None)


class _Formatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))

    def formatException(self, ei: Any) -> str:  # noqa: N802 -- logging's name
        return "  " + super().formatException(ei).replace("\n", "\n  ")


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    """Route the root logger to ``stream`` (stderr) in this format; safe to call twice."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_ida", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter())
    handler._ida = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiocoap logs every exchange at INFO/DEBUG under "coap-server"; keep it to warnings unless debugging.
    logging.getLogger("coap-server").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    logging.getLogger("coap").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
