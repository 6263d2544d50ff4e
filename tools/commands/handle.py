"""`ida handle create|add|modify|remove|delete ID`: administer a handle at its prefix's primary node.

    ida handle create 88.123.99/PUMP-000123 --upstream hdl://node:2641 --auth 300:0.NA/88.123.99 \\
        --key admpriv.bin --value 1:URL:https://id.example.com/PUMP-000123 --value 2:MAC:24:0a:c4:12:34:56

``hdl://`` upstreams speak the native protocol (session, challenge answered with ``--key``, the flow of CNRI's
own tools: :mod:`gateway.upstream.admin`); ``http(s)://`` upstreams the Handle REST API
(:mod:`gateway.upstream.admin_rest`) with a client certificate made from ``--key`` (https) or HTTP basic
authentication with the secret in ``--secret-env VAR``. A create without an ``HS_ADMIN`` value gets one naming
``--auth`` with every permission (at index 100), as ``hdl-create`` does.

``--value INDEX:TYPE:DATA`` (repeatable): DATA is text; ``@FILE`` reads it from a file (e.g. a public key for
``HS_PUBKEY``); for ``HS_ADMIN`` it is ``INDEX:HANDLE`` or ``INDEX:PERMISSIONS:HANDLE`` (12 bits, e.g.
``300:111111111111:0.NA/88.123.99``).

Output: one line, or with ``--json`` the Handle REST shape (``{"responseCode": 1, "handle": ...}``). Errors are
one line on stderr (and the JSON on stdout with ``--json``). Exit codes: 0 done; 1 refused (exists, not found,
not homed, not authorized, wrong key, ...); 2 bad option, identifier, value or key file; 3 upstream down or busy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import ssl
import sys
from pathlib import Path
from typing import Any

from gateway.upstream.admin import OPERATIONS, AdminAuth, AdminClient, AdminError, AdminResult
from gateway.upstream.admin_rest import RestAdminClient
from gateway.upstream.urls import make_admin_client
from proto import identifier
from proto.handle import AdminRequest
from proto.handle.keys import KeyFileError
from proto.handle.numbers import AdminPerm
from proto.records import AdminRef, HandleValue, RecordFormatError, parse_value_ref
from tools.errors import CliError

EXIT_REFUSED = 1
EXIT_BAD_INPUT = 2
EXIT_DOWN = 3
ADMIN_INDEX = 100
_VERBS = {
    "create": "create a handle with the given values",
    "add": "add values to a handle",
    "modify": "replace values of a handle (by index)",
    "remove": "remove values of a handle (by index)",
    "delete": "delete a handle",
}
_DONE = {
    "create": "created",
    "add": "added to",
    "modify": "modified",
    "remove": "removed from",
    "delete": "deleted",
}
_ADMIN_DATA = re.compile(r"^(\d+):(?:([01]{12}):)?(.+)$")


def parse_value(text: str, base: Path | None = None) -> HandleValue:
    """``INDEX:TYPE:DATA`` -> a HandleValue (see the module docstring); ValueError names the problem."""
    index, _, rest = text.partition(":")
    vtype, sep, data = rest.partition(":")
    if not index.isdigit() or not vtype or not sep:
        raise ValueError(f"--value {text!r}: expected INDEX:TYPE:DATA, e.g. 1:URL:https://example.com/x")
    if not 0 < int(index) <= 0x7FFFFFFF:
        raise ValueError(f"--value {text!r}: the index must be a positive 32-bit number")
    if data.startswith("@"):
        path = Path(data[1:]) if base is None else base / data[1:]
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise ValueError(f"--value {text!r}: cannot read {path}: {e.strerror}") from None
    elif vtype.upper() == "HS_ADMIN":
        m = _ADMIN_DATA.match(data)
        if not m:
            raise ValueError(f"--value {text!r}: HS_ADMIN data is INDEX:HANDLE or INDEX:PERMISSIONS:HANDLE")
        perms = int(m.group(2), 2) if m.group(2) else int(AdminPerm.ALL)
        raw = AdminRef(m.group(3), int(m.group(1)), perms).encode()
    else:
        raw = data.encode()
    return HandleValue(int(index), vtype, raw)


def admin_value(ref: str, index: int = ADMIN_INDEX) -> HandleValue:
    """An HS_ADMIN value naming the admin ``ref`` (``INDEX:HANDLE``) with every permission."""
    handle, at = parse_value_ref(ref)
    return HandleValue(index, "HS_ADMIN", AdminRef(handle, at, int(AdminPerm.ALL)).encode())


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="handle_command", metavar="OPERATION", required=True)
    for verb, help_text in _VERBS.items():
        q = sub.add_parser(verb, help=help_text, description=help_text)
        q.add_argument("identifier", metavar="ID", help="the handle, e.g. 88.123.99/PUMP-000123")
        q.add_argument(
            "--upstream",
            "-u",
            required=True,
            metavar="URL",
            help="the prefix's primary: hdl://host:2641 (native) or https://host:8000 (REST)",
        )
        q.add_argument(
            "--auth", required=True, metavar="INDEX:HANDLE", help="the admin, e.g. 300:0.NA/88.123.99"
        )
        q.add_argument("--key", metavar="FILE", help="the admin's HANDLE.NET private key file (admpriv.bin)")
        q.add_argument(
            "--passphrase-env", metavar="VAR", help="environment variable holding the key's passphrase"
        )
        q.add_argument(
            "--secret-env", metavar="VAR", help="REST: environment variable holding the admin's secret"
        )
        q.add_argument(
            "--tls-ca", metavar="FILE", help="REST over https: the server's CA or certificate (PEM)"
        )
        q.add_argument("--timeout", type=float, default=10.0, metavar="S", help="per exchange (default 10)")
        q.add_argument("--json", action="store_true", help="print the Handle REST JSON shape")
        if verb in ("create", "add", "modify"):
            q.add_argument(
                "--value", action="append", default=[], metavar="INDEX:TYPE:DATA", help="a value (repeatable)"
            )
        if verb in ("create", "add"):
            q.add_argument("--overwrite", action="store_true", help="replace what is there")
        if verb == "create":
            q.add_argument(
                "--no-admin-value", action="store_true", help="do not add an HS_ADMIN value naming --auth"
            )
        if verb == "remove":
            q.add_argument("--index", action="append", type=int, default=[], metavar="N", help="repeatable")


def build_request(args: argparse.Namespace) -> tuple[AdminRequest, bool]:
    """The administration request the options describe; CliError (exit 2) for a bad one."""
    try:
        handle = identifier.normalise(args.identifier)
    except identifier.IdentifierError as e:
        raise CliError(f"bad identifier {args.identifier!r}: {e.detail}") from None
    verb = args.handle_command
    try:
        values = [parse_value(v) for v in getattr(args, "value", [])]
        if verb == "create" and not args.no_admin_value and not any(v.type == "HS_ADMIN" for v in values):
            values.append(admin_value(args.auth))
    except (ValueError, RecordFormatError) as e:
        raise CliError(str(e)) from None
    if verb in ("add", "modify") and not values:
        raise CliError(f"{verb} needs at least one --value INDEX:TYPE:DATA")
    if verb == "remove" and not args.index:
        raise CliError("remove needs at least one --index N")
    if len({v.index for v in values}) != len(values):
        raise CliError("two --value options share an index")
    req = AdminRequest(OPERATIONS[verb], handle, tuple(values), tuple(getattr(args, "index", []) or ()))
    return req, bool(getattr(args, "overwrite", False))


def _secret(var: str | None, what: str) -> bytes | None:
    if var is None:
        return None
    value = os.environ.get(var)
    if value is None:
        raise CliError(f"{what}: environment variable {var} is not set")
    return value.encode()


def make_client(args: argparse.Namespace) -> AdminClient | RestAdminClient:
    """The client for ``--upstream`` with the admin's credentials; CliError for what is missing or unreadable."""
    key = None
    if args.key:
        try:
            key = AdminAuth.from_file(
                args.auth, args.key, _secret(args.passphrase_env, "--passphrase-env")
            ).key
        except OSError as e:
            raise CliError(f"--key: cannot read {args.key}: {e.strerror}") from None
        except KeyFileError as e:
            raise CliError(f"--key {args.key}: {e}") from None
        except (ValueError, RecordFormatError) as e:
            raise CliError(str(e)) from None
    tls = None
    if args.tls_ca:
        try:
            tls = ssl.create_default_context(cafile=args.tls_ca)
        except (OSError, ssl.SSLError) as e:
            raise CliError(f"--tls-ca {args.tls_ca}: {e}") from None
    secret = _secret(args.secret_env, "--secret-env")
    try:
        return make_admin_client(
            args.upstream, args.auth, key=key, secret=secret, tls=tls, timeout=args.timeout
        )
    except (ValueError, RecordFormatError) as e:
        raise CliError(str(e)) from None


async def administer(
    client: AdminClient | RestAdminClient, req: AdminRequest, overwrite: bool
) -> AdminResult:
    """Send ``req`` and close the client."""
    try:
        return await client.request(req, overwrite=overwrite)
    finally:
        await client.close()


def _print_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, ensure_ascii=False))


def run(args: argparse.Namespace) -> int:
    req, overwrite = build_request(args)
    client = make_client(args)
    verb = args.handle_command
    try:
        result = asyncio.run(administer(client, req, overwrite))
    except AdminError as e:
        if args.json:
            _print_json({"responseCode": e.code, "handle": req.handle, "error": e.kind, "message": str(e)})
        raise CliError(str(e), EXIT_DOWN if e.transient else EXIT_REFUSED) from None
    if args.json:
        _print_json({"responseCode": 1, "handle": req.handle, "operation": verb, "node": result.node})
    else:
        how = f" (session {result.session_id}, challenge answered)" if result.challenged else ""
        print(f"{_DONE[verb]} {req.handle} at {result.node}{how}")
    sys.stdout.flush()
    return 0
