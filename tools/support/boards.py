"""Board descriptions: ``boards/<name>.json``, validated against ``boards/schema.json``.

The schema is the authority. It is checked here by a small interpreter of the JSON Schema (2020-12) keywords
the schema uses (no third-party dependency); an unknown keyword in the schema is an error, so the schema can
never silently say more than is enforced. Facts a schema cannot express (name = file name, regions inside the
flash and not overlapping, LittleFS block_count = vfs size / block size, flash size = its esptool name) are
checked in :func:`load_board` too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BOARDS_DIR = Path(__file__).resolve().parents[2] / "boards"
SCHEMA_FILE = "schema.json"

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_SIZE_NAMES = {
    "1MB": 1 << 20,
    "2MB": 2 << 20,
    "4MB": 4 << 20,
    "8MB": 8 << 20,
    "16MB": 16 << 20,
    "32MB": 32 << 20,
}


class BoardError(Exception):
    """Unknown board, unreadable file, or a file that does not satisfy the schema."""


# --- a tiny JSON Schema interpreter (only the keywords boards/schema.json uses) ---------------------------

_ANNOTATIONS = {"$schema", "$id", "$comment", "title", "description", "examples", "default", "$defs"}
_TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if name not in _TYPES:
        raise BoardError(f"schema uses unknown type {name!r}")
    return isinstance(value, _TYPES[name])


def _same(a: Any, b: Any) -> bool:
    """JSON equality: 1 != true, 1 == 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and bool(a == b)


_KEYWORDS = _ANNOTATIONS | {
    "$ref",
    "type",
    "const",
    "enum",
    "not",
    "anyOf",
    "if",
    "then",
    "else",
    "minimum",
    "maximum",
    "multipleOf",
    "minLength",
    "pattern",
    "items",
    "minItems",
    "maxItems",
    "uniqueItems",
    "required",
    "properties",
    "additionalProperties",
}


