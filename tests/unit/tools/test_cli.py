"""The `ida` entry point as a user runs it (a real subprocess of the installed console script)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from gateway import __version__
from tools.cli import SUBCOMMANDS

IDA = str(Path(sys.executable).parent / "ida")


def ida(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IDA, *args], capture_output=True, text=True, timeout=60)


def test_help_lists_every_subcommand() -> None:
    r = ida("--help")
    assert r.returncode == 0
    for name, _module, _help in SUBCOMMANDS:
        assert name in r.stdout


def test_version() -> None:
    r = ida("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"ida {__version__}"


def test_identifier_command() -> None:
    r = ida("identifier", "--json", "0.na/88.123.99", "88.123.99/")
    assert r.returncode == 1
    good, bad = (json.loads(line) for line in r.stdout.splitlines())
    assert good == {
        "input": "0.na/88.123.99",
        "valid": True,
        "normalised": "0.NA/88.123.99",
        "prefix": "0.NA",
        "suffix": "88.123.99",
    }
    assert bad["valid"] is False and bad["reason"] == "EMPTY_SUFFIX"


def test_no_command_prints_help() -> None:
    r = ida()
    assert r.returncode == 2 and "COMMAND" in r.stdout


def test_every_subcommand_module_loads() -> None:
    from tools.cli import build_parser

    parser = build_parser()  # imports every subcommand module and adds its arguments
    assert parser.prog == "ida"
