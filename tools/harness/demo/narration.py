"""How the demo speaks: one line per event, ``[  12.3s] text`` (:class:`Narrator`), and the words for what the
devices say on their consoles -- the answer sources, the firmware's log lines worth telling, a value worth
showing. Pure functions of what was read; the demo's other modules decide when to speak."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "Narrator",
    "SOURCE_WORDS",
    "LOG_SOURCES",
    "boot_line",
    "log_line",
    "shown_value",
    "source_words",
]

# the console's (and the firmware log's) answer sources, in words
SOURCE_WORDS = {
    "upstream": "from upstream (the gateway asked the recursive node)",
    "cache": "from the gateway cache",
    "zone": "from the gateway's local zone",
    "stale": "from the gateway cache, stale (upstream did not answer)",
    "device-cache": "from the device's own cache (no network)",
    "device-revalidated": "from the device's own cache, revalidated with the gateway",
}
# the ``src=`` numbers of the firmware's ``I app resolve`` log line, as console source names
LOG_SOURCES = {
    "-2": "device-revalidated",
    "-1": "device-cache",
    "0": "zone",
    "1": "cache",
    "2": "upstream",
    "3": "stale",
}

BOOT = re.compile(r"^I app boot=(\d+) fw=(\S+) board=(\S+)")
STARTED = re.compile(r"^I net (\w+) started")
NET_DOWN = re.compile(r"^W net down")
NET_ERROR = re.compile(r"^W net (\w+) error (.*); retry in (\d+) ms")
BOOT_RESOLVE = re.compile(r"^I app resolve id=(\S+) code=(\d+) values=(\d+) src=(\S+)")
QUIET = re.compile(r"^(I |W mqtt INSECURE)")  # other info lines and the plain-MQTT warning are not narrated


class Narrator:
    """One line per event, ``[  12.3s] text``, flushed at once (``make`` and pipes buffer otherwise)."""

    def __init__(self, out: Callable[[str], None] | None = None) -> None:
        self.t0 = time.monotonic()
        self.out = out or (lambda s: print(s, flush=True))

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        self.out(f"[{self.elapsed():6.1f}s] {text}")


def source_words(source: str) -> str:
    return SOURCE_WORDS.get(source, "from " + source)


def boot_line(label: str, text: str) -> str | None:
    """``device X booted: ...`` for the firmware's boot log line (None for another banner)."""
    m = BOOT.match(text)
    if not m:
        return None
    return f"device {label} booted: boot #{m.group(1)}, firmware {m.group(2)}, board {m.group(3)}"


def log_line(
    name: str, label: str, text: str, *, target: str, first_resolve_done: bool
) -> tuple[str, str] | None:
    """What to say about one firmware log line: (kind, sentence), or None for a line not narrated. ``kind`` is
    ``started``, ``resolved``, ``down``, ``error`` or ``log``; ``target`` names where the device connects."""
    if m := STARTED.match(text):
        return "started", f"{name} network up: {m.group(1)} client started towards {target}"
    if m := BOOT_RESOLVE.match(text):
        ident, code, nvalues, src = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        when = "after reconnecting" if first_resolve_done else "at boot"
        if code == 1:
            source = LOG_SOURCES.get(src, src)
            return "resolved", (
                f"{label} resolved its own identifier {ident} {when}: {nvalues} values {source_words(source)}"
            )
        return "resolved", f"{label} could not resolve its own identifier {when}: code {code}"
    if NET_DOWN.match(text):
        return "down", f"{name} lost its network: its reports now wait in its flash queue"
    if m := NET_ERROR.match(text):
        return "error", f"{name}: {m.group(1)} error ({m.group(2)}), retrying in {int(m.group(3)) / 1000:g} s"
    if text.startswith(("W ", "E ")) and not QUIET.match(text):
        return "log", f"{name} log: {text}"
    return None


def shown_value(values: Any) -> str | None:
    """What to show of a resolve reply's values (the console gives ``[index, type, data, ttl]`` lists): the
    DESC text if there is one, else the URL."""
    found: dict[str, str] = {}
    for v in values if isinstance(values, list) else []:
        if isinstance(v, list) and len(v) >= 3 and isinstance(v[1], str) and isinstance(v[2], str):
            found.setdefault(v[1].upper(), v[2])
    if "DESC" in found:
        return f'DESC "{found["DESC"]}"'
    if "URL" in found:
        return f"URL {found['URL']}"
    return None
