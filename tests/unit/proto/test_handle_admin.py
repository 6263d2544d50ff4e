"""The administration half of the Handle codec against real HANDLE.NET 7.3.1 traffic (tests/vectors/handle-admin):
every captured message decodes and re-encodes byte for byte, the captured challenge signature verifies with the
captured public key over exactly the bytes the codec says are signed, the server's own answers are reproduced by
the node-side encoders, and garbage only ever raises HandleFormatError."""

from __future__ import annotations

import hashlib
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric import dsa, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from proto.handle import (
    AdminRequest,
    ChallengeAnswer,
    Credential,
    HandleFormatError,
    Message,
    SessionSetup,
    decode_admin_request,
    decode_admin_response,
    decode_challenge,
    decode_challenge_answer,
    decode_credential,
    decode_message,
    decode_session_setup,
    decode_session_setup_answer,
    encode_admin_answer,
    encode_challenge,
    mac_credential,
    new_request,
    request_digest,
    session_key,
    session_mac,
    signed_bytes,
    verify_mac,
)
from proto.handle import keys as K
from proto.handle import numbers as N
from proto.records import AdminRef
from tests.support.captures import ADMIN, load_exchange

CREATE = load_exchange("capture_create.hex")
BATCH = load_exchange("capture_batch_session.hex")
ADMPUB = (ADMIN / "admpub.bin").read_bytes()
ADMPRIV = (ADMIN / "admpriv.bin").read_bytes()
SERVER_PUB = (ADMIN / "pubkey.bin").read_bytes()


def msgs(exchange: list[tuple[str, bytes]]) -> list[Message]:
    return [decode_message(data) for _, data in exchange]


# ------------------------------------------------------------------------------------------------------
# every message, byte for byte
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data", [d for _, d in CREATE + BATCH], ids=lambda d: f"{len(d)}B")
def test_every_captured_message_reencodes_byte_for_byte(data: bytes) -> None:
    msg = decode_message(data)
    assert msg.encode() == data
    if msg.credential:
        assert decode_credential(msg.credential).encode() == msg.credential


def test_create_exchange_decodes() -> None:
    setup, setup_answer, create, challenge, answer, done = msgs(CREATE)
    # SESSION_SETUP: Diffie-Hellman in RFC 2409 group 2, for the admin 300:0.NA/88.123.99, the 2-byte tail
    s = decode_session_setup(setup)
    assert (s.mode, s.timeout, s.identity_handle, s.identity_index) == (4, 86400, "0.NA/88.123.99", 300)
    assert s.trailer == b"\0\0" and s.encode_body() == setup.body
    y, p, g = K.decode_dh_key(s.public_key)
    assert (p, g) == K.OAKLEY_GROUP_2 and K.encode_dh_key(y, p, g) == s.public_key
    assert setup.header.op_flags == N.SESSION_SETUP_FLAGS == 0x59800000
    # its answer: a new session id, cipher 1 (DES), the server's DH key in the same group, signed by the server
    assert setup_answer.envelope.session_id == 2 and setup_answer.header.op_flags == 0xD9800000
    a = decode_session_setup_answer(setup_answer)
    alg, server_key = a.dh()
    assert alg == N.SESSION_ALG_DES and K.decode_dh_key(server_key)[1:] == K.OAKLEY_GROUP_2
    assert setup_answer.body == bytes([N.DIGEST_SHA1]) + request_digest(setup) + a.encode_body()
    # CREATE in the session, with an HS_MAC credential (counter 1)
    req = decode_admin_request(create)
    assert (req.opcode, req.handle, create.envelope.session_id) == (100, "88.123.99/CAP-0002", 2)
    (admin,) = req.values
    assert (admin.index, admin.type) == (100, "HS_ADMIN")
    assert AdminRef.decode(admin.data) == AdminRef("0.NA/88.123.99", 300, N.AdminPerm.ALL)
    assert req.encode_body() == create.body
    cred = decode_credential(create.credential)
    assert (cred.type, cred.signer, cred.signer_index, cred.hash_alg) == ("HS_MAC", "", 1, b"\x02")
    assert len(cred.signature) == 20
    # 402: digest of the CREATE's header + body, and a 16-byte nonce
    ch = decode_challenge(challenge)
    assert (ch.digest_type, ch.digest) == (N.DIGEST_SHA1, hashlib.sha1(create.head_and_body()).digest())
    assert ch.matches(create) and len(ch.nonce) == N.CHALLENGE_NONCE_SIZE
    # CHALLENGE_RESPONSE on a new connection: same session, new request id, no credential
    ans = decode_challenge_answer(answer)
    assert (ans.auth_type, ans.handle, ans.index) == ("HS_PUBKEY", "0.NA/88.123.99", 300)
    assert answer.envelope.session_id == 2 and answer.envelope.request_id != create.envelope.request_id
    assert answer.credential == b"" and ans.encode_body() == answer.body
    # success: the CREATE's opcode, the CHALLENGE_RESPONSE's request id, no body
    r = decode_admin_response(done)
    assert r.ok and done.header.opcode == 100 and done.envelope.request_id == answer.envelope.request_id


