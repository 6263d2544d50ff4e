"""Interactive line mode: a terminal to the device's console, with line editing and history on the host.

Lines typed are sent as they are; everything the device writes is printed as it arrives (a background
thread pumps the session), with restarts, crash reports and garbled lines marked. Local commands:
``inspect`` (the inspection report), ``exit``/``quit``. Ctrl-D or Ctrl-C leaves cleanly: the console is
returned to text mode, the port closed, the history saved (lines that carry a secret are never saved).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from tools.support.console import Banner, ConsoleError, Crash, DeviceConsole, Event, Garbage, PortError, Text
from tools.support.console.scrub import scrub

from .report import inspect

__all__ = ["FIRST_OUTPUT_WAIT", "HISTORY_LENGTH", "OUTPUT_QUIET", "history_file", "run_interactive"]

FIRST_OUTPUT_WAIT = 1.0
"""After a line is sent, seconds to wait for the device's first output before showing the prompt again."""
OUTPUT_QUIET = 0.2
"""...and then until the device has been quiet this long (later output is printed above the prompt)."""
HISTORY_LENGTH = 1000
PROMPT = "ida> "
LOCAL_HELP = "local commands: inspect (report of this device), exit; Ctrl-D or Ctrl-C quits"


def history_file() -> Path:
    """``$IDA_CONSOLE_HISTORY``, else ``$XDG_STATE_HOME/ida/console_history`` (``~/.local/state``)."""
    explicit = os.environ.get("IDA_CONSOLE_HISTORY")
    if explicit:
        return Path(explicit)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "ida" / "console_history"


def render(ev: Event) -> str | None:
    """How an event shows in the terminal (None: not shown)."""
    if isinstance(ev, Garbage):
        return f"[garbled line: {ev.line}]"
    if isinstance(ev, Crash):
        return f"[CRASH] {ev.line}"
    if isinstance(ev, Banner):
        return f"[device restarted] {ev.line}"
    return ev.line


class _Printer:
    """Prints device output from the pump thread without trampling the line being typed."""

    def __init__(self, out: TextIO, readline: Any = None) -> None:
        self.out = out
        self.readline = readline
        self.lock = threading.Lock()
        self.prompting = False
        self.last = 0.0
        self.count = 0
        self.skip_echo = ""

    def __call__(self, ev: Event) -> None:
        if isinstance(ev, Text) and self.skip_echo and ev.line.strip() == self.skip_echo:
            self.skip_echo = ""  # the device's echo of what was typed (consoles with echo on)
            return
        text = render(ev)
        if text is None:
            return
        with self.lock:
            self.last = time.monotonic()
            self.count += 1
            if self.prompting and self.readline is not None:
                self.out.write("\r\x1b[K" + text + "\n" + PROMPT + self.readline.get_line_buffer())
            else:
                self.out.write(text + "\n")
            self.out.flush()

    def note(self, text: str) -> None:
        with self.lock:
            self.out.write(("\r\x1b[K" if self.prompting and self.readline is not None else "") + text + "\n")
            self.out.flush()

    def wait_output(self, since: float) -> None:
        """Until the device answered and went quiet, or :data:`FIRST_OUTPUT_WAIT` passed without output."""
        start_count = self.count
        while True:
            time.sleep(0.02)
            now = time.monotonic()
            if self.count == start_count:
                if now - since >= FIRST_OUTPUT_WAIT:
                    return
            elif now - self.last >= OUTPUT_QUIET:
                return


def _setup_readline() -> Any:
    try:
        import readline
    except ImportError:  # pragma: no cover - Windows without pyreadline
        return None
    readline.set_history_length(HISTORY_LENGTH)
    try:
        readline.read_history_file(history_file())
    except OSError:
        pass
    return readline


def _save_history(readline: Any) -> None:
    path = history_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(path)
    except OSError:
        pass


def run_interactive(
    session: DeviceConsole,
    *,
    json_mode: bool = False,
    read_line: Callable[[str], str] | None = None,
    out: TextIO | None = None,
) -> int:
    """The line-mode loop; returns the exit code (0 on Ctrl-D/exit, 130 on Ctrl-C). ``read_line`` (default:
    ``input`` with readline history when stdin is a terminal) and ``out`` are for tests."""
    out = out or sys.stdout
    rl = None
    if read_line is None:
        if sys.stdin.isatty():
            rl = _setup_readline()
        read_line = input
    printer = _Printer(out, rl)
    session.on_event = printer
    try:
        session.set_json(json_mode)
    except ConsoleError as e:
        out.write(f"[{e}]\n")
    out.write(f"[connected to {session.name or 'the device'}; {LOCAL_HELP}]\n")
    out.flush()

    stop = threading.Event()
    failure: list[BaseException] = []

    def pump() -> None:
        resets = session.stats.resets
        while not stop.is_set():
            try:
                session.poll()
                if json_mode and session.stats.resets != resets:  # a fresh console is in text mode
                    resets = session.stats.resets
                    session.set_json(True)
            except PortError as e:
                failure.append(e)
                stop.set()
                printer.note(f"[connection lost: {e}; press Enter]")
            except ConsoleError as e:  # e.g. JSON mode could not be restored: say so, keep going
                printer.note(f"[{e}]")
            except Exception as e:  # never die silently in the background
                failure.append(e)
                stop.set()
                printer.note(f"[console reader stopped: {type(e).__name__}: {e}; press Enter]")

    thread = threading.Thread(target=pump, name="console-pump", daemon=True)
    thread.start()
    code = 0
    try:
        while not stop.is_set():
            printer.prompting = True
            try:
                line = read_line(PROMPT)
            except EOFError:
                out.write("\n")
                break
            except KeyboardInterrupt:
                out.write("\n")
                code = 130
                break
            finally:
                printer.prompting = False
            if rl is not None and scrub(line) != line:  # never keep a key in the history file
                n = rl.get_current_history_length()
                if n:
                    rl.remove_history_item(n - 1)
            word = line.strip()
            if stop.is_set():
                break
            if word in ("exit", "quit"):
                break
            if word == "inspect":
                _inspect(session, json_mode, out)
                continue
            if word == "help":
                out.write(f"[{LOCAL_HELP}]\n")
            try:
                session.send_line(line)
            except PortError as e:
                failure.append(e)
                out.write(f"[connection lost: {e}]\n")
                break
            printer.skip_echo = word
            printer.wait_output(time.monotonic())
    finally:
        stop.set()
        thread.join(timeout=2.0)
        if not failure:
            with contextlib.suppress(ConsoleError):  # what the device still had to say
                session.listen(FIRST_OUTPUT_WAIT, quiet=OUTPUT_QUIET)
        session.on_event = None
        if rl is not None:
            _save_history(rl)
    if failure:
        code = code or 1
    out.flush()
    return code


def _inspect(session: DeviceConsole, json_mode: bool, out: TextIO) -> None:
    try:
        report = inspect(session)
    except ConsoleError as e:
        out.write(f"[inspect failed: {e}]\n")
        return
    finally:
        if not json_mode:
            try:
                session.set_json(False)
            except ConsoleError:
                pass
    out.write((json.dumps(report.to_json(), indent=2) + "\n") if json_mode else report.text())
    out.flush()
