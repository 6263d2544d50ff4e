"""A factory station of simulated chips that registers upstream, for the registration tests: an ``ida node`` in
a thread of the test process, a batch build, chips pre-loaded with the batch's ``factory.bin``, and (run as a
program) a station process that flashes N chips with ``run_batch`` -- the one the crash test kills with SIGKILL.

    python -m tests.support.regstation BUILD_DIR DATA_DIR FIRST COUNT

flashes chips with MACs 24:0a:c4:01:xx:xx numbered FIRST .. FIRST+COUNT-1 (those the ledger already has are
skipped: a restarted station goes on where the killed one stopped) and prints ``flashed N`` after each chip.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.flashutil import firmware_tree, standin_runtime
from tools.commands.flash import builder as fb
from tools.commands.flash.batch import run_batch
from tools.commands.flash.ledger import Ledger
from tools.commands.flash.programmer import SimulatedChip
from tools.commands.flash.provision import IdentityTemplate, Station
from tools.harness.node import NodeServer

BOARD = "esp32-devkitc"
TEMPLATE = IdentityTemplate(("coap://192.168.4.1:5683",), "coap")
ADMIN = Path(__file__).resolve().parents[1] / "vectors" / "handle-admin"


@contextmanager
def node_thread(**kw: Any) -> Iterator[NodeServer]:
    """A started NodeServer whose event loop runs on a thread of its own (the code under test is synchronous)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="node", daemon=True)
    thread.start()
    node = NodeServer(**kw)
    asyncio.run_coroutine_threadsafe(node.start(), loop).result(15)
    try:
        yield node
    finally:
        asyncio.run_coroutine_threadsafe(node.stop(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def build(tmp: Path) -> Path:
    """A batch build for :data:`BOARD` with a stand-in runtime; returns its directory."""
    fw, _ = firmware_tree(tmp)
    runtime, _ = standin_runtime(BOARD, tmp)
    fb.build(BOARD, tmp / "out", runtime=runtime, firmware_dir=fw)
    return tmp / "out"


def mac(n: int) -> str:
    return f"24:0a:c4:01:{n >> 8 & 0xFF:02x}:{n & 0xFF:02x}"


def factory_chip(built: fb.Build, n: int) -> SimulatedChip:
    """Chip number ``n``, pre-loaded with the batch's factory.bin as a gang programmer leaves it."""
    chip = SimulatedChip(mac=mac(n), port=f"/dev/sim{n}")
    image = (built.directory / fb.FACTORY_IMAGE).read_bytes()
    off = built.manifest.factory_image["offset"]  # type: ignore[index]
    chip.flash[off : off + len(image)] = image
    return chip


def flash_chips(build_dir: Path, station: Station, numbers: list[int], out: Any = None) -> Any:
    """``run_batch`` over the chips ``numbers`` (all present at once); returns the batch summary."""
    built = fb.load_build(build_dir, BOARD)
    chips = {f"/dev/sim{n}": factory_chip(built, n) for n in numbers}
    return run_batch(
        built,
        station,
        TEMPLATE,
        ports=lambda: list(chips),
        programmer=chips.__getitem__,
        count=len(chips),
        out=out if out is not None else sys.stdout,
        sleep=lambda s: None,
    )


class _Progress:
    """The batch's output, with ``flashed N`` on a line of its own after every chip."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, text: str) -> int:
        if "PASS" in text and ": " in text:
            self.n += 1
            sys.stdout.write(f"flashed {self.n}\n")
        sys.stdout.write(text)
        return len(text)

    def flush(self) -> None:
        sys.stdout.flush()

    def isatty(self) -> bool:
        return False


def main(argv: list[str]) -> int:
    build_dir, data_dir, first, count = Path(argv[0]), Path(argv[1]), int(argv[2]), int(argv[3])
    with Ledger.in_dir(data_dir) as led:
        done = {d.mac for d in led.devices() if d.state == "verified"}
    numbers = [n for n in range(first, first + count) if mac(n) not in done]
    station = Station(data_dir, operator="test", station="line-1", register_wait=120.0)
    summary = flash_chips(build_dir, station, numbers, out=_Progress())
    sys.stdout.flush()
    return 0 if not summary.failed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
