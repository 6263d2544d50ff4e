"""``ida device run --image BUILD_DIR``: a simulated device running the firmware as a built image deploys it.

    ida flash build --board unix --out build/flash/unix --runtime .venv/micropython32/micropython32-frozen
    ida device run --identifier 88.123.99/PUMP-0001 --image build/flash/unix \\
        --micropython .venv/micropython32/micropython32-frozen --heap 64000

The data dir plays the chip's filesystem. The files of the build's filesystem image (``fs.bin``, read with the
board's LittleFS parameters, exactly what the chip mounts) are installed into it; the files a previous ``--image``
installed and this image lacks are removed (``image.json`` records them), the device's own files (identity,
config, queue, counters) stay. The firmware then comes from there, never from ``firmware/``: ``<data>/main.py``
when the image has one, else the interpreter's frozen ``main`` (``-m main``); the module path is the chip's
(``<data>``, then ``.frozen``, then ``<data>/lib``: ``''``, ``.frozen``, ``/lib`` with the filesystem's root as
the current directory). The interpreter must have frozen in exactly what the build left off the filesystem (the
check ``ida flash device`` makes for a runtime: ``flash/builder.py``). A chip's ``/board.json`` is the one file not
installed: the host plays a simulated board (``--board``, default unix), whose board file ``device run`` writes.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tools.cli import CliError

__all__ = ["ImageRun", "IMAGE_RECORD", "install_image"]

IMAGE_RECORD = "image.json"
BOARD_FILE = "/board.json"


@dataclass(frozen=True)
class ImageRun:
    """What ``install_image`` installed and how the device starts from it."""

    build_dir: Path
    board: str  # the board the image was built for
    files: tuple[str, ...]  # device paths installed into the data dir
    frozen: tuple[str, ...]  # firmware files the interpreter holds instead

    @property
    def main_on_filesystem(self) -> bool:
        return "/main.py" in self.files

    def command(self, micropython: str, heap: str | None) -> tuple[list[str], dict[str, str]]:
        """The device's command line and the environment it needs on top of ``device_env``. Run it with the data
        dir as the working directory: it is the chip's filesystem root, and the paths the firmware keeps (its
        files, ``sys.path`` = ``['', '.frozen', 'lib']`` as on the chip) are as short as they are there -- with
        absolute host paths they would cost heap a chip does not spend."""
        cmd = [micropython, *(["-X", f"heapsize={heap}"] if heap else [])]
        cmd += ["main.py"] if self.main_on_filesystem else ["-m", "main"]
        return cmd, {"MICROPYPATH": ":.frozen:lib", "IDA_DATA": "."}

    def describe(self) -> str:
        where = (
            "main.py and .mpy on the filesystem" if self.frozen == () else f"{len(self.frozen)} files frozen"
        )
        return f"image {self.build_dir} ({self.board}: {where})"


def install_image(build_dir: Path, data_dir: Path, micropython: str) -> ImageRun:
    """Install the build's filesystem into ``data_dir`` for ``micropython`` (see the module docstring);
    CliError (exit 2) for a directory that is not a build or an interpreter that does not fit it."""
    from tools.commands.flash.builder import RuntimeInfo, check_runtime_layout, load_build
    from tools.commands.flash.errors import FlashError
    from tools.commands.flash.frozen import frozen_names
    from tools.commands.flash.image import read_files, sha256

    try:
        b = load_build(build_dir)
        program = Path(micropython).read_bytes()
        held = frozen_names(program)
        check_runtime_layout(
            b.manifest,
            RuntimeInfo(micropython, sha256(program), len(program), "program", 0, None, None, held),
        )
        files = read_files(b.params, b.fs_image)
    except OSError as e:
        raise CliError(f"cannot read {e.filename}: {e.strerror or e}") from None
    except FlashError as e:
        raise CliError(str(e)) from None
    if not b.board.simulated:
        files.pop(BOARD_FILE, None)
    record = data_dir / IMAGE_RECORD
    with contextlib.suppress(OSError, ValueError, KeyError):
        for old in json.loads(record.read_text())["files"]:
            if old not in files:
                _remove(data_dir, old)
    try:
        for path, data in sorted(files.items()):
            dest = data_dir / path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, dest)
        doc = {"build": str(Path(build_dir).resolve()), "fs_sha256": b.manifest.fs_image["sha256"]}
        record.write_text(json.dumps({**doc, "files": sorted(files)}, indent=1) + "\n")
    except OSError as e:
        raise CliError(f"cannot install the image into {data_dir}: {e.strerror or e}", 1) from None
    return ImageRun(Path(build_dir), b.board.name, tuple(sorted(files)), b.manifest.frozen)


def _remove(data_dir: Path, path: str) -> None:
    """Remove an installed file and the directories it leaves empty."""
    f = data_dir / path.lstrip("/")
    with contextlib.suppress(FileNotFoundError):
        f.unlink()
    for parent in f.parents:
        if parent == data_dir or data_dir not in parent.parents:
            break
        try:
            parent.rmdir()
        except OSError:  # not empty (or gone): stop here
            break
