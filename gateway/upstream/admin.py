"""Asyncio client of Handle administration (create, delete, add, remove, modify) at one node, native protocol.

It speaks the flow CNRI's own tools use against HANDLE.NET 7.3.1 (``tests/vectors/handle-admin``):

1. once, SESSION_SETUP (op 400) with a Diffie-Hellman key in RFC 2409 group 2, for the admin's identity; the
   node answers with a session id and its DH key, and both derive the session key (:mod:`proto.handle.session`);
2. each operation on its own TCP connection, in the session, with an HS_MAC credential (counter 1, 2, ...);
3. the first operation of the session is challenged (402: request digest + nonce). The client checks that the
   digest is its own request's, signs nonce + digest with the admin's private key and sends a
   CHALLENGE_RESPONSE on a new connection, same session id, new request id; the node answers the operation.
   Later operations pass on their MAC alone.

A session the node no longer knows (500, 502, 505 or a 405 timeout) is set up again, once per operation.
(A request outside any session is challenged too, but HANDLE.NET 7.3.1 was not seen to accept the answer to
that challenge; the session flow is the one proven against it.) The protocol version is 2.5, as the CNRI tools
send it. SESSION_SETUP goes over TCP like the rest (``hdl-create`` uses UDP for it; a node takes either).

Every failure is an :class:`AdminError`, one line naming the cause (``kind``): ``exists`` (101),
``not-found`` (100), ``not-homed`` (301 / referral: this node is not the prefix's primary), ``not-authorized``
(400 / 401: the prefix's or the handle's HS_ADMIN does not name the admin), ``auth-needed`` (402 again),
``wrong-key`` (403: the signature does not verify with the admin's HS_PUBKEY), ``bad-credential`` (404),
``down`` (no connection, no answer in time), ``busy`` (3), ``error`` (2), ``session`` (session failures that
survive a retry), ``values`` (200 / 201 / 202), ``protocol`` (bytes that do not parse, a challenge to a
request we did not send). :attr:`AdminError.transient` says whether trying again later may succeed.
Used by ``ida handle`` and the factory's registration queue (``tools/commands/flash``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import ProtocolError, UpstreamError, UpstreamRefused
from gateway.logfmt import kv
from gateway.upstream.native import HandleClient, tcp_exchange
from proto.handle import (
    AdminRequest,
    ChallengeAnswer,
    HandleFormatError,
    Message,
    SessionSetup,
    decode_admin_response,
    decode_challenge,
    decode_credential,
    decode_message,
    decode_session_setup_answer,
    encode_message,
    mac_credential,
    new_request,
    session_key,
    signed_bytes,
)
from proto.handle import keys as K
from proto.handle.numbers import (
    DEFAULT_PORT,
    DEFAULT_REQUEST_FLAGS,
    DEFAULT_SESSION_TIMEOUT,
    HASH_SHA1,
    KEY_EXCHANGE_DH,
    OC_CHALLENGE_RESPONSE,
    OC_SESSION_SETUP,
    RC_AUTHEN_NEEDED,
    RC_AUTHEN_TIMEOUT,
    RC_SUCCESS,
    SESSION_SETUP_FLAGS,
    OpCode,
    OpFlag,
    ResponseCode,
)
from proto.records import HandleValue, ValueRef, parse_value_ref

__all__ = [
    "AdminAuth",
    "AdminClient",
    "AdminError",
    "AdminOperations",
    "AdminResult",
    "admin_error",
    "OPERATIONS",
]

log = logging.getLogger(__name__)

VERSION = (2, 5)
OPERATIONS = {
    "create": int(OpCode.CREATE_HANDLE),
    "delete": int(OpCode.DELETE_HANDLE),
    "add": int(OpCode.ADD_VALUE),
    "remove": int(OpCode.REMOVE_VALUE),
    "modify": int(OpCode.MODIFY_VALUE),
}
_OP_NAMES = {v: k for k, v in OPERATIONS.items()}
_SESSION_LOST = frozenset({500, 502, 505, int(RC_AUTHEN_TIMEOUT)})
_TRANSIENT = frozenset({"down", "busy", "error", "session", "auth-needed"})


@dataclass(frozen=True)
class AdminAuth(ValueRef):
    """Who administers: the admin handle and index (``300:0.NA/88.123.99``, its ``str``) and its private key."""

    key: K.PrivateKey

    @classmethod
    def from_file(cls, ref: str, path: str | Path, passphrase: bytes | None = None) -> AdminAuth:
        """``ref`` = ``INDEX:HANDLE``; ``path`` a HANDLE.NET private key file. ValueError names the problem
        (:class:`proto.handle.keys.KeyFileError` for the key file, OSError for a file that cannot be read)."""
        handle, index = parse_value_ref(ref)
        data = Path(path).read_bytes()
        return cls(handle, index, K.load_private_key(data, passphrase))


@dataclass(frozen=True)
class AdminResult:
    """A done operation: what, on which handle, at which node, and whether the node challenged it."""

    op: str
    handle: str
    node: str
    challenged: bool = False
    session_id: int = 0


class AdminError(UpstreamRefused):
    """An operation the node refused or that could not reach it; ``kind`` says which (module docstring)."""

    def __init__(self, message: str, node: str | None, *, kind: str, code: int = 2) -> None:
        super().__init__(message, node, code=code)
        self.kind = kind

    @property
    def transient(self) -> bool:
        """Trying again later may succeed (the node was down, busy, failed, or lost the session)."""
        return self.kind in _TRANSIENT


def admin_error(code: int, op: str, handle: str, auth: str, node: str, text: str = "") -> AdminError:
    """The one-line AdminError for response code ``code`` to ``op`` on ``handle`` (both clients use it);
    ``text`` is the node's own explanation, added where it says more than the code."""
    prefix = handle.split("/", 1)[0]
    table: dict[int, tuple[str, str]] = {
        101: ("exists", f"{handle} already exists at {node}"),
        100: ("not-found", f"{handle} does not exist at {node}"),
        301: ("not-homed", f"{node} does not home prefix {prefix}: it is not that prefix's primary (301)"),
        302: ("not-homed", f"{node} refers {prefix} elsewhere (302): ask the prefix's primary"),
        303: ("not-homed", f"{node} refers {prefix} elsewhere (303): ask the prefix's primary"),
        400: (
            "not-authorized",
            f"not authorized (400): {auth} is not an administrator of {handle} at {node}; the HS_ADMIN "
            f"of 0.NA/{prefix} (create) or of the handle does not name it",
        ),
        401: ("not-authorized", f"not authorized (401): {auth} lacks the permission to {op} {handle}"),
        402: ("auth-needed", f"authentication needed (402): {node} did not take {auth}'s challenge answer"),
        403: ("wrong-key", f"wrong key (403): {node} does not verify {auth}'s key (HS_PUBKEY / HS_SECKEY)"),
        404: ("bad-credential", f"invalid credential (404) for {auth} at {node}"),
        3: ("busy", f"{node} is busy (3)"),
        2: ("error", f"{node} failed (2)"),
        200: ("values", f"{handle}: no value at the given index (200)"),
        201: ("values", f"{handle}: a value index is already in use (201)"),
        202: ("values", f"{handle}: a value is invalid (202)"),
        102: ("values", f"{handle} is not a valid handle (102)"),
    }
    plain = frozenset({100, 101, 301, 302, 303, 3})
    fallback = "session" if code in _SESSION_LOST or code in (501, 503, 504) else "refused"
    kind, message = table.get(
        code, (fallback, f"{node} refused {op} {handle}: {ResponseCode.describe(code)}")
    )
    why = f" ({text})" if text and code not in plain else ""
    return AdminError(f"{op} {handle}: {message}{why}", node, kind=kind, code=code)


