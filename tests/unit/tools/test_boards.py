"""Board files: schema validity, esptool's own chip list and bootloader offsets, flash layout sanity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from esptool.targets import CHIP_DEFS

from tools.support import boards
from tools.support.boards import BoardError

NAMES = boards.list_boards()
SCHEMA = boards.load_schema()


def _raw(name: str) -> dict:
    return json.loads((boards.BOARDS_DIR / f"{name}.json").read_text(encoding="utf-8"))


# chosen from the raw files, so that one broken board fails its tests instead of the whole collection
REAL = [n for n in NAMES if _raw(n).get("simulated") is False]
FOUR_MB = [n for n in REAL if (_raw(n).get("flash") or {}).get("size") == 4 << 20]


def test_expected_boards_present() -> None:
    assert set(NAMES) == {"esp32-devkitc", "esp32-s3-devkitc-1", "esp32-c3-devkitm-1", "unix"}
    assert FOUR_MB == ["esp32-c3-devkitm-1", "esp32-devkitc"]


def test_schema_is_draft_2020_12_and_interpretable() -> None:
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    boards.check_schema(SCHEMA)


@pytest.mark.parametrize("name", NAMES)
def test_board_validates_against_schema(name: str) -> None:
    assert boards.validate(_raw(name), SCHEMA) == []
    board = boards.load_board(name)
    assert board.name == name
    assert board.console.baud == 115200


@pytest.mark.parametrize("name", REAL)
def test_chip_is_in_esptool_list(name: str) -> None:
    assert boards.load_board(name).chip in CHIP_DEFS


@pytest.mark.parametrize("name", REAL)
def test_bootloader_offset_matches_esptool(name: str) -> None:
    board = boards.load_board(name)
    assert board.bootloader.offset == CHIP_DEFS[board.chip].BOOTLOADER_FLASH_OFFSET
    # the bootloader region runs up to the partition table
    assert board.bootloader.end == board.partition_table.offset == 0x8000


@pytest.mark.parametrize("name", REAL)
def test_flash_layout(name: str) -> None:
    board = boards.load_board(name)
    assert board.flash is not None and board.littlefs is not None
    assert board.flash.size_name in CHIP_DEFS[board.chip].FLASH_SIZES
    regions = board.regions()
    for a, b in zip(regions, regions[1:], strict=False):
        assert a.end <= b.offset, f"{a} overlaps {b}"
    assert regions[-1].end <= board.flash.size
    assert board.region("nvs").offset == 0x9000 and board.region("nvs").size == 0x6000
    assert board.region("phy_init").offset == 0xF000 and board.region("phy_init").size == 0x1000
    assert board.app.offset == 0x10000 and board.app.offset % 0x10000 == 0
    assert board.vfs.size % 4096 == 0 and board.vfs.offset % 4096 == 0
    assert board.littlefs.block_count * board.littlefs.block_size == board.vfs.size
    lfs = board.littlefs
    assert (lfs.block_size, lfs.read_size, lfs.prog_size, lfs.lookahead_size, lfs.name_max) == (
        4096,
        32,
        32,
        32,
        255,
    )


@pytest.mark.parametrize("name", FOUR_MB)
def test_vfs_of_4mb_boards(name: str) -> None:
    vfs = boards.load_board(name).vfs
    assert (vfs.offset, vfs.size) == (0x200000, 0x200000)


def test_s3_n8_layout() -> None:
    b = boards.load_board("esp32-s3-devkitc-1")
    assert b.flash is not None and b.flash.size_name == "8MB"
    assert (b.app.offset, b.app.size) == (0x10000, 0x1F0000)
    assert (b.vfs.offset, b.vfs.size) == (0x200000, 0x600000)
    assert b.status_led is not None and b.status_led.kind == "ws2812"


def test_simulated_board() -> None:
    b = boards.load_board("unix")
    assert b.simulated and b.chip == "unix" and b.flash is None and b.button is None
    assert b.partitions == {} and b.console.kind == "stdio" and b.usb_ids == ()
    with pytest.raises(BoardError, match="no flash region 'vfs'"):
        _ = b.vfs


def test_console_usb_ids() -> None:
    ids = [str(u) for u in boards.console_usb_ids()]
    assert ids[0] == "10c4:ea60" and "303a:1001" in ids and len(ids) == len(set(ids))
    assert [str(u) for u in boards.console_usb_ids(include_native=False)] == ["10c4:ea60"]


@pytest.mark.parametrize("name", ["no-such-board", "../unix", "ESP32"])
def test_unknown_board(name: str) -> None:
    with pytest.raises(BoardError, match="board"):
        boards.load_board(name)


def _broken(tmp_path: Path, name: str, edit) -> Path:  # type: ignore[no-untyped-def]
    shutil.copy(boards.BOARDS_DIR / "schema.json", tmp_path / "schema.json")
    data = _raw(name)
    edit(data)
    (tmp_path / f"{name}.json").write_text(json.dumps(data), encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda d: d.pop("chip"), "missing required field 'chip'"),
        (lambda d: d.update(extra=1), "unknown field 'extra'"),
        (lambda d: d["partitions"]["vfs"].update(size=0x1FF000 + 1), "not a multiple of 4096"),
        (lambda d: d["partitions"]["vfs"].update(offset=0x1F0000), "overlaps"),
        (lambda d: d["partitions"]["vfs"].update(size=0x300000), "past the flash end"),
        (lambda d: d["littlefs"].update(block_count=511), "must be 512"),
        (lambda d: d["littlefs"].update(block_size=512), "must be 4096"),
        (lambda d: d.update(chip="unix"), "must not match"),
        (lambda d: d["console"].update(usb_ids=["10C4:EA60"]), "does not match"),
        (lambda d: d["console"].update(usb_ids=[]), "at least 1"),
        (lambda d: d.update(status_led={"kind": "gpio", "pin": 2, "active": None}), "must be one of"),
        (lambda d: d["flash"].update(size_name="8MB"), "is not 8MB"),
        (lambda d: d.update(name="other"), "differs from the file name"),
    ],
)
def test_invalid_board_rejected(tmp_path: Path, edit, reason: str) -> None:  # type: ignore[no-untyped-def]
    d = _broken(tmp_path, "esp32-devkitc", edit)
    with pytest.raises(BoardError, match="not a valid board file") as exc:
        boards.load_board("esp32-devkitc", d)
    assert reason in str(exc.value)


def test_simulated_board_must_not_have_flash(tmp_path: Path) -> None:
    d = _broken(tmp_path, "unix", lambda b: b.update(flash=_raw("esp32-devkitc")["flash"]))
    with pytest.raises(BoardError, match=r"\$\.flash: expected null"):
        boards.load_board("unix", d)


def test_schema_keyword_not_interpreted_is_an_error() -> None:
    with pytest.raises(BoardError, match="does not interpret"):
        boards.check_schema({"type": "object", "properties": {"x": {"format": "uri"}}})
