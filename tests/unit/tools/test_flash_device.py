"""`ida flash device` / `ida flash batch` against a simulated chip: what is written, verified, recorded.

The per-chip write on a chip that carries the batch image is measured here: 1 block (4096 bytes) for a
typical identity, at most 2 for a long one (test_flash_build.py), versus 2 MiB for the whole filesystem.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from tests.support.flashutil import firmware_tree, standin_runtime
from tools.commands.flash import builder as fb
from tools.commands.flash import image as im
from tools.commands.flash.batch import bar, big, run_batch
from tools.commands.flash.errors import (
    FlashTooSmall,
    NoChip,
    PortBusy,
    PortMissing,
    RuntimeMissing,
    VerifyFailed,
    WriteFailed,
    WrongChip,
)
from tools.commands.flash.identity import IDENTITY_PATH, parse_identity
from tools.commands.flash.keystore import Keystore
from tools.commands.flash.ledger import Ledger, pattern_identifiers
from tools.commands.flash.programmer import SimulatedChip
from tools.commands.flash.provision import IdentityTemplate, Station, flash_device

BOARD = "esp32-devkitc"
TEMPLATE = IdentityTemplate(("coap://192.168.4.1:5683",), "coap")
VFS = 0x200000
VFS_SIZE = 0x200000


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("devbuild")
    fw, _ = firmware_tree(tmp)
    runtime, _ = standin_runtime(BOARD, tmp)
    fb.build(BOARD, tmp / "out", runtime=runtime, firmware_dir=fw)
    return tmp / "out"


@pytest.fixture
def built(build_dir: Path) -> fb.Build:
    return fb.load_build(build_dir, BOARD)


@pytest.fixture
def station(tmp_path: Path) -> Station:
    with Ledger.in_dir(tmp_path / "data") as led:
        led.add_pool(pattern_identifiers("88.123.99", "PUMP-{n:06d}", 1, 20), "pumps")
    return Station(tmp_path / "data", operator="alice", station="line-1")


def factory_chip(built: fb.Build, **kw: object) -> SimulatedChip:
    """A chip pre-loaded with the batch's factory.bin (runtime + batch filesystem), as from a gang programmer."""
    chip = SimulatedChip(**kw)  # type: ignore[arg-type]
    factory = (built.directory / fb.FACTORY_IMAGE).read_bytes()
    off = built.manifest.factory_image["offset"]  # type: ignore[index]
    chip.flash[off : off + len(factory)] = factory
    return chip


def devices(station: Station) -> list:
    with station.ledger() as led:
        return led.devices()


def test_chip_with_batch_image_gets_only_the_identity_blocks(built: fb.Build, station: Station) -> None:
    chip = factory_chip(built)
    r = flash_device(chip, built, station, TEMPLATE)
    assert r.identifier == "88.123.99/PUMP-000001" and r.mac == chip.mac and not r.reused
    assert r.fs_mode == "delta"
    assert [w.what for w in r.writes] == ["fs-delta"]
    # the measured per-chip write: one 4 KiB block instead of the 2 MiB filesystem
    assert r.bytes_written == chip.bytes_written == 4096, r.writes
    assert all(VFS <= off < VFS + VFS_SIZE for off, _ in chip.written)
    print(
        f"\nper-chip write on a chip with the batch image: {r.blocks_written} block(s), {r.bytes_written} bytes"
    )
    assert chip.resets == 1
    # the chip now holds the identity, with the key from the keystore
    fs = im.read_files(built.params, bytes(chip.flash[VFS : VFS + VFS_SIZE]))
    ident = parse_identity(fs[IDENTITY_PATH])
    assert ident.identifier == r.identifier and ident.gateways == TEMPLATE.gateways
    assert ident.key == Keystore.in_dir(station.data_dir).get(r.identifier)
    assert ident.fingerprint == r.key_fingerprint
    (dev,) = devices(station)
    assert (dev.identifier, dev.mac, dev.state, dev.operator, dev.station) == (
        r.identifier,
        chip.mac,
        "verified",
        "alice",
        "line-1",
    )
    assert dev.fs_sha256 == built.manifest.fs_image["sha256"]
    assert dev.image_sha256 == im.sha256(bytes(chip.flash[VFS : VFS + VFS_SIZE]))
    assert dev.runtime_sha256 == built.manifest.runtime.sha256  # type: ignore[union-attr]
    assert (
        dev.key_fingerprint == r.key_fingerprint and dev.firmware_version == built.manifest.firmware_version
    )


