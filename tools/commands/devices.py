"""`ida devices`: the device registry and remote management of a running gateway, over its HTTP API.

    ida devices                                   list devices (one line each)
    ida devices show 88.123.99/PUMP-0001          one device as JSON (latest report, config state)
    ida devices config 88.123.99/PUMP-0001 --interval 60 --meta URL=https://example.com/pump
                                                  set the desired config; the device gets it over its transport

``--gateway URL`` (default ``$IDA_GATEWAY`` or http://127.0.0.1:8080) names the gateway's HTTP API.
Exit codes: 0 ok; 1 unknown device; 2 bad arguments or the gateway refused them; 3 gateway not reachable.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from tools.errors import CliError

DEFAULT_GATEWAY = "http://127.0.0.1:8080"
EXIT_UNKNOWN = 1
EXIT_UNREACHABLE = 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gateway",
        "-g",
        metavar="URL",
        default=os.environ.get("IDA_GATEWAY") or DEFAULT_GATEWAY,
        help=f"gateway HTTP API (default $IDA_GATEWAY or {DEFAULT_GATEWAY})",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S", help="HTTP timeout (default 5)")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.add_parser("list", help="list devices (the default)")
    show = sub.add_parser("show", help="one device as JSON")
    show.add_argument("identifier", metavar="ID")
    cfg = sub.add_parser(
        "config", help="set a device's desired config (report interval, identifier metadata)"
    )
    cfg.add_argument("identifier", metavar="ID")
    cfg.add_argument("--interval", type=int, metavar="S", help="report interval in seconds (10-86400)")
    cfg.add_argument(
        "--meta",
        action="append",
        metavar="TYPE=TEXT",
        default=None,
        help="identifier metadata value (repeatable; replaces the whole map; --meta '' clears it)",
    )


def _meta(items: list[str] | None) -> dict[str, str] | None:
    if items is None:
        return None
    out: dict[str, str] = {}
    for item in items:
        if item == "":
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"--meta: expected TYPE=TEXT, got {item!r}")
        out[key] = value
    return out


def request(base: str, method: str, path: str, body: Any = None, timeout: float = 5.0) -> tuple[int, Any]:
    """One JSON request to the gateway's HTTP API: (status, decoded body)."""
    url = base.rstrip("/") + path
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw or b"null")
        except ValueError:
            return e.code, {"error": raw.decode(errors="replace")}
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise CliError(f"gateway {base} not reachable: {reason}", EXIT_UNREACHABLE) from None


def _path(ident: str) -> str:
    return "/api/devices/" + urllib.parse.quote(ident, safe="/")


def _line(d: dict[str, Any]) -> str:
    online = {True: "online", False: "offline", None: "-"}[d.get("online")]
    cfg = d.get("config") or {}
    return (
        f"{d['id']}  {online}  {d.get('transport') or '-'}  board={d.get('board') or '-'}  "
        f"fw={d.get('fw') or '-'}  reports={d.get('reports_total', 0)}  queue={d.get('queue')}  "
        f"config={cfg.get('state', '-')}"
    )


def run(args: argparse.Namespace) -> int:
    action = args.action or "list"
    if action == "list":
        status, body = request(args.gateway, "GET", "/api/devices", timeout=args.timeout)
        if status != 200:
            raise CliError(f"gateway answered {status}: {body}")
        devices = body.get("devices", [])
        if args.json:
            print(json.dumps(devices, indent=2, ensure_ascii=False))
        else:
            for d in devices:
                print(_line(d))
            if not devices:
                print("no devices yet")
        return 0
    if action == "show":
        status, body = request(args.gateway, "GET", _path(args.identifier), timeout=args.timeout)
        if status == 404:
            raise CliError(f"{args.identifier}: unknown device", EXIT_UNKNOWN)
        if status != 200:
            raise CliError(
                f"gateway answered {status}: {body.get('error', body) if isinstance(body, dict) else body}"
            )
        print(json.dumps(body, indent=2, ensure_ascii=False))
        return 0
    # config
    payload: dict[str, Any] = {}
    if args.interval is not None:
        payload["interval"] = args.interval
    meta = _meta(args.meta)
    if meta is not None:
        payload["meta"] = meta
    if not payload:
        raise CliError("config: give --interval and/or --meta")
    status, body = request(
        args.gateway, "PUT", _path(args.identifier) + "/config", payload, timeout=args.timeout
    )
    if status != 200:
        raise CliError(
            f"gateway refused the config ({status}): {body.get('error', body) if isinstance(body, dict) else body}"
        )
    if args.json:
        print(json.dumps(body, ensure_ascii=False))
    else:
        c = body["config"]
        print(
            f"{body['id']}: desired config cfgver={c['cfgver']} interval={c.get('interval', '-')} "
            f"meta={json.dumps(c.get('meta', {}), ensure_ascii=False)}"
        )
    return 0
