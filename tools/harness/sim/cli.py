"""`ida sim`: a simulated fleet against a running gateway (docs in tools/harness/sim/__init__.py).

    ida sim --devices 3                                   # 3 real firmware processes (micropython), CoAP
    ida sim --devices 200 --transport mix --interval 10 --duration 60
    ida sim --devices 10000 --mode light --json           # the protocol-level simulator, one process

Exit codes: 0 the fleet ran (also when stopped with Ctrl-C), 1 it could not start (no micropython, data dir not
writable, sockets), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tools.errors import CliError
from tools.harness.sim.config import FIRMWARE_MAX_AUTO, MODES, TRANSPORTS, SimConfig, SimError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", "-n", type=int, required=True, metavar="N", help="number of devices")
    p.add_argument(
        "--gateway",
        default=os.environ.get("IDA_SIM_GATEWAY", "coap://127.0.0.1:5683"),
        metavar="URL",
        help="the gateway's CoAP address (default coap://127.0.0.1:5683)",
    )
    p.add_argument(
        "--broker",
        default=os.environ.get("IDA_SIM_BROKER", "mqtt://127.0.0.1:1883"),
        metavar="URL",
        help="the MQTT broker the gateway listens on (default mqtt://127.0.0.1:1883)",
    )
    p.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="coap",
        help="coap, mqtt, or mix (even devices CoAP, odd devices MQTT); default coap",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=60.0,
        metavar="S",
        help="report interval in seconds (default 60; firmware mode: a whole number 10-86400)",
    )
    p.add_argument(
        "--duration", type=float, default=None, metavar="S", help="stop after S seconds (default: Ctrl-C)"
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="auto",
        help=f"firmware: real firmware processes; light: protocol-level simulator in one process; "
        f"auto: firmware for N <= {FIRMWARE_MAX_AUTO}, else light",
    )
    p.add_argument(
        "--prefix", default="88.123.99", help="identifier prefix (devices are <prefix>/SIM-00001...)"
    )
    p.add_argument("--first", type=int, default=1, metavar="K", help="number of the first device (default 1)")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="device state: firmware devices' flash dirs, the light fleet's boot counter "
        "(default $IDA_SIM_DATA or ./sim-data)",
    )
    p.add_argument(
        "--resolve-every",
        type=float,
        default=0.0,
        metavar="S",
        help="each device resolves an identifier every S seconds (default 0 = off)",
    )
    p.add_argument(
        "--resolve-id",
        action="append",
        default=[],
        metavar="ID",
        help="identifier to resolve (repeatable, taken in turn); default: the device's own",
    )
    p.add_argument(
        "--summary-every",
        type=float,
        default=10.0,
        metavar="S",
        help="one summary line every S seconds (default 10; 0 = none)",
    )
    p.add_argument(
        "--drain",
        type=float,
        default=5.0,
        metavar="S",
        help="at the end, wait up to S seconds for reports in flight (default 5)",
    )
    p.add_argument(
        "--coap-sockets",
        type=int,
        default=0,
        metavar="K",
        help="light mode: UDP sockets the CoAP devices share (default min(N, 1024))",
    )
    p.add_argument(
        "--mqtt-connections",
        type=int,
        default=0,
        metavar="K",
        help="light mode: 0 = one MQTT connection per device (default); K = K shared connections",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (schedule jitter)")
    p.add_argument(
        "--json", action="store_true", help="final summary as JSON on stdout (periodic lines on stderr)"
    )


# options that are SimConfig fields of the same name
_CONFIG_OPTIONS = (
    "devices",
    "gateway",
    "broker",
    "transport",
    "interval",
    "duration",
    "mode",
    "prefix",
    "first",
    "resolve_every",
    "summary_every",
    "drain",
    "coap_sockets",
    "mqtt_connections",
    "seed",
)


def config_from_args(args: argparse.Namespace) -> SimConfig:
    kw = {name: getattr(args, name) for name in _CONFIG_OPTIONS}
    if args.data_dir is not None:
        kw["data_dir"] = args.data_dir
    try:
        return SimConfig(resolve_ids=tuple(args.resolve_id), **kw)
    except SimError as e:
        raise CliError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from tools.harness.sim.runner import run_sim
    from tools.harness.sim.stats import format_final

    def line(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    try:
        result = run_sim(cfg, out=line)
    except SimError as e:
        raise CliError(str(e), exit_code=1) from None
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(format_final(result), flush=True)
    return 0
