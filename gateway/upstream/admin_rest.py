"""Handle administration over the Handle REST API (``http(s)://`` upstreams), as HANDLE.NET's server takes it.

=========  =====================================================================================
create     ``PUT /api/handles/{handle}?overwrite=false`` with ``{"handle": ..., "values": [...]}``
           (``overwrite=true`` replaces an existing record)
add        ``PUT /api/handles/{handle}?index=I&...&overwrite=false`` with the values at those indexes
modify     ``PUT /api/handles/{handle}?index=I&...&overwrite=true``
remove     ``DELETE /api/handles/{handle}?index=I&...``
delete     ``DELETE /api/handles/{handle}``
=========  =====================================================================================

Authentication, one of:

* HTTP basic: user ``300%3A0.NA/88.123.99`` (the admin ``INDEX:HANDLE``, its colon percent-encoded), password
  the admin's secret key (an ``HS_SECKEY`` value);
* a TLS client certificate (``https://`` only): made here from the admin's private key, self-signed, subject
  ``UID=300:0.NA/88.123.99``; the server matches its public key against the admin's ``HS_PUBKEY``.

The answer's ``responseCode`` is read as the native client reads a response code
(:func:`gateway.upstream.admin.admin_error`): the same one-line errors, the same ``kind``. An HTTP 401 without
a JSON body counts as 402 (authentication needed); a connection that cannot be made, or no answer within
``timeout``, is ``down``.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as _dt
import json
import ssl
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from gateway.upstream.admin import OPERATIONS, AdminError, AdminOperations, AdminResult, admin_error
from gateway.upstream.rest import MAX_BODY, handle_path
from proto.handle import AdminRequest
from proto.handle import keys as K
from proto.handle.numbers import RC_AUTHEN_NEEDED, RC_SUCCESS
from proto.records import HandleValue, Record, RecordFormatError, ValueRef

__all__ = ["RestAdminClient", "client_certificate", "rest_target"]

_OP_NAMES = {v: k for k, v in OPERATIONS.items()}


def rest_target(req: AdminRequest, overwrite: bool = False) -> tuple[str, str, dict[str, Any] | None]:
    """(HTTP method, path and query, JSON body or None) of one administration request (sans-I/O)."""
    op = _OP_NAMES[req.opcode]
    path = f"/api/handles/{handle_path(req.handle)}"
    query: list[tuple[str, str]] = []
    body: dict[str, Any] | None = None
    if op in ("create", "add", "modify"):
        method = "PUT"
        body = {"handle": req.handle, "values": [v.to_rest() for v in req.values]}
        if op != "create":
            query += [("index", str(v.index)) for v in req.values]
        query.append(("overwrite", "true" if op == "modify" or overwrite else "false"))
    else:
        method = "DELETE"
        query += [("index", str(i)) for i in req.indexes]
    return method, path + (f"?{urlencode(query)}" if query else ""), body


def client_certificate(key: K.PrivateKey, handle: str, index: int, days: int = 1) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM): a self-signed certificate for ``key`` with subject
    ``UID=INDEX:HANDLE``, as HANDLE.NET's REST interface reads the admin from a client certificate."""
    name = x509.Name([x509.NameAttribute(NameOID.USER_ID, str(ValueRef(handle, index)))])
    now = _dt.datetime.now(_dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), pem_key


