"""`ida flash build --runtime`: a stock MicroPython runtime told from one with the firmware frozen in, from the
image bytes. The runtime images stand in for real ESP32 ones: merged esp32-devkitc images whose app's flash data
carries the bytes of the two real 32-bit MicroPython programs of tools/harness/mp32.py (stock, and built with
firmware/manifest.py), so what is detected is their real frozen-module table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.flashutil import standin_runtime
from tests.support.mp import mp32
from tools.commands.flash import builder as fb
from tools.commands.flash import image as im
from tools.commands.flash.errors import BuildError
from tools.commands.flash.frozen import frozen_firmware, frozen_names

BOARD = "esp32-devkitc"
ROOT = Path(__file__).resolve().parents[3]


def _sources() -> list[str]:
    return [p.as_posix() for p in fb.firmware_sources()]


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for kind in ("stock", "frozen"):
        program = Path(mp32(frozen=kind == "frozen")).read_bytes()
        out[kind], _ = standin_runtime(BOARD, tmp_path_factory.mktemp(kind), "v1.29.0", data=program)
    return out


def test_the_frozen_module_table_of_the_real_programs() -> None:
    stock = frozen_names(Path(mp32(frozen=False)).read_bytes())
    frozen = frozen_names(Path(mp32(frozen=True)).read_bytes())
    assert "asyncio/core.py" in stock and "ssl.py" in stock, stock  # the port's own manifest
    assert not any(n.startswith("carrier/") for n in stock) and "main.py" not in stock
    assert set(stock) < set(frozen), "the frozen build keeps the port's own modules"
    assert set(frozen) - set(stock) == set(_sources()), "every firmware .py frozen in, nothing else"
    assert frozen_names(b"\0boot.py\0" + bytes(64)) == () and frozen_names(b"") == ()


def test_frozen_firmware_must_be_the_trees_package() -> None:
    sources = _sources()
    names = frozen_names(Path(mp32(frozen=True)).read_bytes())
    assert frozen_firmware(names, sources) == tuple(sorted(sources))
    assert frozen_firmware(frozen_names(Path(mp32(frozen=False)).read_bytes()), sources) == ()
    package = [s for s in sources if "/" in s]
    older = [n for n in names if n != package[-1]]  # a runtime frozen before a module was added
    with pytest.raises(BuildError, match=rf"not in the runtime: {package[-1]}.*rebuild the runtime"):
        frozen_firmware(older, sources)
    with pytest.raises(BuildError, match="not in the firmware: carrier/gone.py"):
        frozen_firmware([*names, "carrier/gone.py"], sources)
    assert frozen_firmware([n for n in names if n != "main.py"], sources) == tuple(
        s for s in sorted(sources) if s != "main.py"
    ), "a runtime may freeze the package and leave main.py to the filesystem"


def test_stock_runtime_keeps_the_mpy_layout(runtimes: dict[str, Path], tmp_path: Path) -> None:
    m = fb.build(BOARD, tmp_path / "out", runtime=runtimes["stock"])
    assert m.runtime is not None and m.runtime.kind == "merged" and "asyncio/core.py" in m.runtime.frozen
    assert m.frozen == ()
    paths = {f.path for f in m.files}
    assert "/main.py" in paths and "/board.json" in paths
    assert {p for p in paths if p.endswith(".mpy")} == {
        "/" + s[:-3] + ".mpy" for s in _sources() if s != "main.py"
    }
    assert fb.load_build(tmp_path / "out").manifest == m, "the manifest reads back with the runtime's table"


def test_frozen_runtime_leaves_only_board_and_ca_on_the_filesystem(
    runtimes: dict[str, Path], tmp_path: Path
) -> None:
    m = fb.build(BOARD, tmp_path / "out", runtime=runtimes["frozen"])
    assert m.frozen == tuple(sorted(_sources()))
    assert [f.path for f in m.files] == ["/board.json"]
    b = fb.load_build(tmp_path / "out", BOARD)
    assert b.manifest.frozen == m.frozen
    assert set(im.read_files(b.params, b.fs_image)) == {"/board.json"}
    assert sorted(p.name for p in (tmp_path / "out" / "app").iterdir()) == ["board.json"]
    # the same output dir rebuilt for a stock runtime: the .mpy files come back, nothing stale stays
    fb.build(BOARD, tmp_path / "out", runtime=runtimes["stock"])
    assert (tmp_path / "out" / "app" / "main.py").exists()


def test_a_runtime_that_does_not_match_the_build_is_refused(
    runtimes: dict[str, Path], tmp_path: Path
) -> None:
    fb.build(BOARD, tmp_path / "frozen", runtime=runtimes["frozen"])
    fb.build(BOARD, tmp_path / "stock", runtime=runtimes["stock"])
    frozen, stock = fb.load_build(tmp_path / "frozen"), fb.load_build(tmp_path / "stock")
    with pytest.raises(BuildError, match="made for a runtime with the firmware frozen in"):
        fb.flash_args(frozen, str(runtimes["stock"]))
    with pytest.raises(BuildError, match=r"nothing of the firmware frozen in \(a stock runtime\)"):
        fb.flash_args(stock, str(runtimes["frozen"]))
    assert fb.flash_args(frozen, str(runtimes["frozen"]))[-1][1].endswith("fs.bin")


def _ida(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from tools.cli import main; sys.exit(main())", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_cli_warns_with_the_heap_cost_of_a_stock_runtime(runtimes: dict[str, Path], tmp_path: Path) -> None:
    stock = _ida(
        "flash", "build", "--board", BOARD, "--out", str(tmp_path / "s"), "--runtime", str(runtimes["stock"])
    )
    assert stock.returncode == 0, stock.stderr
    assert "WARNING: stock runtime" in stock.stderr and "into the heap" in stock.stderr
    assert "64000 bytes" in stock.stderr and "firmware/manifest.py" in stock.stderr
    frozen = _ida(
        "flash", "build", "--board", BOARD, "--out", str(tmp_path / "f"), "--runtime", str(runtimes["frozen"])
    )
    assert frozen.returncode == 0, frozen.stderr
    assert "WARNING" not in frozen.stderr
    assert f"firmware frozen in the runtime ({len(_sources())} files)" in frozen.stdout
    man = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert man["frozen"] == sorted(_sources()) and "carrier/__init__.py" in man["runtime"]["frozen"]
