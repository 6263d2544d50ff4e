"""tools/fwcheck: firmware type-checked against the MicroPython ESP32 stubs and compiled by mpy-cross."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tools.harness import fwcheck

ROOT = Path(__file__).resolve().parents[3]
STUBS = Path(os.environ.get("FWCHECK_STUBS", ROOT / ".venv" / "mpstubs"))
pytestmark = pytest.mark.skipif(
    not (STUBS / "machine.pyi").is_file(), reason=f"MicroPython stubs not installed at {STUBS} (make setup)"
)
ARCHES = ["xtensawin", "rv32imc"]

GOOD = """\
import time
import machine
import micropython
import network
import esp32
from micropython import const
from carrier.util import twice

_LED = const(2)


@micropython.native
def add(a, b):
    return a + b


def blink(n: int) -> int:
    pin = machine.Pin(_LED, machine.Pin.OUT)
    t0 = time.ticks_ms()
    for _ in range(twice(n)):
        pin.value(not pin.value())
        time.sleep_ms(10)
    return time.ticks_diff(time.ticks_ms(), t0)


def untyped():
    wlan = network.WLAN(network.STA_IF)
    return wlan.active(), esp32.NVS("ida")
"""
UTIL = "def twice(n: int) -> int:\n    return 2 * n\n"
BAD_TYPES = """\
import time


def f():
    t = time.ticks_ms("x")
    return t + time.monotonic()
"""
CPYTHON_ONLY = "import pathlib\n\nHOME = pathlib.Path.home()\n"
DEVICE_SYNTAX = "def f(x):\n    match x:\n        case 1:\n            return 2\n"


def _tree(root: Path, files: dict[str, str]) -> Path:
    fw = root / "firmware"
    for rel, text in files.items():
        path = fw / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return fw


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> fwcheck.Report:
    root = tmp_path_factory.mktemp("fw")
    fw = _tree(
        root,
        {
            "main.py": GOOD,
            "carrier/__init__.py": "",
            "carrier/util.py": UTIL,
            "bad.py": BAD_TYPES,
            "carrier/hostonly.py": CPYTHON_ONLY,
            "carrier/syntax.py": DEVICE_SYNTAX,
        },
    )
    return fwcheck.check(fw, STUBS, ARCHES, cwd=root)


def test_good_file_clean(mixed: fwcheck.Report) -> None:
    for rel in ("firmware/main.py", "firmware/carrier/util.py", "firmware/carrier/__init__.py"):
        assert rel not in mixed.type_errors
        assert not [k for k in mixed.compile_errors if k.startswith(rel)]
    assert "mpstubs" not in mixed.mypy_output  # errors inside the stubs themselves are not reported


def test_wrong_call_and_missing_name(mixed: fwcheck.Report) -> None:
    assert mixed.type_errors["firmware/bad.py"] == 2
    assert 'firmware/bad.py:5: error: Too many arguments for "ticks_ms"' in mixed.mypy_output
    assert 'firmware/bad.py:6: error: Module has no attribute "monotonic"' in mixed.mypy_output


def test_cpython_only_module(mixed: fwcheck.Report) -> None:
    assert mixed.type_errors["firmware/carrier/hostonly.py"] >= 1
    assert 'module named "pathlib"' in mixed.mypy_output


def test_mpy_cross_rejects_what_mypy_accepts(mixed: fwcheck.Report) -> None:
    assert "firmware/carrier/syntax.py" not in mixed.type_errors
    assert list(mixed.compile_errors) == ["firmware/carrier/syntax.py [xtensawin,rv32imc]"]
    assert "SyntaxError" in mixed.compile_errors["firmware/carrier/syntax.py [xtensawin,rv32imc]"]
    assert not mixed.ok
    assert mixed.summary().startswith("firmware-check: FAILED, 3 of 6 files: 3 type error(s)")


NUMBERS = "from micropython import const\n\nCON = const(0)\nACK = const(2)\n_SLOTS = const(4)\n"
MIRRORS = """\
from micropython import const

_CON = const(0)  # mirrors numbers.CON
_ACK = const(3)  # mirrors numbers.ACK
_SLOTS = const(4)  # mirrors numbers._SLOTS
_RST = const(3)  # mirrors numbers.RST
_MISSING = const(1)  # mirrors nomodule.X
_PLAIN = const(7)  # a private const() that mirrors nothing
"""


def test_mirrored_constants_must_match_their_source(tmp_path: Path) -> None:
    fw = _tree(tmp_path, {"carrier/numbers.py": NUMBERS, "carrier/client.py": MIRRORS})
    errors = fwcheck.mirror_errors(fwcheck.firmware_files(fw), tmp_path)
    assert errors == {
        "firmware/carrier/client.py:4": "_ACK = 3 but numbers.ACK = 2",
        "firmware/carrier/client.py:6": "_RST: no RST = const(...) in numbers.py",
        "firmware/carrier/client.py:7": "_MISSING: no X = const(...) in nomodule.py",
    }
    report = fwcheck.Report(
        files=[fw / "carrier/client.py"], stubs="stubs", arches=ARCHES, mirror_errors=errors
    )
    assert not report.ok
    assert report.summary().endswith(", 3 mirrored constant(s) wrong")
    assert report.summary().startswith("firmware-check: FAILED, 1 of 1 file: 0 type error(s)")


def test_the_firmware_mirrors_are_in_step() -> None:
    files = fwcheck.firmware_files(ROOT / "firmware")
    assert sum(len(fwcheck._MIRROR.findall(f.read_text(encoding="utf-8"))) for f in files) >= 20
    assert fwcheck.mirror_errors(files, ROOT) == {}


def test_cli_clean_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fw = _tree(tmp_path, {"main.py": GOOD, "carrier/__init__.py": "", "carrier/util.py": UTIL})
    assert fwcheck.main(["--stubs", str(STUBS), "--firmware", str(fw)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("firmware-check: 3 files clean against micropython-esp32-stubs 1.")
    assert "rv32imc" in out[-1] and "xtensawin" in out[-1]  # arches come from boards/


def test_cli_failure_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fw = _tree(tmp_path, {"bad.py": BAD_TYPES})
    assert fwcheck.main(["--stubs", str(STUBS), "--firmware", str(fw), "--arch", "xtensawin"]) == 1
    assert "FAILED, 1 of 1 file: 2 type error(s)" in capsys.readouterr().out


def test_no_firmware_files_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "firmware").mkdir()
    assert fwcheck.main(["--stubs", str(STUBS), "--firmware", str(tmp_path / "firmware")]) == 2
    assert "no .py files under" in capsys.readouterr().err


def test_missing_stubs_fail_clearly(tmp_path: Path) -> None:
    fw = _tree(tmp_path, {"main.py": GOOD})
    with pytest.raises(fwcheck.CheckError, match="no MicroPython stubs"):
        fwcheck.check(fw, tmp_path, ARCHES)


def test_runs_as_module(tmp_path: Path) -> None:
    import subprocess

    fw = _tree(tmp_path, {"main.py": "import time\nT = time.ticks_ms()\n"})
    proc = subprocess.run(
        [sys.executable, "-m", "tools.harness.fwcheck", "--stubs", str(STUBS), "--firmware", str(fw)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("firmware-check: 1 file clean")