class RestAdminClient(AdminOperations):
    """Administers handles through ``base`` (``https://host:8000``) as the admin ``handle``/``index``, with
    ``secret`` (HTTP basic) or ``key`` (TLS client certificate). ``tls`` is the context for ``https://``
    (default: the system's CAs); the client certificate is added to it."""

    def __init__(
        self,
        base: str,
        handle: str,
        index: int,
        *,
        key: K.PrivateKey | None = None,
        secret: bytes | None = None,
        timeout: float = 5.0,
        tls: ssl.SSLContext | None = None,
        node: str | None = None,
    ) -> None:
        if (key is None) == (secret is None):
            raise ValueError("give the admin's secret (basic authentication) or its key (client certificate)")
        https = base.startswith("https://")
        if key is not None and not https:
            raise ValueError("a client certificate needs an https:// upstream (or use a secret over http)")
        self.base = base.rstrip("/")
        self.handle, self.index = handle, index
        self.timeout = timeout
        self.node = node or base
        self._headers = {"Accept": "application/json"}
        if secret is not None:
            user = quote(str(ValueRef(handle, index)), safe="/").encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(user + b":" + secret).decode()
        self._tls: ssl.SSLContext | None = None
        self.certificate: bytes | None = None  # the client certificate (PEM) presented over https
        if https:
            self._tls = tls or ssl.create_default_context()
            if key is not None:
                cert, pem = client_certificate(key, handle, index)
                self.certificate = cert
                with tempfile.TemporaryDirectory() as tmp:
                    (Path(tmp) / "c.pem").write_bytes(cert)
                    (Path(tmp) / "k.pem").write_bytes(pem)
                    self._tls.load_cert_chain(Path(tmp) / "c.pem", Path(tmp) / "k.pem")
        self._session: aiohttp.ClientSession | None = None

    @property
    def auth(self) -> str:
        return str(ValueRef(self.handle, self.index))

    async def __aenter__(self) -> RestAdminClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._tls if self._tls is not None else False),
                headers=self._headers,
            )
        return self._session

    async def lookup(self, handle: str) -> tuple[HandleValue, ...] | None:
        """The handle's values as the REST API shows them to this admin, None when it has none."""
        status, obj = await self._call("GET", f"/api/handles/{handle_path(handle)}", None, "lookup", handle)
        if status == 404 or obj.get("responseCode") == 100:
            return None
        if obj.get("responseCode") != RC_SUCCESS:
            raise admin_error(int(obj.get("responseCode", 2)), "lookup", handle, self.auth, self.node)
        try:
            return Record.from_rest(obj).values
        except RecordFormatError as e:
            raise AdminError(f"lookup {handle}: {e}", self.node, kind="protocol") from None

    async def request(self, req: AdminRequest, *, overwrite: bool = False) -> AdminResult:
        op = _OP_NAMES[req.opcode]
        method, target, body = rest_target(req, overwrite)
        status, obj = await self._call(method, target, body, op, req.handle)
        code = obj.get("responseCode")
        if code is None and status == 401:
            code = int(RC_AUTHEN_NEEDED)
        if not isinstance(code, int) or isinstance(code, bool):
            raise AdminError(
                f"{op} {req.handle}: HTTP {status} without a responseCode", self.node, kind="protocol"
            )
        if code != RC_SUCCESS:
            message = obj.get("message")
            raise admin_error(
                code, op, req.handle, self.auth, self.node, message if isinstance(message, str) else ""
            )
        return AdminResult(op, req.handle, self.node)

    async def _call(
        self, method: str, target: str, body: dict[str, Any] | None, op: str, handle: str
    ) -> tuple[int, dict[str, Any]]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            async with asyncio.timeout(self.timeout):
                async with self._client().request(
                    method, self.base + target, data=data, headers=headers
                ) as resp:
                    raw = await resp.content.read(MAX_BODY + 1)
                    status = resp.status
        except TimeoutError:
            raise AdminError(
                f"{op} {handle}: upstream down: {self.node}: no answer within {self.timeout:g}s",
                self.node,
                kind="down",
            ) from None
        except (aiohttp.ClientError, OSError) as e:
            raise AdminError(
                f"{op} {handle}: upstream down: {self.node}: {e}", self.node, kind="down"
            ) from None
        if len(raw) > MAX_BODY:
            raise AdminError(
                f"{op} {handle}: answer larger than {MAX_BODY} bytes", self.node, kind="protocol"
            )
        try:
            obj = json.loads(raw) if raw else {}
        except ValueError:
            obj = {}
        if not isinstance(obj, dict):
            obj = {}
        if not obj and status >= 500:
            raise AdminError(f"{op} {handle}: {self.node} failed (HTTP {status})", self.node, kind="error")
        return status, obj