def test_reflash_same_chip_keeps_identifier_and_writes_nothing(built: fb.Build, station: Station) -> None:
    chip = factory_chip(built)
    first = flash_device(chip, built, station, TEMPLATE)
    chip.written.clear()
    again = flash_device(chip, built, station, TEMPLATE)
    assert again.identifier == first.identifier and again.reused
    assert again.fs_mode == "unchanged" and again.bytes_written == 0 and chip.written == []
    assert again.key_fingerprint == first.key_fingerprint  # same key: the gateway's copy stays valid
    assert len(devices(station)) == 1


def test_blank_chip_gets_runtime_and_whole_filesystem(built: fb.Build, station: Station) -> None:
    chip = SimulatedChip()
    r = flash_device(chip, built, station, TEMPLATE)
    assert [(w.what, w.offset) for w in r.writes] == [("runtime", 0x1000), ("fs", VFS)]
    runtime = Path(built.manifest.runtime.path).read_bytes()  # type: ignore[union-attr]
    assert bytes(chip.flash[0x1000 : 0x1000 + len(runtime)]) == runtime
    assert (
        chip.flash[0x1000] == chip.flash[0x10000] == 0xE9 and bytes(chip.flash[0x8000:0x8002]) == im.PT_MAGIC
    )
    assert r.fs_mode == "full" and devices(station)[0].state == "verified"


def test_blank_chip_without_runtime_is_refused_before_an_identifier_is_spent(
    tmp_path: Path, station: Station
) -> None:
    fw, _ = firmware_tree(tmp_path)
    fb.build(BOARD, tmp_path / "noruntime", firmware_dir=fw)
    b = fb.load_build(tmp_path / "noruntime")
    with pytest.raises(RuntimeMissing, match="no MicroPython runtime at 0x10000"):
        flash_device(SimulatedChip(), b, station, TEMPLATE)
    assert devices(station) == []
    with pytest.raises(RuntimeMissing, match="--full"):
        flash_device(factory_chip_from(b), b, station, TEMPLATE, full=True)


def factory_chip_from(b: fb.Build) -> SimulatedChip:
    chip = SimulatedChip()
    chip.flash[0x1000] = chip.flash[0x10000] = 0xE9
    chip.flash[0x8000:0x8002] = im.PT_MAGIC
    chip.flash[VFS : VFS + VFS_SIZE] = b.fs_image
    return chip


def test_full_rewrites_runtime_and_filesystem(built: fb.Build, station: Station) -> None:
    chip = factory_chip(built)
    r = flash_device(chip, built, station, TEMPLATE, full=True)
    assert [w.what for w in r.writes] == ["runtime", "fs"] and r.bytes_written > VFS_SIZE


def test_wrong_chip_is_refused_naming_both(built: fb.Build, station: Station) -> None:
    with pytest.raises(WrongChip) as e:
        flash_device(SimulatedChip(chip="esp32c3"), built, station, TEMPLATE)
    assert "esp32c3" in str(e.value) and "esp32-devkitc" in str(e.value) and "needs esp32" in str(e.value)
    assert devices(station) == []


def test_small_flash_is_refused(built: fb.Build, station: Station) -> None:
    with pytest.raises(FlashTooSmall, match="2 MB"):
        flash_device(SimulatedChip(flash_size=2 << 20), built, station, TEMPLATE)


@pytest.mark.parametrize("switch, error", [("busy", PortBusy), ("absent", PortMissing), ("silent", NoChip)])
def test_port_problems_touch_nothing(built: fb.Build, station: Station, switch: str, error: type) -> None:
    chip = SimulatedChip(**{switch: True})  # type: ignore[arg-type]
    with pytest.raises(error):
        flash_device(chip, built, station, TEMPLATE)
    assert devices(station) == [] and chip.written == []


