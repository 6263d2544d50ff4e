"""Images, no I/O: the LittleFS filesystem image as MicroPython formats it, ESP-IDF partition tables and the ESP
app/bootloader image header.

LittleFS parameters are MicroPython's own (``extmod/vfs_lfsx.c``): block size from the block device (4096 on the
esp32 port), read/prog size 32, lookahead 32, ``cache_size = 4 * max(read, prog)`` = 128 (this caps inline files,
so it must match), ``block_cycles`` 100, name_max 255, and ``block_count`` = the ``vfs`` region size / 4096
exactly (a different count and the device refuses to mount and re-formats). Images are written in on-disk format
v2.0 so that every MicroPython with ``VfsLfs2`` mounts them (lfs 2.6+ writes v2.1 by default, which the lfs 2.3
in MicroPython before 1.23 refuses).
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from littlefs import LittleFS, LittleFSError, UserContext

from tools.support.boards import Board, Region

from .errors import BuildError

# littlefs-python logs every block it reads and writes, data included, at DEBUG: the identity file (device key,
# Wi-Fi passphrase) would be in any debug log of a flashing station. Its logger stays at INFO and above.
logging.getLogger("littlefs").setLevel(logging.INFO)

LFS_DISK_VERSION_2_0 = 0x00020000
ERASED = 0xFF

# --- LittleFS ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LfsParams:
    block_size: int
    block_count: int
    read_size: int
    prog_size: int
    lookahead_size: int
    name_max: int

    @property
    def size(self) -> int:
        return self.block_size * self.block_count

    @property
    def cache_size(self) -> int:
        return 4 * max(self.read_size, self.prog_size)

    def config(self, pin_version: bool = True) -> dict[str, int]:
        """Keyword arguments for ``littlefs.LittleFS`` that reproduce MicroPython's ``VfsLfs2``. With
        ``pin_version`` littlefs formats and writes on-disk version 2.0 (and, like an old lfs, refuses to mount
        2.1); without it, it reads both (MicroPython >= 1.23 upgrades an image to 2.1 on its first write)."""
        cfg = {
            "block_size": self.block_size,
            "block_count": self.block_count,
            "read_size": self.read_size,
            "prog_size": self.prog_size,
            "lookahead_size": self.lookahead_size,
            "name_max": self.name_max,
            "cache_size": self.cache_size,
            "block_cycles": 100,
        }
        if pin_version:
            cfg["disk_version"] = LFS_DISK_VERSION_2_0
        return cfg


def lfs_params(board: Board) -> LfsParams:
    """The board's LittleFS parameters; ``block_count`` checked against its ``vfs`` region when it has one."""
    lfs = board.littlefs
    if lfs is None:
        raise BuildError(f"board {board.name!r} has no littlefs section: it cannot hold a filesystem image")
    if "vfs" in board.partitions and lfs.block_count * lfs.block_size != board.vfs.size:
        raise BuildError(
            f"board {board.name!r}: littlefs block_count {lfs.block_count} x {lfs.block_size} != vfs size "
            f"0x{board.vfs.size:x}; MicroPython would re-format the region"
        )
    return LfsParams(
        lfs.block_size, lfs.block_count, lfs.read_size, lfs.prog_size, lfs.lookahead_size, lfs.name_max
    )


def _open(params: LfsParams, image: bytearray, write: bool = False) -> LittleFS:
    cfg = params.config(pin_version=write)
    fs = LittleFS(context=UserContext(buffer=image), mount=False, filename_encoding=None, **cfg)
    try:
        fs.mount()
    except LittleFSError as e:
        raise BuildError(f"not a LittleFS image with these parameters ({e})") from e
    return fs


def make_fs_image(params: LfsParams, files: Mapping[str, bytes]) -> bytes:
    """A freshly formatted image of exactly ``params.size`` bytes holding ``files`` (absolute paths)."""
    image = bytearray(b"\xff" * params.size)
    fs = LittleFS(context=UserContext(buffer=image), mount=False, filename_encoding=None, **params.config())
    fs.format()
    fs.mount()
    _write_files(fs, files)
    fs.unmount()
    return bytes(image)


