"""The node's REST administration: ``PUT`` / ``DELETE /api/handles/{handle}`` as HANDLE.NET's REST API takes them.

``PUT`` without ``index``: create (``overwrite=false``: 409 / 101 when the handle exists; default and
``overwrite=true``: replace the record). ``PUT ?index=I&...``: add values at those indexes (``overwrite=false``:
409 / 201 when one is in use; default: add or replace). ``DELETE ?index=I&...``: remove values; ``DELETE``:
delete the handle. Body: ``{"handle": ..., "values": [...]}`` (the handle must match the path) or a list of values.

Authentication: HTTP basic, user ``INDEX:HANDLE`` (percent-encoded or not), password the admin's ``HS_SECKEY``
(``ida node --admin-secret``). No credentials: 401 / 402; a wrong secret: 403 / 403. Then the same checks and
changes as the native side (:class:`tools.harness.node.adminops.AdminOps`). Status codes follow HANDLE.NET:
1 -> 200 (201 for a create or add without overwrite), 100 -> 404, 101 / 201 -> 409, 102 / 200 / 202 / 301 -> 400,
400 / 401 / 403 -> 403. (Client-certificate authentication needs TLS, which the node's REST side does not serve.)
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from aiohttp import web

from proto.handle import AdminRequest
from proto.handle.numbers import (
    RC_AUTHEN_FAILED,
    RC_AUTHEN_NEEDED,
    RC_PROTOCOL_ERROR,
    RC_SUCCESS,
    OpCode,
)
from proto.records import HandleValue, RecordFormatError
from tools.harness.node.adminops import OP_NAMES, Identity, Refusal

if TYPE_CHECKING:
    from tools.harness.node.server import NodeServer

__all__ = ["add_admin_routes", "ADMIN_STATUS"]

ADMIN_STATUS = {
    1: 200,
    100: 404,
    101: 409,
    201: 409,
    102: 400,
    200: 400,
    202: 400,
    301: 400,
    4: 400,
    402: 401,
    400: 403,
    401: 403,
    403: 403,
    404: 403,
    3: 503,
}


def _who(header: str | None) -> tuple[Identity, bytes] | None:
    if not header or not header.strip().lower().startswith("basic "):
        return None
    try:
        raw = base64.b64decode(header.strip()[6:].strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = raw.partition(b":")
    if not sep:
        return None
    try:
        return Identity.parse(unquote(user.decode("utf-8"))), password
    except (UnicodeDecodeError, RecordFormatError):
        return None


def _values(body: Any, handle: str) -> tuple[HandleValue, ...]:
    if isinstance(body, dict):
        if "handle" in body and str(body["handle"]).encode().lower() != handle.encode().lower():
            raise ValueError("the handle in the body is not the handle in the path")
        body = body.get("values", [])
    if not isinstance(body, list):
        raise ValueError("the body is not a record or a list of values")
    return tuple(HandleValue.from_rest(v) for v in body)


def _request(request: web.Request, handle: str, body: Any) -> tuple[AdminRequest, bool]:
    indexes = [int(i) for i in request.query.getall("index", [])]
    overwrite_q = request.query.get("overwrite")
    if request.method == "DELETE":
        if indexes:
            return AdminRequest(OpCode.REMOVE_VALUE, handle, indexes=tuple(indexes)), False
        return AdminRequest(OpCode.DELETE_HANDLE, handle), False
    values = _values(body, handle)
    overwrite = overwrite_q is None or overwrite_q.lower() == "true"
    if not indexes:
        return AdminRequest(OpCode.CREATE_HANDLE, handle, values), overwrite
    if sorted(indexes) != sorted(v.index for v in values):
        raise ValueError("the index parameters do not match the values' indexes")
    return AdminRequest(OpCode.ADD_VALUE, handle, values), overwrite


def add_admin_routes(app: web.Application, node: NodeServer) -> None:
    """``PUT`` and ``DELETE`` of ``/api/handles/{handle}`` on ``app``, administering ``node``'s store."""
    ops = node.admin.ops

    def reply(code: int, handle: str, text: str = "", created: bool = False) -> web.Response:
        node.stats.answers[code] += 1
        body: dict[str, Any] = {"responseCode": code, "handle": handle}
        if text:
            body["message"] = text
        status = 201 if created and code == RC_SUCCESS else ADMIN_STATUS.get(code, 500)
        return web.json_response(body, status=status)

    async def change(request: web.Request) -> web.Response:
        node.stats.requests["http"] += 1
        handle = request.match_info.get("handle", "")
        who = _who(request.headers.get("Authorization"))
        if who is None:
            return reply(
                int(RC_AUTHEN_NEEDED), handle, "authenticate with HTTP basic: INDEX:HANDLE and secret"
            )
        try:
            body = json.loads(await request.read() or b"null") if request.method == "PUT" else None
            req, overwrite = _request(request, handle, body)
        except (ValueError, RecordFormatError) as e:
            return reply(int(RC_PROTOCOL_ERROR), handle, str(e))
        ident, password = who
        secret = ops.secret_key(ident)
        if secret is None or not hmac.compare_digest(secret, password):
            return reply(int(RC_AUTHEN_FAILED), handle, f"no HS_SECKEY at {ident} matches the password")
        refusal: Refusal | None = (
            ops.precheck(req, overwrite) or ops.authorize(req, ident, overwrite) or ops.apply(req, overwrite)
        )
        if refusal is not None:
            ops.count(OP_NAMES[req.opcode], refusal.code)
            return reply(refusal.code, handle, refusal.text)
        created = not overwrite and req.opcode in (OpCode.CREATE_HANDLE, OpCode.ADD_VALUE)
        return reply(int(RC_SUCCESS), handle, created=created)

    app.router.add_put("/api/handles/{handle:.+}", change)
    app.router.add_delete("/api/handles/{handle:.+}", change)
