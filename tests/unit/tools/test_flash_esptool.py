"""What `ida flash` writes, checked with esptool's own tooling, for every board with flash.

Stand-ins (no MicroPython binaries are downloaded): bootloader and app are real ESP images made by
``esptool elf2image`` from a tiny ELF (the app led by an ``esp_app_desc_t``, as MicroPython's is); the runtime
is their ``esptool merge-bin`` with our partition table, as MicroPython's build makes ``firmware.bin``. Then:

* ``esptool merge-bin --format hex`` of bootloader / partition table / app / fs.bin at the board's offsets,
  read back by ``esptool image-info`` (the installed command): every piece is where the board file says, the
  images are valid for the chip, the app's version is the one ``ida flash build`` recorded;
* the factory.bin ``ida flash build`` writes equals esptool's raw merge of those pieces, byte for byte;
* the ``esptool write-flash`` command ``ida flash build`` prints is accepted by esptool's own argument parser
  (same address/file pairs as ``merge-bin``) and lays out the same flash;
* the real :class:`EsptoolProgrammer` against pseudo-terminals: a busy port, a missing port, and a port where
  no chip answers give our typed errors.
"""

from __future__ import annotations

import os
import pty
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import serial

from tests.support.flashutil import esptool, firmware_tree, standin_runtime
from tools.commands.flash import builder as fb
from tools.commands.flash import image as im
from tools.commands.flash.errors import NoChip, PortBusy, PortMissing
from tools.commands.flash.programmer import EsptoolProgrammer
from tools.support.boards import load_board

BOARDS = ["esp32-devkitc", "esp32-s3-devkitc-1", "esp32-c3-devkitm-1"]
ESPTOOL = shutil.which("esptool", path=str(Path(sys.executable).parent)) or "esptool"


@pytest.fixture(scope="module")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return firmware_tree(tmp_path_factory.mktemp("fw"))[0]


@pytest.mark.parametrize("name", BOARDS)
def test_factory_image_checked_by_esptool(name: str, tmp_path: Path, firmware: Path) -> None:
    board = load_board(name)
    assert board.flash is not None
    runtime, parts = standin_runtime(name, tmp_path)
    manifest = fb.build(name, tmp_path / "out", runtime=runtime, firmware_dir=firmware)
    b = fb.load_build(tmp_path / "out", name)
    assert manifest.runtime is not None and manifest.runtime.kind == "merged"
    assert manifest.runtime.offset == board.bootloader.offset and manifest.runtime.version == "v1.26.1"

    pieces = [
        (board.bootloader.offset, tmp_path / f"{name}-bootloader.bin"),
        (board.partition_table.offset, tmp_path / f"{name}-partition-table.bin"),
        (board.app.offset, tmp_path / f"{name}-app.bin"),
        (board.vfs.offset, tmp_path / "out" / fb.FS_IMAGE),
    ]
    pairs = [a for off, path in pieces for a in (hex(off), str(path))]

    # 1. merge as Intel HEX (keeps the offsets) and inspect it with the esptool command; of fs.bin only its
    #    superblock pair goes in (Intel HEX of megabytes is slow to write and read; step 2 covers all of it)
    head = tmp_path / "fs-head.bin"
    head.write_bytes(b.fs_image[:8192])
    hex_pairs = pairs[:-1] + [str(head)]
    esptool(
        "--chip", board.chip, "merge-bin", "--format", "hex", "-o", str(tmp_path / "factory.hex"), *hex_pairs
    )
    proc = subprocess.run(
        [ESPTOOL, "image-info", str(tmp_path / "factory.hex")], capture_output=True, text=True, timeout=60
    )
    info = proc.stdout + proc.stderr
    assert proc.returncode == 0, info
    offsets = [int(o, 16) for o in re.findall(r"Processing file \d+/4, offset: (0x[0-9a-f]+)", info)]
    assert offsets == [off for off, _ in pieces]
    chip_names = {"esp32": "ESP32", "esp32s3": "ESP32-S3", "esp32c3": "ESP32-C3"}
    assert f"Detected image type: {chip_names[board.chip]}" in info
    assert info.count("Checksum:") == 2 and "(invalid)" not in info  # bootloader and app are valid images
    assert "App version: v1.26.1" in info
    assert info.count("Probably not a valid firmware image") == 2  # the partition table and the filesystem

    # 2. factory.bin from `ida flash build` == esptool's raw merge of the pieces at the board offsets
    esptool(
        "--chip",
        board.chip,
        "merge-bin",
        "-o",
        str(tmp_path / "raw.bin"),
        "--target-offset",
        hex(board.bootloader.offset),
        *pairs,
    )
    factory = (tmp_path / "out" / fb.FACTORY_IMAGE).read_bytes()
    assert factory == (tmp_path / "raw.bin").read_bytes()
    base = board.bootloader.offset
    table = im.decode_partition_table(
        factory[board.partition_table.offset - base :][: board.partition_table.size]
    )
    assert im.check_table_against_board(table, board) == []
    assert {e.name: (e.offset, e.size) for e in table}["vfs"] == (board.vfs.offset, board.vfs.size)
    fs = factory[board.vfs.offset - base :]
    assert len(fs) == board.vfs.size and im.sha256(fs) == manifest.fs_image["sha256"]
    assert im.parse_image_header(factory[board.app.offset - base :]).chip_id == im.image_chip_id(board.chip)  # type: ignore[union-attr]

    # 3. the write-flash command `ida flash build` prints: esptool's parser takes its pairs, same layout
    cmd = fb.esptool_command(b, port="/dev/ttyUSB0")
    assert cmd[:3] == ["esptool", "--chip", board.chip] and "write-flash" in cmd
    args = cmd[cmd.index("write-flash") + 1 :]
    assert [int(a, 16) for a in args[::2]] == [board.bootloader.offset, board.vfs.offset]
    esptool(
        "--chip",
        board.chip,
        "merge-bin",
        "-o",
        str(tmp_path / "cmd.bin"),
        "--target-offset",
        hex(base),
        *args,
    )
    assert (tmp_path / "cmd.bin").read_bytes() == factory


