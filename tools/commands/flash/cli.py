"""``ida flash``: factory flashing and provisioning. A thin layer over the library in ``tools/commands/flash``:
parse arguments, call one function, print its result."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from tools.errors import CliError
from tools.support.boards import BoardError, list_boards, load_board

from . import batch as batch_mod
from . import regcli
from .builder import FIRMWARE_DIR, Manifest, build, esptool_command, load_build
from .ca import load_ca
from .errors import BuildError, FlashError, LedgerError, RuntimeMissing
from .frozen import stock_runtime_warning
from .identity import SCHEMES
from .ledger import Ledger, file_identifiers, pattern_identifiers
from .programmer import EsptoolProgrammer
from .provision import IdentityTemplate, Station, flash_device, wait_console
from .registrar import drain


def default_build_dir(board: str) -> Path:
    return Path("build") / "flash" / board


def data_dir(args: argparse.Namespace) -> Path:
    return Path(args.data_dir or os.environ.get("IDA_DATA") or "data")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir", help="ledger, keystore and zone file live here (default $IDA_DATA or ./data)"
    )
    sub = p.add_subparsers(dest="flash_command", metavar="COMMAND", required=True)

    b = sub.add_parser("build", help="compile the firmware and build the filesystem image for a batch")
    b.add_argument("--board", required=True, help=f"board file name ({', '.join(list_boards())})")
    b.add_argument("--out", help="output directory (default build/flash/<board>)")
    b.add_argument(
        "--runtime", help="MicroPython .bin for the chip (never downloaded); only its checksum is kept"
    )
    b.add_argument(
        "--native", action="store_true", help="let mpy-cross emit native code for the board's arch"
    )
    b.add_argument("--firmware", type=Path, default=FIRMWARE_DIR, help="firmware tree (default: firmware/)")
    b.add_argument(
        "--ca",
        metavar="FILE",
        help="the MQTT broker's CA certificate (PEM or DER), put into the image as /ca.crt",
    )
    b.set_defaults(_flash=_build)

    def station_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--board", required=True)
        q.add_argument("--build", dest="build_dir", help="build directory (default build/flash/<board>)")
        q.add_argument("--runtime", help="MicroPython .bin to write when the chip has none or with --full")
        q.add_argument(
            "--gateway",
            action="append",
            default=[],
            metavar="URL",
            help="coap://HOST[:PORT] and/or mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (MQTT over TLS) "
            "written into the identity",
        )
        q.add_argument("--transport", choices=("coap", "mqtt"), help="default: the first --gateway's scheme")
        q.add_argument(
            "--ca",
            metavar="FILE",
            help="broker CA (PEM or DER) for mqtts:// when the build has none "
            "(added to each chip; better: ida flash build --ca)",
        )
        q.add_argument(
            "--insecure",
            action="store_true",
            help='factory bench only: CoAP without OSCORE (identity without "secure": true); '
            "logged and recorded in the ledger",
        )
        q.add_argument("--wifi-ssid", default=os.environ.get("IDA_WIFI_SSID"))
        q.add_argument("--wifi-psk", default=os.environ.get("IDA_WIFI_PSK"), help="default $IDA_WIFI_PSK")
        q.add_argument(
            "--operator", default=os.environ.get("USER"), help="recorded in the ledger (default $USER)"
        )
        q.add_argument(
            "--station", default=socket.gethostname(), help="recorded in the ledger (default hostname)"
        )
        q.add_argument("--zone", help="local zone file to register devices in (default <data dir>/zone.json)")
        q.add_argument("--no-register", action="store_true", help="do not add devices to the local zone")
        q.add_argument("--baud", type=int, default=460800, help="flashing baud rate (default 460800)")
        q.add_argument(
            "--no-upstream",
            action="store_true",
            help="do not queue upstream registrations (see `ida flash register setup`)",
        )
        q.add_argument(
            "--register-wait",
            type=float,
            default=30.0,
            metavar="S",
            help="after the last chip, give the registration queue S seconds (default 30; never delays a chip)",
        )

    d = sub.add_parser("device", help="flash and provision one chip")
    d.add_argument("--port", required=True)
    station_args(d)
    who = d.add_mutually_exclusive_group(required=True)
    who.add_argument("--identifier", help="this identifier (must not be on another chip)")
    who.add_argument("--next", action="store_true", help="the next free identifier from the pools")
    d.add_argument(
        "--full", action="store_true", help="write runtime and whole filesystem, not only what differs"
    )
    d.add_argument(
        "--wait-console", action="store_true", help="after reset, wait until the device reports its id"
    )
    d.add_argument("--console-timeout", type=float, default=20.0)
    d.set_defaults(_flash=_device)

    bt = sub.add_parser("batch", help="flash every chip that appears on an Espressif serial port")
    station_args(bt)
    bt.add_argument("--count", type=int, help="stop after N chips (default: until Ctrl-C)")
    bt.set_defaults(_flash=_batch)

    pool = sub.add_parser("pool", help="identifiers that --next may issue")
    psub = pool.add_subparsers(dest="pool_command", metavar="ACTION", required=True)
    pa = psub.add_parser("add", help="add a range (--prefix --pattern --from --to) or a file of identifiers")
    pa.add_argument("--prefix", help="e.g. 88.123.99")
    pa.add_argument("--pattern", help="suffix pattern with {n}, e.g. PUMP-{n:06d}")
    pa.add_argument("--from", dest="first", type=int)
    pa.add_argument("--to", dest="last", type=int)
    pa.add_argument("--file", help="one identifier per line (# comments)")
    pa.add_argument("--name", help="pool name (default: the pattern or file name)")
    pa.set_defaults(_flash=_pool_add)
    pl = psub.add_parser("list", help="pools with total and free counts")
    pl.set_defaults(_flash=_pool_list)

    led = sub.add_parser("ledger", help="what was flashed")
    lsub = led.add_subparsers(dest="ledger_command", metavar="ACTION", required=True)
    le = lsub.add_parser("export", help="write the ledger as CSV (key fingerprints only, never keys)")
    le.add_argument("--out", required=True, help="CSV file ('-' for stdout)")
    le.add_argument("--history", action="store_true", help="every event instead of one row per device")
    le.set_defaults(_flash=_ledger_export)
    lr = lsub.add_parser("release", help="give a failed chip's identifier back to the pool (chip scrapped)")
    lr.add_argument("identifier")
    lr.add_argument("--reason", required=True)
    lr.add_argument("--operator", default=os.environ.get("USER"))
    lr.set_defaults(_flash=_ledger_release)

    regcli.add_ledger_show(lsub)
    regcli.add_register(sub)

    bo = sub.add_parser("boards", help="boards that can be flashed")
    bo.set_defaults(_flash=_boards)


def run(args: argparse.Namespace) -> int:
    try:
        return int(args._flash(args))
    except BoardError as e:
        raise CliError(str(e)) from None
    except (BuildError, LedgerError, RuntimeMissing) as e:
        raise CliError(str(e)) from None
    except FlashError as e:
        raise CliError(str(e), exit_code=1) from None


# --- commands --------------------------------------------------------------------------------------------------


def _build(args: argparse.Namespace) -> int:
    board = load_board(args.board)
    out = Path(args.out) if args.out else default_build_dir(board.name)
    m = build(
        board.name,
        out,
        args.runtime,
        args.firmware,
        board.micropython.mpy_arch if args.native else None,
        ca=args.ca,
    )
    fs = m.fs_image
    print(f"built {m.board} firmware {m.firmware_version} into {out}")
    print(f"  files: {len(m.files)} ({sum(f.size for f in m.files)} bytes), mpy-cross: {m.mpy_cross}")
    if m.ca:
        print(
            f"  ca.crt: {m.ca['subject']} (until {m.ca['not_after']}), {m.ca['size']} bytes DER, for mqtts://"
        )
    print(
        f"  fs.bin: {fs['size']} bytes = {fs['block_count']} x {fs['block_size']}, {fs['used_blocks']} blocks used, "
        f"for 0x{fs['offset'] or 0:x}, sha256 {fs['sha256']}"
    )
    if m.runtime:
        print(
            f"  runtime: {m.runtime.kind} image {m.runtime.path} ({m.runtime.version or 'version unknown'}), "
            f"sha256 {m.runtime.sha256}"
        )
        if m.factory_image:
            print(f"  factory.bin: runtime + fs for a gang programmer, at 0x{m.factory_image['offset']:x}")
        _runtime_layout(m)
        if board.flash is not None:
            print("  by hand: " + " ".join(esptool_command(load_build(out, board.name))))
    else:
        print(
            "  runtime: none given; `ida flash device` will need --runtime PATH with --full or for a blank chip"
        )
    return 0


def _runtime_layout(m: Manifest) -> None:
    """Frozen runtime: say what stays off the filesystem. Stock runtime: warn what the .mpy files cost."""
    if m.frozen:
        on_fs = ", ".join(f.path for f in m.files)
        print(
            f"  firmware frozen in the runtime ({len(m.frozen)} files); the filesystem: {on_fs} + identity per chip"
        )
        return
    mpy = [f for f in m.files if f.path.endswith(".mpy")]
    print("WARNING: " + stock_runtime_warning(sum(f.size for f in mpy), len(mpy)), file=sys.stderr)


def _template(args: argparse.Namespace) -> IdentityTemplate:
    if not args.gateway:
        raise CliError(
            "give the gateway address the devices use: --gateway coap://HOST[:PORT] (or mqtt(s)://...)"
        )
    transport = args.transport or SCHEMES.get(args.gateway[0].partition("://")[0], "coap")
    wifi = (args.wifi_ssid, args.wifi_psk or "") if args.wifi_ssid else None
    ca = load_ca(args.ca).der if args.ca else None
    return IdentityTemplate(tuple(args.gateway), transport, wifi, secure=not args.insecure, ca=ca)


def _station(args: argparse.Namespace) -> Station:
    return Station(
        data_dir(args),
        operator=args.operator,
        station=args.station,
        zone_file=Path(args.zone) if args.zone else None,
        register=not args.no_register,
        upstream=not args.no_upstream,
        register_wait=args.register_wait,
    )


def _load(args: argparse.Namespace):  # noqa: ANN202 - Build
    return load_build(args.build_dir or default_build_dir(args.board), args.board)


def _device(args: argparse.Namespace) -> int:
    b = _load(args)
    template = _template(args)
    progress = batch_mod.ProgressPrinter(sys.stdout, args.port)
    console = (
        wait_console(args.port, b.board.console.baud, args.console_timeout) if args.wait_console else None
    )
    try:
        r = flash_device(
            EsptoolProgrammer(args.port, baud=args.baud),
            b,
            _station(args),
            template,
            identifier=args.identifier,
            full=args.full,
            runtime=args.runtime,
            console=console,
            progress=progress,
        )
    finally:
        progress.end()
    print(f"PASS {r.identifier} on {r.chip} {r.mac}{' (re-flash, same identifier)' if r.reused else ''}")
    key = "new key" if r.new_key else "key kept"
    if r.previous_key_fingerprint:
        key += f", replaces {r.previous_key_fingerprint}"
    print(
        f"  wrote {r.bytes_written} bytes in {r.blocks_written} block(s), filesystem {r.fs_mode}, "
        f"key fingerprint {r.key_fingerprint} ({key}), {r.seconds:.1f} s"
    )
    if not r.secure:
        print("  WARNING: INSECURE identity (--insecure): CoAP without OSCORE, factory bench only")
    for w in r.writes:
        print(f"    {w.what:16} 0x{w.offset:06x} +{w.size}")
    if r.console:
        print(f"  console: {r.console}")
    station = _station(args)
    upstream = station.upstream_config()
    if upstream is not None:  # the chip is done; the queue gets --register-wait seconds
        tally, counts = drain(station.data_dir, upstream, station.register_wait, wait_for_retries=False)
        print(f"  {tally.text(counts)}")
    return 0


def _batch(args: argparse.Namespace) -> int:
    b = _load(args)
    usb_ids = b.board.usb_ids
    if not usb_ids:
        raise CliError(f"board {b.board.name!r} lists no USB VID:PID to find its ports by")
    baud = args.baud
    summary = batch_mod.run_batch(
        b,
        _station(args),
        _template(args),
        ports=lambda: batch_mod.espressif_ports(usb_ids),
        programmer=lambda port: EsptoolProgrammer(port, baud=baud),
        runtime=args.runtime,
        count=args.count,
    )
    return 1 if summary.failed else 0


def _pool_add(args: argparse.Namespace) -> int:
    if args.file:
        if args.pattern or args.prefix:
            raise CliError("give either --file or --prefix/--pattern/--from/--to")
        try:
            with open(args.file, encoding="utf-8") as f:
                ids = list(file_identifiers(f))
        except OSError as e:
            raise CliError(f"cannot read {args.file}: {e.strerror}") from None
        name = args.name or Path(args.file).name
    else:
        if None in (args.prefix, args.pattern, args.first, args.last):
            raise CliError("a range needs --prefix, --pattern, --from and --to")
        ids = list(pattern_identifiers(args.prefix, args.pattern, args.first, args.last))
        name = args.name or f"{args.prefix}/{args.pattern}"
    with Ledger.in_dir(data_dir(args)) as ledger:
        added, skipped = ledger.add_pool(ids, name)
        free = ledger.free_count()
    print(f"pool {name}: {added} identifier(s) added, {skipped} already known (skipped); {free} free in all")
    return 0


def _pool_list(args: argparse.Namespace) -> int:
    with Ledger.in_dir(data_dir(args)) as ledger:
        pools = ledger.pools()
    if not pools:
        print("no pools: add one with `ida flash pool add`")
    for p in pools:
        print(f"{p.pool}: {p.free} free of {p.total}")
    return 0


def _ledger_export(args: argparse.Namespace) -> int:
    with Ledger.in_dir(data_dir(args)) as ledger:
        if args.out == "-":
            ledger.export_csv(sys.stdout, args.history)
            return 0
        tmp = Path(args.out + ".tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            n = ledger.export_csv(f, args.history)
        os.replace(tmp, args.out)
    print(f"wrote {n} row(s) to {args.out}")
    return 0


def _ledger_release(args: argparse.Namespace) -> int:
    with Ledger.in_dir(data_dir(args)) as ledger:
        ledger.release(args.identifier, args.operator, args.reason)
    print(f"{args.identifier} is free again")
    return 0


def _boards(args: argparse.Namespace) -> int:
    for name in list_boards():
        b = load_board(name)
        if b.flash is None:
            continue
        usb = ", ".join(str(u) for u in b.usb_ids)
        print(
            f"{name:22} {b.chip:8} {b.flash.size_name:5} vfs 0x{b.vfs.offset:x}+0x{b.vfs.size:x}  usb {usb}"
        )
    return 0