def test_captured_challenge_signature_verifies_over_nonce_then_digest() -> None:
    _, _, create, challenge, answer, _ = msgs(CREATE)
    ch = decode_challenge(challenge)
    alg, sig = decode_challenge_answer(answer).signature()
    pub = K.load_public_key(ADMPUB)
    assert alg == b"SHA1" and ch.signed_bytes() == ch.nonce + ch.digest
    assert K.verify(pub, alg, sig, ch.signed_bytes())
    # not over anything else, not with a flipped byte, not with another key
    assert not K.verify(pub, alg, sig, ch.digest + ch.nonce)
    assert not K.verify(pub, alg, sig, bytes([ch.nonce[0] ^ 1]) + ch.signed_bytes()[1:])
    assert not K.verify(pub, alg, sig[:-1] + bytes([sig[-1] ^ 1]), ch.signed_bytes())
    other = dsa.generate_private_key(1024).public_key()
    assert not K.verify(other, alg, sig, ch.signed_bytes())


def test_server_signature_of_the_session_answer_verifies_with_its_key() -> None:
    _, setup_answer, *_ = msgs(CREATE)
    cred = decode_credential(setup_answer.credential)
    assert (cred.type, cred.signer, cred.signer_index, cred.hash_alg) == ("HS_SIGNED", "", 0, b"SHA1")
    server = K.load_public_key(SERVER_PUB)
    assert signed_bytes(setup_answer) == setup_answer.head_and_body()
    assert K.verify(server, cred.hash_alg, cred.signature, signed_bytes(setup_answer))
    assert not K.verify(server, cred.hash_alg, cred.signature, setup_answer.encode())


def test_batch_session_decodes_every_operation() -> None:
    m = msgs(BATCH)
    requests = [x for x in m[2::2]]
    ops = [(r.header.opcode, decode_admin_request(r)) for r in requests if r.header.opcode != 200]
    assert [op for op, _ in ops] == [100, 102, 104, 103, 101]
    create, add, modify, remove, delete = (r for _, r in ops)
    assert [(v.index, v.type, v.data) for v in create.values[:2]] == [
        (1, "URL", b"https://example.com/cap/0001"),
        (2, "MAC", b"24:0a:c4:12:34:56"),
    ]
    assert [(v.index, v.data) for v in add.values] == [(3, b"0.1.0")]
    assert [(v.index, v.data) for v in modify.values] == [(3, b"0.2.0")]
    assert remove.indexes == (2,) and delete.values == () and delete.handle == "88.123.99/CAP-0001"
    for r, (_, parsed) in zip([x for x in requests if x.header.opcode != 200], ops, strict=True):
        assert parsed.encode_body() == r.body
    # one session; the HS_MAC counters go 1..5 (the challenge response has no credential)
    creds = [decode_credential(r.credential) for r in requests if r.credential]
    assert [c.signer_index for c in creds] == [1, 2, 3, 4, 5]
    assert {r.envelope.session_id for r in requests} == {1}
    # only the first operation was challenged; the others passed on their MAC alone
    codes = [r.header.response_code for r in m[1::2]]
    assert codes == [1, 402, 1, 1, 1, 1, 1]


def test_node_side_encoders_reproduce_the_server() -> None:
    _, _, create, challenge, answer, done = msgs(CREATE)
    nonce = decode_challenge(challenge).nonce
    assert encode_challenge(create, nonce) == CREATE[3][1]
    assert encode_admin_answer(create, 1, request_id=answer.envelope.request_id) == CREATE[5][1]
    m = msgs(BATCH)
    for req, resp in zip(m[6::2], m[7::2], strict=True):  # ADD .. DELETE, each answered on its MAC
        assert encode_admin_answer(req, 1) == resp.encode()


