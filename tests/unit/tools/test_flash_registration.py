"""Registration in the factory flow (issue 16): a flashed chip's identifier is queued in the ledger's own
transaction and registered at the node in the background; the line never waits for the network; failures are
recorded with their one-line reason; a chip flashed again is modified, not created again."""

from __future__ import annotations

import argparse
import io
import json
import socket
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import dsa

from proto.handle.keys import encode_private_key
from proto.records import HandleValue, Record
from tests.support.regstation import (
    ADMIN,
    BOARD,
    TEMPLATE,
    build,
    factory_chip,
    flash_chips,
    mac,
    node_thread,
)
from tools.commands.flash import builder as fb
from tools.commands.flash import cli
from tools.commands.flash.ledger import FILENAME, Device, Ledger, pattern_identifiers
from tools.commands.flash.provision import Station, flash_device
from tools.commands.flash.registrar import UpstreamConfig, drain
from tools.commands.flash.regqueue import LEASE_S, RegistrationQueue, enqueue_in
from tools.errors import CliError
from tools.harness.node import NodeServer
from tools.harness.node.adminops import Identity, install_admin

PUB = (ADMIN / "admpub.bin").read_bytes()


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("regbuild"))


@pytest.fixture
def built(build_dir: Path) -> fb.Build:
    return fb.load_build(build_dir, BOARD)


def admin_node(**kw: object):  # type: ignore[no-untyped-def]
    ctx = node_thread(handle="127.0.0.1:0", http=None, prefixes=["88.123.99"], **kw)
    return ctx


def station_for(
    tmp: Path, upstream: str, *, key: Path = ADMIN / "admpriv.bin", wait: float = 20.0
) -> Station:
    data = tmp / "data"
    with Ledger.in_dir(data) as led:
        led.add_pool(pattern_identifiers("88.123.99", "PUMP-{n:06d}", 1, 50), "pumps")
    (data / "admin.bin").write_bytes(key.read_bytes())
    UpstreamConfig(
        upstream,
        "300:0.NA/88.123.99",
        key="admin.bin",
        url="https://id.example.com/{identifier}",
        timeout=2.0,
        backoff_min=0.2,
        backoff_max=1.0,
    ).check().save(data)
    return Station(data, operator="alice", station="line-1", register_wait=wait)


def with_admin(node: NodeServer) -> NodeServer:
    install_admin(node.store, Identity("0.NA/88.123.99", 300), "HS_PUBKEY", PUB)
    return node


def registrations(station: Station) -> dict[str, dict]:
    with RegistrationQueue.in_dir(station.data_dir) as q:
        return {r["identifier"]: r for r in q.rows()}


def test_a_flashed_chip_is_queued_with_the_ledger_then_registered(built: fb.Build, tmp_path: Path) -> None:
    with admin_node() as node:
        with_admin(node)
        station = station_for(tmp_path, node.handle_url)
        r = flash_device(factory_chip(built, 1), built, station, TEMPLATE)
        # queued, not sent: flash_device never talks to the node
        assert registrations(station)[r.identifier]["state"] == "pending"
        assert node.admin.answers == {}
        tally, counts = drain(station.data_dir, station.upstream_config(), 10.0)  # type: ignore[arg-type]
        assert counts == {"pending": 0, "registered": 1, "failed": 0} and tally.registered == 1
        rec = node.get_record(r.identifier)
        assert rec is not None
        got = {v.type: v.data.decode() if v.type != "HS_ADMIN" else "admin" for v in rec.values}
        assert (
            got["MAC"] == mac(1)
            and got["BOARD"] == BOARD
            and got["URL"] == f"https://id.example.com/{r.identifier}"
        )
        assert {v.index for v in rec.values} == {1, 2, 3, 4, 5, 100} and got[
            "FW_VERSION"
        ] == built.manifest.firmware_version
        with Ledger.in_dir(station.data_dir) as led:
            row = led.devices_with_registration()[0]
            assert (row["registration"], row["state"]) == ("registered", "verified") and row["registered"]
            assert [e["result"] for e in led.events()][-1] == "registered"


