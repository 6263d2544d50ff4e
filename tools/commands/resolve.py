"""`ida resolve ID`: one resolution through the gateway's engine (zone, cache, upstream pool).

Exit codes: 0 found; 1 handle not found or no value matches the filters; 2 bad identifier or bad option;
3 no upstream answered (all down, refused, timed out) and nothing cached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from gateway.errors import AllUpstreamsFailed, UpstreamError
from gateway.resolution import SOURCE_NAMES, Answer
from gateway.resolver import Resolver, ResolverConfig, default_upstreams
from proto import devicemsg, identifier
from proto.records import AdminRef, HandleValue, RecordFormatError, rest_error
from tools.errors import CliError

EXIT_FOUND = 0
EXIT_NOT_FOUND = 1
EXIT_BAD_INPUT = 2
EXIT_UPSTREAM_DOWN = 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("identifier", metavar="ID", help="handle to resolve, e.g. 88.123.99/PUMP-0001")
    p.add_argument(
        "--upstream",
        "-u",
        action="append",
        metavar="URL",
        default=[],
        help="recursive node: hdl://host:2641, hdl+tcp://host:port, http(s)://host:port "
        "(repeatable; default $IDA_UPSTREAM or hdl://127.0.0.1:2641)",
    )
    p.add_argument(
        "--type",
        "-t",
        action="append",
        dest="types",
        metavar="T",
        default=[],
        help="only values of this type (repeatable)",
    )
    p.add_argument(
        "--index",
        "-i",
        action="append",
        dest="indexes",
        metavar="N",
        type=int,
        default=[],
        help="only the value with this index (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print the Handle REST JSON shape")
    p.add_argument(
        "--timeout", type=float, default=5.0, metavar="S", help="overall upstream timeout (default 5)"
    )
    p.add_argument(
        "--hedge",
        type=float,
        default=None,
        metavar="S",
        help="ask the next node too when the first is silent this long",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="use (and update) the persistent cache and zone in DIR; default: in-memory cache",
    )


def _config(args: argparse.Namespace) -> ResolverConfig:
    if args.timeout <= 0:
        raise CliError("--timeout must be positive")
    if any(i < 0 or i > 0xFFFFFFFF for i in args.indexes):
        raise CliError("--index must be an unsigned 32-bit integer")
    upstreams = list(args.upstream) or default_upstreams()
    return ResolverConfig(
        upstreams=upstreams,
        timeout=args.timeout,
        attempt_timeout=args.timeout / len(upstreams),  # leave time to fail over to every node
        hedge_delay=args.hedge,
        data_dir=args.data_dir,
    )


async def resolve_once(
    config: ResolverConfig, ident: str, types: tuple[str, ...] = (), indexes: tuple[int, ...] = ()
) -> Answer:
    """Library form of the command: build a resolver, resolve once, close it (flushing the cache)."""
    resolver = Resolver(config)
    try:
        return await resolver.resolve(ident, types, indexes)
    finally:
        await resolver.close()


def _show(v: HandleValue) -> str:
    text = v.text()
    if text is not None:
        return text
    if v.type == "HS_ADMIN":
        try:
            adm = AdminRef.decode(v.data)
            return f"admin {adm.index}:{adm.handle} permissions {adm.permissions:012b}"
        except RecordFormatError:
            pass
    return "0x" + v.data.hex()


def _print_text(answer: Answer, out: TextIO) -> None:
    now = time.time()
    src = SOURCE_NAMES.get(answer.source, str(answer.source))
    print(f"{answer.handle}  (source: {src}, ttl: {answer.max_age(now)} s)", file=out)
    values = answer.record.values if answer.record is not None else ()
    rows = [("index", "type", "ttl", "data")]
    for v in values:
        data = _show(v)
        ttl = f"{v.ttl}" + (" (abs)" if v.ttl_type else "")
        rows.append((str(v.index), v.type, ttl, data.replace("\n", "\\n")))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3], file=out)


def run(args: argparse.Namespace) -> int:
    try:
        name = identifier.normalise(args.identifier)
    except identifier.IdentifierError as e:
        raise CliError(
            f"bad identifier {args.identifier!r}: {e.detail} ({e.reason})", EXIT_BAD_INPUT
        ) from None
    try:
        config = _config(args)
        answer = asyncio.run(resolve_once(config, name, tuple(args.types), tuple(args.indexes)))
    except ValueError as e:  # a bad --upstream URL, a bad zone file
        raise CliError(str(e), EXIT_BAD_INPUT) from None
    except AllUpstreamsFailed as e:
        lines = [f"{name}: all upstreams failed, nothing cached"]
        lines += [f"  {node}: {type(err).__name__}: {err}" for node, err in e.errors.items()]
        raise CliError("\n".join(lines), EXIT_UPSTREAM_DOWN) from None
    except UpstreamError as e:  # UpstreamTimeout: the overall timeout expired
        raise CliError(f"{name}: {type(e).__name__}: {e}", EXIT_UPSTREAM_DOWN) from None

    if answer.code == devicemsg.OK and answer.record is not None:
        if args.json:
            body: dict[str, Any] = answer.record.to_rest()
            print(json.dumps(body, ensure_ascii=False, indent=2))
        else:
            _print_text(answer, sys.stdout)
        return EXIT_FOUND
    if answer.code == devicemsg.VALUES_NOT_FOUND:
        message = f"{name}: no values match the type/index filter (values not found)"
    else:
        message = f"{name}: handle not found"
    if args.json:
        print(json.dumps(rest_error(answer.code, name, message), ensure_ascii=False, indent=2))
    print(f"ida resolve: {message}", file=sys.stderr)
    return EXIT_NOT_FOUND
