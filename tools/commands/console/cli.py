"""``ida console``: the technician's serial console (thin layer over :mod:`tools.commands.console`).

    ida console [PORT] [--baud N] [--json] [--transcript FILE] [COMMAND ...]

Without COMMAND: interactive line mode. With one: one-shot (the reply printed, exit code 0 when the device
answered ok, 1 when it refused, 2 when it could not be asked). ``inspect`` collects the inspection report and
saves a transcript (``--transcript FILE``, default ``transcripts/<identifier>-<time>.txt``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from tools.errors import CliError
from tools.support.console import DEFAULT_BAUD, ConsoleError, DeviceConsole, Reply, Timeouts, Transcript

from .ports import choose_port
from .report import LOG_LINES, default_transcript_path, inspect

_PORTISH = re.compile(r"^(/|\\\\\.\\|[A-Za-z][A-Za-z0-9+.-]*://|COM\d+$)", re.IGNORECASE)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = "ida console [PORT] [options] [COMMAND ...]"
    p.add_argument(
        "words",
        nargs="*",
        metavar="[PORT] [COMMAND ...]",
        help="serial port (a path such as /dev/ttyUSB0, COM3, or a pyserial URL; default: the one Espressif "
        "console found by USB VID:PID), then a device command (status, id, net, config get, resolve ID, log 20, "
        "selftest, reboot, factory-reset, ...) or inspect; none = interactive line mode",
    )
    p.add_argument("--baud", type=int, default=DEFAULT_BAUD, help=f"baud rate (default {DEFAULT_BAUD})")
    p.add_argument(
        "--json", action="store_true", help="print the device's JSON replies (and the report as JSON)"
    )
    p.add_argument(
        "--transcript", metavar="FILE", help="record the session to FILE (inspect: instead of the default)"
    )
    p.add_argument(
        "--transcript-dir",
        metavar="DIR",
        default="transcripts",
        help="where inspect saves its transcript when --transcript is not given (default ./transcripts)",
    )
    p.add_argument(
        "--timeout", type=float, metavar="S", help="seconds to wait for the reply (default per command)"
    )
    p.add_argument(
        "--log-lines",
        type=int,
        default=LOG_LINES,
        metavar="N",
        help=f"inspect: log lines (default {LOG_LINES})",
    )
    p.add_argument("--yes", action="store_true", help="factory-reset: confirm without asking")


def split_words(words: list[str]) -> tuple[str | None, list[str]]:
    """(PORT or None, COMMAND words): the first word is the port when it looks like one."""
    if words and _PORTISH.match(words[0]):
        return words[0], words[1:]
    return None, list(words)


def render_reply(reply: Reply) -> str:
    """A reply as the firmware's text mode prints it: ``error: ...`` then ``key: value`` lines."""
    lines = [f"error: {reply.error}"] if reply.error is not None else []
    for k, v in reply.fields.items():
        if isinstance(v, list):
            lines.append(f"{k}:")
            lines += [f"  {' '.join(_text(y) for y in x) if isinstance(x, list) else _text(x)}" for x in v]
        elif isinstance(v, dict):
            lines.append(f"{k}:")
            lines += [f"  {x}: {_text(y)}" for x, y in v.items()]
        else:
            lines.append(f"{k}: {_text(v)}")
    return "\n".join(lines)


def _text(v: Any) -> str:
    if isinstance(v, dict) and set(v) == {"hex"}:
        return str(v["hex"])
    return str(v) if not isinstance(v, dict | list) else json.dumps(v)


def run(args: argparse.Namespace) -> int:
    port, command = split_words(list(args.words))
    try:
        if port is None:
            port = choose_port()
        transcript = Transcript(port, args.baud)
        if args.transcript:
            transcript.attach(args.transcript)
        session = DeviceConsole.open(port, args.baud, transcript=transcript, timeouts=Timeouts())
    except (ConsoleError, OSError) as e:
        raise CliError(str(e)) from None
    try:
        if not command:
            from .interactive import run_interactive

            with session:
                return run_interactive(session, json_mode=args.json)
        if command[0] == "inspect":
            return _inspect(session, args)
        with session:
            if command[0] == "factory-reset":
                _confirm_factory_reset(args)
                reply = session.factory_reset()
            elif command[0] == "reboot":
                reply = session.reboot()
            else:
                reply = session.command(" ".join(command), args.timeout)
        print(json.dumps(reply.obj) if args.json else render_reply(reply))
        return 0 if reply.ok else 1
    except ConsoleError as e:
        raise CliError(str(e)) from None
    finally:
        transcript.close()


def _inspect(session: DeviceConsole, args: argparse.Namespace) -> int:
    with session:
        report = inspect(session, args.log_lines)
    path = Path(args.transcript) if args.transcript else default_transcript_path(report, args.transcript_dir)
    report.transcript = str(path)
    session.transcript.section("inspection report", report.text())
    if not args.transcript:
        try:
            session.transcript.save(path)
        except OSError as e:
            raise CliError(f"cannot save the transcript to {path}: {e}") from None
    print(
        json.dumps(report.to_json(), indent=2) if args.json else report.text(),
        end="" if not args.json else "\n",
    )
    return 0 if report.ok else 1


def _confirm_factory_reset(args: argparse.Namespace) -> None:
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise CliError("factory-reset erases the device's identity: confirm with --yes")
    answer = input("factory-reset erases identity, config and queued reports of the device. Type YES: ")
    if answer.strip() != "YES":
        raise CliError("factory-reset cancelled", exit_code=1)
