"""One device console, written once over any transport: a serial port (the technician's ``ida console``, the
factory station) or the stdin/stdout pipes of a firmware process (``ida demo``, ``ida sim``, the tests), the
way mpremote writes its behaviour once over a transport.

:class:`DeviceConsole` sends commands in the firmware's JSON-lines mode and returns the matching
:class:`~tools.support.console.protocol.Reply`. It owns the robustness rules:

* **Before each command** it reads what is waiting (a reply that came too late, logs, a reset) and sends a
  line end first, so junk the device has half-received cannot glue onto the command.
* **Device resets.** A boot banner (ROM ``rst:``/``ets``/``ESP-ROM:``, the firmware's ``I app boot=``) means the
  device restarted and its console is back in text mode. The console waits until the boot has gone quiet,
  turns JSON mode back on and sends the interrupted command once more (commands with effects that must not
  happen twice -- ``reboot``, ``factory-reset``, ``provision`` -- are not repeated: :class:`DeviceReset`). A
  device that answers in plain text while the console thinks JSON mode is on (a reset whose banner was lost)
  is handled the same way.
* **Garbage** (not UTF-8, control characters, overlong lines, junk before a JSON line) is counted and kept in
  the transcript; what can be salvaged from such a line is used. Replies to garbled lines the device
  rejected (``cmd: "?"``) are counted, never mistaken for an answer.
* **Crash reports** (``Traceback``, ``Guru Meditation Error``...) are collected with the lines that follow.
* **Time limits** per command are the named constants of :mod:`~tools.support.console.timeouts`.

:meth:`DeviceConsole.command` waits for its reply; :meth:`DeviceConsole.request` sends and returns a future the
reply completes whenever a read comes across it, so several commands can be in flight (the firmware answers
``resolve`` when the gateway does, and ``status`` meanwhile).

Every line sent and received goes to the console's :class:`~tools.support.console.transcript.Transcript`. All I/O
holds ``console.lock`` (an RLock), so one thread may pump ``poll()`` while another runs commands
(:class:`~tools.support.console.pump.ConsolePump` is that thread).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..lifecycle import Closable
from .errors import CommandTimeout, DeviceReset, PortError
from .protocol import Banner, Crash, Event, Garbage, LineParser, Reply, Text, check_command
from .serialport import DEFAULT_BAUD, READ_SLICE, open_port
from .timeouts import CRASH_LINES, NOT_REPEATED, RESTART_LIMIT, Timeouts
from .transcript import Transcript

__all__ = ["DeviceConsole", "PortLike", "SessionStats"]


class PortLike(Protocol):
    """What the session needs of a port (pyserial's ``Serial`` has it): ``read`` returns at most ``size``
    bytes and blocks at most ``timeout`` seconds; ``in_waiting`` (optional) says how many bytes are buffered."""

    timeout: float | None

    def read(self, size: int = 1, /) -> bytes: ...

    def write(self, data: bytes, /) -> int | None: ...

    def close(self) -> None: ...


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


@dataclass(slots=True)
class _Pending:
    """A command sent by :meth:`DeviceConsole.request` whose reply has not been read yet."""

    cmd: str
    words: list[str]
    future: Future[Reply]


class DeviceConsole(Closable):
    """See the module docstring. ``port`` is an open port (:class:`PortLike`: a pyserial port, a
    :class:`~tools.support.console.pipe.PipePort`); the console sets its ``timeout`` to ``read_slice``.
    ``on_event`` is called (under the lock) with every event except the replies the console's own commands and
    requests consume; ``monitor`` with every event read, those replies included (a test's view of all output)."""

    def __init__(
        self,
        port: PortLike,
        *,
        name: str = "",
        baud: int | None = None,
        transcript: Transcript | None = None,
        timeouts: Timeouts | None = None,
        on_event: Callable[[Event], object] | None = None,
        monitor: Callable[[Event], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        read_slice: float = READ_SLICE,
    ) -> None:
        self.port = port
        self.name = name or str(getattr(port, "port", "") or getattr(port, "name", "") or "")
        self.transcript = transcript if transcript is not None else Transcript(self.name, baud)
        self.timeouts = timeouts or Timeouts()
        self.on_event = on_event
        self.monitor = monitor
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
        self._pending: list[_Pending] = []
        port.timeout = read_slice

    # -- opening and closing -----------------------------------------------------------------------------
    @classmethod
    def open(cls, device: str, baud: int = DEFAULT_BAUD, **kwargs: Any) -> DeviceConsole:
        """Open ``device`` without resetting the chip (:func:`~tools.support.console.serialport.open_port`)."""
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

    # -- reading -----------------------------------------------------------------------------------------
    def _read(self, expect: Callable[[Event], bool] | None = None) -> list[Event]:
        """One read (at most the port's timeout); the events of the lines it completed, dispatched (those
        ``expect`` accepts as the reply a command waits for are not passed to ``on_event``)."""
        try:
            data = self.port.read(1)
            waiting = getattr(self.port, "in_waiting", 0) if data else 0
            if waiting:
                data += self.port.read(waiting)
        except Exception as e:  # pyserial: SerialException (device unplugged), OSError; a pipe's end
            failed = PortError(f"{self.name or 'port'}: read failed: {e}", "is the device still connected?")
            self._abandon(failed)
            raise failed from None
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
        if self.monitor is not None:
            self.monitor(ev)
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
            self._abandon(DeviceReset(f"the device restarted before answering ({ev.kind} banner)"))
        elif isinstance(ev, Reply):
            self._boot_until = 0.0
            if ev.cmd == "?":
                self.stats.rejected += 1
            elif ev.cmd == "json" and ev.ok:  # also when typed by hand in line mode
                self.json = ev.obj.get("json") is True
                self._set_json_by_us = self._set_json_by_us or self.json
            consumed = consumed or self._answer(ev)
        elif isinstance(ev, Text) and ev.line.strip() == "json: False":
            self.json = False
        if self.on_event is not None and not consumed:
            self.on_event(ev)

    def _answer(self, reply: Reply) -> bool:
        """Complete the oldest request this reply answers (requests whose caller stopped waiting are dropped)."""
        for p in list(self._pending):
            if p.future.done():
                self._pending.remove(p)
            elif _matches(reply, p.cmd, p.words):
                self._pending.remove(p)
                if p.future.set_running_or_notify_cancel():  # False: cancelled just now
                    p.future.set_result(reply)
                    return True
        return False

    def _awaited(self, reply: Reply) -> bool:
        return any(not p.future.done() and _matches(reply, p.cmd, p.words) for p in self._pending)

    def _abandon(self, error: Exception) -> None:
        """Fail every request in flight (the device restarted or the port is gone: no reply will come)."""
        pending, self._pending = self._pending, []
        for p in pending:
            if p.future.set_running_or_notify_cancel():
                p.future.set_exception(error)

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

        def wanted(ev: Event) -> bool:  # a request sent earlier for the same command gets its reply first
            return isinstance(ev, Reply) and _matches(ev, cmd, words) and not self._awaited(ev)

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
        :class:`~tools.support.console.errors.BadCommand`."""
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

    def request(self, line: str) -> Future[Reply]:
        """Send ``line`` in JSON mode now and return at once: the future gets the device's reply when a read
        (:meth:`poll`, :meth:`listen`, another command) comes across it, or :class:`DeviceReset` /
        :class:`PortError` when the device restarts or the port fails first. Several requests may be in flight;
        cancel the future to stop waiting. Raises what :meth:`command` raises before the line is sent."""
        words = check_command(line)
        future: Future[Reply] = Future()
        with self.lock:
            self._ready()
            self._send(line)
            self._pending.append(_Pending(words[0], words, future))
        return future

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
