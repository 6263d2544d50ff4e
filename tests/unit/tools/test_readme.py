"""Every `ida` command line in README.md is one the CLI accepts (its arguments parse).

What each one does is exercised elsewhere: node/resolve (tests/unit/tools/test_node.py), gateway + coap-client + curl
(tests/test_gateway_*.py), device run (tests/integration/test_e2e_device.py), sim (tests/unit/tools/test_sim.py), flash
(tests/test_flash_*.py), console (tests/unit/tools/test_console_tool.py), demo (tests/integration/test_demo.py)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tools.cli import SUBCOMMANDS, build_parser

README = Path(__file__).resolve().parents[3] / "README.md"


def _ida_lines() -> list[str]:
    text = README.read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(".venv/bin/ida "):
                lines.append(line)
    return lines


LINES = _ida_lines()


def test_readme_has_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert "make test" in text and "make demo" in text
    assert len(LINES) >= 10


@pytest.mark.parametrize("line", LINES)
def test_readme_command_parses(line: str) -> None:
    argv = shlex.split(line)[1:]
    parser = build_parser(only=argv[0])
    args = parser.parse_args(argv)  # SystemExit (a failed test) on an unknown option or subcommand
    assert args.command in {name for name, _m, _h in SUBCOMMANDS}
