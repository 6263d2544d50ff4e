"""`ida node`'s administrative side, driven by the admin clients of gateway/upstream (native and REST) and, for
the refusals a client would never provoke, byte by byte through its sans-I/O core (tools/harness/node/admin.py).

Must show (issue 16): a wrong key is refused by the node; a tampered challenge response is refused; a prefix
whose HS_ADMIN does not name the key is refused."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, rsa
from cryptography.x509.oid import NameOID

from gateway.upstream.admin import AdminAuth, AdminClient, AdminError
from gateway.upstream.admin_rest import RestAdminClient
from proto.handle import (
    AdminRequest,
    ChallengeAnswer,
    Message,
    SessionSetup,
    decode_admin_response,
    decode_challenge,
    decode_message,
    decode_session_setup_answer,
    encode_message,
    mac_credential,
    new_request,
    session_key,
)
from proto.handle import keys as K
from proto.handle.numbers import SESSION_SETUP_FLAGS, AdminPerm
from proto.records import AdminRef, HandleValue, Record
from tests.support.captures import ADMIN, load_exchange
from tools.commands.broker.tls import make_certs
from tools.harness.node import NodeServer
from tools.harness.node.admin import AdminSide
from tools.harness.node.adminops import AdminOps, Identity, install_admin
from tools.harness.node.store import RecordStore

ADMIN_ID = Identity("0.NA/88.123.99", 300)
PUB = (ADMIN / "admpub.bin").read_bytes()
AUTH = AdminAuth.from_file("300:0.NA/88.123.99", ADMIN / "admpriv.bin")
URL = HandleValue(1, "URL", b"https://id.example.com/PUMP-1")


def admin_node(**kw: object) -> NodeServer:
    node = NodeServer(http="127.0.0.1:0", **kw)  # type: ignore[arg-type]
    install_admin(node.store, ADMIN_ID, "HS_PUBKEY", PUB)
    install_admin(node.store, Identity("0.NA/88.123.99", 301), "HS_SECKEY", b"s3cret")
    return node


def client(node: NodeServer, auth: AdminAuth = AUTH) -> AdminClient:
    assert node.handle_address is not None
    return AdminClient(*node.handle_address, auth, timeout=5.0)


# ------------------------------------------------------------------------------------------------------
# through the native admin client
# ------------------------------------------------------------------------------------------------------
async def test_one_session_one_challenge_then_macs() -> None:
    async with admin_node() as node, client(node) as c:
        first = await c.create("88.123.99/PUMP-1", [URL])
        second = await c.create("88.123.99/PUMP-2", [URL])
        assert first.challenged and not second.challenged and first.session_id == second.session_id
        assert c.stats == {"sessions": 1, "challenges": 1, "requests": 2}
        assert node.admin.answers[("create", 402)] == 1 and node.admin.answers[("create", 1)] == 1
        assert node.admin.answers[("challenge-response", 1)] == 1
        assert node.admin.ops.done[("create", "88.123.99/PUMP-1")] == 1
        assert (
            await c.lookup("88.123.99/PUMP-1") == (node.get_record("88.123.99/PUMP-1") or Record("")).values
        )


async def test_every_operation_changes_the_record() -> None:
    async with admin_node() as node, client(node) as c:
        h = "88.123.99/CAP-0001"
        admin = HandleValue(100, "HS_ADMIN", AdminRef("0.NA/88.123.99", 300, int(AdminPerm.ALL)).encode())
        await c.create(h, [URL, HandleValue(2, "MAC", b"24:0a:c4:12:34:56"), admin])
        await c.add(h, [HandleValue(3, "FW_VERSION", b"0.1.0")])
        await c.modify(h, [HandleValue(3, "FW_VERSION", b"0.2.0")])
        await c.remove(h, [2])
        rec = node.get_record(h)
        assert rec is not None and [(v.index, v.data) for v in rec.values] == [
            (1, URL.data),
            (3, b"0.2.0"),
            (100, admin.data),
        ]
        await c.delete(h)
        assert node.get_record(h) is None and await c.lookup(h) is None
        with pytest.raises(AdminError) as e:
            await c.modify(h, [URL])
        assert (e.value.kind, e.value.code) == ("not-found", 100)


async def test_wrong_key_is_refused_by_the_node() -> None:
    other = AdminAuth("0.NA/88.123.99", 300, dsa.generate_private_key(1024))
    async with admin_node() as node, client(node, other) as c:
        with pytest.raises(AdminError) as e:
            await c.create("88.123.99/PUMP-1", [URL])
        assert (e.value.kind, e.value.code, e.value.transient) == ("wrong-key", 403, False)
        assert str(e.value).startswith("create 88.123.99/PUMP-1: wrong key (403)")
        assert "88.123.99/PUMP-1" not in node.store


async def test_prefix_whose_hs_admin_does_not_name_the_key_is_refused() -> None:
    async with admin_node() as node:
        # another prefix, homed here, administered by someone else's key
        stranger = dsa.generate_private_key(1024)
        install_admin(
            node.store, Identity("0.NA/77.7", 300), "HS_PUBKEY", K.encode_public_key(stranger.public_key())
        )
        # and our own prefix handle, once its HS_ADMIN names another index only
        async with client(node) as c:
            with pytest.raises(AdminError) as e:
                await c.create("77.7/PUMP-1", [URL])
            assert (e.value.kind, e.value.code) == ("not-authorized", 400)
            assert "HS_ADMIN of 0.NA/77.7" in str(e.value)
        rec = node.get_record("0.NA/88.123.99")
        assert rec is not None
        others = tuple(
            HandleValue(v.index, v.type, AdminRef("0.NA/88.123.99", 301, int(AdminPerm.ALL)).encode())
            if v.type == "HS_ADMIN"
            else v
            for v in rec.values
        )
        node.store.add(Record(rec.handle, others))
        async with client(node) as c:
            with pytest.raises(AdminError) as e:
                await c.create("88.123.99/PUMP-9", [URL])
            assert (e.value.kind, e.value.code) == ("not-authorized", 400)
        assert "77.7/PUMP-1" not in node.store and "88.123.99/PUMP-9" not in node.store


async def test_refusals_before_authentication() -> None:
    async with admin_node() as node, client(node) as c:
        await c.create("88.123.99/PUMP-1", [URL])
        with pytest.raises(AdminError) as e:
            await c.create("88.123.99/PUMP-1", [URL])
        assert (e.value.kind, e.value.code) == ("exists", 101)
        with pytest.raises(AdminError) as e:
            await c.create("77.1/X", [URL])
        assert (e.value.kind, e.value.code) == ("not-homed", 301)
        assert "does not home prefix 77.1" in str(e.value)
        await c.create("88.123.99/PUMP-1", [HandleValue(1, "URL", b"https://new")], overwrite=True)
        rec = node.get_record("88.123.99/PUMP-1")
        assert rec is not None and rec.values[0].data == b"https://new"


async def test_a_lost_session_is_set_up_again() -> None:
    async with admin_node() as node, client(node) as c:
        await c.create("88.123.99/PUMP-1", [URL])
        node.admin._sessions.clear()  # the node restarted, or the session timed out
        await c.create("88.123.99/PUMP-2", [URL])
        assert c.stats["sessions"] == 2 and c.stats["challenges"] == 2
        assert node.admin.answers[("create", 500)] == 1


async def test_upstream_down_is_transient() -> None:
    async with admin_node() as node:
        assert node.handle_address is not None
        host, port = node.handle_address
    async with AdminClient(host, port, AUTH, timeout=1.0) as c:
        with pytest.raises(AdminError) as e:
            await c.create("88.123.99/PUMP-1", [URL])
    assert e.value.kind == "down" and e.value.transient and "upstream down" in str(e.value)


async def test_created_handles_persist_in_the_store_file(tmp_path: Path) -> None:
    store = tmp_path / "store.json"
    async with admin_node(store_file=store) as node, client(node) as c:
        await c.create("88.123.99/PUMP-1", [URL])
    assert "88.123.99/PUMP-1" in json.dumps(json.loads(store.read_text()))
    async with NodeServer(handle="127.0.0.1:0", http=None, store_file=store) as again:
        rec = again.get_record("88.123.99/PUMP-1")
        assert rec is not None and rec.values[0].data == URL.data
        assert again.store.hosts("88.123.99") and again.get_record("0.NA/88.123.99") is not None


# ------------------------------------------------------------------------------------------------------
# the node's sans-I/O core, byte by byte: what a client would not send
# ------------------------------------------------------------------------------------------------------
class Peer:
    """A hand-driven client of :class:`AdminSide`: session setup, signed requests, raw challenge answers."""

    def __init__(self, side: AdminSide) -> None:
        self.side = side
        p, g = K.OAKLEY_GROUP_2
        mine, y = K.dh_keypair(p, g)
        setup = SessionSetup(4, 600, "0.NA/88.123.99", 300, K.encode_dh_key(y, p, g)).encode_body()
        answer = self.ask(new_request(400, setup, request_id=1, op_flags=SESSION_SETUP_FLAGS))
        alg, server = decode_session_setup_answer(answer).dh()
        self.session = answer.envelope.session_id
        self.key = session_key(K.dh_secret(mine, K.decode_dh_key(server)[0]), alg)
        self.counter = 0

    def ask(self, msg: Message) -> Message:
        data, _code, _handle = self.side.answer(decode_message(msg.encode()))
        return decode_message(data)

    def request(self, handle: str, *, mac_key: bytes | None = None) -> tuple[Message, Message]:
        self.counter += 1
        bare = new_request(
            100,
            AdminRequest(100, handle, (URL,)).encode_body(),
            request_id=10 + self.counter,
            session_id=self.session,
        )
        cred = mac_credential(mac_key or self.key, bare, self.counter).encode()
        signed = decode_message(encode_message(bare.envelope, bare.header, bare.body, cred))
        return signed, self.ask(signed)

    def answer(self, challenge: Message, signature: bytes, rid: int = 99) -> Message:
        body = ChallengeAnswer.signed("0.NA/88.123.99", 300, b"SHA1", signature).encode_body()
        return self.ask(new_request(200, body, request_id=rid, session_id=self.session))


@pytest.fixture
def side() -> AdminSide:
    store = RecordStore([], ["88.123.99"])
    install_admin(store, ADMIN_ID, "HS_PUBKEY", PUB)
    return AdminSide(AdminOps(store))


def test_tampered_challenge_responses_are_refused(side: AdminSide) -> None:
    peer = Peer(side)
    _, challenge = peer.request("88.123.99/PUMP-1")
    ch = decode_challenge(challenge)
    good = K.sign(AUTH.key, ch.signed_bytes())
    flipped = good[:-1] + bytes([good[-1] ^ 0x01])
    refused = peer.answer(challenge, flipped)
    assert decode_admin_response(refused).code == 403 and refused.envelope.request_id == 99
    # the challenge is used up: even the right signature now finds nothing pending (405)
    assert decode_admin_response(peer.answer(challenge, good)).code == 405
    # a signature over the digest of another request
    _, challenge = peer.request("88.123.99/PUMP-2")
    ch = decode_challenge(challenge)
    other = K.sign(AUTH.key, ch.nonce + bytes(20))
    assert decode_admin_response(peer.answer(challenge, other)).code == 403
    assert "88.123.99/PUMP-1" not in side.ops.store and "88.123.99/PUMP-2" not in side.ops.store


def test_the_challenged_request_needs_the_right_mac_and_later_ones_too(side: AdminSide) -> None:
    peer = Peer(side)
    _, challenge = peer.request("88.123.99/PUMP-1", mac_key=bytes(8))  # MAC under a wrong session key
    ch = decode_challenge(challenge)
    assert decode_admin_response(peer.answer(challenge, K.sign(AUTH.key, ch.signed_bytes()))).code == 502
    _, challenge = peer.request("88.123.99/PUMP-2")
    ch = decode_challenge(challenge)
    assert decode_admin_response(peer.answer(challenge, K.sign(AUTH.key, ch.signed_bytes()))).ok
    _, later = peer.request("88.123.99/PUMP-3")  # authenticated session: on its MAC alone
    assert decode_admin_response(later).ok
    _, forged = peer.request("88.123.99/PUMP-4", mac_key=b"\1" * 8)
    assert decode_admin_response(forged).code == 502
    assert sorted(side.ops.store.handles("88.123.99")) == ["88.123.99/PUMP-2", "88.123.99/PUMP-3"]


def test_node_answers_cnri_session_setup_and_unknown_sessions(side: AdminSide) -> None:
    setup = decode_message(load_exchange("capture_create.hex")[0][1])
    answer = decode_message(side.answer(setup)[0])
    alg, key = decode_session_setup_answer(answer).dh()
    assert alg == 1 and K.decode_dh_key(key)[1:] == K.OAKLEY_GROUP_2 and answer.envelope.session_id == 1
    assert answer.header.op_flags == 0xD9800000 and answer.credential  # signed: CT was asked
    create = decode_message(load_exchange("capture_create.hex")[2][1])  # session 2: unknown here
    assert decode_admin_response(decode_message(side.answer(create)[0])).code == 500


# ------------------------------------------------------------------------------------------------------
# REST administration
# ------------------------------------------------------------------------------------------------------
async def test_rest_administration_with_basic_auth() -> None:
    async with admin_node() as node:
        rest = RestAdminClient(node.http_url, "0.NA/88.123.99", 301, secret=b"s3cret")
        async with rest:
            admin = HandleValue(100, "HS_ADMIN", AdminRef("0.NA/88.123.99", 301, int(AdminPerm.ALL)).encode())
            await rest.create("88.123.99/R-1", [URL, admin])
            await rest.add("88.123.99/R-1", [HandleValue(2, "MAC", b"aa")])
            await rest.modify("88.123.99/R-1", [HandleValue(2, "MAC", b"bb")])
            assert [v.data for v in await rest.lookup("88.123.99/R-1") or ()] == [URL.data, b"bb", admin.data]
            await rest.remove("88.123.99/R-1", [2])
            with pytest.raises(AdminError) as e:
                await rest.create("88.123.99/R-1", [URL])
            assert (e.value.kind, e.value.code) == ("exists", 101)
            await rest.delete("88.123.99/R-1")
        assert "88.123.99/R-1" not in node.store
        async with RestAdminClient(node.http_url, "0.NA/88.123.99", 301, secret=b"wrong") as bad:
            with pytest.raises(AdminError) as e:
                await bad.create("88.123.99/R-2", [URL])
            assert (e.value.kind, e.value.code) == ("wrong-key", 403)


async def test_rest_client_certificate_carries_the_admin_and_its_key(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server = make_certs(tmp_path, ["127.0.0.1"], days=1)  # a CA and a server certificate, as for the broker
    rest = RestAdminClient(
        "https://127.0.0.1:1",
        "0.NA/88.123.99",
        300,
        key=rsa_key,
        tls=ssl.create_default_context(cafile=server.ca),
    )
    assert rest.certificate is not None
    seen: list[tuple[str, bytes]] = []

    async def put(request: web.Request) -> web.Response:
        tls = request.transport.get_extra_info("ssl_object") if request.transport else None
        assert tls is not None
        cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
        uid = cert.subject.get_attributes_for_oid(NameOID.USER_ID)[0].value
        seen.append((str(uid), K.encode_public_key(cert.public_key())))  # type: ignore[arg-type]
        return web.json_response({"responseCode": 1, "handle": request.match_info["h"]}, status=201)

    tls_server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_server.load_cert_chain(server.cert, server.key)
    tls_server.verify_mode = ssl.CERT_REQUIRED
    tls_server.load_verify_locations(cadata=rest.certificate.decode())  # the server trusts this admin's cert
    app = web.Application()
    app.router.add_put("/api/handles/{h:.+}", put)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls_server)
    await site.start()
    rest.base = f"https://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with rest:
            await rest.create("88.123.99/C-1", [URL])
    finally:
        await runner.cleanup()
    assert seen == [("300:0.NA/88.123.99", K.encode_public_key(rsa_key.public_key()))]
