"""The node's Handle REST API (aiohttp), as a Handle.Net REST client expects it.

``GET /api/handles/{handle}`` (``?type=T`` and ``?index=N``, both repeatable; a value is kept if it matches
either list) answers, with ``Content-Type: application/json``:

===========================================  ======  ========================================================
outcome                                      HTTP    body
===========================================  ======  ========================================================
found                                        200     ``{"responseCode": 1, "handle": h, "values": [...]}``
handle not found                             404     ``{"responseCode": 100, "handle": h}``
no value matches the type/index filter       200     ``{"responseCode": 200, "handle": h, "values": []}``
prefix not hosted here                       404     ``{"responseCode": 301, "handle": h, "message": ...}``
bad ``index`` query / empty handle           400     ``{"responseCode": 2 / 102, "handle": h, "message": ...}``
simulated failure (``--failure-rate``)       500     ``{"responseCode": 2, "handle": h, "message": ...}``
simulated busy (``--busy-rate``)             503     ``{"responseCode": 3, "handle": h, "message": ...}``
===========================================  ======  ========================================================

Values are shown as :meth:`HandleValue.to_rest` shows them (``string``, ``base64`` or ``admin`` data);
values that are not publicly readable are left out. The handle in the answer is the one in the request
(path segments percent-decoded, so ``%2F`` and a literal ``/`` are the same).

``GET /api/handles?prefix=P`` (``page`` and ``pageSize`` optional, page 0-based) lists the handles under a
hosted prefix: ``{"responseCode": 1, "prefix": P, "totalCount": "n", "handles": [...]}``.

``PUT`` / ``DELETE /api/handles/{handle}`` administer the node (:mod:`tools.harness.node.restadmin`, HTTP
basic authentication); the fault knobs do not apply to them.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from aiohttp import web

from proto.handle.numbers import (
    RC_ERROR,
    RC_HANDLE_NOT_FOUND,
    RC_INVALID_HANDLE,
    RC_SERVER_BUSY,
    RC_SERVER_NOT_RESP,
    RC_SUCCESS,
    RC_VALUES_NOT_FOUND,
)
from proto.records import Record, rest_error
from tools.harness.node.faults import DropConnection, Fault
from tools.harness.node.restadmin import add_admin_routes

if TYPE_CHECKING:
    from tools.harness.node.server import NodeServer

__all__ = ["make_app", "HTTP_STATUS"]

HTTP_STATUS: dict[int, int] = {
    RC_SUCCESS: 200,
    RC_ERROR: 500,
    RC_SERVER_BUSY: 503,
    RC_HANDLE_NOT_FOUND: 404,
    RC_INVALID_HANDLE: 400,
    RC_VALUES_NOT_FOUND: 200,
    RC_SERVER_NOT_RESP: 404,
}

_dumps = functools.partial(json.dumps, ensure_ascii=False)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Reply(NamedTuple):
    response: web.Response
    code: int  # responseCode
    values: int


def _json(body: dict[str, Any], code: int, node: NodeServer, status: int | None = None) -> _Reply:
    node.stats.answers[code] += 1
    resp = web.json_response(body, status=status or HTTP_STATUS.get(code, 500), dumps=_dumps)
    return _Reply(resp, code, len(body.get("values", ())))


def _error(code: int, handle: str, message: str, node: NodeServer, status: int | None = None) -> _Reply:
    return _json(rest_error(code, handle, message or None), code, node, status)


def _gated(node: NodeServer, handler: Callable[[web.Request, Fault], Awaitable[_Reply]]) -> Handler:
    """Run the node's knobs before ``handler``; a drop closes the connection without a response."""

    async def run(request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        name = request.match_info.get("handle") or request.query.get("prefix", "")
        try:
            fault = await node.http_gate()
        except DropConnection as e:
            if e.args:  # a failure, not silence
                node.log_request("http", request.remote, None, name, "dropped", 0, Fault.DROP, t0)
            if request.transport is not None:
                request.transport.close()
            raise web.HTTPServiceUnavailable() from None  # never reaches the client: the socket is closed
        reply = await handler(request, fault)
        node.log_request("http", request.remote, None, name, str(reply.code), reply.values, fault, t0)
        return reply.response

    return run


def make_app(node: NodeServer) -> web.Application:
    """The aiohttp application of ``node`` (its store, knobs and stats)."""

    async def get_handle(request: web.Request, fault: Fault) -> _Reply:
        handle = request.match_info.get("handle", "")
        if not handle:
            return await list_handles(request, fault)
        if fault is Fault.ERROR:
            return _error(RC_ERROR, handle, "simulated failure", node)
        if fault is Fault.BUSY:
            return _error(RC_SERVER_BUSY, handle, "server busy (simulated)", node)
        types = request.query.getall("type", [])
        try:
            indexes = [int(i) for i in request.query.getall("index", [])]
            if any(not 0 <= i <= 0xFFFFFFFF for i in indexes):
                raise ValueError
        except ValueError:
            return _error(RC_ERROR, handle, "index must be an unsigned 32-bit integer", node, 400)
        look = node.store.resolve(handle, types, indexes)
        if look.code == RC_SUCCESS:
            return _json(Record(handle, look.values).to_rest(), RC_SUCCESS, node)
        if look.code == RC_VALUES_NOT_FOUND:
            return _json(
                {"responseCode": RC_VALUES_NOT_FOUND, "handle": handle, "values": []}, look.code, node
            )
        return _error(look.code, handle, look.message, node)

    async def list_handles(request: web.Request, fault: Fault) -> _Reply:
        prefix = request.query.get("prefix", "")
        if fault is Fault.ERROR:
            return _error(RC_ERROR, prefix, "simulated failure", node)
        if fault is Fault.BUSY:
            return _error(RC_SERVER_BUSY, prefix, "server busy (simulated)", node)
        if not prefix:
            return _error(RC_ERROR, "", "give a prefix: /api/handles?prefix=...", node, 400)
        if prefix.upper().startswith("0.NA/"):
            prefix = prefix[5:]
        if not node.store.hosts(prefix):
            return _error(RC_SERVER_NOT_RESP, prefix, "server not responsible for prefix", node)
        handles = node.store.handles(prefix)
        body: dict[str, Any] = {"responseCode": RC_SUCCESS, "prefix": prefix, "totalCount": str(len(handles))}
        if "page" in request.query or "pageSize" in request.query:
            try:
                page = int(request.query.get("page", "0"))
                size = int(request.query.get("pageSize", "100"))
                if page < 0 or size <= 0:
                    raise ValueError
            except ValueError:
                return _error(RC_ERROR, prefix, "page must be >= 0 and pageSize > 0", node, 400)
            handles = handles[page * size : (page + 1) * size]
            body.update(page=page, pageSize=size)
        body["handles"] = handles
        return _json(body, RC_SUCCESS, node)

    app = web.Application()
    app.router.add_get("/api/handles", _gated(node, list_handles))
    app.router.add_get("/api/handles/{handle:.*}", _gated(node, get_handle))
    add_admin_routes(app, node)
    return app
