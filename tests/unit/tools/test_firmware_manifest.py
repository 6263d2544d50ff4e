"""firmware/manifest.py and the ESP-IDF board definitions under firmware/boards/.

The manifest is run by MicroPython's own manifest reader (tools/manifestfile.py of the source in
third_party/micropython32, as the port builds run it) for both ports it serves: the unix port (the tests' 32-bit
build: its standard variant's modules kept) and the esp32 port (a stand-in ports/esp32 whose boards/manifest.py
freezes one module: that manifest is kept). Nothing here can build ESP-IDF, so the board definitions are checked
against boards/*.json: one per ESP32 board file, including the stock MicroPython board the file names and setting
the manifest."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.mp import mp32
from tools.commands.flash.builder import firmware_sources
from tools.harness import mp32 as build32
from tools.support.boards import list_boards, load_board

ROOT = Path(__file__).resolve().parents[3]
FIRMWARE = ROOT / "firmware"
# IDF_TARGET of MicroPython's stock boards (ports/esp32/boards/<board>/mpconfigboard.cmake; esp32 is the default)
STOCK_TARGET = {"ESP32_GENERIC": "esp32", "ESP32_GENERIC_S3": "esp32s3", "ESP32_GENERIC_C3": "esp32c3"}


@pytest.fixture(scope="module")
def manifestfile() -> ModuleType:
    mp32(frozen=False)  # the build unpacks the source next to the program
    src = build32.out_dir() / "src" / "tools" / "manifestfile.py"
    spec = importlib.util.spec_from_file_location("manifestfile", src)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _frozen(manifestfile: ModuleType, port_dir: Path) -> dict[str, Path]:
    src = build32.out_dir() / "src"
    m = manifestfile.ManifestFile(
        manifestfile.MODE_FREEZE,
        {"PORT_DIR": str(port_dir), "MPY_DIR": str(src), "MPY_LIB_DIR": str(src / "lib" / "micropython-lib")},
    )
    m.execute(str(FIRMWARE / "manifest.py"))
    return {f.target_path: Path(f.full_path) for f in m.files()}


def _firmware() -> set[str]:
    return {p.as_posix() for p in firmware_sources()}


def test_manifest_on_the_unix_port_keeps_its_standard_variant(manifestfile: ModuleType) -> None:
    files = _frozen(manifestfile, build32.out_dir() / "src" / "ports" / "unix")
    ours = {t for t, p in files.items() if FIRMWARE in p.parents}
    assert ours == _firmware(), "the whole carrier package and main.py, nothing else of firmware/"
    assert all(files[t] == FIRMWARE / t for t in ours)
    assert {"ssl.py", "asyncio/core.py", "mip/__init__.py"} <= set(files), (
        "the standard variant's own modules"
    )


def test_manifest_on_the_esp32_port_keeps_its_board_manifest(
    manifestfile: ModuleType, tmp_path: Path
) -> None:
    port = tmp_path / "ports" / "esp32"
    (port / "boards").mkdir(parents=True)
    (port / "modules").mkdir()
    (port / "modules" / "_boot.py").write_text("import vfs\n")
    (port / "boards" / "manifest.py").write_text('freeze("$(PORT_DIR)/modules")\n')
    files = _frozen(manifestfile, port)
    assert set(files) == _firmware() | {"_boot.py"}
    (port / "boards" / "manifest.py").write_text('include("$(PORT_DIR)/missing/manifest.py")\n')
    with pytest.raises(manifestfile.ManifestFileError, match="missing/manifest.py"):
        _frozen(manifestfile, port)  # an error inside the port's manifest is not taken for "not this port"


def test_manifest_needs_a_port_manifest(manifestfile: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(manifestfile.ManifestFileError, match="no port manifest"):
        _frozen(manifestfile, tmp_path)


def _esp32_boards() -> list[str]:
    return [n for n in list_boards() if load_board(n).micropython.port == "esp32"]


def test_one_board_definition_per_esp32_board_file() -> None:
    defined = {p.name for p in (FIRMWARE / "boards").iterdir() if p.is_dir()}
    assert defined == set(_esp32_boards()), (
        "firmware/boards/<name>/ for each ESP32 board in boards/, no other"
    )
    assert "unix" not in defined


@pytest.mark.parametrize("name", _esp32_boards())
def test_board_definition_includes_the_stock_board_and_sets_the_manifest(name: str) -> None:
    board = load_board(name)
    stock = board.micropython.board
    assert stock in STOCK_TARGET and STOCK_TARGET[stock] == board.chip, (stock, board.chip)
    d = FIRMWARE / "boards" / name
    cmake = d.joinpath("mpconfigboard.cmake").read_text()
    code = [ln for ln in cmake.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert code == [
        f"include(boards/{stock}/mpconfigboard.cmake)",
        "set(MICROPY_FROZEN_MANIFEST ${MICROPY_BOARD_DIR}/../../manifest.py)",
    ]
    assert (d / "../../manifest.py").resolve() == FIRMWARE / "manifest.py"
    assert f"make BOARD_DIR=<ida-edge>/firmware/boards/{name}" in cmake
    header = d.joinpath("mpconfigboard.h").read_text()
    assert re.findall(r"^#include \"(.+)\"$", header, re.M) == [f"boards/{stock}/mpconfigboard.h"]
    assert sorted(p.name for p in d.iterdir()) == ["mpconfigboard.cmake", "mpconfigboard.h"]
