"""`ida device run`: one simulated device -- the real firmware (``firmware/main.py``) under MicroPython's unix
port -- in the foreground, its serial console on this terminal.

    ida device run --identifier 88.123.99/PUMP-0001 --gateway coap://127.0.0.1:5683
    ida device run --identifier 88.123.99/PUMP-0002 --transport mqtt --broker mqtt://127.0.0.1:1883
    ida device run --identifier 88.123.99/PUMP-0001 --data-dir /tmp/pump1 --interval 10
    ida device run --identifier 88.123.99/PUMP-0001 --image build/flash/unix \
        --micropython .venv/micropython32/micropython32-frozen --heap 64000

``--image BUILD_DIR`` runs the firmware as a build of ``ida flash build`` deploys it (its filesystem image installed
into the data dir; the code from there or frozen in the interpreter, never from ``firmware/``:
``device_image.py``); ``--micropython`` picks the interpreter and ``--heap`` its heap (``-X heapsize``), so a
device can run as the chip has it: ``status`` reports ``heap_used``.

The data dir (default ``./devices/<topic key of the identifier>``, e.g. ``devices/88.123.99%2FPUMP-0001``) is
the device's flash. When it holds no identity, one is provisioned there (``tools.harness.sim.provision``: the flashing
tool's ``identity.json`` format, a new 16-byte key); when it holds this identifier's identity, the identity and
its key are kept (gateway addresses or transport given on the command line replace the stored ones; flags left
out keep them), and so are the boot counter, the queued reports and the remote config. A data dir that belongs
to a different identifier is refused unless ``--force``, which re-provisions it (new key; that device's queued
reports, config and crash streak are erased; the boot counter is kept so (boot, seq) stay unique). The board
file (``boards/<name>.json``, default ``unix``) is copied to ``<dir>/board.json``.

The firmware then runs as a child process that inherits stdin/stdout/stderr: type ``help``, ``status``,
``json on``... Ctrl-C, SIGINT or SIGTERM stop the device cleanly (it gets SIGINT, flushes its report queue to
flash and exits; SIGKILL after a grace period or a second Ctrl-C); SIGHUP does the same. The exit code is the
device's (130 after a stop), 128+N if signal N killed it, 1 if it could not start, 2 for bad arguments or a
data dir that belongs to another device. Messages of this command go to stderr, so stdout is the console alone.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from proto import devicemsg
from proto import identifier as gwident
from tools.cliargs import namesakes
from tools.errors import CliError

__all__ = [
    "add_arguments",
    "run",
    "prepare",
    "Prepared",
    "default_data_dir",
    "uid_from_identifier",
    "STOP_GRACE",
    "DEFAULT_GATEWAY",
    "DEFAULT_BROKER",
]

DEFAULT_GATEWAY = "coap://127.0.0.1:5683"
DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
DEFAULT_DEVICES_DIR = Path("devices")
STOP_GRACE = 5.0  # s between the SIGINT a stop sends and SIGKILL
LOCK_FILE = "run.lock"
# files of the device that a re-provisioning for another identifier erases (not kv/boot: the boot counter)
_OTHER_DEVICE_STATE = ("q.dat", "q.dat.tmp", "config.json", "config.json.tmp", "rtc.bin", "kv/key")
_SI_KERNEL = (
    0x80  # siginfo si_code of a signal the kernel sent, e.g. Ctrl-C from the terminal's line discipline
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    r = sub.add_parser(
        "run",
        help="provision (when needed) and run one firmware device in the foreground",
        description="Provision a unix-board identity in the data dir when absent, then run the firmware under "
        "micropython in the foreground with its console on this terminal (Ctrl-C stops it).",
    )
    r.add_argument(
        "--identifier",
        "--id",
        dest="identifier",
        required=True,
        metavar="ID",
        help="the device's identifier, e.g. 88.123.99/PUMP-0001",
    )
    r.add_argument(
        "--gateway",
        metavar="URL",
        default=None,
        help=f"the gateway's CoAP address (default: the stored one, else {DEFAULT_GATEWAY})",
    )
    r.add_argument(
        "--transport",
        choices=("coap", "mqtt"),
        default=None,
        help="coap or mqtt (default: the stored one, else coap)",
    )
    r.add_argument(
        "--broker",
        metavar="URL",
        default=None,
        help=f"the MQTT broker the gateway listens on (default with --transport mqtt: the stored one, "
        f"else {DEFAULT_BROKER})",
    )
    r.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"the device's flash (default {DEFAULT_DEVICES_DIR}/<topic key of the identifier>)",
    )
    r.add_argument(
        "--board", default="unix", metavar="NAME", help="simulated board file boards/NAME.json (default unix)"
    )
    r.add_argument(
        "--interval",
        type=int,
        default=None,
        metavar="S",
        help="report interval in seconds until the gateway configures one (10-86400; firmware default 60)",
    )
    r.add_argument(
        "--uid",
        default=None,
        metavar="HEX",
        help="unique id, 1-16 bytes hex (default: derived from the identifier)",
    )
    r.add_argument(
        "--watchdog",
        type=int,
        default=0,
        metavar="MS",
        help="software watchdog timeout in ms (default 0 = off: a busy host should not 'reset' it)",
    )
    r.add_argument(
        "--image",
        type=Path,
        default=None,
        metavar="BUILD_DIR",
        help="run the firmware of this `ida flash build` output (its filesystem image, or frozen in the "
        "interpreter), not firmware/",
    )
    r.add_argument(
        "--micropython",
        default=None,
        metavar="BIN",
        help="the MicroPython interpreter (default: $IDA_MICROPYTHON, else the venv's micropython)",
    )
    r.add_argument(
        "--heap",
        default=None,
        metavar="BYTES",
        help="MicroPython heap size (-X heapsize), e.g. 64000 as on an ESP32 without PSRAM, or 4M",
    )
    r.add_argument(
        "--force",
        action="store_true",
        help="re-provision a data dir that holds another identifier's identity (new key; its "
        "queued reports and config are erased)",
    )


# -- provisioning ----------------------------------------------------------------------------------------------
def default_data_dir(identifier: str, base: Path = DEFAULT_DEVICES_DIR) -> Path:
    """``devices/<topic key>``: the identifier as one path component (``/`` and ``%`` percent-encoded)."""
    return base / devicemsg.topic_key(identifier)


def uid_from_identifier(identifier: str) -> str:
    """A stable 6-byte unique id (locally administered, like a MAC) for a device, from its identifier."""
    return "02" + hashlib.sha256(identifier.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Prepared:
    data_dir: Path
    identifier: str
    transport: str
    gateway_url: str  # the URL of the transport in use
    fingerprint: str
    action: str  # "provisioned", "kept", "updated", "re-provisioned"


def _read_existing(data_dir: Path) -> tuple[dict[str, object] | None, str | None]:
    """(identity.json as a dict, None) / (None, None) when absent / (None, why) when unreadable."""
    path = data_dir / "identity.json"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"cannot read {path}: {e.strerror or e}"
    try:
        doc = json.loads(raw)
    except ValueError:
        return None, f"{path} is not valid JSON"
    if not isinstance(doc, dict) or not isinstance(doc.get("id"), str):
        return None, f"{path} is not an identity file"
    return doc, None


def _stored_key(data_dir: Path, doc: dict[str, object]) -> bytes | None:
    """The key in identity.json, else the firmware's secret store ``kv/key`` (where the firmware keeps it
    after saving an identity from its console)."""
    k = doc.get("key")
    if isinstance(k, str):
        try:
            return bytes.fromhex(k)
        except ValueError:
            return None
    try:
        return (data_dir / "kv" / "key").read_bytes() or None
    except OSError:
        return None


def _erase_other_device(data_dir: Path) -> None:
    for name in ("identity.json", "identity.json.tmp", *_OTHER_DEVICE_STATE):
        with contextlib.suppress(FileNotFoundError):
            (data_dir / name).unlink()


def _copy_board(data_dir: Path, board: str) -> None:
    from tools.support.boards import BOARDS_DIR, BoardError, list_boards, load_board

    try:
        b = load_board(board)
    except BoardError as e:
        raise CliError(str(e)) from None
    if not b.simulated:  # a chip's board file would switch the console to UART behaviour (echo) on a pipe
        raise CliError(
            f"board {board!r} is a real chip; the unix port runs simulated boards only "
            f"({', '.join(n for n in list_boards() if load_board(n).simulated)})"
        )
    data = (BOARDS_DIR / f"{board}.json").read_bytes()
    dst = data_dir / "board.json"
    with contextlib.suppress(OSError):
        if dst.read_bytes() == data:
            return
    tmp = dst.with_name("board.json.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, dst)
    except OSError as e:
        raise CliError(f"cannot write {dst}: {e.strerror or e}", 1) from None


def prepare(
    identifier: str,
    data_dir: Path | None = None,
    *,
    gateway: str | None = None,
    broker: str | None = None,
    transport: str | None = None,
    board: str = "unix",
    force: bool = False,
) -> Prepared:
    """Make ``data_dir`` hold a provisioned unix-board device for ``identifier`` (see the module docstring).
    CliError (exit 2) for a bad identifier, address or board, or a data dir that belongs to another device."""
    from tools.commands.flash.identity import key_fingerprint, new_key
    from tools.harness.sim.config import SimError
    from tools.harness.sim.provision import provision

    try:
        ident = gwident.normalise(identifier)
    except gwident.IdentifierError as e:
        raise CliError(f"identifier {identifier!r} is not valid: {e}") from None
    data_dir = data_dir if data_dir is not None else default_data_dir(ident)
    doc, why = _read_existing(data_dir)
    key: bytes | None = None
    action = "provisioned"
    if why is not None or doc is not None:
        other: str | None = why
        if doc is not None:
            old_id = str(doc["id"])
            try:
                same = gwident.normalise(old_id) == ident
            except gwident.IdentifierError:
                same = False
            if not same:
                other = f"{data_dir} holds the identity of {old_id!r}, not {ident!r}"
        if other is not None:
            if not force:
                raise CliError(
                    f"{other}; use another --data-dir, or --force to re-provision it (new key; that "
                    f"device's queued reports and config are erased)"
                )
            _erase_other_device(data_dir)
            doc = None
            key = new_key()
            action = "re-provisioned"
    stored: dict[str, object] = doc or {}
    t = transport or str(stored.get("transport") or "coap")
    coap = gateway or _url(stored, "coap") or (DEFAULT_GATEWAY if t == "coap" else None)
    mqtt = broker or _url(stored, "mqtt") or (DEFAULT_BROKER if t == "mqtt" else None)
    if doc is not None:
        key = _stored_key(data_dir, doc)
        unchanged = (
            key is not None
            and (doc.get("transport") or "coap") == t
            and _url(doc, "coap") == coap
            and _url(doc, "mqtt") == mqtt
        )
        if unchanged:
            assert key is not None
            _copy_board(data_dir, board)
            return Prepared(
                data_dir, ident, t, str(coap if t == "coap" else mqtt), key_fingerprint(key), "kept"
            )
        action = "updated"
        if key is None:
            key = new_key()  # an identity without any key: the firmware could not have run with it either
    try:
        made = provision(data_dir, ident, coap=coap, mqtt=mqtt, transport=t, key=key)
    except SimError as e:
        raise CliError(str(e)) from None
    _copy_board(data_dir, board)
    return Prepared(
        data_dir, made.identifier, t, str(coap if t == "coap" else mqtt), made.fingerprint, action
    )


def _url(doc: dict[str, object], scheme: str) -> str | None:
    v = doc.get(scheme)
    return v if isinstance(v, str) and v else None


# -- running ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _lock(data_dir: Path) -> Iterator[None]:
    """One device process per data dir (two would interleave writes to its flash)."""
    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise CliError(f"cannot open {data_dir / LOCK_FILE}: {e.strerror or e}", 1) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CliError(f"a device is already running in {data_dir}") from None
        yield
    finally:
        os.close(fd)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_WAIT_SIGNALS = {*_STOP_SIGNALS, signal.SIGCHLD}


def run_device(
    cmd: list[str],
    env: dict[str, str],
    *,
    grace: float = STOP_GRACE,
    err: TextIO | None = None,
    cwd: Path | None = None,
) -> int:
    """Run ``cmd`` in the foreground (stdin/stdout/stderr inherited) until it exits; returns its exit code
    (128+N when signal N killed it). SIGINT, SIGTERM and SIGHUP sent to this process reach the device as one
    SIGINT (its clean stop); a Ctrl-C typed on the terminal already reached it (same process group) and is not
    sent twice. SIGKILL follows after ``grace`` seconds, or at once on a second stop signal."""
    from tools.support.procs import die_with_parent

    err = err or sys.stderr
    tty = os.isatty(0)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _WAIT_SIGNALS)

    def child_setup() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        die_with_parent()

    try:
        try:
            # With a terminal on stdin the device must stay in the foreground process group to read it; with
            # a pipe it gets its own group, so only this process decides what reaches it.
            proc = subprocess.Popen(
                cmd, env=env, cwd=cwd, preexec_fn=child_setup, process_group=None if tty else 0
            )
        except OSError as e:
            raise CliError(f"cannot start {cmd[0]}: {e.strerror or e}", 1) from None
        stopping = False
        deadline: float | None = None
        while True:
            rc = proc.poll()
            if rc is not None:
                break
            timeout = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
            info = signal.sigtimedwait(_WAIT_SIGNALS, timeout)
            if info is not None and info.si_signo in _STOP_SIGNALS:
                from_terminal = tty and info.si_signo == signal.SIGINT and info.si_code == _SI_KERNEL
                if stopping:
                    print("ida device: stopping now (SIGKILL)", file=err)
                    proc.kill()
                elif not from_terminal:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGINT)
                if not stopping:
                    stopping = True
                    deadline = time.monotonic() + grace
            if deadline is not None and time.monotonic() >= deadline and proc.poll() is None:
                print(f"ida device: the device did not stop within {grace:.0f} s; SIGKILL", file=err)
                proc.kill()
                deadline = None
        return rc if rc >= 0 else 128 - rc
    finally:
        while signal.sigtimedwait(_WAIT_SIGNALS, 0) is not None:  # consume what arrived meanwhile
            pass
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "action", None) != "run":
        raise CliError(
            "usage: ida device run --identifier ID [--gateway coap://HOST:PORT] "
            "[--transport coap|mqtt --broker mqtt://HOST:PORT] [--data-dir DIR]"
        )
    if args.interval is not None and not 10 <= args.interval <= 86400:
        raise CliError(f"--interval must be 10-86400 seconds, got {args.interval}")
    uid = args.uid
    if uid is not None:
        try:
            ok = 1 <= len(bytes.fromhex(uid)) <= 16
        except ValueError:
            ok = False
        if not ok:
            raise CliError(f"--uid must be 1-16 bytes of hex, got {uid!r}")
    if args.watchdog < 0:
        raise CliError("--watchdog must be 0 (off) or a number of ms")
    if args.heap is not None and not re.fullmatch(r"[1-9][0-9]*[KM]?", args.heap):
        raise CliError(f"--heap must be a number of bytes (optionally with K or M), got {args.heap!r}")
    from tools.harness.sim.provision import device_command, device_env
    from tools.support.procs import ProcessError, micropython_binary

    try:
        micropython = args.micropython or micropython_binary()
    except ProcessError as e:
        raise CliError(str(e), 1) from None
    cmd = device_command(micropython, args.heap)
    try:
        ident = gwident.normalise(args.identifier)
    except gwident.IdentifierError as e:
        raise CliError(f"identifier {args.identifier!r} is not valid: {e}") from None
    data_dir = args.data_dir if args.data_dir is not None else default_data_dir(ident)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"cannot create {data_dir}: {e.strerror or e}", 1) from None
    with _lock(data_dir):  # before provisioning: never rewrite the identity under a running device
        p = prepare(ident, data_dir, **namesakes(args, "gateway", "broker", "transport", "board", "force"))
        env = device_env(
            data_dir.resolve(),
            uid=uid or uid_from_identifier(p.identifier),
            interval=args.interval,
            wdt_ms=args.watchdog,
        )
        firmware = "firmware/"
        cwd: Path | None = None
        if args.image is not None:
            from tools.commands.device_image import install_image

            image = install_image(args.image, data_dir.resolve(), micropython)
            cmd, extra = image.command(micropython, args.heap)
            env.update(extra)
            cwd = data_dir.resolve()  # the image's root, as on the chip
            firmware = image.describe()
        print(
            f"ida device: {p.identifier} over {p.transport} to {p.gateway_url} (key {p.fingerprint}, identity "
            f"{p.action}) in {data_dir}, firmware from {firmware}; console: help, status, json on; Ctrl-C stops",
            file=sys.stderr,
        )
        sys.stderr.flush()
        return run_device(cmd, env, cwd=cwd)