def test_key_files_decode_and_reencode() -> None:
    priv = K.load_private_key(ADMPRIV)
    assert isinstance(priv, dsa.DSAPrivateKey)
    assert K.encode_private_key(priv) == ADMPRIV
    assert K.encode_public_key(priv.public_key()) == ADMPUB
    assert K.encode_public_key(K.load_public_key(ADMPUB)) == ADMPUB
    sig = K.sign(priv, b"nonce+digest")
    assert K.verify(K.load_public_key(ADMPUB), b"SHA1", sig, b"nonce+digest")


def test_rsa_keys_and_passphrases() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    data = K.encode_private_key(key)
    assert data[:4] == b"\0\0\0\1" and data[8:23] == b"RSA_PRIVCRT_KEY"
    back = K.load_private_key(data)
    assert isinstance(back, rsa.RSAPrivateKey) and back.private_numbers() == key.private_numbers()
    pub = K.load_public_key(K.encode_public_key(key.public_key()))
    assert K.verify(pub, b"SHA1", K.sign(back, b"x"), b"x")
    assert K.verify(pub, b"SHA-256", K.sign(back, b"x", b"SHA-256"), b"x")
    locked = K.encode_private_key(K.load_private_key(ADMPRIV), b"secret")
    assert struct.unpack(">I", locked[:4])[0] == 4
    with pytest.raises(K.PassphraseNeeded, match="protected by a passphrase"):
        K.load_private_key(locked)
    with pytest.raises(K.PassphraseNeeded, match="does not open"):
        K.load_private_key(locked, b"wrong")
    assert K.encode_private_key(K.load_private_key(locked, b"secret")) == ADMPRIV


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "truncated"),
        (b"\0\0\0\2" + b"x" * 40, "encryption type 2 is not supported"),
        (b"\0\0\0\1\0\0\0\3abc", "type 'abc'"),
        (b"\0\0\0\1\0\0\0\x0cRSA_PRIV_KEY", "RSA_PRIVCRT_KEY"),
        (ADMPRIV[:100], "truncated"),
    ],
)
def test_bad_private_key_files_are_named(data: bytes, match: str) -> None:
    with pytest.raises(K.KeyFileError, match=match):
        K.load_private_key(data)


def test_bad_public_keys_are_named() -> None:
    with pytest.raises(K.KeyFileError, match="DH_PUB_KEY"):
        K.load_public_key(K.encode_dh_key(5, 23, 2))
    with pytest.raises(K.KeyFileError, match="truncated"):
        K.load_public_key(ADMPUB[:50])


# ------------------------------------------------------------------------------------------------------
# sessions: key agreement and the MAC
# ------------------------------------------------------------------------------------------------------
def _java_broken_mac(
    key: bytes, hb: bytes, major: int, minor: int, sid: int, rid: int, counter: int
) -> bytes:
    """HANDLE.NET's brokenTwoFiveTwoSixSignature written out with its own offsets (``offset = writeInt(...)``
    returns 4, so the fields land on top of each other), to check the closed form session_mac uses."""
    buf = bytearray(2 * len(key) + len(hb) + 2 + 12)
    buf[0 : len(key)] = key
    off = len(key)
    buf[off], buf[off + 1] = major, minor
    off += 2
    for value in (sid, rid, counter):
        buf[off : off + 4] = struct.pack(">I", value)
        off = 4
    buf[off : off + len(hb)] = hb
    buf[off + len(hb) : off + len(hb) + len(key)] = key
    return hashlib.sha1(bytes(buf)).digest()


@pytest.mark.parametrize("key_len", [8, 24, 32])
def test_protocol_25_mac_is_handle_nets(key_len: int) -> None:
    create = msgs(CREATE)[2]
    key = bytes(range(1, key_len + 1))
    alg, mac = session_mac(key, create, 7)
    env = create.envelope
    want = _java_broken_mac(key, create.head_and_body(), 2, 5, env.session_id, env.request_id, 7)
    assert (alg, mac) == (b"\x02", want)


