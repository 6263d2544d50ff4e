"""The `ida` command: one entry point, one subcommand per job. Subcommands live in their own modules and
register themselves through ``SUBCOMMANDS`` (module path, function that adds the parser)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from gateway import __version__
from tools.errors import CliError

# (name, module, help). Each module has `add_arguments(parser)` and `run(args) -> int`.
SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("identifier", "tools.commands.identifier", "check and normalise identifiers"),
    ("flash", "tools.commands.flash.cli", "factory flashing and provisioning"),
    (
        "gateway",
        "tools.commands.gateway",
        "run the edge gateway (CoAP, HTTP, MQTT front ends) until SIGTERM/SIGINT",
    ),
    (
        "devices",
        "tools.commands.devices",
        "list devices and set their desired config through a running gateway",
    ),
    (
        "resolve",
        "tools.commands.resolve",
        "resolve an identifier through the gateway engine (zone, cache, upstreams)",
    ),
    (
        "handle",
        "tools.commands.handle",
        "administer a handle at its prefix's primary node (create, add, modify, remove, delete)",
    ),
    ("node", "tools.harness.node.cli", "local recursive-node simulator (Handle native + REST)"),
    ("bench", "tools.harness.bench.cli", "benchmarks against anchors measured in the same run"),
    ("broker", "tools.commands.broker", "generate Mosquitto TLS/ACL/password config for provisioned devices"),
    ("console", "tools.commands.console.cli", "technician's serial console"),
    (
        "sim",
        "tools.harness.sim.cli",
        "simulated fleet: real firmware processes or a protocol-level simulator",
    ),
    ("demo", "tools.harness.demo", "run the whole system locally with narration (make demo)"),
    (
        "device",
        "tools.commands.device_run",
        "run one simulated device (the real firmware under micropython) in the foreground",
    ),
]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser. Subcommand modules are imported lazily: with ``only`` set, just that one is imported
    (its arguments are needed); the others get a bare sub-parser, which is all ``ida --help`` shows."""
    parser = argparse.ArgumentParser(
        prog="ida",
        description="Industrial identifier resolution at the edge: gateway, recursive-node simulator, "
        "factory flashing, technician console, fleet simulator and benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"ida {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in SUBCOMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def _chosen(argv: Sequence[str]) -> str | None:
    names = {name for name, _m, _h in SUBCOMMANDS}
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in names else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = _chosen(argv)
    parser = build_parser(only=chosen or "")
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except CliError as e:
        print(f"ida {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
