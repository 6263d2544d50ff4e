"""A session with a device's serial console over any pyserial-like port.

:class:`ConsoleSession` sends commands in the firmware's JSON-lines mode and returns the matching
:class:`~tools.commands.console.protocol.Reply`. It owns the robustness rules:

* **Before each command** it reads what is waiting (a reply that came too late, logs, a reset) and sends a
  line end first, so junk the device has half-received cannot glue onto the command.
* **Device resets.** A boot banner (ROM ``rst:``/``ets``/``ESP-ROM:``, the firmware's ``I app boot=``) means the
  device restarted and its console is back in text mode. The session waits until the boot has gone quiet,
  turns JSON mode back on and sends the interrupted command once more (commands with effects that must not
  happen twice -- ``reboot``, ``factory-reset``, ``provision`` -- are not repeated: :class:`DeviceReset`). A
  device that answers in plain text while the session thinks JSON mode is on (a reset whose banner was lost)
  is handled the same way.
* **Garbage** (not UTF-8, control characters, overlong lines, junk before a JSON line) is counted and kept in
  the transcript; what can be salvaged from such a line is used. Replies to garbled lines the device
  rejected (``cmd: "?"``) are counted, never mistaken for an answer.
* **Crash reports** (``Traceback``, ``Guru Meditation Error``...) are collected with the lines that follow.
* **Time limits** per command are the named constants below (see :class:`Timeouts`).

Every line sent and received goes to the session's :class:`~tools.commands.console.transcript.Transcript`. All I/O
holds ``session.lock`` (an RLock), so one thread may pump ``poll()`` while another runs commands.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from .errors import CommandTimeout, DeviceReset, PortError
from .ports import DEFAULT_BAUD, READ_SLICE, open_port
from .protocol import Banner, Crash, Event, Garbage, LineParser, Reply, Text, check_command
from .transcript import Transcript

__all__ = [
    "BOOT_QUIET",
    "BOOT_WAIT",
    "CLOSE_TIMEOUT",
    "COMMAND_TIMEOUT",
    "COMMAND_TIMEOUTS",
    "ConsoleSession",
    "JSON_MODE_TIMEOUT",
    "NOT_REPEATED",
    "PortLike",
    "SessionStats",
    "Timeouts",
]

COMMAND_TIMEOUT = 3.0
"""Seconds for a reply to an ordinary command (the firmware answers within one loop, 50 ms)."""
JSON_MODE_TIMEOUT = 2.0
"""Seconds for the reply to ``json on``; after a reset it is re-sent until :data:`BOOT_WAIT` is over."""
RESOLVE_TIMEOUT = 95.0
"""``resolve`` answers when the gateway does: CoAP's MAX_TRANSMIT_WAIT (93 s) bounds the device's wait."""
SELFTEST_TIMEOUT = 10.0
"""``selftest`` writes and reads back a file in flash."""
LOG_TIMEOUT = 5.0
"""``log`` and ``config``: a few kilobytes at 115200 baud."""
RESET_TIMEOUT = 10.0
"""``factory-reset`` erases files; ``provision`` writes the identity."""
BOOT_WAIT = 10.0
"""Seconds a restarted device may take until its console answers again."""
BOOT_QUIET = 0.3
"""After a boot banner, the boot is over when the line has been quiet this long."""
CLOSE_TIMEOUT = 1.0
"""Seconds for the ``json off`` that returns the console to text mode when the session closes."""
RESTART_LIMIT = 6
"""Restarts in a row (a boot loop) after which a command gives up with :class:`DeviceReset`."""
CRASH_LINES = 40
"""Lines kept after the start of a crash report."""

COMMAND_TIMEOUTS: Mapping[str, float] = {
    "resolve": RESOLVE_TIMEOUT,
    "selftest": SELFTEST_TIMEOUT,
    "log": LOG_TIMEOUT,
    "config": LOG_TIMEOUT,
    "help": LOG_TIMEOUT,
    "factory-reset": RESET_TIMEOUT,
    "provision": RESET_TIMEOUT,
}

NOT_REPEATED = frozenset({"reboot", "factory-reset", "provision"})
"""Commands not sent again after a reset interrupted them (their effect must not happen twice)."""


class PortLike(Protocol):
    """What the session needs of a port (pyserial's ``Serial`` has it): ``read`` returns at most ``size``
    bytes and blocks at most ``timeout`` seconds; ``in_waiting`` (optional) says how many bytes are buffered."""

    timeout: float | None

    def read(self, size: int = 1, /) -> bytes: ...

    def write(self, data: bytes, /) -> int | None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Timeouts:
    command: float = COMMAND_TIMEOUT
    json_mode: float = JSON_MODE_TIMEOUT
    boot_wait: float = BOOT_WAIT
    boot_quiet: float = BOOT_QUIET
    close: float = CLOSE_TIMEOUT
    per_command: Mapping[str, float] = field(default_factory=lambda: dict(COMMAND_TIMEOUTS))

    def for_command(self, cmd: str) -> float:
        return self.per_command.get(cmd, self.command)


@dataclass(slots=True)
class SessionStats:
    resets: int = 0  # device restarts seen (banner, or the console found back in text mode)
    retries: int = 0  # commands sent again after a reset
    crashes: list[list[str]] = field(default_factory=list)  # each crash report: its lines
    garbage: int = 0  # garbled lines / byte runs
    rejected: int = 0  # garbled lines the device received and rejected ("?" replies)
    bytes_in: int = 0
    bytes_out: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "resets": self.resets,
            "retries": self.retries,
            "crashes": [list(c) for c in self.crashes],
            "garbage": self.garbage,
            "rejected": self.rejected,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }


class _Restarted(Exception):
    """Internal: the device restarted (or lost JSON mode) while the session waited for a reply."""


class ConsoleSession:
    """See the module docstring. ``port`` is an open pyserial-like port (:class:`PortLike`); the session
    sets its ``timeout`` to ``read_slice``. ``on_event`` is called (under the lock) with every event except
    the replies the session's own commands consume."""

    def __init__(
        self,
        port: PortLike,
        *,
        name: str = "",
        baud: int | None = None,
        transcript: Transcript | None = None,
        timeouts: Timeouts | None = None,
        on_event: Callable[[Event], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        read_slice: float = READ_SLICE,
    ) -> None:
        self.port = port
        self.name = name or str(getattr(port, "port", "") or getattr(port, "name", "") or "")
        self.transcript = transcript if transcript is not None else Transcript(self.name, baud)
        self.timeouts = timeouts or Timeouts()
        self.on_event = on_event
        self.clock = clock
        self.lock = threading.RLock()
        self.stats = SessionStats()
        self.json = False  # whether the device's console is in JSON mode, as far as the session knows
        self.closed = False
        self._parser = LineParser()
        self._boot_until = 0.0  # a banner was seen: the device is booting until a reply or this time
        self._last_rx = clock()
        self._crash: list[str] | None = None
        self._set_json_by_us = False
        self._sent_last = ""
        port.timeout = read_slice

    # -- opening and closing -----------------------------------------------------------------------------
    @classmethod
    def open(cls, device: str, baud: int = DEFAULT_BAUD, **kwargs: Any) -> ConsoleSession:
        """Open ``device`` without resetting the chip (:func:`~tools.commands.console.ports.open_port`)."""
        kwargs.setdefault("name", device)
        return cls(open_port(device, baud), baud=baud, **kwargs)

    def close(self) -> None:
        """Return the console to text mode (when this session turned JSON on) and close the port."""
        with self.lock:
            if self.closed:
                return
            if self.json and self._set_json_by_us:
                try:
                    self._json_off(self.timeouts.close)
                except (CommandTimeout, PortError):
                    pass
            self.closed = True
            self.transcript.note("port closed")
            self.port.close()  # the transcript stays open: its owner saves or closes it

    def __enter__(self) -> ConsoleSession:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- reading -----------------------------------------------------------------------------------------
    def _read(self, expect: Callable[[Event], bool] | None = None) -> list[Event]:
        """One read (at most the port's timeout); the events of the lines it completed, dispatched (those
        ``expect`` accepts as the reply a command waits for are not passed to ``on_event``)."""
        try:
            data = self.port.read(1)
            waiting = getattr(self.port, "in_waiting", 0) if data else 0
            if waiting:
                data += self.port.read(waiting)
        except Exception as e:  # pyserial: SerialException (device unplugged), OSError
            raise PortError(
                f"{self.name or 'port'}: read failed: {e}", "is the device still connected?"
            ) from None
        now = self.clock()
        if not data:
            if self._parser.pending and now - self._last_rx >= self.timeouts.boot_quiet:
                events = self._parser.flush()  # a partial line the device never finished
            else:
                return []
        else:
            self.stats.bytes_in += len(data)
            self._last_rx = now
            events = self._parser.feed(data)
        for ev in events:
            self._dispatch(ev, consumed=expect is not None and expect(ev))
        return events

    def _dispatch(self, ev: Event, consumed: bool = False) -> None:
        self.transcript.received(ev)
        if isinstance(ev, Text):
            if self._crash is not None and len(self._crash) < CRASH_LINES:
                self._crash.append(ev.line)
        elif not isinstance(ev, Crash):
            self._crash = None
        if isinstance(ev, Garbage):
            self.stats.garbage += 1
        elif isinstance(ev, Crash):
            if self._crash is not None and len(self._crash) < CRASH_LINES:
                self._crash.append(ev.line)  # the same report (a crash log line, then its traceback)
            else:
                self._crash = [ev.line]
                self.stats.crashes.append(self._crash)
        elif isinstance(ev, Banner):
            now = self.clock()
            if now >= self._boot_until:
                self.stats.resets += 1
                self.transcript.note(f"device restart detected ({ev.kind} banner)")
            self._boot_until = now + self.timeouts.boot_wait
            self.json = False  # a fresh console starts in text mode
        elif isinstance(ev, Reply):
            self._boot_until = 0.0
            if ev.cmd == "?":
                self.stats.rejected += 1
            elif ev.cmd == "json" and ev.ok:  # also when typed by hand in line mode
                self.json = ev.obj.get("json") is True
                self._set_json_by_us = self._set_json_by_us or self.json
        elif isinstance(ev, Text) and ev.line.strip() == "json: False":
            self.json = False
        if self.on_event is not None and not consumed:
            self.on_event(ev)

    def poll(self) -> list[Event]:
        """Read once (at most ``read_slice`` seconds) and dispatch what arrived; for a pump thread."""
        with self.lock:
            return self._read()

    def listen(self, duration: float, quiet: float | None = None) -> list[Event]:
        """Read for ``duration`` seconds, or (with ``quiet``) until the line has been silent that long."""
        with self.lock:
            events: list[Event] = []
            end = self.clock() + duration
            last = self.clock()
            while self.clock() < end:
                got = self._read()
                events += got
                if got:
                    last = self.clock()
                elif quiet is not None and self.clock() - last >= quiet:
                    break
            return events

    @property
    def booting(self) -> bool:
        return self.clock() < self._boot_until

    # -- writing -----------------------------------------------------------------------------------------
    def _send(self, line: str, fresh: bool = True) -> None:
        """Send one line; ``fresh`` sends a line end first so half-received junk cannot merge with it."""
        data = (b"\r\n" if fresh else b"") + line.encode("utf-8") + b"\r\n"
        try:
            self.port.write(data)
        except Exception as e:
            raise PortError(
                f"{self.name or 'port'}: write failed: {e}", "is the device still connected?"
            ) from None
        self.stats.bytes_out += len(data)
        self._sent_last = line
        self.transcript.sent(line)

    def send_line(self, line: str) -> None:
        """Send a line as typed (interactive use: no leading line end, so a ``YES`` confirmation works)."""
        with self.lock:
            self._send(line, fresh=False)

    # -- commands ----------------------------------------------------------------------------------------
    def _await(self, cmd: str, words: list[str], timeout: float) -> Reply:
        """The reply to ``words``; :class:`_Restarted` when the device restarted first."""
        deadline = self.clock() + timeout

        def wanted(ev: Event) -> bool:
            return isinstance(ev, Reply) and _matches(ev, cmd, words)

        while True:
            for ev in self._read(wanted):
                if isinstance(ev, Reply) and wanted(ev):
                    return ev
                if isinstance(ev, Banner):
                    raise _Restarted(f"banner: {ev.line}")
                if (
                    isinstance(ev, Text)
                    and self.json
                    and self._crash is None
                    and _text_reply(ev.line, self._sent_last)
                ):
                    self.json = False
                    self.stats.resets += 1
                    self.transcript.note("the console answers in text mode: it restarted unseen")
                    raise _Restarted("text mode")
            if self.clock() >= deadline:
                raise CommandTimeout(" ".join(words), timeout)

    def _json_off(self, timeout: float) -> None:
        """``json off``: the reply comes in text mode (``json: False``); a restart also means text mode."""
        self._send("json off")
        self.json = False
        deadline = self.clock() + timeout

        def wanted(ev: Event) -> bool:
            return (isinstance(ev, Text) and ev.line.strip() == "json: False") or (
                isinstance(ev, Reply) and ev.cmd == "json"
            )

        while True:
            for ev in self._read(wanted):
                if wanted(ev) or isinstance(ev, Banner):
                    return
            if self.clock() >= deadline:
                raise CommandTimeout("json off", timeout)

    def _drain(self) -> None:
        """Read what is already waiting, without waiting for more (one read when the port cannot tell)."""
        waiting = getattr(self.port, "in_waiting", None)
        if not isinstance(waiting, int):
            self._read()
            return
        while waiting > 0:
            self._read()
            waiting = int(getattr(self.port, "in_waiting", 0))
        if self._parser.pending and self.clock() - self._last_rx >= self.timeouts.boot_quiet:
            self._read()  # flush a partial line the device never finished

    def _settle(self) -> None:
        """Wait while the device boots: until the line is quiet for ``boot_quiet`` (or ``boot_wait`` is over)."""
        while self.booting and self.clock() - self._last_rx < self.timeouts.boot_quiet:
            self._read()

    def _ready(self) -> None:
        """Read what is waiting; after a restart let the boot finish; make sure JSON mode is on."""
        self._drain()
        for _ in range(RESTART_LIMIT):
            if self.booting:
                self._settle()
            if self.json:
                return
            total = self.timeouts.boot_wait if self.booting else self.timeouts.json_mode
            deadline = self.clock() + total
            try:
                while True:
                    self._send("json on")
                    try:
                        self._await(
                            "json",
                            ["json", "on"],
                            max(0.05, min(self.timeouts.json_mode, deadline - self.clock())),
                        )
                        break
                    except CommandTimeout:
                        if self.clock() >= deadline:
                            raise CommandTimeout(
                                "json on",
                                total,
                                "the device does not answer on its console: is "
                                "it running the ida firmware, at this baud rate?",
                            ) from None
            except _Restarted:
                continue
            self.json = True
            self._set_json_by_us = True
            return
        raise DeviceReset("the device keeps restarting", "see the transcript for its crash report")

    def set_json(self, on: bool) -> None:
        """Switch the console's JSON mode (interactive use; commands switch it on by themselves)."""
        with self.lock:
            if on:
                self._ready()
            else:
                self._drain()
                self._json_off(self.timeouts.json_mode)

    def command(self, line: str, timeout: float | None = None, *, retry: bool | None = None) -> Reply:
        """Send ``line`` in JSON mode and return the device's reply (``reply.ok`` may be False: the device
        refused). A restart during the command repeats it once (``retry``; default: all but
        :data:`NOT_REPEATED`). Raises :class:`CommandTimeout`, :class:`DeviceReset`, :class:`PortError`,
        :class:`~tools.commands.console.errors.BadCommand`."""
        words = check_command(line)
        cmd = words[0]
        limit = self.timeouts.for_command(cmd) if timeout is None else timeout
        attempts = 2 if (cmd not in NOT_REPEATED if retry is None else retry) else 1
        with self.lock:
            for attempt in range(attempts):
                self._ready()
                self._send(line)
                try:
                    return self._await(cmd, words, limit)
                except _Restarted:
                    again = attempt + 1 < attempts
                    self.transcript.note(
                        f"the device restarted during {cmd!r}" + ("; sending it again" if again else "")
                    )
                    if again:
                        self.stats.retries += 1
            raise DeviceReset(
                f"the device restarted during {cmd!r}" + (" twice" if attempts > 1 else ""),
                "it was not sent again: check its effect with status"
                if attempts == 1
                else "see the transcript",
            )

    def reboot(self, wait: bool = True) -> Reply:
        """``reboot``; with ``wait``, also wait for the device to come back (then JSON mode is on again)."""
        with self.lock:
            reply = self.command("reboot", retry=False)
            if wait and reply.ok:
                self.wait_restart()
            return reply

    def wait_restart(self, timeout: float | None = None) -> None:
        """Wait for a boot banner (at most ``timeout``, default ``boot_wait``), then for the console."""
        with self.lock:
            deadline = self.clock() + (self.timeouts.boot_wait if timeout is None else timeout)
            while not self.booting:
                if self.clock() >= deadline:
                    raise CommandTimeout("reboot", self.timeouts.boot_wait, "the device did not restart")
                self._read()
            self._ready()

    def factory_reset(self) -> Reply:
        """``factory-reset`` confirmed with ``YES``: erases identity, config and queued reports, then the
        device restarts (this waits for it). Returns the final reply (``erased``)."""
        with self.lock:
            first = self.command("factory-reset", retry=False)
            if not first.ok or "confirm" not in first.obj:
                return first
            self._send("YES", fresh=False)  # a line end first would be taken as "no"
            try:
                reply = self._await(
                    "factory-reset", ["factory-reset"], self.timeouts.for_command("factory-reset")
                )
            except _Restarted:
                raise DeviceReset("the device restarted before confirming the factory reset") from None
            if reply.ok:
                self.wait_restart()
            return reply


def _matches(reply: Reply, cmd: str, words: list[str]) -> bool:
    if reply.cmd != cmd:
        return False
    if cmd == "resolve" and len(words) > 1 and isinstance(reply.obj.get("id"), str):
        return str(reply.obj["id"]).casefold() == words[1].casefold()  # not a late answer to an older resolve
    return True


def _text_reply(line: str, sent: str) -> bool:
    """A line only a console in text mode writes: the echo of our command, ``key: value``, ``error: ...``."""
    if sent and line.strip() == sent.strip():
        return True
    head, sep, _ = line.partition(":")
    return bool(sep) and head.replace("_", "").isalpha() and head.islower() and not line.startswith(" ")
