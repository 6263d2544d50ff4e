"""Handle REST API client: ``GET {base}/api/handles/{handle}?type=..&index=..`` over aiohttp.

The HTTP exchange is a thin shell around two pure functions that tests (and hypothesis) drive directly:
:func:`request_target` builds the path and query, :func:`parse_response` turns (HTTP status, body) into a
:class:`gateway.upstream.base.Result` or one of the documented errors.

Mapping (Handle.Net REST API):

==========================================  =================================================
HTTP 200 + ``responseCode`` 1               Result(RC_SUCCESS, values)
HTTP 404, or ``responseCode`` 100           Result(RC_HANDLE_NOT_FOUND)
``responseCode`` 200 (any HTTP status)      Result(RC_VALUES_NOT_FOUND)
``responseCode`` 3, HTTP 429 / 503          UpstreamBusy
``responseCode`` 302 / 303                  UpstreamReferral
other ``responseCode``, 5xx, other 4xx      UpstreamRefused (``code`` = the responseCode, else 2)
body not JSON / wrong shape / too large     ProtocolError
no complete answer within ``timeout``       UpstreamTimeout
connection refused / reset / DNS failure    UpstreamError
==========================================  =================================================

A 404 whose body is not JSON (an HTML error page: the URL is not a Handle REST endpoint) is not taken as
"not found" -- that would negatively cache every handle -- but raised as UpstreamRefused.

The handle goes into the path percent-encoded as UTF-8, each ``/``-separated segment on its own, so the
``/`` between prefix and suffix (and any ``/`` inside the suffix) stays a literal ``/`` as Handle.Net
expects; ``.`` and ``..`` segments are encoded (``%2E``) so no proxy or URL library folds them away.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
from yarl import URL

from gateway.errors import ProtocolError, UpstreamBusy, UpstreamError, UpstreamRefused, UpstreamTimeout
from gateway.upstream.base import Result, error_for_code
from proto.handle.numbers import (
    RC_ERROR,
    RC_HANDLE_NOT_FOUND,
    RC_SERVER_BUSY,
    RC_SUCCESS,
    RC_VALUES_NOT_FOUND,
)
from proto.records import Record, RecordFormatError

__all__ = ["RestClient", "handle_path", "parse_response", "request_target", "MAX_BODY"]

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # bytes; a Handle record is rarely more than a few KiB


# -- sans-I/O ------------------------------------------------------------------------------------------
def handle_path(handle: str) -> str:
    """The percent-encoded path of ``handle`` under ``/api/handles/`` (``/`` kept, dot segments encoded)."""
    segments = []
    for seg in handle.split("/"):
        if seg in (".", ".."):
            segments.append(seg.replace(".", "%2E"))
        else:
            segments.append(quote(seg, safe="", encoding="utf-8", errors="strict"))
    return "/".join(segments)


def request_target(handle: str, types: Sequence[str] = (), indexes: Sequence[int] = ()) -> str:
    """``/api/handles/<encoded handle>[?type=..&index=..]``, already percent-encoded."""
    target = "/api/handles/" + handle_path(handle)
    query: list[tuple[str, str]] = [("type", t) for t in types] + [("index", str(int(i))) for i in indexes]
    if query:
        target += "?" + urlencode(query, quote_via=quote, safe="")
    return target


def _decode_json(body: bytes, node: str | None) -> Any:
    if len(body) > MAX_BODY:
        raise ProtocolError(f"REST body of more than {MAX_BODY} bytes", node)
    try:
        return json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ProtocolError(f"REST body is not JSON: {str(e)[:120]}", node) from None


def _response_code(obj: Any) -> int | None:
    if not isinstance(obj, dict):
        return None
    rc = obj.get("responseCode")
    if isinstance(rc, int) and not isinstance(rc, bool):
        return rc
    return None


def _check_record(record: Record) -> None:
    """Values must survive the forms we emit later (REST JSON, CBOR, etag): UTF-8 text, sane timestamps."""
    record.handle.encode()
    for v in record.values:
        v.type.encode()
        v.to_rest()


def parse_response(status: int, body: bytes, handle: str, node: str | None = None) -> Result:
    """Map an HTTP status and body of ``GET /api/handles/{handle}`` to a Result or raise (see module doc)."""
    obj: Any = None
    json_error: ProtocolError | None = None
    if body.strip():
        try:
            obj = _decode_json(body, node)
        except ProtocolError as e:
            json_error = e
    rc = _response_code(obj)
    message = obj.get("message") if isinstance(obj, dict) else None
    detail = f"{handle}: HTTP {status}" + (f" responseCode {rc}" if rc is not None else "")
    if isinstance(message, str) and message:
        detail += f": {message[:200]}"

    # Answers first: "not found" is not a failure.
    if rc == RC_HANDLE_NOT_FOUND or (
        status == 404 and rc is None and json_error is None and (obj is None or isinstance(obj, dict))
    ):
        return Result(int(RC_HANDLE_NOT_FOUND), handle)
    if rc == RC_VALUES_NOT_FOUND:
        return Result(int(RC_VALUES_NOT_FOUND), handle)
    if rc == RC_SERVER_BUSY or status in (429, 503):
        raise UpstreamBusy(detail, node)
    if status == 404 and rc is None:
        raise UpstreamRefused(
            f"{detail}: 404 without a Handle REST body (is this a Handle REST endpoint?)",
            node,
            code=int(RC_ERROR),
        )
    if rc is not None and rc != RC_SUCCESS:  # a referral (302/303) or a refusal
        raise error_for_code(rc, detail, node)
    if status >= 300:
        raise UpstreamRefused(detail, node, code=rc if rc is not None else int(RC_ERROR))
    # HTTP 2xx from here on.
    if json_error is not None:
        raise json_error
    if rc is None:
        raise ProtocolError(f"{handle}: HTTP {status} body without an integer responseCode", node)
    try:
        record = Record.from_rest(obj)
        _check_record(record)
    except (RecordFormatError, ValueError, TypeError, OverflowError, OSError, RecursionError) as e:
        raise ProtocolError(f"{handle}: malformed record: {str(e)[:200]}", node) from None
    return Result(int(RC_SUCCESS), handle, record.values)


# -- I/O -----------------------------------------------------------------------------------------------
class RestClient:
    """Resolves handles at one Handle REST endpoint (``base`` like ``http://host:8000``).

    ``timeout`` bounds the whole exchange (connect, request, body). One aiohttp session per client, opened
    on first use; ``close()`` releases it. ``session`` may be passed in (it is then not closed here).
    """

    def __init__(
        self,
        base: str,
        *,
        timeout: float = 2.0,
        max_body: int = MAX_BODY,
        session: aiohttp.ClientSession | None = None,
        node: str | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        url = URL(base)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"REST base URL {base!r} must be http:// or https:// with a host")
        self.base = base.rstrip("/")
        self.timeout = timeout
        self.max_body = max_body
        self.node = node or self.base
        self._session = session
        self._own_session = session is None
        self._closed = False

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None),
                connector=aiohttp.TCPConnector(limit=64, ttl_dns_cache=60),
                headers={"Accept": "application/json"},
                auto_decompress=True,
            )
            self._own_session = True
        return self._session

    async def resolve(self, handle: str, types: Sequence[str] = (), indexes: Sequence[int] = ()) -> Result:
        if self._closed:
            raise UpstreamError("client is closed", self.node)
        try:
            target = request_target(handle, types, indexes)
        except (UnicodeEncodeError, ValueError, TypeError) as e:
            raise ValueError(f"cannot build a REST request for {handle!r}: {e}") from None
        url = URL(self.base + target, encoded=True)
        session = self._get_session()
        try:
            async with asyncio.timeout(self.timeout):
                async with session.get(url, allow_redirects=False) as resp:
                    status = resp.status
                    body = await self._read_body(resp)
        except TimeoutError:
            log.info("rest.timeout node=%s handle=%s timeout=%g", self.node, handle, self.timeout)
            raise UpstreamTimeout(f"{handle}: no REST answer within {self.timeout:g}s", self.node) from None
        except aiohttp.ClientPayloadError as e:
            raise ProtocolError(f"{handle}: broken HTTP body: {e}", self.node) from None
        except aiohttp.ClientResponseError as e:  # malformed status line / headers
            raise ProtocolError(f"{handle}: malformed HTTP response: {e.message}", self.node) from None
        except (aiohttp.ClientError, OSError) as e:
            log.info("rest.error node=%s handle=%s error=%r", self.node, handle, str(e))
            raise UpstreamError(f"{handle}: REST request to {self.base} failed: {e}", self.node) from None
        try:
            result = parse_response(status, body, handle, self.node)
        except UpstreamError as e:
            log.info("rest.failed node=%s handle=%s status=%d error=%r", self.node, handle, status, str(e))
            raise
        log.debug(
            "rest.answer node=%s handle=%s status=%d code=%d values=%d",
            self.node,
            handle,
            status,
            result.code,
            len(result.values),
        )
        return result

    async def _read_body(self, resp: aiohttp.ClientResponse) -> bytes:
        if resp.content_length is not None and resp.content_length > self.max_body:
            raise ProtocolError(
                f"REST body of {resp.content_length} bytes exceeds {self.max_body}", self.node
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(16384):
            size += len(chunk)
            if size > self.max_body:
                raise ProtocolError(f"REST body exceeds {self.max_body} bytes", self.node)
            chunks.append(chunk)
        return b"".join(chunks)

    async def close(self) -> None:
        self._closed = True
        if self._session is not None and self._own_session and not self._session.closed:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> RestClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