def test_a_reflashed_chip_is_modified_not_created_again(built: fb.Build, tmp_path: Path) -> None:
    with admin_node() as node:
        with_admin(node)
        station = station_for(tmp_path, node.handle_url)
        chip = factory_chip(built, 2)
        first = flash_device(chip, built, station, TEMPLATE)
        drain(station.data_dir, station.upstream_config(), 10.0)  # type: ignore[arg-type]
        time.sleep(1.1)  # a later production time (seconds), so the values differ
        again = flash_device(chip, built, station, TEMPLATE, full=True)
        assert again.identifier == first.identifier and again.reused
        assert registrations(station)[first.identifier]["op"] == "modify"
        _, counts = drain(station.data_dir, station.upstream_config(), 10.0)  # type: ignore[arg-type]
        assert counts["registered"] == 1
        done = node.admin.ops.done
        assert done[("create", first.identifier)] == 1 and done[("modify", first.identifier)] == 1


def test_upstream_down_keeps_it_pending_and_flashing_does_not_wait(built: fb.Build, tmp_path: Path) -> None:
    with admin_node() as node:
        with_admin(node)
        node.set_silent(True)  # answers nothing: every exchange waits for its 2 s timeout
        station = station_for(tmp_path, node.handle_url, wait=0.0)
        out = io.StringIO()
        summary = flash_chips(built.directory, station, [3, 4, 5], out=out)
        assert len(summary.passed) == 3
        # each chip took far less than one exchange's timeout: the line did not wait for the node
        assert max(r.seconds for r in summary.passed) < 2.0
        assert "registration: 0 registered, 3 pending, 0 failed" in out.getvalue()
        rows = registrations(station)
        assert all(r["state"] == "pending" for r in rows.values())
        node.set_silent(False)
        _, counts = drain(station.data_dir, station.upstream_config(), 20.0)  # type: ignore[arg-type]
        assert counts == {"pending": 0, "registered": 3, "failed": 0}


def test_a_create_whose_answer_was_lost_counts_as_done(built: fb.Build, tmp_path: Path) -> None:
    with admin_node() as node:
        with_admin(node)
        station = station_for(tmp_path, node.handle_url)
        r = flash_device(factory_chip(built, 6), built, station, TEMPLATE)
        with RegistrationQueue.in_dir(station.data_dir) as q:
            (job,) = q.claim()
        node.store.add(
            Record(r.identifier, job.values)
        )  # the node has it: our create got through, its answer not
        _, counts = drain(station.data_dir, station.upstream_config(), 10.0)  # type: ignore[arg-type]
        assert counts["registered"] == 1
        assert node.admin.answers[("create", 101)] == 1 and node.admin.ops.done[("create", r.identifier)] == 0
        with Ledger.in_dir(station.data_dir) as led:
            assert "already there with our values" in led.events()[-1]["detail"]


