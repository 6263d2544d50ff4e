"""The flashing ledger: identifiers are never issued twice and never lost, even with two stations at once."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tools.commands.flash import cli
from tools.commands.flash.errors import IdentifierConflict, LedgerError, PoolExhausted
from tools.commands.flash.keystore import Keystore
from tools.commands.flash.ledger import (
    Checksums,
    Ledger,
    file_identifiers,
    normalise_mac,
    pattern_identifiers,
)

ROOT = Path(__file__).resolve().parents[3]


def mac(i: int) -> str:
    return f"24:0a:c4:{(i >> 16) & 0xFF:02x}:{(i >> 8) & 0xFF:02x}:{i & 0xFF:02x}"


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    led = Ledger.in_dir(tmp_path)
    led.add_pool(pattern_identifiers("88.123.99", "PUMP-{n:06d}", 1, 50), "pumps")
    return led


# Each worker allocates N identifiers for its own MACs as fast as it can and prints them as JSON.
WORKER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from tools.commands.flash.ledger import Ledger
led = Ledger.in_dir(sys.argv[2])
station, n = int(sys.argv[3]), int(sys.argv[4])
got = []
for i in range(n):
    mac = "02:00:%02x:%02x:%02x:00" % (station, i >> 8, i & 0xFF)
    got.append(led.allocate(mac, "esp32-devkitc", station="st%d" % station).identifier)
print(json.dumps(got))
"""


def test_two_processes_allocating_concurrently_never_get_the_same_identifier(tmp_path: Path) -> None:
    n = 300
    with Ledger.in_dir(tmp_path) as led:
        led.add_pool(pattern_identifiers("88.123.99", "PUMP-{n:06d}", 1, 2 * n + 50), "pumps")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(ROOT), str(tmp_path), str(s), str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for s in (1, 2)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    a, b = results
    assert len(a) == len(b) == n
    assert len(set(a)) == n and len(set(b)) == n
    assert not set(a) & set(b)
    with Ledger.in_dir(tmp_path) as led:
        assert led.free_count() == 50
        devices = led.devices()
        assert len(devices) == 2 * n
        assert len({d.mac for d in devices}) == 2 * n
        # the identifiers issued are exactly the first 2n of the pool: none skipped, none lost
        assert {d.identifier for d in devices} == {f"88.123.99/PUMP-{i:06d}" for i in range(1, 2 * n + 1)}


def test_reflash_same_mac_keeps_identifier(ledger: Ledger) -> None:
    first = ledger.allocate(mac(1), "esp32-devkitc")
    ledger.record(first.identifier, "verified")
    again = ledger.allocate(mac(1).upper(), "esp32-devkitc")
    assert again.identifier == first.identifier and again.reused
    assert ledger.device_by_mac("240AC4000001").identifier == first.identifier  # type: ignore[union-attr]
    assert ledger.allocate(mac(2), "esp32-devkitc").identifier != first.identifier


def test_identifier_never_on_two_macs(ledger: Ledger) -> None:
    a = ledger.allocate(mac(1), "esp32-devkitc", identifier="88.123.99/PUMP-000025")
    assert a.identifier == "88.123.99/PUMP-000025"
    with pytest.raises(IdentifierConflict, match="already bound to chip 24:0a:c4:00:00:01"):
        ledger.allocate(mac(2), "esp32-devkitc", identifier="88.123.99/pump-000025")
    # nor a second identifier on one MAC
    with pytest.raises(IdentifierConflict, match="already carries"):
        ledger.allocate(mac(1), "esp32-devkitc", identifier="88.123.99/PUMP-000026")
    # an explicitly chosen pool identifier is no longer free for --next
    issued = {ledger.allocate(mac(100 + i), "esp32-devkitc").identifier for i in range(49)}
    assert "88.123.99/PUMP-000025" not in issued
    with pytest.raises(PoolExhausted):
        ledger.allocate(mac(5000), "esp32-devkitc")


def test_failed_flash_keeps_identifier_bound_to_its_mac(ledger: Ledger) -> None:
    a = ledger.allocate(mac(1), "esp32-devkitc")
    ledger.record(a.identifier, "failed", detail="verify failed")
    assert ledger.device(a.identifier).state == "failed"  # type: ignore[union-attr]
    # not issued to another chip ...
    assert ledger.allocate(mac(2), "esp32-devkitc").identifier != a.identifier
    # ... and the same chip gets it back when flashed again
    retry = ledger.allocate(mac(1), "esp32-devkitc")
    assert retry.identifier == a.identifier and retry.reused


def test_release_returns_a_failed_identifier_to_the_pool_but_never_a_verified_one(ledger: Ledger) -> None:
    a = ledger.allocate(mac(1), "esp32-devkitc")
    ledger.record(a.identifier, "failed")
    ledger.release(a.identifier, "alice", "chip scrapped")
    assert ledger.device(a.identifier) is None
    b = ledger.allocate(mac(2), "esp32-devkitc")
    assert b.identifier == a.identifier  # first in issue order again: not lost
    ledger.record(b.identifier, "verified")
    with pytest.raises(LedgerError, match="in the field"):
        ledger.release(b.identifier)
    results = [e["result"] for e in ledger.events() if e["identifier"] == a.identifier]
    assert results == ["allocated", "failed", "released", "allocated", "verified"]