@dataclass
class _Session:
    id: int
    key: bytes
    expires: float
    counter: int = 0
    authenticated: bool = False


class _SessionLost(Exception):
    """The node no longer knows our session: set up a new one and send again."""


class AdminOperations:
    """The five operations, each one :meth:`request` (the native and the REST client share them)."""

    async def request(self, req: AdminRequest, *, overwrite: bool = False) -> AdminResult:
        raise NotImplementedError

    async def create(
        self, handle: str, values: Iterable[HandleValue], *, overwrite: bool = False
    ) -> AdminResult:
        return await self.request(
            AdminRequest(OPERATIONS["create"], handle, tuple(values)), overwrite=overwrite
        )

    async def delete(self, handle: str) -> AdminResult:
        return await self.request(AdminRequest(OPERATIONS["delete"], handle))

    async def add(
        self, handle: str, values: Iterable[HandleValue], *, overwrite: bool = False
    ) -> AdminResult:
        return await self.request(AdminRequest(OPERATIONS["add"], handle, tuple(values)), overwrite=overwrite)

    async def modify(self, handle: str, values: Iterable[HandleValue]) -> AdminResult:
        return await self.request(AdminRequest(OPERATIONS["modify"], handle, tuple(values)))

    async def remove(self, handle: str, indexes: Iterable[int]) -> AdminResult:
        return await self.request(AdminRequest(OPERATIONS["remove"], handle, indexes=tuple(indexes)))