def test_verify_failure_is_reported_and_keeps_the_identifier_bound(built: fb.Build, station: Station) -> None:
    chip = factory_chip(built, flip_after_write=VFS + 4096 + 100)
    with pytest.raises(VerifyFailed, match="0x201000"):
        flash_device(chip, built, station, TEMPLATE)
    (dev,) = devices(station)
    assert dev.state == "failed" and dev.mac == chip.mac and "verify failed" in (dev.detail or "")
    assert chip.resets == 0  # not reset into a half-good image
    # the chip is fixed (re-seated) and flashed again: same identifier, now verified
    chip.flip_after_write = None
    r = flash_device(chip, built, station, TEMPLATE)
    assert r.identifier == dev.identifier and r.reused
    assert devices(station)[0].state == "verified"


def test_write_failure_is_recorded(built: fb.Build, station: Station) -> None:
    chip = SimulatedChip(fail_after_writes=1)  # the runtime goes in, the filesystem does not
    with pytest.raises(WriteFailed):
        flash_device(chip, built, station, TEMPLATE)
    (dev,) = devices(station)
    assert dev.state == "failed"
    with station.ledger() as led:
        assert [e["result"] for e in led.events()] == ["allocated", "failed"]


def test_explicit_identifier_and_console_callback(built: fb.Build, station: Station) -> None:
    seen = []

    def console(identifier: str) -> str:
        seen.append(identifier)
        return f"id {identifier}"

    r = flash_device(
        factory_chip(built), built, station, TEMPLATE, identifier="88.123.99/SPARE-7", console=console
    )
    assert (
        r.identifier == "88.123.99/SPARE-7"
        and seen == ["88.123.99/SPARE-7"]
        and r.console == "id 88.123.99/SPARE-7"
    )


def test_registered_in_the_local_zone(built: fb.Build, station: Station) -> None:
    pytest.importorskip("gateway.zone")
    from gateway.zone import Zone

    r = flash_device(factory_chip(built), built, station, TEMPLATE)
    rec = Zone.load(station.zone).get(r.identifier)
    assert rec is not None
    values = {v.type: v.text() for v in rec.values}
    assert values["MAC"] == r.mac and values["BOARD"] == BOARD
    assert values["FW_VERSION"] == built.manifest.firmware_version and (values["PRODUCED"] or "").endswith(
        "Z"
    )
    # the key is nowhere in the zone
    key = Keystore.in_dir(station.data_dir).get(r.identifier)
    assert key is not None and key.hex() not in station.zone.read_text()


def test_batch_flashes_chips_as_they_appear(built: fb.Build, station: Station) -> None:
    chips = {
        "/dev/ttyUSB0": factory_chip(built, mac="24:0a:c4:00:00:10"),
        "/dev/ttyUSB1": SimulatedChip(chip="esp32s3", mac="24:0a:c4:00:00:11"),
        "/dev/ttyUSB2": factory_chip(built, mac="24:0a:c4:00:00:12"),
    }
    # what list_ports would show, poll by poll: nothing, one chip, two, the first one unplugged, ...
    timeline = iter(
        [[], ["/dev/ttyUSB0"], ["/dev/ttyUSB0", "/dev/ttyUSB1"], ["/dev/ttyUSB1", "/dev/ttyUSB2"]]
    )
    last: list[str] = []

    def ports() -> list[str]:
        nonlocal last
        last = next(timeline, last)
        return last

    out = io.StringIO()
    summary = run_batch(
        built,
        station,
        TEMPLATE,
        ports=ports,
        programmer=chips.__getitem__,
        count=3,
        out=out,
        sleep=lambda s: None,
    )
    text = out.getvalue()
    assert [r.mac for r in summary.passed] == ["24:0a:c4:00:00:10", "24:0a:c4:00:00:12"]
    assert [p for p, _ in summary.failed] == ["/dev/ttyUSB1"] and "esp32s3" in summary.failed[0][1]
    assert big("PASS") in text and big("FAIL") in text
    assert "[##############################] 100%" in text
    assert "batch: 3 chip(s), 2 passed, 1 failed" in text
    assert [d.identifier for d in devices(station)] == ["88.123.99/PUMP-000001", "88.123.99/PUMP-000002"]


def test_batch_stops_on_ctrl_c_with_a_summary(built: fb.Build, station: Station) -> None:
    def ports() -> list[str]:
        raise KeyboardInterrupt

    out = io.StringIO()
    summary = run_batch(built, station, TEMPLATE, ports=ports, out=out)
    assert summary.passed == [] and "stopped" in out.getvalue() and "0 chip(s)" in out.getvalue()


