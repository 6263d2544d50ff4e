"""The node's administrative side of the native protocol (sans-I/O): sessions, challenges, then the operation.

What it answers, following HANDLE.NET 7.3.1 (``tests/vectors/handle-admin`` is reproduced byte for byte):

* SESSION_SETUP (400) with a Diffie-Hellman key (mode 4): a new session id, the node's DH key in the client's
  group with cipher 1 (DES), the request digest; signed (HS_SIGNED, the node's own DSA key) when asked (CT).
  Other key exchange modes: RC_SESSION_FAILED (501).
* an administration request (100-104): first :meth:`AdminOps.precheck` (301 / 101 / 100, no authentication
  needed for those); then, in a session that already answered a challenge, its HS_MAC credential decides
  (wrong MAC: 502, counter seen before: 505); otherwise a 402 challenge (digest + 16-byte nonce) kept under the
  session id -- or, for a request outside any session, under a session id the node assigns and puts in the
  challenge's envelope.
* CHALLENGE_RESPONSE (200) under that session id: no challenge pending (or older than ``challenge_timeout``):
  405. Else :meth:`AdminOps.authorize` (400 when ``HS_ADMIN`` does not name the admin), the signature over
  nonce + digest against the admin's ``HS_PUBKEY`` values (403 when none verifies), in a session the MAC of
  the challenged request (502), then the operation; the answer is the original request's, under the challenge
  response's request id. A session whose challenge was answered is authenticated for that admin.
* a request in a session the node does not know: RC_SESSION_TIMEOUT (500).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import dsa

from proto.handle import (
    ADMIN_OPCODES,
    AdminRequest,
    Credential,
    Envelope,
    HandleFormatError,
    Header,
    Message,
    SessionSetupAnswer,
    decode_admin_request,
    decode_challenge_answer,
    decode_credential,
    decode_session_setup,
    encode_admin_answer,
    encode_challenge,
    encode_message,
    request_digest,
    session_key,
    signed_bytes,
    verify_mac,
)
from proto.handle import keys as K
from proto.handle.numbers import (
    AUTH_PUBKEY,
    CHALLENGE_NONCE_SIZE,
    CRED_SIGNED,
    DIGEST_SHA1,
    HASH_SHA1,
    KEY_EXCHANGE_DH,
    OC_CHALLENGE_RESPONSE,
    OC_SESSION_SETUP,
    OPF_CT,
    OPF_RD,
    RC_AUTHEN_FAILED,
    RC_AUTHEN_TIMEOUT,
    RC_PROTOCOL_ERROR,
    RC_SESSION_FAILED,
    RC_SESSION_KEY_INVALID,
    RC_SESSION_TIMEOUT,
    RC_SUCCESS,
    SESSION_ALG_DES,
    OpFlag,
    ResponseCode,
)
from proto.handle.response import answer_flags
from proto.handle.wire import u32
from tools.harness.node.adminops import OP_NAMES, AdminOps, Identity, Refusal

__all__ = ["AdminSide", "NODE_OPCODES"]

NODE_OPCODES = ADMIN_OPCODES | {int(OC_CHALLENGE_RESPONSE), int(OC_SESSION_SETUP)}
CHALLENGE_TIMEOUT = 60.0  # seconds a challenge waits for its answer (HANDLE.NET's default maxAuthTime)
_OVRW = int(OpFlag.OVRW)
_OP_NAMES = {
    **OP_NAMES,
    int(OC_SESSION_SETUP): "session-setup",
    int(OC_CHALLENGE_RESPONSE): "challenge-response",
}


@dataclass
class _Session:
    key: bytes
    identity: Identity
    expires: float
    authenticated: bool = False
    counters: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class _Pending:
    request: Message
    admin: AdminRequest
    nonce: bytes
    since: float


class AdminSide:
    """Sessions and challenges of one node over its :class:`AdminOps`. ``clock`` is monotonic seconds."""

    def __init__(
        self,
        ops: AdminOps,
        *,
        clock: Callable[[], float] = time.monotonic,
        challenge_timeout: float = CHALLENGE_TIMEOUT,
        nonce: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.ops = ops
        self.clock = clock
        self.challenge_timeout = challenge_timeout
        self.nonce = nonce
        self.answers: Counter[tuple[str, int]] = Counter()
        self._sessions: dict[int, _Session] = {}
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self._key: dsa.DSAPrivateKey | None = None

    @property
    def server_key(self) -> dsa.DSAPrivateKey:
        """The node's signing key (made on first use)."""
        if self._key is None:
            self._key = dsa.generate_private_key(1024)
        return self._key

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def answer(self, msg: Message) -> tuple[bytes, int, str]:
        """The answer to one request whose opcode is in :data:`NODE_OPCODES`: (bytes, response code, handle)."""
        op = msg.header.opcode
        try:
            if op == OC_SESSION_SETUP:
                data, code, handle = self._setup(msg), int(RC_SUCCESS), ""
            elif op == OC_CHALLENGE_RESPONSE:
                data, code, handle = self._challenge_answer(msg)
            else:
                data, code, handle = self._admin(msg)
        except HandleFormatError as e:
            data, code, handle = encode_admin_answer(msg, int(RC_PROTOCOL_ERROR), str(e)), 4, ""
        self.answers[(_OP_NAMES.get(op, str(op)), code)] += 1
        return data, code, handle

    # -- SESSION_SETUP ---------------------------------------------------------------------------------
    def _setup(self, msg: Message) -> bytes:
        s = decode_session_setup(msg)
        if s.mode != KEY_EXCHANGE_DH:
            return encode_admin_answer(
                msg, int(RC_SESSION_FAILED), f"key exchange mode {s.mode} not supported (only 4, DH)"
            )
        try:
            y, p, g = K.decode_dh_key(s.public_key)
            mine, my_y = K.dh_keypair(p, g)
            secret = K.dh_secret(mine, y)
        except ValueError as e:
            return encode_admin_answer(msg, int(RC_SESSION_FAILED), f"bad Diffie-Hellman key: {e}")
        sid = self._new_id()
        ident = Identity(s.identity_handle, s.identity_index)
        self._sessions[sid] = _Session(session_key(secret, SESSION_ALG_DES), ident, self.clock() + s.timeout)
        body = SessionSetupAnswer(KEY_EXCHANGE_DH, u32(SESSION_ALG_DES) + K.encode_dh_key(my_y, p, g))
        req_env, req_h = msg.envelope, msg.header
        certify = bool(req_h.op_flags & OPF_CT)
        flags = answer_flags(req_h) | int(OPF_RD) | (int(OPF_CT) if certify else 0)
        env = Envelope(req_env.major, req_env.minor, 0, sid, req_env.request_id)
        full = bytes([DIGEST_SHA1]) + request_digest(msg) + body.encode_body()
        header = Header(OC_SESSION_SETUP, RC_SUCCESS, flags, 1, req_h.recursion_count, req_h.expiration)
        credential = b""
        if certify:
            answer = Message(env, header, full)
            sig = K.sign(self.server_key, signed_bytes(answer), HASH_SHA1)
            credential = Credential(CRED_SIGNED, HASH_SHA1, sig).encode()
        return encode_message(env, header, full, credential)

    # -- administration requests -------------------------------------------------------------------------
    def _admin(self, msg: Message) -> tuple[bytes, int, str]:
        req = decode_admin_request(msg)
        sid = msg.envelope.session_id
        session = self._session(sid)
        if sid and session is None and sid not in self._pending:
            return self._refuse(
                msg, Refusal(int(RC_SESSION_TIMEOUT), "invalid session id or session timed out")
            )
        overwrite = bool(msg.header.op_flags & _OVRW)
        early = self.ops.precheck(req, overwrite)
        if early is not None:
            return self._refuse(msg, early, req.handle)
        if session is not None and session.authenticated:
            if not verify_mac(session.key, msg):
                return self._refuse(
                    msg, Refusal(int(RC_SESSION_KEY_INVALID), "session authentication failed")
                )
            counter = decode_credential(msg.credential).signer_index
            if counter in session.counters:
                return self._refuse(
                    msg, Refusal(int(ResponseCode.SESSION_MESSAGE_REJECTED), "counter reused")
                )
            session.counters.add(counter)
            return self._perform(msg, req, session.identity, overwrite)
        key = sid if session is not None else self._new_id()
        nonce = self.nonce(CHALLENGE_NONCE_SIZE)
        now = self.clock()
        for stale in [k for k, p in self._pending.items() if now - p.since > self.challenge_timeout]:
            del self._pending[stale]  # never answered
        self._pending[key] = _Pending(msg, req, nonce, now)
        challenged = msg
        if key != sid:  # outside a session: the challenge carries the id it is kept under
            e = msg.envelope
            challenged = Message(Envelope(e.major, e.minor, e.flags, key, e.request_id), msg.header, msg.body)
        return encode_challenge(challenged, nonce), 402, req.handle

    def _perform(
        self, msg: Message, req: AdminRequest, who: Identity, overwrite: bool, request_id: int | None = None
    ) -> tuple[bytes, int, str]:
        refusal = self.ops.authorize(req, who, overwrite) or self.ops.apply(req, overwrite)
        if refusal is not None:
            self.ops.count(OP_NAMES[req.opcode], refusal.code)
            return self._refuse(msg, refusal, req.handle, request_id)
        return encode_admin_answer(msg, int(RC_SUCCESS), request_id=request_id), int(RC_SUCCESS), req.handle

    @staticmethod
    def _refuse(
        msg: Message, r: Refusal, handle: str = "", request_id: int | None = None
    ) -> tuple[bytes, int, str]:
        return encode_admin_answer(msg, r.code, r.text, request_id=request_id), r.code, handle

    def _session(self, sid: int) -> _Session | None:
        s = self._sessions.get(sid) if sid else None
        if s is not None and s.expires < self.clock():
            del self._sessions[sid]
            return None
        return s

    # -- CHALLENGE_RESPONSE ------------------------------------------------------------------------------
    def _challenge_answer(self, msg: Message) -> tuple[bytes, int, str]:
        sid, rid = msg.envelope.session_id, msg.envelope.request_id
        pending = self._pending.pop(sid, None)
        if pending is None or self.clock() - pending.since > self.challenge_timeout:
            return self._refuse(msg, Refusal(int(RC_AUTHEN_TIMEOUT)))
        ans = decode_challenge_answer(msg)
        who = Identity(ans.handle, ans.index)
        orig, req = pending.request, pending.admin
        overwrite = bool(orig.header.op_flags & _OVRW)
        not_admin = self.ops.authorize(req, who, overwrite)
        if not_admin is not None:
            self.ops.count(OP_NAMES[req.opcode], not_admin.code)
            return self._refuse(orig, not_admin, req.handle, rid)
        signed = pending.nonce + request_digest(orig)
        if ans.auth_type != AUTH_PUBKEY:
            return self._refuse(
                orig, Refusal(int(RC_AUTHEN_FAILED), f"{ans.auth_type} is not supported"), "", rid
            )
        try:
            alg, sig = ans.signature()
        except HandleFormatError as e:
            return self._refuse(orig, Refusal(int(RC_AUTHEN_FAILED), str(e)), req.handle, rid)
        keys = self.ops.public_keys(who)
        if not any(K.verify(k, alg, sig, signed) for k in keys):
            why = "signature does not verify" if keys else "no HS_PUBKEY"
            self.ops.count(OP_NAMES[req.opcode], int(RC_AUTHEN_FAILED))
            return self._refuse(orig, Refusal(int(RC_AUTHEN_FAILED), f"{why} at {who}"), req.handle, rid)
        session = self._session(sid)
        if session is not None:
            if not verify_mac(session.key, orig):
                refusal = Refusal(int(RC_SESSION_KEY_INVALID), "the session key authentication failed")
                return self._refuse(orig, refusal, req.handle, rid)
            session.authenticated, session.identity = True, who
            if orig.credential:
                session.counters.add(decode_credential(orig.credential).signer_index)
        return self._perform(orig, req, who, overwrite, rid)
