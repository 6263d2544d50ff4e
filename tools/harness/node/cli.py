"""`ida node`: run a local recursive Handle node (native UDP+TCP and REST) until SIGINT/SIGTERM.

Prints one line per listener on stdout when ready (``handle udp+tcp listening on 127.0.0.1:2641``,
``http listening on 127.0.0.1:8000``; port 0 prints the port actually bound) and the counters on exit.
SIGUSR1 toggles silence. Exit codes: 0 clean stop; 2 bad option or records file; 1 could not listen.
After administration, two more exit lines: ``node admin: OP:CODE=N ...`` (every answer) and
``node admin done: create=200/200 ...`` (operations done / distinct handles: equal when each was done once).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from proto.handle.keys import KeyFileError, load_public_key
from proto.handle.numbers import AUTH_PUBKEY, AUTH_SECKEY, DEFAULT_PORT
from proto.records import RecordFormatError
from tools.cliargs import namesakes
from tools.errors import CliError
from tools.harness.node.adminops import Identity, install_admin
from tools.harness.node.faults import FAILURE_MODES, Knobs
from tools.harness.node.server import DEFAULT_HTTP_PORT, Address, NodeError, NodeServer, parse_hostport
from tools.harness.node.store import RecordsError, load_records, sample_records

OFF = ("off", "none", "")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--records",
        metavar="FILE",
        help="JSON list of Handle REST records {handle, values} (default: the built-in sample set)",
    )
    p.add_argument(
        "--handle",
        metavar="HOST:PORT",
        default=f"127.0.0.1:{DEFAULT_PORT}",
        help=f"native protocol, UDP and TCP (default 127.0.0.1:{DEFAULT_PORT}; port 0 = any; off)",
    )
    p.add_argument(
        "--http",
        metavar="HOST:PORT",
        default=f"127.0.0.1:{DEFAULT_HTTP_PORT}",
        help=f"Handle REST API (default 127.0.0.1:{DEFAULT_HTTP_PORT}; port 0 = any; off)",
    )
    p.add_argument("--latency", type=float, default=0.0, metavar="MS", help="added delay before each answer")
    p.add_argument("--jitter", type=float, default=0.0, metavar="MS", help="delay varies by up to +-MS")
    p.add_argument(
        "--failure-rate", type=float, default=0.0, metavar="P", help="fraction of requests that fail (0-1)"
    )
    p.add_argument(
        "--failure-mode",
        choices=FAILURE_MODES,
        default="mixed",
        help="a failure answers RC_ERROR / HTTP 500 (error), gets no answer (drop), or either (mixed)",
    )
    p.add_argument(
        "--busy-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="fraction of requests answered RC_SERVER_BUSY / HTTP 503 (0-1)",
    )
    p.add_argument(
        "--truncate",
        action="store_true",
        help="answer every UDP request with a truncated (TC) datagram: clients must retry over TCP",
    )
    p.add_argument("--silent", action="store_true", help="start silent: drop every request (SIGUSR1 toggles)")
    p.add_argument(
        "--prefix",
        action="append",
        default=[],
        metavar="PREFIX",
        help="also host this prefix (unknown handles under it answer 100, not 301); repeatable",
    )
    p.add_argument(
        "--seed", type=int, default=None, metavar="N", help="seed of the fault dice (repeatable runs)"
    )
    p.add_argument("--log-requests", action="store_true", help="log one line per request on stderr")
    p.add_argument(
        "--store",
        metavar="FILE",
        help="keep the records in FILE: read from it when it exists (instead of --records), written after "
        "every change an administrator makes",
    )
    p.add_argument(
        "--admin-key",
        action="append",
        default=[],
        metavar="INDEX:HANDLE=FILE",
        help="administrator: the HANDLE.NET public key file (e.g. admpub.bin) as HS_PUBKEY at INDEX of the "
        "prefix handle HANDLE, named by its HS_ADMIN (e.g. 300:0.NA/88.123.99=admpub.bin); repeatable",
    )
    p.add_argument(
        "--admin-secret",
        action="append",
        default=[],
        metavar="INDEX:HANDLE=SECRET",
        help="administrator with a secret key (HS_SECKEY, for REST basic authentication); repeatable",
    )


def _bind(text: str, default_port: int, flag: str) -> Address | None:
    if text.strip().lower() in OFF:
        return None
    try:
        return parse_hostport(text, default_port)
    except ValueError as e:
        raise CliError(f"{flag}: {e}") from None


# options that are Knobs fields of the same name (latency and jitter are given in ms)
_KNOB_OPTIONS = ("failure_rate", "failure_mode", "busy_rate", "truncate", "silent")


def build_node(args: argparse.Namespace) -> NodeServer:
    """The NodeServer the options describe (not started); CliError for a bad option or records file."""
    handle = _bind(args.handle, DEFAULT_PORT, "--handle")
    http = _bind(args.http, DEFAULT_HTTP_PORT, "--http")
    if handle is None and http is None:
        raise CliError("--handle and --http are both off: nothing to serve")
    try:
        same = namesakes(args, *_KNOB_OPTIONS)
        knobs = Knobs(latency=args.latency / 1000.0, jitter=args.jitter / 1000.0, **same)
    except ValueError as e:
        raise CliError(str(e)) from None
    try:
        records = load_records(args.records) if args.records else sample_records()
        return NodeServer(
            records,
            handle=handle,
            http=http,
            knobs=knobs,
            prefixes=args.prefix,
            seed=args.seed,
            log_requests=args.log_requests,
            store_file=args.store,
        )
    except RecordsError as e:
        raise CliError(str(e)) from None


def _admin_option(text: str, flag: str) -> tuple[Identity, str]:
    ref, sep, rest = text.partition("=")
    try:
        if not sep or not rest:
            raise RecordFormatError(f"{text!r} is not INDEX:HANDLE=...")
        who = Identity.parse(ref)
    except RecordFormatError as e:
        raise CliError(f"{flag}: {e}") from None
    return who, rest


def install_admins(node: NodeServer, args: argparse.Namespace) -> None:
    """Put the administrators of ``--admin-key`` / ``--admin-secret`` into the node's records."""
    for text in args.admin_key:
        who, path = _admin_option(text, "--admin-key")
        try:
            data = open(path, "rb").read()
            load_public_key(data)
        except OSError as e:
            raise CliError(f"--admin-key: cannot read {path}: {e.strerror}") from None
        except KeyFileError as e:
            raise CliError(f"--admin-key: {path}: {e}") from None
        _install(node, who, AUTH_PUBKEY, data)
    for text in args.admin_secret:
        who, secret = _admin_option(text, "--admin-secret")
        _install(node, who, AUTH_SECKEY, secret.encode())
    if args.admin_key or args.admin_secret:
        node.save()