def test_progress_bar_and_banner() -> None:
    assert bar(0, 10, 10) == "[..........]   0%"
    assert bar(5, 10, 10) == "[#####.....]  50%"
    assert big("PASS").count("\n") == 4


def test_cli_device_reports_errors_without_traceback(
    built: fb.Build, station: Station, tmp_path: Path
) -> None:
    import argparse

    from tools.commands.flash import cli
    from tools.errors import CliError

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(
        [
            "--data-dir",
            str(station.data_dir),
            "device",
            "--port",
            str(tmp_path / "nope"),
            "--board",
            BOARD,
            "--build",
            str(built.directory),
            "--next",
            "--gateway",
            "coap://192.168.4.1",
        ]
    )
    with pytest.raises(CliError) as e:
        cli.run(args)
    assert e.value.exit_code == 1 and "no such serial port" in str(e.value)
    args.gateway = []
    with pytest.raises(CliError, match="--gateway"):
        cli.run(args)


def test_manifest_records_runtime(built: fb.Build) -> None:
    rt = built.manifest.runtime
    assert rt is not None and rt.kind == "merged" and rt.offset == 0x1000 and rt.version == "v1.26.1"
    doc = json.loads((built.directory / fb.MANIFEST).read_text())
    assert doc["runtime"]["sha256"] == rt.sha256 and os.path.isabs(doc["runtime"]["path"])


def test_espressif_ports_are_the_console_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch mode finds ports with the console tool's find_ports: the board's VID:PID only, sorted."""
    from types import SimpleNamespace

    from serial.tools import list_ports

    from tools.commands.flash.batch import espressif_ports
    from tools.support.boards import UsbId

    seen = [
        SimpleNamespace(device=d, vid=v, pid=p, description="", serial_number=None)
        for d, v, p in (
            ("/dev/ttyUSB1", 0x10C4, 0xEA60),
            ("/dev/ttyACM0", 0x303A, 0x1001),
            ("/dev/ttyUSB0", 0x10C4, 0xEA60),
            ("/dev/ttyS0", None, None),
        )
    ]
    monkeypatch.setattr(list_ports, "comports", lambda: seen)
    assert espressif_ports([UsbId(0x10C4, 0xEA60)]) == ["/dev/ttyUSB0", "/dev/ttyUSB1"]
    assert espressif_ports([UsbId(0x10C4, 0xEA60), UsbId(0x303A, 0x1001)]) == [
        "/dev/ttyACM0",
        "/dev/ttyUSB0",
        "/dev/ttyUSB1",
    ]
    assert espressif_ports([]) == []


def test_wait_console_finds_the_identifier_on_a_pty() -> None:
    """The real console wait (pyserial) against a pseudo-terminal playing the device: it asks `id` and
    returns the line with the identifier; a silent device times out with ConsoleTimeout."""
    import pty
    import threading

    from tools.commands.flash.errors import ConsoleTimeout
    from tools.commands.flash.provision import wait_console

    master, slave = pty.openpty()
    port = os.ttyname(slave)
    stop = threading.Event()

    def device() -> None:
        os.write(master, b"I app boot=1 noise\r\n\x00\xff garbage\r\n")
        buf = b""
        while not stop.is_set():
            buf += os.read(master, 256)
            if b"id\r" in buf:
                os.write(master, b"id: 88.123.99/PUMP-000009\r\ntransport: coap\r\n")
                return

    t = threading.Thread(target=device, daemon=True)
    t.start()
    try:
        assert wait_console(port, 115200, timeout=10)("88.123.99/PUMP-000009") == "id: 88.123.99/PUMP-000009"
        with pytest.raises(ConsoleTimeout, match="did not report"):
            wait_console(port, 115200, timeout=1.2)("88.123.99/PUMP-000010")
        # opened like `ida console` does (tools.support.console.open_port): exclusively, so a port another program
        # holds is a clear error, not a garbled session
        from tools.support.console import open_port

        held = open_port(port)
        try:
            with pytest.raises(ConsoleTimeout, match="cannot open the console: .*busy"):
                wait_console(port, 115200, timeout=1)("88.123.99/PUMP-000009")
        finally:
            held.close()
    finally:
        stop.set()
        os.close(master)
        os.close(slave)