def add_files(params: LfsParams, image: bytes, files: Mapping[str, bytes]) -> bytes:
    """A copy of ``image`` with ``files`` added or replaced, written the way the device would (copy-on-write:
    only the blocks littlefs touches change)."""
    buf = bytearray(image)
    if len(buf) != params.size:
        raise BuildError(f"image is {len(buf)} bytes, the board's filesystem is {params.size}")
    fs = _open(params, buf, write=True)
    _write_files(fs, files)
    fs.unmount()
    return bytes(buf)


def _write_files(fs: LittleFS, files: Mapping[str, bytes]) -> None:
    for path in sorted(files):
        if not path.startswith("/"):
            raise BuildError(f"filesystem paths are absolute: {path!r}")
        parent = posixpath.dirname(path)
        if parent != "/":
            fs.makedirs(parent, exist_ok=True)
        try:
            with fs.open(path, "wb") as f:
                f.write(files[path])
        except LittleFSError as e:
            raise BuildError(f"cannot write {path} into the filesystem image ({e})") from e


def read_files(params: LfsParams, image: bytes) -> dict[str, bytes]:
    """Every regular file in the image, by absolute path."""
    fs = _open(params, bytearray(image))
    out: dict[str, bytes] = {}
    for top, _dirs, names in fs.walk("/"):
        for name in names:
            path = posixpath.join(top, name)
            with fs.open(path, "rb") as f:
                out[path] = f.read()
    fs.unmount()
    return out


def used_blocks(params: LfsParams, image: bytes) -> int:
    fs = _open(params, bytearray(image))
    n = fs.used_block_count
    fs.unmount()
    return int(n)


# --- block deltas -----------------------------------------------------------------------------------------


def changed_blocks(old: bytes, new: bytes, block_size: int) -> list[tuple[int, bytes]]:
    """Runs of consecutive blocks where ``new`` differs from ``old``, as (offset in the image, data).
    Offsets and lengths are multiples of ``block_size`` (flash erase sectors), so each run can be written on its
    own."""
    if len(old) != len(new) or len(new) % block_size:
        raise ValueError("images must have the same size, a multiple of the block size")
    runs: list[tuple[int, bytes]] = []
    start: int | None = None
    for off in range(0, len(new) + block_size, block_size):
        differs = off < len(new) and old[off : off + block_size] != new[off : off + block_size]
        if differs and start is None:
            start = off
        elif not differs and start is not None:
            runs.append((start, new[start:off]))
            start = None
    return runs


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# --- ESP image header ---------------------------------------------------------------------------------------

ESP_IMAGE_MAGIC = 0xE9
APP_DESC_MAGIC = 0xABCD5432


@dataclass(frozen=True)
class EspImageHeader:
    segments: int
    flash_mode: int
    flash_size_freq: int
    entry: int
    chip_id: int


def parse_image_header(data: bytes) -> EspImageHeader | None:
    """The common + extended header of an ESP32-family image (``esp_image_header_t``), None if no magic."""
    if len(data) < 24 or data[0] != ESP_IMAGE_MAGIC:
        return None
    _, segs, mode, size_freq, entry = struct.unpack_from("<BBBBI", data, 0)
    (chip_id,) = struct.unpack_from("<H", data, 12)
    return EspImageHeader(segs, mode, size_freq, entry, chip_id)


def app_description(data: bytes) -> dict[str, str] | None:
    """``esp_app_desc_t`` at the start of an ESP-IDF app's first segment: version, project, IDF version."""
    off = 24 + 8
    if len(data) < off + 144 or struct.unpack_from("<I", data, off)[0] != APP_DESC_MAGIC:
        return None

    def cstr(start: int, n: int) -> str:
        return data[off + start : off + start + n].split(b"\0", 1)[0].decode("utf-8", "replace")

    return {"version": cstr(16, 32), "project": cstr(48, 32), "idf": cstr(112, 32)}


def image_chip_id(chip: str) -> int:
    """The chip id esptool writes into image headers for ``chip`` (e.g. esp32 0, esp32s3 9, esp32c3 5)."""
    from esptool.targets import CHIP_DEFS

    try:
        return int(CHIP_DEFS[chip].IMAGE_CHIP_ID)
    except KeyError:
        raise BuildError(f"esptool does not know the chip {chip!r}") from None


