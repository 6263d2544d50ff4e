"""``ida broker config`` and ``ida broker certs``: the arguments and the run (a thin layer over the package)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tools.cliargs import namesakes
from tools.errors import CliError

from .errors import BrokerConfigError
from .generate import ACL_MODES, DEFAULT_GATEWAY, generate
from .tls import TlsFiles, make_certs

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="broker_command", metavar="COMMAND", required=True)
    c = sub.add_parser("config", help="password file, ACL and mosquitto.conf for the devices in the keystore")
    c.add_argument("--data-dir", help="where keystore.json is (default $IDA_DATA or ./data)")
    c.add_argument("--keystore", type=Path, help="keystore file (default <data dir>/keystore.json)")
    c.add_argument("--out", type=Path, required=True, help="directory for the generated files")
    c.add_argument("--tls-cert", type=Path, help="broker certificate (PEM)")
    c.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    c.add_argument("--ca", type=Path, help="CA that issued it (PEM); devices and gateways verify against it")
    c.add_argument("--port", type=int, default=8883, help="device TLS listener port (default 8883)")
    c.add_argument("--bind", default="0.0.0.0", help="device listener address (default 0.0.0.0)")
    c.add_argument("--service-port", type=int, default=8884, help="gateway TLS listener port (default 8884)")
    c.add_argument("--service-bind", default="127.0.0.1", help="gateway listener address (default 127.0.0.1)")
    c.add_argument(
        "--broker-host",
        default="localhost",
        help="name of the broker in its certificate, for the gateway's URL (default localhost)",
    )
    c.add_argument(
        "--plain-port", type=int, help="also a plain loopback listener: INSECURE, factory bench only"
    )
    c.add_argument(
        "--gateway",
        action="append",
        metavar="NAME",
        help=f"gateway user (repeatable; default {DEFAULT_GATEWAY})",
    )
    c.add_argument(
        "--outbox-topic",
        action="append",
        default=[],
        metavar="TOPIC",
        help="[outbox] mqtt_topic the gateways may publish to ({key} allowed)",
    )
    c.add_argument(
        "--acl",
        choices=ACL_MODES,
        default="explicit",
        help="explicit per-device entries (default) or one %%u pattern block (large fleets)",
    )
    k = sub.add_parser("certs", help="a private CA and a server certificate for the broker")
    k.add_argument("--out", type=Path, required=True)
    k.add_argument("--host", action="append", required=True, help="DNS name or IP of the broker (repeatable)")
    k.add_argument("--days", type=int, default=825, help="server certificate lifetime (default 825)")


def run(args: argparse.Namespace) -> int:
    try:
        if args.broker_command == "certs":
            files = make_certs(args.out, args.host, args.days)
            print(f"CA {files.ca}, server certificate {files.cert} for {', '.join(args.host)}; keys 0600")
            return 0
        tls_args = (args.tls_cert, args.tls_key, args.ca)
        if any(tls_args) and not all(tls_args):
            raise BrokerConfigError("--tls-cert, --tls-key and --ca go together")
        tls = TlsFiles(*tls_args) if all(tls_args) else None
        data = Path(args.data_dir or os.environ.get("IDA_DATA") or "data")
        listeners = namesakes(
            args, "port", "bind", "service_port", "service_bind", "broker_host", "plain_port"
        )
        res = generate(
            data,
            args.out,
            tls=tls,
            gateways=args.gateway or (DEFAULT_GATEWAY,),
            outbox_topics=args.outbox_topic,
            acl_mode=args.acl,
            keystore=args.keystore,
            **listeners,
        )
    except BrokerConfigError as e:
        raise CliError(str(e)) from None
    print(f"{res.devices} devices, gateways {', '.join(res.gateways)} -> {res.out}")
    for path in res.files:
        print(f"  {path}")
    for ident, why in res.skipped:
        print(f"  skipped {ident}: {why}")
    if tls is None:
        print("  WARNING: no TLS listener: INSECURE plain mode, factory bench only")
    return 0