def test_pool_add_skips_known_identifiers(ledger: Ledger) -> None:
    ledger.allocate(mac(1), "esp32-devkitc", identifier="88.123.99/EXTRA-1")
    added, skipped = ledger.add_pool(
        file_identifiers(["# spares", "88.123.99/PUMP-000001", "", "88.123.99/extra-1", "88.123.99/EXTRA-2"]),
        "spares",
    )
    assert (added, skipped) == (1, 2)
    assert [(p.pool, p.total, p.free) for p in ledger.pools()] == [("pumps", 50, 50), ("spares", 1, 1)]


def test_bad_input_is_refused() -> None:
    with pytest.raises(LedgerError):
        list(pattern_identifiers("88.123.99", "PUMP", 1, 3))
    with pytest.raises(LedgerError):
        list(pattern_identifiers("88..99", "P-{n}", 1, 1))
    with pytest.raises(LedgerError, match="line 2"):
        list(file_identifiers(["88.1/A", "no-slash"]))
    with pytest.raises(LedgerError):
        normalise_mac("24:0a:c4:00:00")
    assert normalise_mac("240AC4000001") == "24:0a:c4:00:00:01"


def test_export_has_checksums_and_fingerprints_but_no_key(ledger: Ledger, tmp_path: Path) -> None:
    ks = Keystore.in_dir(tmp_path)
    a = ledger.allocate(mac(1), "esp32-devkitc", operator="alice")
    key = ks.get_or_create(a.identifier)
    ledger.record(
        a.identifier, "verified", Checksums("0.1.0", "f" * 64, "e" * 64, None, ks.fingerprint(a.identifier))
    )
    for history in (False, True):
        out = io.StringIO()
        ledger.export_csv(out, history)
        text = out.getvalue()
        assert key.hex() not in text.lower()
        rows = list(csv.DictReader(io.StringIO(text)))
        assert rows[-1]["key_fingerprint"] == ks.fingerprint(a.identifier)
        assert rows[-1]["mac"] == mac(1)
    # the keystore holds the key, readable only by its owner
    assert stat.S_IMODE(os.stat(ks.path).st_mode) == 0o600
    assert ks.get(a.identifier) == key
    assert ks.get_or_create(a.identifier) == key  # kept across re-flashes


def run_cli(tmp_path: Path, *argv: str) -> int:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return cli.run(p.parse_args(["--data-dir", str(tmp_path), *argv]))


def test_cli_pool_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        run_cli(
            tmp_path,
            "pool",
            "add",
            "--prefix",
            "88.123.99",
            "--pattern",
            "PUMP-{n:06d}",
            "--from",
            "1",
            "--to",
            "10000",
        )
        == 0
    )
    assert "10000 identifier(s) added" in capsys.readouterr().out
    ids = tmp_path / "ids.txt"
    ids.write_text("88.123.99/VALVE-1\n88.123.99/VALVE-2\n")
    assert run_cli(tmp_path, "pool", "add", "--file", str(ids)) == 0
    assert run_cli(tmp_path, "pool", "list") == 0
    out = capsys.readouterr().out
    assert "88.123.99/PUMP-{n:06d}: 10000 free of 10000" in out and "ids.txt: 2 free of 2" in out
    with Ledger.in_dir(tmp_path) as led:
        led.allocate(mac(7), "esp32-devkitc")
    assert run_cli(tmp_path, "ledger", "export", "--out", str(tmp_path / "l.csv")) == 0
    rows = list(csv.DictReader((tmp_path / "l.csv").open()))
    assert [(r["identifier"], r["mac"], r["state"]) for r in rows] == [
        ("88.123.99/PUMP-000001", mac(7), "allocated")
    ]
    from tools.errors import CliError

    with pytest.raises(CliError, match="--prefix"):
        run_cli(tmp_path, "pool", "add", "--pattern", "X-{n}")


def test_a_ledger_from_before_the_security_columns_is_upgraded(tmp_path: Path) -> None:
    """A ledger file made before ``previous_key_fingerprint`` and ``security`` existed opens, gains the
    columns, and keeps its rows."""
    import sqlite3

    from tools.commands.flash import ledger as lm

    old_schema = "\n".join(
        line for line in lm._SCHEMA.splitlines() if not any(c in line for c in lm._ADDED_COLUMNS)
    )
    db = sqlite3.connect(tmp_path / lm.FILENAME)
    db.executescript(old_schema)
    db.execute(
        "INSERT INTO devices (identifier, fold, mac, board, state, key_fingerprint, created, updated) "
        "VALUES ('88.123.99/OLD-1', '88.123.99/OLD-1', ?, 'esp32-devkitc', 'verified', 'aabbccdd', 't', 't')",
        (mac(9),),
    )
    db.commit()
    db.close()
    with Ledger.in_dir(tmp_path) as led:
        old = led.device("88.123.99/OLD-1")
        assert old is not None and old.key_fingerprint == "aabbccdd" and old.security is None
        led.allocate(mac(9), "esp32-devkitc")
        dev = led.record(
            "88.123.99/OLD-1",
            "verified",
            Checksums(key_fingerprint="11223344", previous_key_fingerprint="aabbccdd", security="oscore"),
        )
        assert (dev.key_fingerprint, dev.previous_key_fingerprint, dev.security) == (
            "11223344",
            "aabbccdd",
            "oscore",
        )
        assert led.events()[-1]["security"] == "oscore"
    with Ledger.in_dir(tmp_path) as led:  # opening again changes nothing
        assert led.device("88.123.99/OLD-1").security == "oscore"  # type: ignore[union-attr]