def test_mac_credential_round_trip_and_tampering() -> None:
    key = bytes(8)
    bare = new_request(100, AdminRequest(100, "88.123.99/X").encode_body(), request_id=5, session_id=9)
    cred = mac_credential(key, bare, 3)
    signed = Message(bare.envelope, bare.header, bare.body, cred.encode())
    back = decode_message(signed.encode())
    assert verify_mac(key, back) and decode_credential(back.credential).signer_index == 3
    assert not verify_mac(b"\1" * 8, back)
    assert not verify_mac(key, Message(back.envelope, back.header, back.body + b"x", back.credential))
    assert not verify_mac(key, bare)
    for version in ((2, 4), (2, 6), (2, 7), (2, 8)):
        req = new_request(101, b"\0\0\0\1x", request_id=1, session_id=2, version=version)
        withmac = Message(req.envelope, req.header, req.body, mac_credential(key, req, 1).encode())
        assert verify_mac(key, withmac), version


def test_dh_agreement_gives_both_sides_one_session_key() -> None:
    p, g = K.OAKLEY_GROUP_2
    a, ya = K.dh_keypair(p, g)
    b, yb = K.dh_keypair(p, g)
    secret = K.dh_secret(a, yb)
    assert secret == K.dh_secret(b, ya) and len(secret) == 128
    des = session_key(secret, N.SESSION_ALG_DES)
    assert len(des) == 8 and all(bin(x).count("1") % 2 == 1 for x in des)
    assert len(session_key(secret, N.SESSION_ALG_DESEDE)) == 24
    assert session_key(b"\0\0" + bytes(range(1, 127)), N.SESSION_ALG_AES) == bytes(range(1, 33))
    with pytest.raises(ValueError, match="unknown session cipher"):
        session_key(secret, 9)


def test_session_setup_body_round_trips_every_mode() -> None:
    for s in (
        SessionSetup(4, 60, "0.NA/88.123.99", 300, public_key=b"key"),
        SessionSetup(3, 60, "0.NA/88.123.99", 300, exchange_handle="0.NA/X", exchange_index=7),
        SessionSetup(2, 60, "0.NA/88.123.99", 300),
    ):
        msg = new_request(400, s.encode_body(), request_id=1)
        assert decode_session_setup(decode_message(msg.encode())) == s


def test_challenge_answer_helpers() -> None:
    a = ChallengeAnswer.signed("0.NA/88.123.99", 300, b"SHA1", b"sig")
    msg = new_request(200, a.encode_body(), request_id=3, session_id=2)
    back = decode_challenge_answer(decode_message(msg.encode()))
    assert back == a and back.signature() == (b"SHA1", b"sig")


def test_admin_answers_with_error_texts() -> None:
    req = new_request(100, AdminRequest(100, "88.123.99/X").encode_body(), request_id=3)
    r = decode_admin_response(decode_message(encode_admin_answer(req, 101, "handle already exists")))
    assert (r.code, r.message, r.ok, r.name) == (
        101,
        "handle already exists",
        False,
        "HANDLE_ALREADY_EXIST (101)",
    )
    with pytest.raises(ValueError, match="not an administration request"):
        AdminRequest(1, "x")


# ------------------------------------------------------------------------------------------------------
# garbage raises HandleFormatError, nothing else
# ------------------------------------------------------------------------------------------------------
_DECODERS = (
    decode_admin_request,
    decode_admin_response,
    decode_challenge,
    decode_challenge_answer,
    decode_session_setup,
    decode_session_setup_answer,
)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200), opcode=st.sampled_from([100, 101, 102, 103, 104, 200, 400]))
def test_garbage_bodies_raise_only_format_errors(body: bytes, opcode: int) -> None:
    for code in (0, 1, 402):
        msg = Message(msgs(CREATE)[2].envelope, msgs(CREATE)[2].header.__class__(opcode, code), body)
        for decode in _DECODERS:
            try:
                decode(msg)
            except HandleFormatError:
                pass


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=120))
def test_garbage_credentials_and_keys(data: bytes) -> None:
    try:
        decode_credential(data)
    except HandleFormatError:
        pass
    for load in (K.load_public_key, K.load_private_key):
        try:
            load(data)
        except K.KeyFileError:
            pass
    try:
        K.decode_dh_key(data)
    except HandleFormatError:
        pass


def test_credential_section_length_is_checked() -> None:
    good = Credential("HS_SIGNED", b"SHA1", b"sig").encode()
    assert decode_credential(good) == Credential("HS_SIGNED", b"SHA1", b"sig")
    with pytest.raises(HandleFormatError, match="signature section"):
        decode_credential(good + b"x")
