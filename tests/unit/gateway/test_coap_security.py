"""gateway/frontends/coap_security.py and coap_credentials.py without sockets: gateway sequence numbers, keystore
lookups and reloads, kid collisions, and the mode switch. (End to end with the real device: tests/integration/test_oscore_interop.py.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import aiocoap
import pytest
from aiocoap import oscore
from aiocoap.message import Direction
from aiocoap.numbers.codes import Code

from gateway.frontends import coap_credentials
from gateway.frontends import coap_security as cs
from tools.commands.flash.keystore import Keystore

ID_A = "88.123.99/PUMP-0001-ABCD"
ID_B = "88.123.99/PUMP-0002-ABCD"
KEY_A = bytes(range(16))
KEY_B = bytes(range(16, 32))


def device_context(
    tmp: Path, ident: str, key: bytes, kid: bytes | None = None
) -> oscore.FilesystemSecurityContext:
    """The device's side as aiocoap would hold it (same parameters as carrier/oscore.py)."""
    d = tmp / ("dev-" + ident.replace("/", "_"))
    d.mkdir()
    (d / "settings.json").write_text(
        json.dumps(
            {
                "sender-id_hex": (kid or cs.kid_of(ident)).hex(),
                "recipient-id_hex": "",
                "secret_hex": key.hex(),
                "salt_hex": cs.SALT.hex(),
                "algorithm": cs.ALGORITHM,
            }
        )
    )
    return oscore.FilesystemSecurityContext(str(d))


def protected_post(ctx: oscore.FilesystemSecurityContext, path: str) -> aiocoap.Message:
    msg = aiocoap.Message(code=Code.POST, uri_path=tuple(path.split("/")), payload=b"x")
    msg.direction = Direction.OUTGOING
    outer, _ = ctx.protect(msg)
    outer.direction = Direction.INCOMING
    return outer


def test_kid_is_pinned() -> None:
    # the firmware computes the same (tests/integration/test_oscore_interop.py authenticates with it)
    assert cs.kid_of(ID_A) == bytes.fromhex("edd63c299734")
    assert cs.kid_of("0.na/x") == cs.kid_of("0.NA/x") != cs.kid_of("0.NA/X")  # normalised: prefix case only


def test_gateway_sequence_numbers_never_repeat_across_processes_and_restarts(tmp_path: Path) -> None:
    path = tmp_path / cs.SEQ_FILE
    a, b = cs.SequenceNumbers(path, block=10), cs.SequenceNumbers(path, block=10)
    got = [a.take() for _ in range(15)] + [b.take() for _ in range(15)] + [a.take() for _ in range(3)]
    assert len(set(got)) == len(got)
    restarted = cs.SequenceNumbers(path, block=10)
    assert restarted.take() > max(got)
    other_host = cs.SequenceNumbers(tmp_path / "elsewhere" / cs.SEQ_FILE, block=10, instance=1)
    assert other_host.take() == 1 << 32  # another host's numbers never meet this one's
    path.write_text("garbage")
    with pytest.raises(oscore.ContextUnavailable):
        cs.SequenceNumbers(path).take()


def test_contexts_come_from_the_keystore_and_follow_its_changes(tmp_path: Path) -> None:
    ks = Keystore.in_dir(tmp_path)
    ks.put(ID_A, KEY_A)
    creds = cs.KeystoreCredentials(ks.path, cs.SequenceNumbers(tmp_path / "seq"), reload_interval=0)
    dev_a = device_context(tmp_path, ID_A, KEY_A)
    req = protected_post(dev_a, f"d/{ID_A}/rpt")
    ctx = creds.find_oscore(oscore.verify_start(req))
    assert repr(ctx) == f"<DeviceContext {ID_A} kid={cs.kid_of(ID_A).hex()}>"
    assert KEY_A.hex() not in repr(ctx)
    with pytest.raises(oscore.ReplayErrorWithEcho):  # no replay state yet: Echo recovery first
        ctx.unprotect(req)
    # a device flashed after the gateway started is found without a restart
    dev_b = device_context(tmp_path, ID_B, KEY_B)
    with pytest.raises(KeyError):
        creds.find_oscore(oscore.verify_start(protected_post(dev_b, "r/x")))
    os.utime(ks.path, (1, 1))
    ks.put(ID_B, KEY_B)
    assert creds.find_oscore(oscore.verify_start(protected_post(dev_b, "r/x"))).device == ID_B
    # re-keyed: the old context is dropped
    old = creds.context(ID_A)
    ks.put(ID_A, KEY_B)
    os.utime(ks.path, (2, 2))
    creds.reload()
    assert creds.context(ID_A) is not old
    with pytest.raises(KeyError):  # a kid context is not part of this design
        creds.find_oscore({oscore.COSE_KID: cs.kid_of(ID_A), oscore.COSE_KID_CONTEXT: b"x"})


def test_a_keystore_change_with_the_same_mtime_is_still_seen(tmp_path: Path) -> None:
    ks = Keystore.in_dir(tmp_path)
    ks.put(ID_A, KEY_A)
    before = ks.path.stat()
    creds = cs.KeystoreCredentials(ks.path, cs.SequenceNumbers(tmp_path / "seq"), reload_interval=0)
    assert creds.devices == 1
    ks.put(
        ID_B, KEY_B
    )  # within the same timestamp tick on a coarse file system: simulated by putting it back
    os.utime(ks.path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert ks.path.stat().st_mtime_ns == before.st_mtime_ns
    creds.reload()
    assert creds.devices == 2 and creds.context(ID_B).device == ID_B


def test_kid_collision_is_resolved_by_trial_decryption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    same = b"\x01" * 6
    monkeypatch.setattr(coap_credentials, "kid_of", lambda _ident: same)
    ks = Keystore.in_dir(tmp_path)
    ks.put(ID_A, KEY_A)
    ks.put(ID_B, KEY_B)
    creds = cs.KeystoreCredentials(ks.path, cs.SequenceNumbers(tmp_path / "seq"))
    for ident, key in ((ID_B, KEY_B), (ID_A, KEY_A)):
        creds.context(ident).recipient_replay_window.initialize_empty()  # type: ignore[union-attr]
        req = protected_post(device_context(tmp_path, ident, key, same), "r/x")
        sc = creds.find_oscore(oscore.verify_start(req))
        assert isinstance(sc, coap_credentials._TrialContext)
        inner, _ = sc.unprotect(req)
        assert inner.payload == b"x"
        assert sc.authenticated_claims == [ident]
        assert sc.context_for_response() is creds.context(ident)
    wrong = protected_post(device_context(tmp_path, "88.1/X", bytes(16), same), "r/x")
    with pytest.raises(oscore.ProtectionInvalid):
        creds.find_oscore(oscore.verify_start(wrong)).unprotect(wrong)


def test_mode_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="security"):
        cs.CoapSecurity("dtls", tmp_path / "k.json", tmp_path)
    sec = cs.CoapSecurity(cs.OSCORE, tmp_path / "missing.json", tmp_path)
    assert sec.credentials.devices == 0 and sec.health() == {"coap_security": "oscore"}
    assert sec.open_path((".well-known", "core")) and not sec.open_path(("r", "88.1", "x"))
    assert cs.CoapSecurity(cs.OSCORE, tmp_path / "k.json", tmp_path, plain_resolve=True).open_path(("r", "x"))
