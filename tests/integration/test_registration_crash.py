"""Issue 16, must show: against ``ida node``, a batch of 200 simulated chips registers all 200; the station is
SIGKILLed in the middle; after the restart the registration queue finishes with every identifier registered
exactly once; then each identifier resolves through ``ida gateway`` from the node, not from the local zone.
The node is silenced (SIGUSR1) for a while before the kill, so the station dies with registrations queued and
one sent without an answer, whatever the machine's speed.

Every piece is a real process on loopback: ``ida node`` (native protocol, administered with the captured
HANDLE.NET key pair, its records in a ``--store`` file), the station (``tests/support/regstation.py``:
``run_batch`` over simulated chips, the background registrar, the ledger), and ``ida gateway`` (no zone file:
an answer can only come from the node).
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.support.regstation import ADMIN, build
from tools.commands.flash.ledger import FILENAME, Ledger, pattern_identifiers
from tools.commands.flash.registrar import UpstreamConfig
from tools.harness.bench.project import GatewayProcess
from tools.support.procs import Process, free_port, ida_command

pytestmark = pytest.mark.slow

CHIPS = 200
SILENT_AFTER = 50  # chips flashed when the node stops answering
KILL_AFTER = 80  # chips flashed when the station is killed


def registered(data: Path) -> int:
    with sqlite3.connect(data / FILENAME, timeout=30) as db:
        (n,) = db.execute("SELECT COUNT(*) FROM registrations WHERE state = 'registered'").fetchone()
    return int(n)


def station(build_dir: Path, data: Path, log: Path) -> Process:
    cmd = [*ida_command()[:1], "-m", "tests.support.regstation", str(build_dir), str(data), "1", str(CHIPS)]
    return Process("station", cmd, log=log).start()


def test_station_killed_mid_batch_registers_every_identifier_exactly_once(tmp_path: Path) -> None:
    build_dir = build(tmp_path)
    data = tmp_path / "station"
    with Ledger.in_dir(data) as led:
        led.add_pool(pattern_identifiers("88.123.99", "PUMP-{n:06d}", 1, CHIPS), "pumps")
    (data / "admin.bin").write_bytes((ADMIN / "admpriv.bin").read_bytes())

    node_cmd = ida_command(
        "node", "--handle", "127.0.0.1:0", "--http", "off", "--prefix", "88.123.99",
        "--admin-key", f"300:0.NA/88.123.99={ADMIN / 'admpub.bin'}", "--store", str(tmp_path / "node.json"),
    )  # fmt: skip
    with Process("node", node_cmd, log=tmp_path / "node.log", stdout=True).start() as node:
        port = int(node.wait_line(rb"handle udp\+tcp listening on 127\.0\.0\.1:(\d+)", timeout=30).group(1))
        url = f"hdl://127.0.0.1:{port}"
        UpstreamConfig(
            url, "300:0.NA/88.123.99", key="admin.bin", url="https://id.example.com/{identifier}", timeout=5.0,
            backoff_min=0.2, backoff_max=2.0,
        ).check().save(data)  # fmt: skip

        # 1. the station flashes and registers; from chip SILENT_AFTER on the node stops answering (SIGUSR1), so
        #    registrations pile up in the queue (one of them sent and waiting for its answer); at chip KILL_AFTER
        #    the station is killed with SIGKILL, then the node answers again
        first = station(build_dir, data, tmp_path / "station-1.log")
        first.wait_log(rf"^flashed {SILENT_AFTER}$", timeout=600)
        assert node.proc is not None
        node.proc.send_signal(signal.SIGUSR1)
        first.wait_log(rf"^flashed {KILL_AFTER}$", timeout=600)
        first.kill()
        assert first.returncode == -signal.SIGKILL
        node.proc.send_signal(signal.SIGUSR1)
        with Ledger.in_dir(data) as led:
            verified = sum(d.state == "verified" for d in led.devices())
        before = registered(data)
        assert KILL_AFTER <= verified < CHIPS and before < verified

        # 2. restarted, it flashes the chips left and its queue finishes (the dead station's leases taken over)
        second = station(build_dir, data, tmp_path / "station-2.log")
        second.wait_log(r"^registration: \d+ registered", timeout=900)
        deadline = time.monotonic() + 60
        while second.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert second.returncode == 0, second.log_tail()

        with Ledger.in_dir(data) as led:
            rows = led.devices_with_registration()
        assert len(rows) == CHIPS and {r["state"] for r in rows} == {"verified"}
        assert {r["registration"] for r in rows} == {"registered"}
        assert len({r["identifier"] for r in rows}) == CHIPS

        # 3. each through ida gateway, from the node: only the node has the URL value (no zone file here)
        http = free_port(also_tcp=True)
        gw = GatewayProcess(tmp_path, url, extra=("--http", f"127.0.0.1:{http}")).start()
        try:
            for r in rows:
                path = "/api/handles/" + urllib.parse.quote(r["identifier"], safe="/")
                with urllib.request.urlopen(f"http://127.0.0.1:{http}{path}", timeout=10) as resp:
                    record = json.loads(resp.read())
                got = {v["type"]: v["data"]["value"] for v in record["values"]}
                assert got["URL"] == f"https://id.example.com/{r['identifier']}" and got["MAC"] == r["mac"]
        finally:
            gw.stop()
        node.stop()
        out = b"\n".join(node.stdout_lines).decode() + "\n" + node.log_text()

    # exactly once: 200 creates done at the node, one per handle; nothing else changed them
    done = re.search(r"node admin done: (.*)", out)
    assert done is not None, out[-2000:]
    assert done.group(1).strip() == f"create={CHIPS}/{CHIPS}", done.group(1)
    stored = json.loads((tmp_path / "node.json").read_text())
    assert sum(bool(re.fullmatch(r"88\.123\.99/PUMP-\d{6}", rec["handle"])) for rec in stored) == CHIPS
    print(
        f"\n[registration] killed after {KILL_AFTER} chips flashed, {before} registered; restarted: {CHIPS}/{CHIPS}"
    )
