"""What comes out of a device's serial console, as events; no I/O here.

The firmware (``firmware/carrier/console.py``) answers a command with text ("key: value" lines) or, after
``json on``, with exactly one JSON object per line: ``{"ok": true, "cmd": "status", ...}`` for a reply,
``{"log": "I app ..."}`` for a log line. Between those lines a real serial line carries other things: the
ROM bootloader's banner after a reset (``rst:0x1 (POWERON_RESET),boot:...``), the firmware's own boot log
(``I app boot=3 ...``), crash reports (``Traceback``, ``Guru Meditation Error``), bytes at the wrong baud rate
and partial lines. :class:`LineParser` splits the byte stream into lines (CR, LF or CRLF; a line longer
than ``max_line`` is cut and reported) and turns each line into events:

* :class:`Reply` -- a JSON reply (``ok``, ``cmd``, ``error`` and the reply's fields);
* :class:`Log` -- a log line (JSON ``{"log": ...}`` or plain ``I|W|E <tag> ...``);
* :class:`Banner` -- the device (re)started;
* :class:`Crash` -- a crash report started (its following lines arrive as :class:`Text`);
* :class:`Text` -- any other line (text-mode replies, echo);
* :class:`Garbage` -- bytes that are not a clean line (not UTF-8, control characters, too long, junk in
  front of a JSON object). What can be salvaged from such a line (a JSON object after the junk, a banner or
  crash marker inside it) is reported as well.

Feed it bytes in any chunking: ``parser.feed(b"...")`` returns the events of the lines completed so far.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Banner",
    "Crash",
    "DEVICE_MAX_LINE",
    "Event",
    "Garbage",
    "LineParser",
    "Log",
    "MAX_LINE",
    "Reply",
    "Text",
    "check_command",
]

MAX_LINE = 16384
"""Longest line the host accepts (a resolve reply with many values is a few kilobytes)."""

DEVICE_MAX_LINE = 128
"""Longest command line the firmware accepts (``MAXLINE`` in firmware/carrier/console.py)."""

_EOL = re.compile(rb"\r\n|\r|\n")
_ANSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]")
_CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_LOG = re.compile(r"^[IWE] [A-Za-z0-9_.-]+ ")

# A (re)start of the device: the firmware's first log line, the ROM bootloader, MicroPython's soft reset.
BANNERS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("app", re.compile(r"\bI app boot=\d+")),
    ("rom", re.compile(r"\brst:0x[0-9a-fA-F]+ \(")),
    ("rom", re.compile(r"\bets [A-Z][a-z]{2} [ \d]\d \d{4}")),
    ("rom", re.compile(r"\bESP-ROM:")),
    ("soft", re.compile(r"\bMPY: soft reboot")),
)

# The start of a crash report (ESP-IDF panic handler, MicroPython traceback, the firmware's own crash log).
CRASHES: tuple[re.Pattern[str], ...] = (
    re.compile(r"Traceback \(most recent call last\)"),
    re.compile(r"Guru Meditation Error"),
    re.compile(r"abort\(\) was called"),
    re.compile(r"Brownout detector was triggered"),
    re.compile(r"Task watchdog got triggered"),
    re.compile(r"\bE app crash\b"),
    re.compile(r"\bE hal watchdog expired\b"),
)


@dataclass(frozen=True, slots=True)
class Reply:
    """A JSON reply: ``obj`` is the whole object (``ok``, ``cmd``, ``error`` and the reply's fields)."""

    obj: dict[str, Any] = field(hash=False)
    line: str

    @property
    def ok(self) -> bool:
        return self.obj.get("ok") is True

    @property
    def cmd(self) -> str:
        return str(self.obj.get("cmd", ""))

    @property
    def error(self) -> str | None:
        """Why the device refused (``ok`` false); None for a reply that is ok."""
        e = self.obj.get("error")
        return None if e is None or self.ok else str(e)

    @property
    def fields(self) -> dict[str, Any]:
        """The reply without ``ok``, ``cmd`` (and ``error`` when refused), in the device's order. An ok reply
        may carry an ``error`` field of its own (``id`` of an unprovisioned device says why)."""
        skip = ("ok", "cmd") if self.ok else ("ok", "cmd", "error")
        return {k: v for k, v in self.obj.items() if k not in skip}


@dataclass(frozen=True, slots=True)
class Log:
    """A log line (``I|W|E <tag> ...``); ``text`` is the log text, ``line`` the line it came in."""

    text: str
    line: str


@dataclass(frozen=True, slots=True)
class Banner:
    """The device (re)started; ``kind`` is "app" (the firmware's boot log), "rom" or "soft"."""

    kind: str
    line: str


@dataclass(frozen=True, slots=True)
class _Line:
    line: str


class Text(_Line):
    """Any other line (a text-mode reply, an echo, the lines that follow a crash report's start)."""

    __slots__ = ()


class Crash(_Line):
    """The start of a crash report (a traceback, a panic, the firmware's crash log)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Garbage:
    data: bytes
    reason: str

    @property
    def line(self) -> str:
        return f"{self.reason}: {self.data!r}"


Event = Reply | Log | Text | Banner | Crash | Garbage


def _marker(text: str, cut: bool = False) -> Crash | Banner | None:
    """A crash or (re)start marker in ``text``; with ``cut`` the text starts at the marker (junk before)."""
    for pat in CRASHES:
        m = pat.search(text)
        if m:
            return Crash(text[m.start() :] if cut else text)
    for kind, pat in BANNERS:
        m = pat.search(text)
        if m:
            return Banner(kind, text[m.start() :] if cut else text)
    return None


def _from_object(obj: dict[str, Any], line: str) -> Event:
    log = obj.get("log")
    if isinstance(log, str) and len(obj) == 1:
        return _marker(log) or Log(log, line)
    if isinstance(obj.get("ok"), bool) and isinstance(obj.get("cmd"), str):
        return Reply(obj, line)
    return Text(line)


def classify(raw: bytes) -> list[Event]:
    """The events of one line (without its line end); [] for a blank line."""
    clean = _ANSI.sub(b"", raw)
    if not clean.strip():
        return []
    j = clean.find(b'{"')
    if j >= 0:
        try:
            obj = json.loads(clean[j:])
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            body = clean[j:].decode("utf-8").strip()
            prefix = clean[:j]
            junk: list[Event] = [Garbage(prefix, "junk before a JSON line")] if prefix.strip() else []
            return junk + [_from_object(obj, body)]
    reason = ""
    try:
        text = clean.decode("utf-8")
    except UnicodeDecodeError:
        text = clean.decode("utf-8", "replace")
        reason = "not UTF-8"
    if _CTRL.search(text):
        text = _CTRL.sub("", text)
        reason = reason or "control characters"
    text = text.rstrip()
    if reason:
        found: list[Event] = [Garbage(raw, reason)]
        salvaged = _marker(text, cut=True)
        return found + ([salvaged] if salvaged else [])
    found_one = _marker(text)
    if found_one:
        return [found_one]
    if _LOG.match(text):
        return [Log(text, text)]
    return [Text(text)]


class LineParser:
    """Bytes in, events out (see the module docstring). ``pending`` is the unfinished last line."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._buf = b""
        self._skipping = False  # inside an overlong line: drop until its end

    @property
    def pending(self) -> bytes:
        return self._buf

    def feed(self, data: bytes) -> list[Event]:
        buf = self._buf + data
        events: list[Event] = []
        start = 0
        for m in _EOL.finditer(buf):
            line = buf[start : m.start()]
            start = m.end()
            if self._skipping:
                self._skipping = False
                continue
            if len(line) > self.max_line:
                events.append(Garbage(line[:64], f"line too long ({len(line)} bytes)"))
                continue
            events.extend(classify(line))
        rest = buf[start:]
        if len(rest) > self.max_line:
            if not self._skipping:
                events.append(Garbage(rest[:64], f"line too long (over {self.max_line} bytes)"))
            self._skipping = True
            rest = b""
        self._buf = rest
        return events

    def flush(self) -> list[Event]:
        """The unfinished line as events (the device went quiet in the middle of a line)."""
        rest, self._buf = self._buf, b""
        if self._skipping:
            self._skipping = False
            return []
        events = classify(rest)
        if events and isinstance(events[0], Text):
            return [Garbage(rest, "partial line")]
        return events


def check_command(line: str) -> list[str]:
    """The words of a command line the firmware will accept; :class:`~tools.support.console.errors.BadCommand`
    otherwise (empty, too long, control characters)."""
    from .errors import BadCommand

    if _CTRL.search(line) or "\n" in line or "\r" in line or "\t" in line:
        raise BadCommand("a command line cannot hold control characters or line ends")
    n = len(line.encode("utf-8"))
    if n > DEVICE_MAX_LINE:
        raise BadCommand(f"command line too long: {n} bytes (the device accepts at most {DEVICE_MAX_LINE})")
    words = line.split()
    if not words:
        raise BadCommand("empty command")
    return words
