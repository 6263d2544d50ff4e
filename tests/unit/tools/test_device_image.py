"""`ida device run --image BUILD_DIR --micropython BIN --heap BYTES` (tools/commands/device_image.py): a device
runs the firmware of an `ida flash build` output, from its filesystem image (stock runtime: main.py and .mpy) or
from the interpreter (frozen runtime), never from firmware/, on the 32-bit interpreters with the chip's heap;
`status` reports heap_used. The builds here are for the simulated unix board, whose runtime is the program."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.devicerun import IdaDevice
from tests.support.fwdevice import CoapGateway, wait_for
from tests.support.mp import mp32
from tools.cli import CliError, main
from tools.commands.device_image import IMAGE_RECORD, install_image
from tools.commands.flash import builder as fb

ID = "88.123.99/PUMP-0001"
MARK = "0.1.0-from-the-image"


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A stock-runtime build of a firmware copy whose VERSION says it came from the image, and a frozen-runtime
    build of the tree (the frozen interpreter holds firmware/ as it is)."""
    tmp = tmp_path_factory.mktemp("images")
    fw = tmp / "firmware"
    shutil.copytree(fb.FIRMWARE_DIR, fw, ignore=shutil.ignore_patterns("__pycache__"))
    init = fw / "carrier" / "__init__.py"
    init.write_text(re.sub(r'VERSION = "[^"]*"', f'VERSION = "{MARK}"', init.read_text()))
    fb.build("unix", tmp / "stock", runtime=mp32(frozen=False), firmware_dir=fw)
    fb.build("unix", tmp / "frozen", runtime=mp32(frozen=True))
    return {"stock": tmp / "stock", "frozen": tmp / "frozen"}


@pytest.fixture
def gateway() -> Iterator[CoapGateway]:
    gw = CoapGateway(ID)
    gw.add_record(ID, [[1, "URL", "https://example.org/pump-0001", 86400]])
    gw.start()
    yield gw
    gw.stop()


def _run(d: Path, gw: CoapGateway, build: Path, interpreter: str, heap: int) -> dict[str, object]:
    args = ("--gateway", gw.url, "--image", str(build), "--micropython", interpreter, "--heap", str(heap))
    with IdaDevice(d, ID, *args) as dev:
        boot = dev.expect(r"^I app boot=\d+ fw=(\S+) ", 30)
        wait_for(lambda: gw.reports, 30, "first report")
        dev.json_on()
        st = dev.wait_status(lambda s: s["acked"] >= 1)
        res = dev.json("resolve " + ID)
        if "values" not in res:
            res = json.loads(dev.expect(r'^\{.*"cmd": "resolve".*"values"', 20).string)
    assert "https://example.org/pump-0001" in json.dumps(res), res
    return {"fw": boot.group(1), "heap_used": st["heap_used"], "err": "\n".join(dev.err)}


def test_stock_image_runs_its_mpy_files_in_a_112000_byte_heap(
    builds: dict[str, Path], gateway: CoapGateway, tmp_path: Path
) -> None:
    d = tmp_path / "dev"
    r = _run(d, gateway, builds["stock"], mp32(frozen=False), 112000)
    assert r["fw"] == MARK, "the firmware came from the image, not from firmware/"
    assert "main.py and .mpy on the filesystem" in str(r["err"])
    assert (d / "main.py").exists() and (d / "carrier" / "app.mpy").exists()
    assert not (d / "carrier" / "app.py").exists()
    assert 0 < int(str(r["heap_used"])) < 112000


def test_frozen_image_runs_from_the_interpreter_in_64000_bytes(
    builds: dict[str, Path], gateway: CoapGateway, tmp_path: Path
) -> None:
    d = tmp_path / "dev"
    install_image(builds["stock"], d, mp32(frozen=False))  # a chip that had the stock image before
    r = _run(d, gateway, builds["frozen"], mp32(frozen=True), 64000)
    assert r["fw"] == fb.firmware_version(), "the frozen firmware"
    assert f"{len(fb.firmware_sources())} files frozen" in str(r["err"])
    assert not (d / "main.py").exists() and not (d / "carrier").exists(), "the stock image's files are gone"
    assert json.loads((d / IMAGE_RECORD).read_text())["files"] == ["/board.json"]
    assert 0 < int(str(r["heap_used"])) < 64000


def test_an_interpreter_that_does_not_fit_the_build_is_refused(
    builds: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(CliError, match="made for a runtime with the firmware frozen in"):
        install_image(builds["frozen"], tmp_path / "a", mp32(frozen=False))
    with pytest.raises(CliError, match=r"nothing of the firmware frozen in \(a stock runtime\)"):
        install_image(builds["stock"], tmp_path / "b", mp32(frozen=True))
    with pytest.raises(CliError, match="not a build directory"):
        install_image(tmp_path, tmp_path / "c", mp32(frozen=True))
    argv = ["device", "run", "--identifier", ID, "--data-dir", str(tmp_path / "d"), "--heap", "lots"]
    assert main(argv) == 2 and "--heap must be a number of bytes" in capsys.readouterr().err