def check_schema(schema: Any, where: str = "#") -> None:
    """Raise :class:`BoardError` if any (sub)schema uses a keyword :func:`validate` does not interpret."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, Mapping):
        raise BoardError(f"schema at {where} is not an object")
    unknown = sorted(set(schema) - _KEYWORDS)
    if unknown:
        raise BoardError(
            f"boards/schema.json at {where} uses {unknown}, which tools/support/boards.py does not interpret"
        )
    for key in ("not", "if", "then", "else", "items", "additionalProperties"):
        if key in schema:
            check_schema(schema[key], f"{where}/{key}")
    for key in ("properties", "$defs"):
        for name, sub in schema.get(key, {}).items():
            check_schema(sub, f"{where}/{key}/{name}")
    for i, sub in enumerate(schema.get("anyOf", [])):
        check_schema(sub, f"{where}/anyOf/{i}")


def _resolve(root: Mapping[str, Any], ref: str) -> Mapping[str, Any]:
    if not ref.startswith("#/"):
        raise BoardError(f"schema $ref {ref!r}: only local references (#/...) are supported")
    node: Any = root
    for part in ref[2:].split("/"):
        if not isinstance(node, Mapping) or part not in node:
            raise BoardError(f"schema $ref {ref!r} does not resolve")
        node = node[part]
    if not isinstance(node, Mapping):
        raise BoardError(f"schema $ref {ref!r} is not a schema object")
    return node


def validate(
    value: Any, schema: Mapping[str, Any], root: Mapping[str, Any] | None = None, path: str = "$"
) -> list[str]:
    """Return the list of violations of ``schema`` by ``value`` (empty when valid), each as ``path: reason``."""
    root = schema if root is None else root
    errors: list[str] = []

    def err(msg: str) -> None:
        errors.append(f"{path}: {msg}")

    for key, arg in schema.items():
        if key in _ANNOTATIONS or key in ("then", "else"):
            continue
        if key == "$ref":
            errors += validate(value, _resolve(root, arg), root, path)
        elif key == "type":
            names = arg if isinstance(arg, list) else [arg]
            if not any(_is_type(value, n) for n in names):
                err(f"expected {' or '.join(names)}, got {json.dumps(value)}")
        elif key == "const":
            if not _same(value, arg):
                err(f"must be {json.dumps(arg)}, got {json.dumps(value)}")
        elif key == "enum":
            if not any(_same(value, a) for a in arg):
                err(f"must be one of {json.dumps(arg)}, got {json.dumps(value)}")
        elif key == "not":
            if not validate(value, arg, root, path):
                err(f"must not match {json.dumps(arg)}")
        elif key == "anyOf":
            branches = [validate(value, sub, root, path) for sub in arg]
            if all(branches):
                err("matches none of the alternatives: " + " | ".join("; ".join(b) for b in branches))
        elif key == "if":
            branch = "then" if not validate(value, arg, root, path) else "else"
            if branch in schema:
                errors += validate(value, schema[branch], root, path)
        elif key in ("minimum", "maximum", "multipleOf"):
            if _is_type(value, "number"):
                if key == "minimum" and value < arg:
                    err(f"{value} is below the minimum {arg}")
                elif key == "maximum" and value > arg:
                    err(f"{value} is above the maximum {arg}")
                elif key == "multipleOf" and value % arg:
                    err(f"{value} (0x{int(value):x}) is not a multiple of {arg} (0x{int(arg):x})")
        elif key in ("minLength", "pattern"):
            if isinstance(value, str):
                if key == "minLength" and len(value) < arg:
                    err(f"shorter than {arg} characters")
                elif key == "pattern" and not re.search(arg, value):
                    err(f"{json.dumps(value)} does not match {arg}")
        elif key in ("items", "minItems", "maxItems", "uniqueItems"):
            if isinstance(value, list):
                if key == "items":
                    for i, item in enumerate(value):
                        errors += validate(item, arg, root, f"{path}[{i}]")
                elif key == "minItems" and len(value) < arg:
                    err(f"needs at least {arg} item(s)")
                elif key == "maxItems" and len(value) > arg:
                    err(f"allows at most {arg} item(s)")
                elif (
                    key == "uniqueItems"
                    and arg
                    and len({json.dumps(v, sort_keys=True) for v in value}) < len(value)
                ):
                    err("items must be unique")
        elif key in ("required", "properties", "additionalProperties"):
            if isinstance(value, dict):
                if key == "required":
                    errors += [
                        f"{path}: missing required field {name!r}" for name in arg if name not in value
                    ]
                elif key == "properties":
                    for name, sub in arg.items():
                        if name in value:
                            errors += validate(value[name], sub, root, f"{path}.{name}")
                else:
                    known = schema.get("properties", {})
                    for name in value:
                        if name in known:
                            continue
                        if arg is False:
                            err(f"unknown field {name!r}")
                        elif isinstance(arg, Mapping):
                            errors += validate(value[name], arg, root, f"{path}.{name}")
        else:
            raise BoardError(
                f"boards/schema.json uses keyword {key!r}, which tools/support/boards.py does not interpret"
            )
    return errors


# --- the typed model ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UsbId:
    vid: int
    pid: int

    @classmethod
    def parse(cls, text: str) -> UsbId:
        vid, _, pid = text.partition(":")
        return cls(int(vid, 16), int(pid, 16))

    def __str__(self) -> str:
        return f"{self.vid:04x}:{self.pid:04x}"


@dataclass(frozen=True)
class Flash:
    size: int
    size_name: str
    mode: str
    freq: str


@dataclass(frozen=True)
class Region:
    name: str
    offset: int
    size: int
    type: str
    subtype: str
    note: str = ""

    @property
    def end(self) -> int:
        return self.offset + self.size

    def __str__(self) -> str:
        return f"{self.name} 0x{self.offset:x}+0x{self.size:x}"


@dataclass(frozen=True)
class LittleFS:
    version: int
    block_size: int
    read_size: int
    prog_size: int
    lookahead_size: int
    name_max: int
    block_count: int


@dataclass(frozen=True)
class NativeUsb:
    kind: str
    usb_ids: tuple[UsbId, ...]
    port_label: str | None
    note: str = ""


@dataclass(frozen=True)
class Console:
    kind: str
    baud: int
    usb_ids: tuple[UsbId, ...]
    bridge: str | None
    port_label: str | None
    native_usb: NativeUsb | None


@dataclass(frozen=True)
class Led:
    kind: str
    pin: int
    active: str | None
    alt_pins: tuple[int, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class Button:
    name: str
    pin: int
    active: str
    note: str = ""


@dataclass(frozen=True)
class Features:
    wifi: bool
    ble: bool
    psram: bool


@dataclass(frozen=True)
class MicroPythonTarget:
    port: str
    board: str | None
    mpy_arch: str | None


@dataclass(frozen=True)
class Board:
    name: str
    description: str
    module: str | None
    simulated: bool
    chip: str
    micropython: MicroPythonTarget
    flash: Flash | None
    partitions: Mapping[str, Region]
    littlefs: LittleFS | None
    console: Console
    status_led: Led | None
    button: Button | None
    features: Features
    source: tuple[str, ...]

    def region(self, name: str) -> Region:
        """A flash region by name (``bootloader``, ``partition_table``, ``nvs``, ``factory``, ``vfs``...)."""
        try:
            return self.partitions[name]
        except KeyError:
            raise BoardError(f"board {self.name!r} has no flash region {name!r}") from None

    @property
    def bootloader(self) -> Region:
        return self.region("bootloader")

    @property
    def partition_table(self) -> Region:
        return self.region("partition_table")

    @property
    def app(self) -> Region:
        """The partition the MicroPython image goes to: ``factory``, or ``ota_0`` on an OTA layout."""
        return self.region("factory" if "factory" in self.partitions else "ota_0")

    @property
    def vfs(self) -> Region:
        return self.region("vfs")

    def regions(self) -> list[Region]:
        """All flash regions in address order."""
        return sorted(self.partitions.values(), key=lambda r: r.offset)

    @property
    def usb_ids(self) -> tuple[UsbId, ...]:
        """Every USB VID:PID under which this board's console can appear (bridge first, then native USB)."""
        native = self.console.native_usb.usb_ids if self.console.native_usb else ()
        return tuple(dict.fromkeys(self.console.usb_ids + native))