class AdminClient(AdminOperations):
    """Administers handles at one node (``hdl://host:port``) as ``auth``. Use as ``async with``.

    ``timeout`` bounds each exchange (one TCP connection); ``server_key`` (optional, the node's public key
    from its HS_SITE) makes the client refuse a session answer the node did not sign.
    """

    def __init__(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        auth: AdminAuth | None = None,
        *,
        timeout: float = 5.0,
        session_timeout: int = DEFAULT_SESSION_TIMEOUT,
        server_key: K.PublicKey | None = None,
    ) -> None:
        if auth is None:
            raise ValueError("an AdminClient needs an AdminAuth")
        self.host, self.port, self.auth = host, port, auth
        self.timeout = timeout
        self.session_timeout = session_timeout
        self.server_key = server_key
        self.node = f"hdl://{host}:{port}"
        self.stats: Counter[str] = Counter()  # sessions, challenges, requests
        self._session: _Session | None = None
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._session = None

    async def lookup(self, handle: str) -> tuple[HandleValue, ...] | None:
        """The handle's public values at this node (an anonymous resolution), None when it has none."""
        async with HandleClient(self.host, self.port, transport="tcp", timeout=self.timeout) as c:
            try:
                result = await c.resolve(handle)
            except UpstreamError as e:
                raise self._down(f"lookup {handle}", e) from None
        return result.values if result.found else None

    async def request(self, req: AdminRequest, *, overwrite: bool = False) -> AdminResult:
        """Send one administration request (in the session, answering the challenge when one comes)."""
        flags = int(DEFAULT_REQUEST_FLAGS) | (int(OpFlag.OVRW) if overwrite else 0)
        async with self._lock:
            for attempt in (1, 2):
                session = await self._ensure_session(_OP_NAMES[req.opcode], req.handle)
                try:
                    return await self._send(session, req, flags)
                except _SessionLost as e:
                    self._session = None
                    if attempt == 2:
                        raise admin_error(
                            int(e.args[0]), _OP_NAMES[req.opcode], req.handle, str(self.auth), self.node
                        ) from None
                    log.info("handle.admin.session.lost %s", kv(node=self.node, code=e.args[0]))
        raise AssertionError("unreachable")

    # -- the exchange ----------------------------------------------------------------------------------
    async def _send(self, session: _Session, req: AdminRequest, flags: int) -> AdminResult:
        op = _OP_NAMES[req.opcode]
        session.counter += 1
        bare = new_request(
            req.opcode,
            req.encode_body(),
            request_id=self._rid(),
            session_id=session.id,
            op_flags=flags,
            version=VERSION,
        )
        cred = mac_credential(session.key, bare, session.counter).encode()
        answer = await self._exchange(
            encode_message(bare.envelope, bare.header, bare.body, cred), bare, op, req.handle
        )
        self.stats["requests"] += 1
        challenged = False
        if answer.header.response_code == RC_AUTHEN_NEEDED and not session.authenticated:
            answer = await self._answer_challenge(session, bare, answer, op, req.handle)
            challenged = True
        code = answer.header.response_code
        if code in _SESSION_LOST:
            raise _SessionLost(code)
        try:
            result = decode_admin_response(answer)
        except HandleFormatError as e:
            raise AdminError(f"{op} {req.handle}: {e}", self.node, kind="protocol") from None
        if not result.ok:
            raise admin_error(code, op, req.handle, str(self.auth), self.node, result.message)
        session.authenticated = True
        log.debug("handle.admin.done %s", kv(node=self.node, op=op, handle=req.handle, challenged=challenged))
        return AdminResult(op, req.handle, self.node, challenged, session.id)

    async def _answer_challenge(
        self, session: _Session, request: Message, answer: Message, op: str, handle: str
    ) -> Message:
        try:
            challenge = decode_challenge(answer)
        except HandleFormatError as e:
            raise AdminError(f"{op} {handle}: bad challenge: {e}", self.node, kind="protocol") from None
        if not challenge.matches(request):
            raise AdminError(
                f"{op} {handle}: the challenge is about a request we did not send; not signed",
                self.node,
                kind="protocol",
            )
        self.stats["challenges"] += 1
        sig = K.sign(self.auth.key, challenge.signed_bytes(), HASH_SHA1)
        body = ChallengeAnswer.signed(self.auth.handle, self.auth.index, HASH_SHA1, sig).encode_body()
        reply = new_request(
            OC_CHALLENGE_RESPONSE,
            body,
            request_id=self._rid(),
            session_id=answer.envelope.session_id,
            version=VERSION,
        )
        return await self._exchange(reply.encode(), reply, op, handle)

    async def _ensure_session(self, op: str, handle: str) -> _Session:
        s = self._session
        if s is not None and s.expires > time.monotonic():
            return s
        p, g = K.OAKLEY_GROUP_2
        mine, y = K.dh_keypair(p, g)
        setup = SessionSetup(
            KEY_EXCHANGE_DH, self.session_timeout, self.auth.handle, self.auth.index, K.encode_dh_key(y, p, g)
        )
        msg = new_request(
            OC_SESSION_SETUP,
            setup.encode_body(),
            request_id=self._rid(),
            op_flags=SESSION_SETUP_FLAGS,
            version=VERSION,
        )
        answer = await self._exchange(msg.encode(), msg, "session setup", self.auth.handle)
        code = answer.header.response_code
        if code != RC_SUCCESS:
            raise admin_error(
                code, "session setup", self.auth.handle, str(self.auth), self.node, self._text(answer)
            )
        self._check_signature(answer)
        try:
            alg, server = decode_session_setup_answer(answer).dh()
            sy, sp, sg = K.decode_dh_key(server)
            if (sp, sg) != (p, g):
                raise HandleFormatError("the node answered in another Diffie-Hellman group")
            key = session_key(K.dh_secret(mine, sy), alg)
        except (HandleFormatError, ValueError) as e:
            raise AdminError(f"{op} {handle}: session setup: {e}", self.node, kind="protocol") from None
        self.stats["sessions"] += 1
        s = _Session(answer.envelope.session_id, key, time.monotonic() + self.session_timeout * 0.9)
        self._session = s
        log.info("handle.admin.session %s", kv(node=self.node, session=s.id, admin=str(self.auth)))
        return s

    def _check_signature(self, answer: Message) -> None:
        if self.server_key is None:
            return
        try:
            cred = decode_credential(answer.credential)
            ok = K.verify(
                self.server_key, cred.hash_alg, cred.signature, signed_bytes(answer, cred.signer_index)
            )
        except HandleFormatError:
            ok = False
        if not ok:
            raise AdminError(
                "session setup: the answer is not signed by the node's key", self.node, kind="protocol"
            )

    @staticmethod
    def _text(answer: Message) -> str:
        try:
            return decode_admin_response(answer).message
        except HandleFormatError:
            return ""

    async def _exchange(self, data: bytes, request: Message, op: str, handle: str) -> Message:
        rid = request.envelope.request_id
        try:
            async with asyncio.timeout(self.timeout):
                raw = await tcp_exchange(self.host, self.port, data, rid)
            return decode_message(raw)
        except TimeoutError:
            raise self._down(f"{op} {handle}", UpstreamError(f"no answer within {self.timeout:g}s")) from None
        except (HandleFormatError, ProtocolError) as e:
            raise AdminError(f"{op} {handle}: {e}", self.node, kind="protocol") from None
        except OSError as e:
            raise self._down(f"{op} {handle}", e) from None

    def _down(self, what: str, e: Exception) -> AdminError:
        return AdminError(f"{what}: upstream down: {self.node}: {e}", self.node, kind="down")

    @staticmethod
    def _rid() -> int:
        return secrets.randbits(31) | 1
