"""A transcript of a console session: every line sent and received, time-stamped, secrets scrubbed.

Format (UTF-8 text, one entry per line)::

    # ida console transcript
    # port: /dev/ttyUSB0  baud: 115200  opened: 2026-03-01T09:12:03Z
    2026-03-01T09:12:03.120Z > json on
    2026-03-01T09:12:03.131Z < {"ok": true, "cmd": "json", "json": true}
    2026-03-01T09:12:04.002Z ! not UTF-8: b'\\xff\\xfe'
    2026-03-01T09:12:05.310Z # device reset detected (banner: I app boot=4 ...)

``>`` sent, ``<`` received, ``!`` garbage or crash text, ``#`` a note by the tool. A transcript can be kept
in memory and saved at the end (``save``) or streamed to a file as it grows (``attach``), so that a session
that is killed still leaves what it saw.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from .protocol import Crash, Event, Garbage
from .scrub import scrub

__all__ = ["Transcript", "utc_stamp"]


def utc_stamp(t: float, ms: bool = True) -> str:
    """``2026-03-01T09:12:03.120Z`` (or without milliseconds)."""
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
    return f"{base}.{int(t * 1000) % 1000:03d}Z" if ms else base + "Z"


class Transcript:
    def __init__(
        self,
        port: str = "",
        baud: int | None = None,
        clock: Callable[[], float] = time.time,
        keep: int | None = None,
    ) -> None:
        """``keep``: hold only the last ``keep`` lines in memory (a console that runs for days; a file
        :meth:`attach`-ed still gets every line)."""
        self.clock = clock
        self.lines: deque[str] = deque(["# ida console transcript"], maxlen=keep)
        where = f"# port: {port or '?'}" + (f"  baud: {baud}" if baud else "")
        self.lines.append(f"{where}  opened: {utc_stamp(clock(), ms=False)}")
        self._stream: TextIO | None = None
        self.path: Path | None = None

    def _add(self, mark: str, text: str) -> None:
        stamp = utc_stamp(self.clock())
        for part in scrub(text).splitlines() or [""]:
            line = f"{stamp} {mark} {part}"
            self.lines.append(line)
            if self._stream is not None:
                self._stream.write(line + "\n")
                self._stream.flush()

    def sent(self, line: str) -> None:
        self._add(">", line)

    def received(self, event: Event) -> None:
        self._add("!" if isinstance(event, Garbage | Crash) else "<", event.line)

    def note(self, text: str) -> None:
        self._add("#", text)

    def section(self, title: str, body: str) -> None:
        """A block of text (e.g. the inspection report) appended verbatim after a ``# title`` line."""
        self.note(title)
        for line in scrub(body).splitlines():
            self.lines.append(line)
            if self._stream is not None:
                self._stream.write(line + "\n")
        if self._stream is not None:
            self._stream.flush()

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"

    def attach(self, path: Path | str) -> Path:
        """Stream to ``path`` from now on (what was recorded so far is written first)."""
        p = Path(path)
        if p.parent != Path(""):
            p.parent.mkdir(parents=True, exist_ok=True)
        stream = open(p, "w", encoding="utf-8")  # noqa: SIM115 - kept open until close()
        stream.write(self.text())
        stream.flush()
        self.close()
        self._stream, self.path = stream, p
        return p

    def save(self, path: Path | str) -> Path:
        """Write everything to ``path`` at once (temp file + rename: never half a transcript)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.text())
            os.replace(tmp, p)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self.path = p
        return p

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
