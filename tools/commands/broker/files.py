"""How ``ida broker`` writes its files: atomically, with their mode set before any byte is written."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["lines_bytes", "write_file"]


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Atomic: a 0600/0644 temp file, fsynced, renamed over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def lines_bytes(lines: Iterable[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()
