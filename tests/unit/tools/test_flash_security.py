"""`ida flash` and device security: identities are OSCORE-secure by default (``--insecure`` is logged and
recorded), a chip gets a new key whenever its filesystem is written (nonce safety: the device's OSCORE sequence
number restarts with a rewritten filesystem), and ``mqtts://`` devices get the broker's CA from the batch image.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.flashutil import firmware_tree, standin_runtime
from tools.commands.flash import builder as fb
from tools.commands.flash import image as im
from tools.commands.flash.ca import CaError, load_ca, to_der
from tools.commands.flash.errors import FlashError
from tools.commands.flash.identity import (
    CA_PATH,
    IDENTITY_PATH,
    Identity,
    key_fingerprint,
    new_key,
    parse_identity,
    personalise,
)
from tools.commands.flash.keystore import Keystore
from tools.commands.flash.ledger import Ledger, pattern_identifiers
from tools.commands.flash.programmer import Parts, SimulatedChip
from tools.commands.flash.provision import IdentityTemplate, Result, Station, flash_device

BOARD = "esp32-devkitc"
VFS, VFS_SIZE = 0x200000, 0x200000
COAP = IdentityTemplate(("coap://192.168.4.1:5683",))
MQTTS = IdentityTemplate(("mqtts://192.168.4.1:8883",), "mqtt")


@dataclass(frozen=True)
class Builds:
    plain: fb.Build  # no CA
    with_ca: fb.Build  # ida flash build --ca
    ca_pem: Path
    tmp: Path


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Builds:
    from tools.commands.broker import make_certs

    tmp = tmp_path_factory.mktemp("flashsec")
    fw, _ = firmware_tree(tmp)
    runtime, _ = standin_runtime(BOARD, tmp)
    tls = make_certs(tmp / "tls", ["192.168.4.1", "broker.plant.example"])
    fb.build(BOARD, tmp / "plain", runtime=runtime, firmware_dir=fw)
    fb.build(BOARD, tmp / "ca", runtime=runtime, firmware_dir=fw, ca=tls.ca)
    return Builds(fb.load_build(tmp / "plain", BOARD), fb.load_build(tmp / "ca", BOARD), tls.ca, tmp)


@pytest.fixture
def station(tmp_path: Path) -> Station:
    with Ledger.in_dir(tmp_path / "data") as led:
        led.add_pool(pattern_identifiers("88.123.99", "PUMP-{n:06d}", 1, 20), "pumps")
    return Station(tmp_path / "data", operator="alice", station="line-1")


def factory_chip(built: fb.Build, cls: type[SimulatedChip] = SimulatedChip, **kw: object) -> SimulatedChip:
    """A chip pre-loaded with the batch's factory.bin (runtime + batch filesystem)."""
    chip = cls(**kw)  # type: ignore[arg-type]
    factory = (built.directory / fb.FACTORY_IMAGE).read_bytes()
    off = built.manifest.factory_image["offset"]  # type: ignore[index]
    chip.flash[off : off + len(factory)] = factory
    return chip


def flashed(built: fb.Build, station: Station, url: str) -> tuple[SimulatedChip, Result]:
    """A factory chip flashed once by the station (identity towards ``url``)."""
    chip = factory_chip(built)
    return chip, flash_device(chip, built, station, url)


def chip_files(built: fb.Build, chip: SimulatedChip) -> dict[str, bytes]:
    return im.read_files(built.params, bytes(chip.flash[VFS : VFS + VFS_SIZE]))


def chip_identity(built: fb.Build, chip: SimulatedChip) -> tuple[dict, Identity]:
    raw = chip_files(built, chip)[IDENTITY_PATH]
    return json.loads(raw), parse_identity(raw)


def ledger_row(station: Station, identifier: str):  # noqa: ANN201 - Device
    with station.ledger() as led:
        return led.device(identifier)


# --- secure by default ------------------------------------------------------------------------------------------


def test_identity_is_secure_by_default_and_fits_one_block(builds: Builds, station: Station) -> None:
    chip = factory_chip(builds.plain)
    r = flash_device(chip, builds.plain, station, COAP)
    doc, ident = chip_identity(builds.plain, chip)
    assert doc["secure"] is True and ident.secure and r.secure
    assert (
        "transport" not in doc
    )  # the firmware's default (coap) is left out: the file stays inline (<= 128 B)
    assert len(json.dumps(doc, separators=(",", ":"))) <= 128 and r.bytes_written == 4096
    assert ledger_row(station, r.identifier).security == "oscore"


