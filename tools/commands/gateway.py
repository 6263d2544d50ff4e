"""`ida gateway`: run the edge gateway (CoAP, HTTP, MQTT front ends over the resolver) until SIGTERM/SIGINT.

Configuration: ``--config FILE`` (TOML, see docs/gateway.md and gateway.example.toml), then the flags below on top.
Exit codes: 0 clean stop; 2 bad configuration or flag; 1 could not start (e.g. a port in use).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gateway import config as gwconfig
from gateway.logfmt import configure
from tools.cliargs import namesakes
from tools.errors import CliError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", "-c", metavar="FILE", help="TOML configuration file (default: built-in defaults)"
    )
    p.add_argument(
        "--upstream",
        "-u",
        action="append",
        metavar="URL",
        default=None,
        help="recursive node, replaces [upstream] urls (repeatable): hdl://host:2641, hdl+tcp://host:port, "
        "http(s)://host:port",
    )
    p.add_argument(
        "--coap", metavar="HOST:PORT", help="CoAP bind address (default 127.0.0.1:5683; port 0 = any)"
    )
    p.add_argument(
        "--http", metavar="HOST:PORT", help="HTTP bind address (default 127.0.0.1:8080; port 0 = any)"
    )
    p.add_argument("--mqtt", metavar="URL", help="MQTT broker, e.g. mqtt://127.0.0.1:1883 ('' = MQTT off)")
    p.add_argument("--data-dir", metavar="DIR", help="runtime state directory (default $IDA_DATA or ./data)")
    p.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning or error (default info)")
    p.add_argument(
        "--print-config", action="store_true", help="print the effective configuration as JSON and exit"
    )


def load_config(args: argparse.Namespace) -> gwconfig.GatewayConfig:
    """The config file plus the flags; CliError (exit 2) naming the key or flag when something is wrong."""
    try:
        cfg = gwconfig.load(Path(args.config) if args.config else None)
        flags = namesakes(args, "upstream", "coap", "http", "mqtt", "data_dir", "log_level")
        return gwconfig.with_overrides(cfg, **flags)
    except gwconfig.ConfigError as e:
        raise CliError(f"ConfigError: {e}") from None


def _jsonable(cfg: gwconfig.GatewayConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg), default=str))


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    if args.print_config:
        print(json.dumps(_jsonable(cfg), indent=2))
        return 0
    configure(cfg.log.level)
    from gateway.service import Gateway  # after logging is set up; pulls in aiocoap, aiohttp, SQLite

    try:
        asyncio.run(Gateway(cfg).run(freeze_gc=True))
    except gwconfig.ConfigError as e:
        raise CliError(f"ConfigError: {e}") from None
    except OSError as e:
        print(f"ida gateway: cannot start: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0
