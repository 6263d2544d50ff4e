"""``ida flash register setup|run|status|retry`` and ``ida flash ledger show``: the upstream registration of a
station, as commands (a thin layer over :mod:`.registrar` and :mod:`.regqueue`; ``cli.py`` adds them).

Exit codes of ``register run``: 0 nothing left pending or failed; 1 some failed (refused for good: the reason is
shown); 3 some still pending (the node is down or busy: run it again, or let the next batch send them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from tools.cliargs import namesakes
from tools.errors import CliError

from .errors import FlashError
from .ledger import Ledger
from .register import VALUE_INDEXES
from .registrar import CONFIG_FILENAME, UpstreamConfig, drain
from .regqueue import RegistrationQueue

EXIT_FAILED = 1
EXIT_PENDING = 3


def _data_dir(args: argparse.Namespace) -> Path:
    return Path(args.data_dir or os.environ.get("IDA_DATA") or "data")


def add_register(sub: Any) -> None:
    """The ``register`` subcommand and its actions."""
    reg = sub.add_parser("register", help="register flashed identifiers at the enterprise's Handle node")
    rsub = reg.add_subparsers(dest="register_command", metavar="ACTION", required=True)
    s = rsub.add_parser("setup", help=f"configure this station once (writes <data dir>/{CONFIG_FILENAME})")
    s.add_argument("--upstream", required=True, metavar="URL", help="hdl://node:2641 or https://node:8000")
    s.add_argument("--auth", required=True, metavar="INDEX:HANDLE", help="the admin, e.g. 300:0.NA/88.123.99")
    s.add_argument("--key", metavar="FILE", help="the admin's private key file (copied into the data dir)")
    s.add_argument("--passphrase-env", metavar="VAR", help="environment variable with the key's passphrase")
    s.add_argument("--secret-env", metavar="VAR", help="REST basic authentication: variable with the secret")
    s.add_argument("--tls-ca", metavar="FILE", help="https: the node's CA or certificate (copied)")
    s.add_argument("--url", metavar="PATTERN", help="URL value, e.g. https://id.example.com/{identifier}")
    s.add_argument("--admin", metavar="INDEX:HANDLE", help="HS_ADMIN of each handle (default: --auth)")
    s.add_argument(
        "--values",
        default=",".join(VALUE_INDEXES),
        metavar="LIST",
        help=f"production values to register (default {','.join(VALUE_INDEXES)})",
    )
    s.add_argument("--timeout", type=float, default=10.0, metavar="S")
    s.set_defaults(_flash=_setup)
    r = rsub.add_parser("run", help="send the queue now (until it is empty or --timeout)")
    r.add_argument(
        "--timeout", type=float, default=60.0, metavar="S", help="give up after S seconds (default 60)"
    )
    r.set_defaults(_flash=_run)
    st = rsub.add_parser("status", help="registration counts and the identifiers not yet registered")
    st.add_argument("--json", action="store_true")
    st.set_defaults(_flash=_status)
    rt = rsub.add_parser("retry", help="queue failed registrations again (all, or the identifiers given)")
    rt.add_argument("identifiers", nargs="*", metavar="ID")
    rt.set_defaults(_flash=_retry)


def add_ledger_show(lsub: Any) -> None:
    """``ledger show``: every device with its registration state."""
    sh = lsub.add_parser("show", help="devices with their registration state (--json to export)")
    sh.add_argument("--json", action="store_true", help="a JSON list, one object per device")
    sh.add_argument("--registration", choices=("pending", "registered", "failed", "none"), help="only these")
    sh.set_defaults(_flash=_ledger_show)


def _copy(src: str | None, data_dir: Path, name: str) -> str | None:
    if src is None:
        return None
    try:
        data = Path(src).read_bytes()
    except OSError as e:
        raise CliError(f"cannot read {src}: {e.strerror}") from None
    dest = data_dir / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, dest)
    return name


def _setup(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    cfg = UpstreamConfig(
        key=_copy(args.key, data_dir, "registration-key.bin"),
        tls_ca=_copy(args.tls_ca, data_dir, "registration-ca.pem"),
        values=tuple(v.strip().upper() for v in args.values.split(",") if v.strip()),
        **namesakes(args, "upstream", "auth", "passphrase_env", "secret_env", "url", "admin", "timeout"),
    ).check()
    cfg.client(data_dir)  # the key opens (and the passphrase is right) before the file is written
    path = cfg.save(data_dir)
    print(f"registration: {cfg.upstream} as {cfg.auth}; written to {path}")
    return 0


def _config(data_dir: Path) -> UpstreamConfig:
    cfg = UpstreamConfig.load(data_dir)
    if cfg is None:
        raise CliError(f"no {data_dir / CONFIG_FILENAME}: run `ida flash register setup` first")
    return cfg


def _run(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    try:
        tally, counts = drain(data_dir, _config(data_dir), args.timeout)
    except FlashError as e:
        raise CliError(str(e)) from None
    print(tally.text(counts))
    if counts["failed"]:
        return EXIT_FAILED
    return EXIT_PENDING if counts["pending"] else 0


def _status(args: argparse.Namespace) -> int:
    with RegistrationQueue.in_dir(_data_dir(args)) as queue:
        counts = queue.counts()
        open_rows = [r for r in queue.rows() if r["state"] != "registered"]
    if args.json:
        print(json.dumps({"counts": counts, "open": open_rows}, ensure_ascii=False))
        return 0
    print(
        f"registration: {counts['registered']} registered, {counts['pending']} pending, {counts['failed']} failed"
    )
    for r in open_rows:
        print(
            f"  {r['state']:8} {r['op']:6} {r['identifier']}  tries {r['attempts']}  {r['detail'] or ''}".rstrip()
        )
    return 0


def _retry(args: argparse.Namespace) -> int:
    with RegistrationQueue.in_dir(_data_dir(args)) as queue:
        n = queue.retry_failed(args.identifiers)
    print(f"{n} registration(s) queued again")
    return 0


def _ledger_show(args: argparse.Namespace) -> int:
    with Ledger.in_dir(_data_dir(args)) as ledger:
        rows = ledger.devices_with_registration()
    if args.registration:
        want = None if args.registration == "none" else args.registration
        rows = [r for r in rows if r["registration"] == want]
    if args.json:
        json.dump(rows, sys.stdout, ensure_ascii=False)
        print()
        return 0
    for r in rows:
        reg = r["registration"] or "-"
        why = f"  ({r['registration_detail']})" if r["registration"] == "failed" else ""
        print(f"{r['identifier']:28} {r['mac']}  {r['state']:9} registration {reg}{why}")
    if not rows:
        print("no devices")
    return 0