def test_insecure_is_logged_and_recorded(
    builds: Builds, station: Station, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "tools.commands.flash")
    chip = factory_chip(builds.plain)
    r = flash_device(chip, builds.plain, station, IdentityTemplate(COAP.gateways, secure=False))
    doc, ident = chip_identity(builds.plain, chip)
    assert "secure" not in doc and not ident.secure and not r.secure
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert warnings == [
        f"INSECURE identity for {r.identifier}: CoAP without OSCORE (--insecure, factory bench only)"
    ]
    assert ledger_row(station, r.identifier).security == "insecure"
    with station.ledger() as led:
        assert {e["security"] for e in led.events() if e["result"] != "allocated"} == {"insecure"}


# --- key freshness ----------------------------------------------------------------------------------------------


@dataclass
class WatchedChip(SimulatedChip):
    """Records, at each write, the key the keystore holds for ``identifier`` (the gateway's view)."""

    keystore: Keystore | None = None
    keys_at_write: list[bytes | None] = field(default_factory=list)

    def write_flash(self, parts: Parts) -> None:
        assert self.keystore is not None
        ids = self.keystore.identifiers()
        self.keys_at_write.append(self.keystore.get(ids[0]) if ids else None)
        super().write_flash(parts)


def device_ran(built: fb.Build, chip: SimulatedChip) -> None:
    """What the firmware does to its filesystem while it runs: littlefs writes its state (the unix port's
    kv/oscseq, a report queue), so some blocks of the vfs region change."""
    region = bytes(chip.flash[VFS : VFS + VFS_SIZE])
    after = im.add_files(
        built.params,
        region,
        {"/kv/oscseq": b"\x01\x02\x03\x04" + (200).to_bytes(8, "little"), "/q.dat": b"queued report"},
    )
    assert im.changed_blocks(region, after, 4096)
    chip.flash[VFS : VFS + VFS_SIZE] = after


def test_new_key_whenever_the_filesystem_is_written(builds: Builds, station: Station) -> None:
    from gateway.frontends.coap_security import KeystoreCredentials, SequenceNumbers

    b = builds.plain
    ks = station.keystore()
    gateway = KeystoreCredentials(
        ks.path, SequenceNumbers(station.data_dir / "oscore-seq.json"), reload_interval=0
    )
    chip = factory_chip(b, WatchedChip, keystore=ks)
    assert isinstance(chip, WatchedChip)

    # 1. first flash: a key is made, in the keystore before the first byte is written
    first = flash_device(chip, b, station, COAP)
    key1 = ks.get(first.identifier)
    assert key1 is not None and first.new_key and first.previous_key_fingerprint is None
    assert chip.keys_at_write == [key1] and chip_identity(b, chip)[1].key == key1
    gateway.reload()
    assert gateway.context(first.identifier).fingerprint == key_fingerprint(key1)  # type: ignore[union-attr]

    # 2. identical re-flash: 0 bytes written, the key is kept
    chip.keys_at_write.clear()
    same = flash_device(chip, b, station, COAP)
    assert same.bytes_written == 0 and same.fs_mode == "unchanged" and not same.new_key
    assert ks.get(first.identifier) == key1 and same.key_fingerprint == first.key_fingerprint
    assert chip.keys_at_write == []

    # 3. the device ran (its filesystem changed: OSCORE sequence state, queue), then is flashed again: the
    #    filesystem is rewritten, so its sequence number restarts -- a new key, stored before the write
    device_ran(b, chip)
    again = flash_device(chip, b, station, COAP)
    key2 = ks.get(first.identifier)
    assert key2 is not None and key2 != key1 and again.new_key and again.fs_mode == "full"
    assert chip.keys_at_write and all(k == key2 for k in chip.keys_at_write)
    assert chip_identity(b, chip)[1].key == key2
    assert "/kv/oscseq" not in chip_files(b, chip)  # the old sequence state is gone with the old key
    assert (again.previous_key_fingerprint, again.key_fingerprint) == (
        key_fingerprint(key1),
        key_fingerprint(key2),
    )
    gateway.reload()  # the gateway re-reads the changed keystore and derives a fresh context
    assert gateway.context(first.identifier).fingerprint == key_fingerprint(key2)  # type: ignore[union-attr]

    # 4. the ledger has both fingerprints, never a key
    dev = ledger_row(station, first.identifier)
    assert (dev.previous_key_fingerprint, dev.key_fingerprint) == (
        key_fingerprint(key1),
        key_fingerprint(key2),
    )
    with station.ledger() as led:
        out = io.StringIO()
        led.export_csv(out, history=True)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [
        (r["result"], r["key_fingerprint"], r["previous_key_fingerprint"])
        for r in rows
        if r["result"] == "verified"
    ] == [
        ("verified", key_fingerprint(key1), ""),
        ("verified", key_fingerprint(key1), ""),
        ("verified", key_fingerprint(key2), key_fingerprint(key1)),
    ]
    assert key1.hex() not in out.getvalue().lower() and key2.hex() not in out.getvalue().lower()

    # 5. a chip back on the batch image (re-loaded with factory.bin), or --full: written, so a new key again
    chip.flash[:] = factory_chip(b).flash
    delta = flash_device(chip, b, station, COAP)
    assert (
        delta.fs_mode == "delta"
        and delta.bytes_written == 4096
        and ks.get(first.identifier) not in (key1, key2)
    )
    full = flash_device(chip, b, station, COAP, full=True)
    assert full.previous_key_fingerprint == delta.key_fingerprint != full.key_fingerprint


