"""Helpers for the tools/commands/flash tests: a firmware tree to build, a one-off build per session, a tiny ELF for
esptool's elf2image, and an esptool run in-process."""

from __future__ import annotations

import contextlib
import io
import shutil
import struct
from pathlib import Path

from tools.commands.flash.builder import FIRMWARE_DIR

STANDIN_MAIN = b"# stand-in main.py: firmware/main.py has not landed yet\nimport carrier\nprint('main', carrier.VERSION)\n"


def firmware_tree(tmp: Path) -> tuple[Path, bool]:
    """The real firmware dir when it has a main.py; else a copy of it with a stand-in main.py. Returns
    (directory, is_real)."""
    if (FIRMWARE_DIR / "main.py").exists():
        return FIRMWARE_DIR, True
    dest = tmp / "firmware"
    shutil.copytree(FIRMWARE_DIR, dest, ignore=shutil.ignore_patterns("__pycache__", "*.mpy"))
    (dest / "main.py").write_bytes(STANDIN_MAIN)
    return dest, False


def tiny_elf(machine: int, entry: int, sections: list[tuple[str, int, bytes]]) -> bytes:
    """A minimal little-endian ELF32 executable: one PROGBITS section and one PT_LOAD segment per
    (name, load address, data), plus the section-name string table; ``machine`` 0x5E (Xtensa) or 0xF3
    (RISC-V). Enough for esptool's ``elf2image`` to produce a valid image."""
    eh, ph, sh = 0x34, 0x20, 0x28
    names = b"\0" + b"".join(n.encode() + b"\0" for n, _, _ in sections) + b".shstrtab\0"
    off = eh + ph * len(sections)
    data_offs = []
    for _, _, data in sections:
        data_offs.append(off)
        off += (len(data) + 3) & ~3
    shstr_off = off
    sh_off = (shstr_off + len(names) + 3) & ~3
    n_sh = len(sections) + 2
    header = struct.pack(
        "<16sHHIIIIIHHHHHH",
        b"\x7fELF\x01\x01\x01" + b"\0" * 9,
        2,
        machine,
        1,
        entry,
        eh,
        sh_off,
        0,
        eh,
        ph,
        len(sections),
        sh,
        n_sh,
        n_sh - 1,
    )
    phdrs = b"".join(
        struct.pack("<IIIIIIII", 1, o, addr, addr, len(d), len(d), 5, 4)
        for o, (_, addr, d) in zip(data_offs, sections, strict=True)
    )
    body = header + phdrs + b"".join(d + b"\0" * (-len(d) % 4) for _, _, d in sections) + names
    shdrs = b"\0" * sh
    name_off = 1
    for o, (name, addr, d) in zip(data_offs, sections, strict=True):
        shdrs += struct.pack("<IIIIIIIIII", name_off, 1, 6, addr, o, len(d), 0, 0, 4, 0)
        name_off += len(name) + 1
    shdrs += struct.pack("<IIIIIIIIII", name_off, 3, 0, 0, shstr_off, len(names), 0, 0, 1, 0)
    return body + b"\0" * (sh_off - len(body)) + shdrs


def app_desc(version: str, project: str = "micropython", idf: str = "v5.4.2") -> bytes:
    """An ``esp_app_desc_t`` (256 bytes) as ESP-IDF puts at the start of an app's first (DROM) segment."""
    return struct.pack(
        "<IIII32s32s16s16s32s32s20s",
        0xABCD5432,
        0,
        0,
        0,
        version.encode(),
        project.encode(),
        b"00:00:00",
        b"Jan  1 2026",
        idf.encode(),
        b"\0" * 32,
        b"\0" * 20,
    ).ljust(256, b"\0")


# Per chip: ELF machine, where the ROM loads code (IRAM), where flash data is mapped (DROM).
CHIP_CODE = {
    "esp32": (0x5E, 0x40080400, 0x3F400020),
    "esp32s3": (0x5E, 0x40378000, 0x3C000020),
    "esp32c3": (0xF3, 0x40380400, 0x3C000020),
}


def esp_image(
    chip: str, tmp: Path, name: str, version: str | None = None, code: bytes = b"\x00" * 64
) -> bytes:
    """A real ESP image for ``chip`` made by ``esptool elf2image`` from a tiny ELF: one IRAM segment, and
    with ``version`` a DROM segment led by an app description (as a MicroPython app has)."""
    machine, iram, drom = CHIP_CODE[chip]
    sections = [(".text", iram, code)]
    if version is not None:
        sections.insert(0, (".flash.appdesc", drom, app_desc(version)))
    elf = tmp / f"{name}.elf"
    elf.write_bytes(tiny_elf(machine, iram, sections))
    esptool("--chip", chip, "elf2image", "-o", str(tmp / f"{name}.bin"), str(elf))
    return (tmp / f"{name}.bin").read_bytes()


def esptool(*argv: str) -> str:
    """Run the esptool command line in this process (``esptool.main``), return what it printed; raise on
    failure with the output."""
    import esptool as et

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            et.main(list(argv))
        except SystemExit as e:
            if e.code not in (0, None):
                raise AssertionError(f"esptool {' '.join(argv)} exited {e.code}:\n{out.getvalue()}") from None
        except Exception as e:
            raise AssertionError(f"esptool {' '.join(argv)} failed: {e}\n{out.getvalue()}") from None
    return out.getvalue()


def standin_runtime(
    board_name: str, tmp: Path, version: str = "v1.26.1", data: bytes = b""
) -> tuple[Path, dict[str, bytes]]:
    """A stand-in for MicroPython's merged ``firmware.bin`` for a board, made the way MicroPython's build
    makes the real one: ``esptool elf2image`` for bootloader and app, the partition table binary, then
    ``esptool merge-bin`` at the bootloader offset. ``data`` follows the app description in the app's flash
    data segment (where a real app keeps its constants). Returns the file and its parts by name."""
    from tools.commands.flash import image as im
    from tools.support.boards import load_board

    board = load_board(board_name)
    assert board.flash is not None
    flash = [
        "--flash-mode",
        board.flash.mode,
        "--flash-freq",
        board.flash.freq,
        "--flash-size",
        board.flash.size_name,
    ]
    parts = {}
    for name, ver in (("bootloader", None), ("app", version)):
        machine, iram, drom = CHIP_CODE[board.chip]
        sections = [(".text", iram, bytes(range(64)))]
        if ver is not None:
            sections.insert(0, (".flash.appdesc", drom, app_desc(ver) + data))
        elf = tmp / f"{board_name}-{name}.elf"
        elf.write_bytes(tiny_elf(machine, iram, sections))
        out = tmp / f"{board_name}-{name}.bin"
        esptool("--chip", board.chip, "elf2image", *flash, "-o", str(out), str(elf))
        parts[name] = out.read_bytes()
    parts["partition-table"] = im.encode_partition_table(im.board_partitions(board))
    (tmp / f"{board_name}-partition-table.bin").write_bytes(parts["partition-table"])
    runtime = tmp / f"{board_name}-firmware.bin"
    esptool(
        "--chip",
        board.chip,
        "merge-bin",
        "-o",
        str(runtime),
        "--target-offset",
        hex(board.bootloader.offset),
        hex(board.bootloader.offset),
        str(tmp / f"{board_name}-bootloader.bin"),
        hex(board.partition_table.offset),
        str(tmp / f"{board_name}-partition-table.bin"),
        hex(board.app.offset),
        str(tmp / f"{board_name}-app.bin"),
    )
    return runtime, parts
