"""The layering rules of the tree, read from the source (no imports executed):

* ``proto`` (the wire formats) imports nothing else of ours;
* ``gateway`` never imports ``tools`` (or tests);
* ``tools`` uses only the public surface of ``gateway`` packages: no private module, no private name, and only
  names in a module's ``__all__`` when it has one;
* ``firmware`` imports only ``carrier`` of ours (it runs on the chip, where nothing else exists).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = {"proto", "gateway", "tools", "tests", "carrier", "firmware"}


def _imports(path: Path) -> Iterator[tuple[int, str, tuple[str, ...]]]:
    """(line, module, names) for every absolute import in ``path``; ``names`` is empty for ``import x``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ()
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module, tuple(a.name for a in node.names)


def _sources(top: str) -> list[Path]:
    return sorted(p for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _module_all(module: str) -> set[str] | None:
    """The ``__all__`` of one of our modules (a package's is its ``__init__``), None when it has none."""
    base = ROOT.joinpath(*module.split("."))
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    if not path.exists():
        return None
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value is not None:
                return {e.value for e in ast.walk(node.value) if isinstance(e, ast.Constant)}
    return None


def _is_submodule(module: str, name: str) -> bool:
    base = ROOT.joinpath(*module.split("."), name)
    return base.is_dir() or base.with_suffix(".py").exists()


def _assert_no_imports(top: str, banned: set[str]) -> None:
    """No file under ``top`` imports a package named in ``banned``; the failure lists every such import."""
    bad = [
        f"{_rel(p)}:{line} imports {mod}"
        for p in _sources(top)
        for line, mod, _names in _imports(p)
        if mod.split(".")[0] in banned
    ]
    assert not bad, "\n".join(bad)


def test_proto_imports_nothing_else_of_ours() -> None:
    _assert_no_imports("proto", OURS - {"proto"})


def test_gateway_never_imports_tools_or_tests() -> None:
    _assert_no_imports("gateway", {"tools", "tests", "carrier", "firmware"})


def test_tools_use_only_the_public_surface_of_gateway() -> None:
    bad: list[str] = []
    for p in _sources("tools"):
        for line, mod, names in _imports(p):
            parts = mod.split(".")
            if parts[0] != "gateway":
                continue
            where = f"{_rel(p)}:{line}"
            if any(part.startswith("_") for part in parts):
                bad.append(f"{where} imports the private module {mod}")
                continue
            public = _module_all(mod)
            for name in names:
                if name.startswith("_") and name != "__version__":
                    bad.append(f"{where} imports the private name {mod}.{name}")
                elif public is not None and name not in public and not _is_submodule(mod, name):
                    bad.append(f"{where} imports {mod}.{name}, which is not in its __all__")
    assert not bad, "\n".join(bad)


def test_firmware_imports_only_carrier() -> None:
    _assert_no_imports("firmware", OURS - {"carrier"})


@pytest.mark.parametrize(
    ("source", "rule", "found"),
    [
        ("from gateway.errors import ProtocolError\n", test_proto_imports_nothing_else_of_ours, "proto"),
        ("import tools.cli\n", test_gateway_never_imports_tools_or_tests, "gateway"),
        (
            "from gateway.frontends.coap_fast import _option\n",
            test_tools_use_only_the_public_surface_of_gateway,
            "tools",
        ),
        ("from proto import devicemsg\n", test_firmware_imports_only_carrier, "firmware"),
    ],
)
def test_each_rule_catches_a_violation(source: str, rule: object, found: str) -> None:
    """Each rule fails on a file that breaks it (the file is written into the tree for the check, then removed)."""
    probe = ROOT / found / "_import_rule_probe.py"
    probe.write_text(source, encoding="utf-8")
    try:
        with pytest.raises(AssertionError, match="_import_rule_probe.py:1"):
            rule()  # type: ignore[operator]
    finally:
        probe.unlink()