# --- ESP-IDF partition table (the binary format of gen_esp32part.py) ---------------------------------------

PT_MAGIC = b"\xaa\x50"
PT_MD5_MAGIC = b"\xeb\xeb"
PT_ENTRY = struct.Struct("<2sBBII16sI")
PT_MAX_LENGTH = 0xC00

PT_TYPES = {"app": 0x00, "data": 0x01}
PT_SUBTYPES = {
    "app": {"factory": 0x00, "test": 0x20, **{f"ota_{i}": 0x10 + i for i in range(16)}},
    "data": {
        "ota": 0x00,
        "phy": 0x01,
        "nvs": 0x02,
        "coredump": 0x03,
        "nvs_keys": 0x04,
        "efuse": 0x05,
        "undefined": 0x06,
        "esphttpd": 0x80,
        "fat": 0x81,
        "spiffs": 0x82,
        "littlefs": 0x83,
    },
}


@dataclass(frozen=True)
class PartitionEntry:
    name: str
    type: int
    subtype: int
    offset: int
    size: int
    flags: int = 0


def board_partitions(board: Board) -> list[PartitionEntry]:
    """The board's flash regions that belong in its partition table (everything but bootloader and table)."""
    out = []
    for r in board.regions():
        if r.type not in PT_TYPES:
            continue
        try:
            subtype = PT_SUBTYPES[r.type][r.subtype]
        except KeyError:
            raise BuildError(
                f"board {board.name!r}: region {r.name} has unknown subtype {r.subtype!r}"
            ) from None
        out.append(PartitionEntry(r.name, PT_TYPES[r.type], subtype, r.offset, r.size))
    return out


def encode_partition_table(entries: list[PartitionEntry]) -> bytes:
    """The binary table as ``gen_esp32part.py`` writes it: 32-byte entries, an MD5 entry, 0xFF up to 0xC00."""
    body = b""
    for e in entries:
        name = e.name.encode()
        if len(name) > 16:
            raise BuildError(f"partition name {e.name!r} is longer than 16 bytes")
        body += PT_ENTRY.pack(PT_MAGIC, e.type, e.subtype, e.offset, e.size, name, e.flags)
    body += PT_MD5_MAGIC + b"\xff" * 14 + hashlib.md5(body).digest()
    if len(body) > PT_MAX_LENGTH:
        raise BuildError("partition table too long")
    return body + b"\xff" * (PT_MAX_LENGTH - len(body))


def decode_partition_table(data: bytes) -> list[PartitionEntry]:
    """Entries of a binary table; raises BuildError on a bad MD5 or a missing end."""
    entries: list[PartitionEntry] = []
    for off in range(0, min(len(data), PT_MAX_LENGTH), PT_ENTRY.size):
        raw = data[off : off + PT_ENTRY.size]
        if raw[:2] == PT_MD5_MAGIC:
            if hashlib.md5(data[:off]).digest() != raw[16:]:
                raise BuildError("partition table MD5 does not match its entries")
            continue
        if raw == b"\xff" * PT_ENTRY.size:
            return entries
        magic, typ, sub, offset, size, name, flags = PT_ENTRY.unpack(raw)
        if magic != PT_MAGIC:
            raise BuildError(f"partition table entry {len(entries)} has no magic")
        entries.append(PartitionEntry(name.rstrip(b"\0").decode(), typ, sub, offset, size, flags))
    raise BuildError("partition table has no end marker")


def check_table_against_board(entries: list[PartitionEntry], board: Board) -> list[str]:
    """Differences between a binary table and the board file (app and, when listed, vfs regions)."""
    problems = []
    by_name = {e.name: e for e in entries}
    wanted: list[Region] = [board.app]
    if "vfs" in board.partitions and "vfs" in by_name:
        wanted.append(board.vfs)
    for r in wanted:
        e = by_name.get(r.name)
        if e is None:
            problems.append(f"table has no {r.name!r} partition")
        elif (e.offset, e.size) != (r.offset, r.size):
            problems.append(
                f"{r.name}: table says 0x{e.offset:x}+0x{e.size:x}, board file says 0x{r.offset:x}+0x{r.size:x}"
            )
    return problems
