"""Flash one chip: detect, allocate its identifier, write what is needed, verify, reset, record, register.

:func:`flash_device` is the whole per-chip procedure over a :class:`~tools.commands.flash.programmer.Programmer`, so the
same code runs against a real chip (esptool) and a simulated one. What gets written:

* the runtime (MicroPython; merged image at the bootloader offset, or app image + partition table) only with
  ``full`` or when the chip has none (no ESP image magic 0xE9 at the bootloader and app offsets);
* the filesystem: nothing when the chip's vfs region already holds this chip's image (MD5 computed on the
  chip); only the changed 4 KiB blocks when it holds the batch image (the usual case on a line where chips
  were pre-loaded with ``factory.bin``); the whole image otherwise or with ``full``.

Keys are fresh whenever the device's state is reset. The device keeps its OSCORE sender sequence number in its
own storage (the filesystem on the unix port, the ``nvs`` partition on the ESP32): once that is rewritten, the
old key with a restarted sequence number would repeat nonces. So the chip keeps its key only when its vfs region
already holds exactly its image under that key (nothing written there) and no write touches ``nvs`` (MicroPython's
merged ``firmware.bin``, written from the bootloader offset, spans and erases it; an app-only runtime does not).
Otherwise it gets a new random key, stored in the keystore (durably, under its lock) before the first byte goes
to the chip; a chip that holds its previous image gets only the blocks that differ from it. The ledger records
both fingerprints, never a key.

Identities are ``"secure": true`` (CoAP protected with OSCORE under the key) unless the template says
``secure=False`` (``--insecure``, factory bench): that is logged as a warning and recorded in the ledger
(``security`` = ``insecure``).

Ledger states follow the work: ``allocated`` before the first write, ``flashed`` after it, ``verified`` after
the read-back, ``failed`` on any error after allocation (the identifier stays bound to the chip's MAC: see
``ledger.py``). When the station registers upstream (``registration.toml``), the ``verified`` record queues the
identifier's registration in the same transaction (``regqueue.py``); nothing here waits for the network. Errors before allocation (busy port, no chip, wrong chip) touch neither ledger nor chip.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tools.support.boards import Board

from . import image as im
from .builder import Build, RuntimeInfo, load_runtime
from .errors import (
    FlashError,
    FlashTooSmall,
    RuntimeMissing,
    VerifyFailed,
    WrongChip,
)
from .identity import (
    CA_NAME,
    CA_PATH,
    ChipImage,
    Identity,
    check_gateways,
    key_fingerprint,
    new_key,
    personalise,
    uses_tls,
)
from .keystore import Keystore
from .ledger import Checksums, Device, Ledger
from .programmer import Parts, Programmer
from .register import Registration, register_device
from .registrar import UpstreamConfig
from .regqueue import enqueue_in

CHUNK = 256 * 1024  # write in chunks this size so progress can be shown
ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)
log = logging.getLogger("tools.commands.flash")
# where the ESP32 firmware keeps its OSCORE sequence-number reservation (kv "oscseq" in NVS, carrier/hal/esp32.py):
# a write over it resets that state just as a filesystem write does on the unix port
STATE_PARTITIONS = ("nvs",)


@dataclass(frozen=True)
class IdentityTemplate:
    """What every chip of a batch shares in its identity file. ``secure`` (default): CoAP protected with
    OSCORE; False only for a factory bench (``--insecure``). ``ca``: the broker's CA (DER) to add to each chip
    when the build has none (``mqtts://`` needs one; a CA in the batch image costs nothing per chip)."""

    gateways: tuple[str, ...]
    transport: str = "coap"
    wifi: tuple[str, str] | None = field(default=None, repr=False)
    secure: bool = True
    ca: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_gateways(self.gateways, self.transport)

    @property
    def security(self) -> str:
        """What the ledger records: ``oscore`` or ``insecure``."""
        return "oscore" if self.secure else "insecure"


@dataclass(frozen=True)
class Station:
    """Where results go: the data dir (ledger, keystore), the zone file, who is flashing."""

    data_dir: Path
    operator: str | None = None
    station: str | None = None
    zone_file: Path | None = None  # default <data dir>/zone.json; register=False skips it
    register: bool = True
    upstream: bool = True  # queue an upstream registration when <data dir>/registration.toml exists
    register_wait: float = (
        30.0  # seconds a batch (ida flash device: a chip) gives the queue once flashing is done
    )

    def ledger(self) -> Ledger:
        return Ledger.in_dir(self.data_dir)

    def upstream_config(self) -> UpstreamConfig | None:
        """How this station registers upstream (None: it does not); FlashError for a broken configuration."""
        return UpstreamConfig.load(self.data_dir) if self.upstream else None

    def keystore(self) -> Keystore:
        return Keystore.in_dir(self.data_dir)

    @property
    def zone(self) -> Path:
        return self.zone_file or self.data_dir / "zone.json"


@dataclass(frozen=True)
class Write:
    what: str  # "runtime", "partition-table", "fs-delta", "fs"
    offset: int
    size: int


@dataclass(frozen=True)
class Result:
    identifier: str
    mac: str
    chip: str
    reused: bool  # the MAC already had this identifier
    fs_mode: str  # "unchanged", "delta", "full"
    writes: tuple[Write, ...]
    key_fingerprint: str
    seconds: float
    console: str | None = None
    secure: bool = True
    previous_key_fingerprint: str | None = (
        None  # set when a new key replaced one (the filesystem was written)
    )

    @property
    def new_key(self) -> bool:
        """The chip got a new key (always, unless nothing was written to its filesystem)."""
        return self.fs_mode != "unchanged"

    @property
    def bytes_written(self) -> int:
        return sum(w.size for w in self.writes)

    @property
    def blocks_written(self) -> int:
        return sum(-(-w.size // 4096) for w in self.writes)


def _noop(stage: str, done: int, total: int) -> None:
    pass


def check_chip(programmer: Programmer, board: Board) -> str:
    """Connect; refuse a chip that is not the board's or has too little flash. Returns the chip's MAC."""
    info = programmer.detect()
    if info.chip != board.chip:
        programmer.close()
        raise WrongChip(f"{info.chip} ({info.description})", board.chip, board.name)
    if board.flash and info.flash_size is not None and info.flash_size < board.flash.size:
        programmer.close()
        raise FlashTooSmall(
            f"chip has {info.flash_size >> 20} MB of flash, board {board.name!r} needs {board.flash.size >> 20} MB"
        )
    return programmer.read_mac()


def runtime_present(programmer: Programmer, board: Board) -> bool:
    """A bootloader, a partition table and an app are on the chip (magic bytes at the board's offsets)."""
    bl = programmer.read_flash(board.bootloader.offset, 4)
    pt = programmer.read_flash(board.partition_table.offset, 2)
    app = programmer.read_flash(board.app.offset, 4)
    return bl[0] == im.ESP_IMAGE_MAGIC and pt == im.PT_MAGIC and app[0] == im.ESP_IMAGE_MAGIC


def runtime_parts(
    build: Build, info: RuntimeInfo, data: bytes, bootloader_present: bool
) -> list[tuple[str, int, bytes]]:
    board = build.board
    if info.kind == "merged":
        return [("runtime", info.offset, _pad(data))]
    if not bootloader_present:
        raise RuntimeMissing(
            f"{info.path} is an app-only image and the chip has no bootloader at 0x{board.bootloader.offset:x}",
            "give MicroPython's merged firmware.bin for this chip instead",
        )
    table = (build.directory / build.manifest.partition_table["file"]).read_bytes()
    return [
        ("partition-table", board.partition_table.offset, _pad(table)),
        ("runtime", info.offset, _pad(data)),
    ]


def _pad(data: bytes) -> bytes:
    return data + b"\xff" * (-len(data) % 4096)


def flash_device(
    programmer: Programmer,
    build: Build,
    station: Station,
    template: IdentityTemplate,
    *,
    identifier: str | None = None,
    full: bool = False,
    runtime: str | os.PathLike[str] | None = None,
    console: Callable[[str], str] | None = None,
    progress: ProgressFn = _noop,
) -> Result:
    """Provision the chip behind ``programmer`` with ``identifier`` (None: the MAC's own, else the next free
    one). ``console(identifier)`` (optional) waits for the reset device to report it and returns that line."""
    t0 = time.monotonic()
    board, params, man = build.board, build.params, build.manifest
    if not board.partitions:
        raise FlashError(f"board {board.name!r} has no flash layout: it cannot be flashed")
    extra, ca_ref = _ca_files(build, template)  # a CA problem is found before anything is spent
    upstream = station.upstream_config()  # so is a broken registration configuration
    progress("detect", 0, 1)
    mac = check_chip(programmer, board)
    # what the runtime needs is known before any identifier is spent: a missing runtime costs nothing
    try:
        plan, rt = _runtime_plan(programmer, build, full, runtime)
    except BaseException:
        programmer.close()
        raise

    def queue_upstream(db: sqlite3.Connection, device: Device) -> None:
        if upstream is not None:
            produced = _dt.datetime.now(_dt.UTC)
            values = upstream.values_for(device.identifier, mac, board.name, man.firmware_version, produced)
            enqueue_in(db, device, values, upstream.upstream, station.station)

    with station.ledger() as ledger:
        alloc = ledger.allocate(
            mac, board.name, identifier=identifier, operator=station.operator, station=station.station
        )

        def chip_for(key: bytes) -> tuple[Identity, ChipImage]:
            ident = Identity(
                alloc.identifier,
                key,
                template.gateways,
                template.transport,
                template.wifi,
                template.secure,
                ca_ref,
            )
            return ident, personalise(params, build.fs_image, ident, extra)

        if not template.secure:
            log.warning(
                "INSECURE identity for %s: CoAP without OSCORE (--insecure, factory bench only)",
                alloc.identifier,
            )
        keystore = station.keystore()
        checks = Checksums(
            firmware_version=man.firmware_version,
            fs_sha256=man.fs_image["sha256"],
            runtime_sha256=rt.sha256 if rt else man.runtime.sha256 if man.runtime else None,
            security=template.security,
        )
        try:
            old_key = keystore.get(alloc.identifier)
            on_chip = None if full else programmer.flash_md5(board.vfs.offset, board.vfs.size)
            wipes_nvs = _touches(plan, board, STATE_PARTITIONS)
            fs_mode, base = "", None  # base: the image the chip's vfs region holds, when known
            if on_chip is not None and on_chip == im.md5(build.fs_image):
                base = build.fs_image
            elif old_key is not None and on_chip is not None:
                ident, chip_image = chip_for(old_key)
                if on_chip == im.md5(chip_image.image):
                    base = chip_image.image
                    if not wipes_nvs:
                        fs_mode = (
                            "unchanged"  # its image under its key, state kept: nothing written, key kept
                        )
            previous = None
            delta: tuple[tuple[int, bytes], ...] = ()
            if fs_mode != "unchanged":
                # the device's state is reset (its filesystem written, or its nvs erased), and with it its OSCORE
                # sequence number: a new key, in the keystore (durably) before the first byte goes to the chip
                ident, chip_image = chip_for(new_key())
                if base is None:
                    fs_mode = "full"
                else:
                    fs_mode = "delta"
                    delta = tuple(im.changed_blocks(base, chip_image.image, params.block_size))
                keystore.rekey(alloc.identifier, ident.key)
                previous = key_fingerprint(old_key) if old_key is not None else None
                log.info(
                    "%s: new key %s%s (%s)",
                    alloc.identifier,
                    ident.fingerprint,
                    f", replacing {previous}" if previous else "",
                    "the runtime write erases nvs" if wipes_nvs else "the filesystem is written",
                )
            checks = Checksums(
                **{
                    **vars(checks),
                    "image_sha256": im.sha256(chip_image.image),
                    "key_fingerprint": ident.fingerprint,
                    "previous_key_fingerprint": previous,
                }
            )
            plan += _fs_plan(board, fs_mode, chip_image.image, delta)
            parts: Parts = [(off, data) for _, off, data in plan]
            _write(programmer, plan, progress)
            ledger.record(alloc.identifier, "flashed", checks)
            progress("verify", 0, 1)
            bad = programmer.verify(parts)
            if programmer.flash_md5(board.vfs.offset, board.vfs.size) != im.md5(chip_image.image):
                bad.append((board.vfs.offset, board.vfs.size))
            if bad:
                raise VerifyFailed(bad)
            progress("verify", 1, 1)
            ledger.record(alloc.identifier, "verified", checks, also=queue_upstream)
        except (
            BaseException
        ) as e:  # Ctrl-C mid-write too: the chip's state is unknown, the identifier stays its
            ledger.record(alloc.identifier, "failed", checks, detail=(str(e) or type(e).__name__)[:500])
            programmer.close()
            raise

    progress("reset", 0, 1)
    programmer.reset()
    if station.register:
        register_device(
            Registration(alloc.identifier, mac, board.name, man.firmware_version, _dt.datetime.now(_dt.UTC)),
            station.zone,
        )
    line = None
    if console is not None:
        progress("console", 0, 1)
        line = console(alloc.identifier)
    writes = tuple(Write(what, off, len(data)) for what, off, data in plan)
    return Result(
        alloc.identifier,
        mac,
        board.chip,
        alloc.reused,
        fs_mode,
        writes,
        ident.fingerprint,
        time.monotonic() - t0,
        line,
        template.secure,
        previous,
    )


def _touches(plan: list[tuple[str, int, bytes]], board: Board, names: tuple[str, ...]) -> bool:
    """A part of ``plan`` overlaps one of the board's partitions ``names``."""
    regions = [board.partitions[n] for n in names if n in board.partitions]
    return any(off < r.end and r.offset < off + len(data) for _, off, data in plan for r in regions)


def _ca_files(build: Build, template: IdentityTemplate) -> tuple[dict[str, bytes], str | None]:
    """Per-chip files for the CA and the identity's ``ca`` reference. An ``mqtts://`` address needs the broker's
    CA: from the batch image (``ida flash build --ca``: nothing per chip) or from ``template.ca`` (added to each
    chip). Refused: TLS without any CA, a CA that differs from the batch image's, a CA with no mqtts:// use."""
    tls = uses_tls(template.gateways)
    in_build = build.manifest.ca
    if template.ca is not None:
        if not tls:
            raise FlashError("a CA was given but no mqtts:// gateway address: the devices would not use it")
        if in_build is not None and in_build["sha256"] != hashlib.sha256(template.ca).hexdigest():
            raise FlashError(
                f"the CA given differs from the one in the build ({in_build['subject']}, from {in_build['source']})",
                "leave out --ca to use the build's CA, or rebuild with `ida flash build --ca FILE`",
            )
    if not tls:
        return {}, None
    if in_build is not None:
        return {}, CA_NAME
    if template.ca is None:
        raise FlashError(
            "an mqtts:// gateway address needs the broker's CA on the device, and the build has none",
            "rebuild with `ida flash build --ca FILE` (nothing extra per chip), or give --ca FILE",
        )
    return {CA_PATH: template.ca}, CA_NAME


def _runtime_plan(
    programmer: Programmer, build: Build, full: bool, runtime: str | os.PathLike[str] | None
) -> tuple[list[tuple[str, int, bytes]], RuntimeInfo | None]:
    """The runtime parts to write and the runtime they come from: none when the chip has one (unless
    ``full``)."""
    board, man = build.board, build.manifest
    if not full and runtime_present(programmer, board):
        return [], None
    path = runtime or (man.runtime.path if man.runtime else None)
    if path is None:
        why = (
            "--full writes the runtime"
            if full
            else f"the chip has no MicroPython runtime at 0x{board.app.offset:x}"
        )
        raise RuntimeMissing(f"{why}, and none was given")
    expect = man.runtime.sha256 if man.runtime and runtime is None else None
    info, data = load_runtime(board, path, expect, for_build=man)
    bl_present = programmer.read_flash(board.bootloader.offset, 1)[0] == im.ESP_IMAGE_MAGIC
    return runtime_parts(build, info, data, bl_present), info


def _fs_plan(
    board: Board, fs_mode: str, chip_image: bytes, delta: tuple[tuple[int, bytes], ...]
) -> list[tuple[str, int, bytes]]:
    if fs_mode == "delta":
        return [("fs-delta", board.vfs.offset + off, data) for off, data in delta]
    if fs_mode == "full":
        return [("fs", board.vfs.offset, chip_image)]
    return []


def _write(programmer: Programmer, plan: list[tuple[str, int, bytes]], progress: ProgressFn) -> None:
    total = sum(len(d) for _, _, d in plan)
    done = 0
    progress("write", 0, total)
    for what, off, data in plan:
        for i in range(0, len(data), CHUNK):
            chunk = data[i : i + CHUNK]
            programmer.write_flash([(off + i, chunk)])
            done += len(chunk)
            progress(f"write {what}", done, total)


def wait_console(port: str, baud: int, timeout: float = 20.0) -> Callable[[str], str]:
    """A ``console`` callback for :func:`flash_device`: open the port the way ``ida console`` does
    (:func:`tools.support.console.open_port`: DTR/RTS released before the open, so no reset; exclusive), ask ``id``
    every second and return the first line that contains the identifier."""

    def wait(identifier: str) -> str:
        from tools.support.console import PortError, open_port

        from .errors import ConsoleTimeout

        try:
            ser = open_port(port, baud, timeout=0.2)
        except PortError as e:
            raise ConsoleTimeout(f"cannot open the console: {e.args[0]}") from None
        buf = b""
        deadline = time.monotonic() + timeout
        next_ask = 0.0
        want = identifier.encode()
        try:
            while time.monotonic() < deadline:
                if time.monotonic() >= next_ask:
                    ser.write(b"\r\nid\r\n")
                    next_ask = time.monotonic() + 1.0
                buf += ser.read(256)
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    if want in raw:
                        return raw.decode("utf-8", "replace").strip()
                buf = buf[-4096:]
        finally:
            ser.close()
        raise ConsoleTimeout(f"{port}: the device did not report {identifier} within {timeout:.0f} s")

    return wait