def test_runtime_writes_and_the_nvs_partition(builds: Builds, station: Station) -> None:
    """On the ESP32 the sequence state is in NVS (0x9000). MicroPython's merged firmware.bin, written from
    0x1000, spans NVS and erases it: a new key, and the chip's identity rewritten in the one block that differs
    from the image it holds. An app-only runtime (0x8000 table + 0x10000 app) leaves NVS and the filesystem
    alone: the key is kept."""
    b = builds.plain
    chip, first = flashed(b, station, COAP)
    chip.flash[0x10000] = 0xFF  # no app image any more: the runtime has to be written
    chip.written.clear()
    merged = flash_device(chip, b, station, COAP)
    assert [w.what for w in merged.writes] == ["runtime", "fs-delta"] and merged.writes[0].offset == 0x1000
    assert merged.writes[0].offset < 0x9000 < merged.writes[0].offset + merged.writes[0].size  # over NVS
    assert merged.new_key and merged.previous_key_fingerprint == first.key_fingerprint
    assert merged.writes[1].size == 4096  # a delta against the chip's own previous image, not 2 MiB
    assert chip_identity(b, chip)[1].key == station.keystore().get(first.identifier)

    chip.flash[0x10000] = 0xFF
    app_only = builds.tmp / f"{BOARD}-app.bin"
    r = flash_device(chip, b, station, COAP, runtime=app_only)
    assert [(w.what, w.offset) for w in r.writes] == [("partition-table", 0x8000), ("runtime", 0x10000)]
    assert r.fs_mode == "unchanged" and not r.new_key and r.key_fingerprint == merged.key_fingerprint


def test_failed_write_after_rekey_leaves_keystore_and_ledger_consistent(
    builds: Builds, station: Station
) -> None:
    b = builds.plain
    chip, first = flashed(b, station, COAP)
    device_ran(b, chip)
    chip.fail_after_writes = len(chip.written)  # the cable is pulled at the next write
    with pytest.raises(FlashError):
        flash_device(chip, b, station, COAP)
    dev = ledger_row(station, first.identifier)
    new = station.keystore().get(first.identifier)
    assert dev.state == "failed" and new is not None and dev.key_fingerprint == key_fingerprint(new)
    assert dev.previous_key_fingerprint == first.key_fingerprint
    chip.fail_after_writes = None
    r = flash_device(chip, b, station, COAP)  # the retry rewrites the filesystem: yet another key
    assert (
        r.previous_key_fingerprint == key_fingerprint(new)
        and ledger_row(station, r.identifier).state == "verified"
    )


# --- MQTT over TLS: the broker's CA ----------------------------------------------------------------------------


def test_build_with_ca_holds_it_as_der(builds: Builds) -> None:
    b = builds.with_ca
    der = to_der(builds.ca_pem.read_bytes())
    files = im.read_files(b.params, b.fs_image)
    assert files[CA_PATH] == der and der[0] == 0x30  # DER SEQUENCE, converted from the PEM given
    ca = b.manifest.ca
    assert ca is not None and ca["file"] == CA_PATH and ca["subject"] == "CN=ida broker CA"
    assert ca["sha256"] == im.sha256(der) and ca["source"] == str(builds.ca_pem.resolve())
    assert any(f.path == CA_PATH for f in b.manifest.files)
    assert builds.plain.manifest.ca is None and CA_PATH not in im.read_files(b.params, builds.plain.fs_image)