def test_refusals_fail_with_their_reason_and_can_be_retried(
    built: fb.Build, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.bin"
    other.write_bytes(encode_private_key(dsa.generate_private_key(1024)))
    with admin_node() as node:
        with_admin(node)
        station = station_for(tmp_path, node.handle_url, key=other)
        r = flash_device(factory_chip(built, 7), built, station, TEMPLATE)
        _, counts = drain(station.data_dir, station.upstream_config(), 10.0)  # type: ignore[arg-type]
        assert counts["failed"] == 1
        detail = registrations(station)[r.identifier]["detail"]
        assert "wrong key (403)" in detail
        args = ["--data-dir", str(station.data_dir)]
        assert run(*args, "ledger", "show") == 0
        assert "registration failed" in capsys.readouterr().out
        assert run(*args, "ledger", "show", "--json") == 0
        (row,) = json.loads(capsys.readouterr().out)
        assert row["registration"] == "failed" and "wrong key" in row["registration_detail"]
        assert run(*args, "register", "status") == 0 and "1 failed" in capsys.readouterr().out
        # the operator fixes the key and queues it again
        (station.data_dir / "admin.bin").write_bytes((ADMIN / "admpriv.bin").read_bytes())
        assert run(*args, "register", "retry") == 0
        assert run(*args, "register", "run", "--timeout", "10") == 0
        assert "1 registered, 0 pending, 0 failed" in capsys.readouterr().out
        assert node.get_record(r.identifier) is not None


def test_existing_record_with_other_values_is_not_overwritten(built: fb.Build, tmp_path: Path) -> None:
    with admin_node() as node:
        with_admin(node)
        node.store.add(Record("88.123.99/PUMP-000001", (HandleValue(1, "URL", b"https://someone-else"),)))
        station = station_for(tmp_path, node.handle_url)
        r = flash_device(factory_chip(built, 8), built, station, TEMPLATE)
        _, counts = drain(station.data_dir, station.upstream_config(), 10.0)  # type: ignore[arg-type]
        assert (
            counts["failed"] == 1
            and "with other values; not overwritten" in registrations(station)[r.identifier]["detail"]
        )
        rec = node.get_record(r.identifier)
        assert rec is not None and rec.values[0].data == b"https://someone-else"


def run(*argv: str) -> int:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return cli.run(p.parse_args(list(argv)))


def test_register_setup_validates_and_copies_the_key(tmp_path: Path) -> None:
    def setup(*extra: str) -> int:
        base = [
            "--upstream",
            "hdl://127.0.0.1:2641",
            "--auth",
            "300:0.NA/88.123.99",
            "--key",
            str(ADMIN / "admpriv.bin"),
        ]
        return run("--data-dir", str(tmp_path / "d"), "register", "setup", *base, *extra)

    assert setup("--url", "https://id/{suffix}") == 0
    cfg = UpstreamConfig.load(tmp_path / "d")
    assert cfg is not None and cfg.key == "registration-key.bin" and cfg.url == "https://id/{suffix}"
    assert (tmp_path / "d" / "registration-key.bin").stat().st_mode & 0o777 == 0o600
    with pytest.raises(CliError, match="url pattern"):
        setup("--url", "https://id/{nope}")
    with pytest.raises(CliError, match="INDEX:HANDLE"):
        setup("--auth", "admin")
    with pytest.raises(CliError, match="unknown values"):
        setup("--values", "MAC,COLOUR")


def _device(led: Ledger, n: int) -> Device:
    a = led.allocate(mac(n), BOARD)
    return led.record(a.identifier, "verified")


def test_queue_leases_and_a_reflash_in_flight(tmp_path: Path) -> None:
    one = (HandleValue(1, "MAC", b"a"),)
    two = (HandleValue(1, "MAC", b"b"),)
    with Ledger.in_dir(tmp_path) as led:
        led.add_pool(pattern_identifiers("88.123.99", "PUMP-{n:06d}", 1, 5), "pumps")
        dev = _device(led, 1)
        led.record(dev.identifier, "verified", also=lambda db, d: enqueue_in(db, d, one, "hdl://n", "line-1"))
    dead_pid = f"{socket.gethostname()}:999999999"
    with (
        RegistrationQueue(tmp_path / FILENAME, owner="otherhost:1") as live,
        RegistrationQueue(tmp_path / FILENAME, owner=dead_pid) as dead,
        RegistrationQueue(tmp_path / FILENAME) as q,
    ):
        (held,) = live.claim(now=100.0)
        assert held.op == "create" and held.values == one
        assert q.claim(now=100.0) == []  # a holder on another host: its lease stands ...
        (job,) = q.claim(now=100.0 + LEASE_S + 1)  # ... until it expires
        q.retry(job, "node down", next_try=0.0)
        assert dead.claim(now=1e9)
        (job,) = q.claim(now=1e9 + 1)  # a dead process of this host: its lease is taken over at once
        with Ledger.in_dir(tmp_path) as led:  # the chip is flashed again while the create is in flight
            led.record(
                dev.identifier, "verified", also=lambda db, d: enqueue_in(db, d, two, "hdl://n", "line-1")
            )
        q.done(job)  # the create got through, with the old values
        (row,) = q.rows()
        assert (row["state"], row["op"]) == ("pending", "modify")  # the new values go as a modify
        (again,) = q.claim()
        assert again.values == two and again.op == "modify"
        q.done(again)
        assert q.counts() == {"pending": 0, "registered": 1, "failed": 0}