def test_app_only_runtime_goes_with_the_partition_table(tmp_path: Path, firmware: Path) -> None:
    name = "esp32-c3-devkitm-1"
    board = load_board(name)
    _, parts = standin_runtime(name, tmp_path)
    app = tmp_path / "app-only.bin"
    app.write_bytes(parts["app"])
    fb.build(name, tmp_path / "out", runtime=app, firmware_dir=firmware)
    b = fb.load_build(tmp_path / "out")
    assert b.manifest.runtime is not None and b.manifest.runtime.kind == "app"
    assert b.manifest.factory_image is None
    pairs = fb.flash_args(b)
    assert [off for off, _ in pairs] == [board.partition_table.offset, board.app.offset, board.vfs.offset]
    # the generated table is the board's, as esptool would write it
    table = (tmp_path / "out" / fb.PARTITION_TABLE).read_bytes()
    assert table == parts["partition-table"] and len(table) == 0xC00


def test_runtime_for_another_chip_is_refused(tmp_path: Path) -> None:
    runtime, _ = standin_runtime("esp32-s3-devkitc-1", tmp_path)
    with pytest.raises(fb.BuildError, match="chip id 9"):
        fb.inspect_runtime(load_board("esp32-c3-devkitm-1"), runtime.read_bytes())
    with pytest.raises(fb.BuildError, match="not an ESP image"):
        fb.inspect_runtime(load_board("esp32-devkitc"), b"\xff" * 4096)


def test_partition_table_binary_format() -> None:
    # gen_esp32part's format: 32-byte entries <2sBBII16sI>, MD5 entry 0xEBEB, 0xFF to 0xC00
    entries = [
        im.PartitionEntry("nvs", 1, 2, 0x9000, 0x6000),
        im.PartitionEntry("factory", 0, 0, 0x10000, 0x1F0000),
    ]
    raw = im.encode_partition_table(entries)
    assert raw[:32] == bytes.fromhex("aa50 01 02 00900000 00600000") + b"nvs".ljust(16, b"\0") + b"\0" * 4
    assert raw[64:66] == b"\xeb\xeb" and raw[66:80] == b"\xff" * 14
    assert raw[96:] == b"\xff" * (0xC00 - 96)
    assert im.decode_partition_table(raw) == entries
    bad = bytearray(raw)
    bad[10] ^= 1
    with pytest.raises(fb.BuildError, match="MD5"):
        im.decode_partition_table(bytes(bad))


# --- the real esptool path, without a chip -----------------------------------------------------------------------


@pytest.fixture
def pty_port() -> Iterator[tuple[int, str]]:
    master, slave = pty.openpty()
    yield master, os.ttyname(slave)
    os.close(master)
    os.close(slave)


def test_esptool_programmer_busy_port(pty_port: tuple[int, str]) -> None:
    _, name = pty_port
    holder = serial.Serial(name, exclusive=True)  # e.g. a console left open
    try:
        with pytest.raises(PortBusy, match="busy"):
            EsptoolProgrammer(name, connect_attempts=1).detect()
    finally:
        holder.close()


def test_esptool_programmer_missing_port(tmp_path: Path) -> None:
    with pytest.raises(PortMissing, match="no such serial port"):
        EsptoolProgrammer(str(tmp_path / "ttyUSB9"), connect_attempts=1).detect()


def test_esptool_programmer_no_chip_answering(pty_port: tuple[int, str]) -> None:
    _, name = pty_port
    with pytest.raises(NoChip, match="No serial data received"):
        EsptoolProgrammer(name, connect_attempts=1, before="no-reset").detect()


def test_espressif_ports_filter_by_usb_id(monkeypatch: pytest.MonkeyPatch) -> None:
    from serial.tools import list_ports, list_ports_common

    from tools.commands.flash.batch import espressif_ports

    def port(dev: str, vid: int | None, pid: int | None) -> list_ports_common.ListPortInfo:
        p = list_ports_common.ListPortInfo(dev, skip_link_detection=True)
        p.vid, p.pid = vid, pid
        return p

    fake = [
        port("/dev/ttyUSB1", 0x10C4, 0xEA60),
        port("/dev/ttyACM0", 0x303A, 0x1001),
        port("/dev/ttyS0", None, None),
        port("/dev/ttyUSB0", 0x0403, 0x6001),
    ]
    monkeypatch.setattr(list_ports, "comports", lambda: fake)
    assert espressif_ports(load_board("esp32-devkitc").usb_ids) == ["/dev/ttyUSB1"]
    assert espressif_ports(load_board("esp32-s3-devkitc-1").usb_ids) == ["/dev/ttyACM0", "/dev/ttyUSB1"]