def test_mqtts_identity_references_the_batch_ca_and_only_the_identity_differs(
    builds: Builds, station: Station
) -> None:
    b = builds.with_ca
    chip, r = flashed(b, station, MQTTS)
    doc, ident = chip_identity(b, chip)
    assert doc["mqtt"] == "mqtts://192.168.4.1:8883" and doc["transport"] == "mqtt"
    assert doc["ca"] == "ca.crt" and doc["secure"] is True and ident.ca == "ca.crt"
    assert chip_files(b, chip)[CA_PATH] == im.read_files(b.params, b.fs_image)[CA_PATH]
    # per chip only the identity differs: the same blocks as that identity costs on a build without a CA.
    # It is over littlefs's 128-byte inline limit (cache_size), so it takes a data block besides the root
    # directory's metadata block: 2 blocks (a CoAP identity stays inline: 1 block).
    alone = personalise(builds.plain.params, builds.plain.fs_image, ident)
    assert r.fs_mode == "delta" and r.blocks_written == alone.delta_blocks == 2, r.writes
    print(
        f"\nper-chip write, mqtts identity with the CA in the batch image: {r.blocks_written} blocks "
        f"({len(ident.to_json(compact=True))}-byte identity)"
    )
    der = im.read_files(b.params, b.fs_image)[CA_PATH]
    assert not any(
        der in bytes(chip.flash[off : off + n]) for off, n in chip.written
    )  # the CA is not rewritten
    # the CoAP identity on the same (CA) build: still 1 block
    assert flash_device(factory_chip(b, mac="24:0a:c4:00:00:02"), b, station, COAP).bytes_written == 4096


def test_ca_per_chip_when_the_build_has_none(builds: Builds, station: Station) -> None:
    der = load_ca(builds.ca_pem).der
    chip = factory_chip(builds.plain)
    r = flash_device(chip, builds.plain, station, IdentityTemplate(MQTTS.gateways, "mqtt", ca=der))
    assert (
        chip_files(builds.plain, chip)[CA_PATH] == der
        and chip_identity(builds.plain, chip)[0]["ca"] == "ca.crt"
    )
    assert r.blocks_written == 3, r.writes  # + the CA's data block
    # the same CA again with a build that has it: nothing extra per chip
    same = flash_device(
        factory_chip(builds.with_ca, mac="24:0a:c4:00:00:02"),
        builds.with_ca,
        station,
        IdentityTemplate(MQTTS.gateways, "mqtt", ca=der),
    )
    assert same.blocks_written == 2


def test_ca_mistakes_are_refused_before_anything_is_spent(
    builds: Builds, station: Station, tmp_path: Path
) -> None:
    from tools.commands.broker import make_certs

    other = load_ca(make_certs(tmp_path / "other", ["x"]).ca).der
    der = load_ca(builds.ca_pem).der
    cases = [
        (builds.plain, MQTTS, "needs the broker's CA"),
        (
            builds.with_ca,
            IdentityTemplate(MQTTS.gateways, "mqtt", ca=other),
            "differs from the one in the build",
        ),
        (builds.plain, IdentityTemplate(("mqtt://192.168.4.1",), "mqtt", ca=der), "no mqtts://"),
    ]
    for built, template, message in cases:
        chip = factory_chip(built)
        with pytest.raises(FlashError, match=message):
            flash_device(chip, built, station, template)
        assert chip.written == []
    with station.ledger() as led:
        assert led.devices() == []