def _install(node: NodeServer, who: Identity, vtype: str, data: bytes) -> None:
    try:
        install_admin(node.store, who, vtype, data)
    except (ValueError, RecordsError) as e:
        raise CliError(str(e)) from None


async def serve(node: NodeServer) -> None:
    """Start ``node``, print its addresses, run until SIGINT/SIGTERM, stop it and print its counters."""
    try:
        await node.start()
    except NodeError as e:
        raise CliError(str(e), 1) from None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def toggle() -> None:
        on = node.toggle_silent()
        print(f"ida node: silent {'on' if on else 'off'}", file=sys.stderr, flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, toggle)
    try:
        for line in node.listening_lines():
            print(line)
        sys.stdout.flush()
        prefixes = ", ".join(node.store.prefixes) or "none"
        state = " (silent)" if node.silent else ""
        print(f"ida node: {len(node.store)} records, prefixes {prefixes}{state}", file=sys.stderr, flush=True)
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
        await node.stop()
        print(f"node stats: {node.stats.summary()}", flush=True)
        admin = node.admin.answers
        if admin:
            pairs = " ".join(f"{op}:{code}={n}" for (op, code), n in sorted(admin.items()))
            print(f"node admin: {pairs}", flush=True)
            print(f"node admin done: {node.admin.ops.summary()}", flush=True)


def run(args: argparse.Namespace) -> int:
    node = build_node(args)
    install_admins(node, args)
    logging.basicConfig(
        level=logging.INFO if args.log_requests else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    asyncio.run(serve(node))
    return 0