def _usb_ids(items: list[str]) -> tuple[UsbId, ...]:
    return tuple(UsbId.parse(s) for s in items)


def _build(d: Mapping[str, Any]) -> Board:
    con = d["console"]
    nat = con["native_usb"]
    led = d["status_led"]
    btn = d["button"]
    parts = d["partitions"] or {}
    return Board(
        name=d["name"],
        description=d["description"],
        module=d.get("module"),
        simulated=d["simulated"],
        chip=d["chip"],
        micropython=MicroPythonTarget(**d["micropython"]),
        flash=Flash(**d["flash"]) if d["flash"] else None,
        partitions={name: Region(name=name, **r) for name, r in parts.items()},
        littlefs=LittleFS(**d["littlefs"]) if d["littlefs"] else None,
        console=Console(
            kind=con["kind"],
            baud=con["baud"],
            usb_ids=_usb_ids(con["usb_ids"]),
            bridge=con["bridge"],
            port_label=con["port_label"],
            native_usb=NativeUsb(
                nat["kind"], _usb_ids(nat["usb_ids"]), nat["port_label"], nat.get("note", "")
            )
            if nat
            else None,
        ),
        status_led=Led(
            led["kind"], led["pin"], led["active"], tuple(led.get("alt_pins", ())), led.get("note", "")
        )
        if led
        else None,
        button=Button(**btn) if btn else None,
        features=Features(**d["features"]),
        source=tuple(d["source"]),
    )


def _semantic_errors(board: Board, stem: str) -> list[str]:
    errors: list[str] = []
    if board.name != stem:
        errors.append(f"$.name: {board.name!r} differs from the file name {stem!r}.json")
    if board.flash is not None:
        if _SIZE_NAMES.get(board.flash.size_name) != board.flash.size:
            errors.append(f"$.flash: size {board.flash.size} is not {board.flash.size_name}")
        regions = board.regions()
        for r in regions:
            if r.end > board.flash.size:
                errors.append(
                    f"$.partitions.{r.name}: {r} ends at 0x{r.end:x}, past the flash end 0x{board.flash.size:x}"
                )
        for a, b in zip(regions, regions[1:], strict=False):
            if b.offset < a.end:
                errors.append(f"$.partitions: {a} overlaps {b}")
    if board.littlefs is not None and "vfs" in board.partitions:
        lfs, vfs = board.littlefs, board.vfs
        if lfs.block_count * lfs.block_size != vfs.size:
            errors.append(
                f"$.littlefs.block_count: {lfs.block_count} x {lfs.block_size} != vfs size 0x{vfs.size:x} "
                f"(must be {vfs.size // lfs.block_size})"
            )
    return errors


def load_schema(boards_dir: Path | None = None) -> dict[str, Any]:
    path = (boards_dir or BOARDS_DIR) / SCHEMA_FILE
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BoardError(f"cannot read the board schema {path}: {e}") from e
    if not isinstance(schema, dict):
        raise BoardError(f"{path}: the schema is not a JSON object")
    check_schema(schema)
    return schema


def list_boards(boards_dir: Path | None = None) -> list[str]:
    """Names of all board files, sorted."""
    d = boards_dir or BOARDS_DIR
    return sorted(p.stem for p in d.glob("*.json") if p.name != SCHEMA_FILE)


def load_board(name: str, boards_dir: Path | None = None) -> Board:
    """Load and validate ``boards/<name>.json``; raise :class:`BoardError` with every problem found."""
    d = boards_dir or BOARDS_DIR
    if not _NAME_RE.match(name):
        raise BoardError(f"invalid board name {name!r} (lower-case letters, digits and '-')")
    path = d / f"{name}.json"
    if not path.is_file():
        known = ", ".join(list_boards(d)) or "none"
        raise BoardError(f"unknown board {name!r} (known boards: {known})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BoardError(f"{path}: not readable JSON: {e}") from e
    errors = validate(data, load_schema(d))
    if not errors:
        board = _build(data)
        errors = _semantic_errors(board, name)
    if errors:
        raise BoardError(f"{path} is not a valid board file:\n  " + "\n  ".join(dict.fromkeys(errors)))
    return board


def load_all(boards_dir: Path | None = None) -> list[Board]:
    return [load_board(n, boards_dir) for n in list_boards(boards_dir)]


def console_usb_ids(boards_dir: Path | None = None, include_native: bool = True) -> list[UsbId]:
    """USB VID:PIDs under which any board's console can appear, for finding serial ports; no duplicates."""
    ids: dict[UsbId, None] = {}
    for board in load_all(boards_dir):
        for usb_id in board.usb_ids if include_native else board.console.usb_ids:
            ids[usb_id] = None
    return list(ids)