def test_load_ca_accepts_pem_and_der_and_refuses_the_rest(builds: Builds, tmp_path: Path) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    pem = builds.ca_pem.read_bytes()
    der_file = tmp_path / "ca.der"
    der_file.write_bytes(to_der(pem))
    assert load_ca(der_file) == load_ca(builds.ca_pem)
    two = tmp_path / "two.pem"
    two.write_bytes(pem + pem)
    with pytest.raises(CaError, match="2 PEM certificates"):
        load_ca(two)
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a certificate")
    with pytest.raises(CaError, match="not an X.509 certificate"):
        load_ca(junk)
    with pytest.raises(CaError, match="cannot read"):
        load_ca(tmp_path / "missing.pem")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")])
    now = dt.datetime.now(dt.UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    from cryptography.hazmat.primitives.serialization import Encoding

    (tmp_path / "leaf.der").write_bytes(leaf.public_bytes(Encoding.DER))
    with pytest.raises(CaError, match="not a CA certificate"):
        load_ca(tmp_path / "leaf.der")
    with pytest.raises(CaError, match="expired"):
        load_ca(builds.ca_pem, now=now + dt.timedelta(days=20000))


def test_firmware_reads_the_flashed_identity_and_loads_the_ca(
    builds: Builds, station: Station, tmp_path: Path
) -> None:
    """The chip's files under the real micropython: carrier.identity parses the identity (secure, mqtts, the
    CA path under its data root) and carrier.tls builds the MQTT TLS context from the DER CA."""
    from tests.support.mp import run_mp

    b = builds.with_ca
    chip = factory_chip(b)
    flash_device(chip, b, station, MQTTS)
    root = tmp_path / "flash"
    root.mkdir()
    for path in (IDENTITY_PATH, CA_PATH):
        (root / path[1:]).write_bytes(chip_files(b, chip)[path])
    out = run_mp(
        "from carrier import identity, tls\n"
        "from fwfakes import FakeHal\n"
        f"i = identity.load(FakeHal({str(root) + '/'!r}))\n"
        "ctx = tls.context(i.ca_path)\n"
        "print(i.secure, i.mqtt_tls, i.transport, i.mqtt[0], i.mqtt[1], i.ca_path, identity.fingerprint(i.key))\n"
    )
    key = station.keystore().get(chip_identity(b, chip)[1].identifier)
    assert key is not None
    assert out.split() == [
        "True",
        "True",
        "mqtt",
        "192.168.4.1",
        "8883",
        f"{root}/ca.crt",
        key_fingerprint(key),
    ]


# --- the command line ------------------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    from tools.commands.flash import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(list(argv))


def test_cli_build_ca_and_station_options(
    builds: Builds, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tools.commands.flash import cli

    fw, _ = firmware_tree(tmp_path)
    assert (
        cli.run(
            parse(
                "build",
                "--board",
                BOARD,
                "--out",
                str(tmp_path / "b"),
                "--firmware",
                str(fw),
                "--ca",
                str(builds.ca_pem),
            )
        )
        == 0
    )
    assert "ca.crt: CN=ida broker CA" in capsys.readouterr().out
    assert fb.load_build(tmp_path / "b").manifest.ca is not None
    base = ("device", "--port", "p", "--board", BOARD, "--next")
    t = cli._template(parse(*base, "--gateway", "mqtts://broker.plant.example", "--ca", str(builds.ca_pem)))
    assert (t.transport, t.secure, t.ca) == ("mqtt", True, load_ca(builds.ca_pem).der)
    t = cli._template(parse(*base, "--gateway", "coap://10.0.0.1", "--insecure"))
    assert (t.transport, t.secure, t.security, t.ca) == ("coap", False, "insecure", None)
    with pytest.raises(FlashError, match="mqtts://host"):
        cli._template(parse(*base, "--gateway", "MQTTS://broker"))


def test_identity_format_round_trips() -> None:
    key = new_key()
    for ident in (
        Identity("88.123.99/P-1", key, ("coap://10.0.0.1",)),
        Identity(
            "88.123.99/P-1", key, ("coap://10.0.0.1", "mqtts://b:8883"), "mqtt", ("s", "p"), True, "ca.crt"
        ),
    ):
        assert parse_identity(ident.to_json()) == ident == parse_identity(ident.to_json(compact=True))
    assert b'"transport"' not in Identity("88.123.99/P-1", key, ("coap://h",)).to_json(compact=True)
    with pytest.raises(FlashError, match="one gateway address per transport"):
        Identity("88.123.99/P-1", key, ("mqtt://b", "mqtts://b"), "mqtt")
    assert "oscore" in repr(
        Identity("88.123.99/P-1", key, ("coap://h",), secure=True)
    ) and key.hex() not in repr(ident)


def test_result_reports_key_state() -> None:
    r = Result("88.1/X", "m", "esp32", True, "unchanged", (), "aa", 0.0)
    assert not r.new_key and r.secure and r.previous_key_fingerprint is None
