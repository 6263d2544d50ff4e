"""The firmware as a real process: ``micropython firmware/main.py`` on the unix board, its console driven over
stdin/stdout, against a CoAP gateway stub (aiocoap) in this test. Covers provisioning over the console, reports,
resolve, remote config (observed), offline queueing and drain, a gateway outage, reboot persistence, safe mode,
the watchdog, and the heap a booted device uses (code as source, as .mpy, and in place from a ROMFS image)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.fwdevice import (
    KEY,
    CoapGateway,
    DeviceProc,
    compile_firmware,
    provision,
    romfs_image,
    wait_for,
)

ID = "88.123.99/PUMP-0001"


@pytest.fixture
def gateway():
    gw = CoapGateway(ID)
    gw.add_record(ID, [[1, "URL", "https://example.org/pump-0001", 86400]])
    gw.add_record(
        "88.1/thing", [[1, "URL", "https://example.org/thing", 300], [2, "EMAIL", "ops@example.org", 300]]
    )
    gw.start()
    yield gw
    gw.stop()


def _device(tmp_path: Path, gw: CoapGateway | None, **env: str) -> DeviceProc:
    data = tmp_path / "dev"
    if gw is not None:
        provision(data, ID, coap=gw.url)
    return DeviceProc(data, env)


def test_console_provisioning_over_stdio(tmp_path: Path, gateway: CoapGateway) -> None:
    with DeviceProc(tmp_path / "fresh") as dev:
        dev.expect(r"not provisioned")
        dev.send("status")
        dev.expect(r"^id: None")
        dev.json_on()
        st = dev.json("status")
        assert st["ok"] and st["id"] is None and st["transport"] is None
        assert dev.json("frobnicate") == {
            "ok": False,
            "cmd": "frobnicate",
            "error": "unknown command (try help)",
        }
        dev.send(b"\x00\x1b[A garbage \xff\xfe\n")
        dev.expect(r'"ok": false.*bad input')
        dev.send(b"x" * 500 + b"\n")
        dev.expect(r"line too long")
        r = dev.json(f"provision {ID} {gateway.url}")
        assert r["ok"] and r["id"] == ID and r["rebooting"] and len(r["key"]) == 8
        dev.expect(r"I app boot=2 ")  # rebooted in-process
        dev.expect(rf"I app id={ID} transport=coap key={r['key']}")
        wait_for(lambda: gateway.reports, 10, "first report")
        dev.json_on()
        ident = dev.json("id")
        assert ident["id"] == ID and ident["key"] == r["key"]
    saved = json.loads((tmp_path / "fresh" / "identity.json").read_text())
    assert saved["id"] == ID and "key" not in saved, "the key lives in the secret store, not identity.json"
    assert (tmp_path / "fresh" / "kv" / "key").stat().st_size == 16


def test_reports_resolve_and_remote_config(tmp_path: Path, gateway: CoapGateway) -> None:
    gateway.set_config({20: 3, 21: 45, 22: {"URL": "https://example.org/pump-0001"}})
    with _device(tmp_path, gateway) as dev:
        dev.expect(rf"I app resolve id={ID} code=1 values=1 src=2")
        wait_for(lambda: gateway.reports and gateway.cfg_acks, 10, "report and config ack")
        rep = gateway.reports[0]
        assert (rep[2], rep[10], rep[11], rep[16], rep[17]) == (ID, 1, 1, "unix", "0.1.0")
        assert rep[13] > 0 and rep[15] == 0 and rep[19] == 0 and rep[25] > 1_700_000_000
        assert gateway.cfg_acks[0] == {2: ID, 20: 3, 3: 1}
        dev.json_on()
        st = dev.json("status")
        assert (st["interval"], st["cfgver"], st["acked"], st["queue"]) == (45, 3, 1, 0)
        # a config change is pushed through the observation, applied and acknowledged
        gateway.set_config({20: 4, 21: 20})
        wait_for(lambda: len(gateway.cfg_acks) >= 2, 10, "second config ack")
        assert gateway.cfg_acks[1] == {2: ID, 20: 4, 3: 1}
        bad = {20: 5, 21: 3}
        gateway.set_config(bad)
        wait_for(lambda: len(gateway.cfg_acks) >= 3, 10, "rejection")
        assert (
            gateway.cfg_acks[2][3] == 400
            and gateway.cfg_acks[2][20] == 5
            and "interval" in gateway.cfg_acks[2][9]
        )
        assert dev.json("config get interval")["interval"] == 20
        # resolve from the console: gateway first, then the device's cache
        r = dev.json("resolve 88.1/thing")
        assert r["ok"] and r["code"] == 1 and r["source"] == "upstream"
        assert r["values"][1] == [2, "EMAIL", "ops@example.org", 300]
        assert dev.json("resolve 88.1/thing")["source"] == "device-cache"
        r = dev.json("resolve 88.1/unknown")
        assert not r["ok"] and r["code"] == 100
        assert dev.json("resolve not-an-id")["error"] == "bad identifier: NO_SEPARATOR"
        n = len(gateway.reports)
        assert dev.json("report")["seq"] == n + 1
        wait_for(lambda: len(gateway.reports) > n, 10, "report on demand")
    out = "\n".join(dev.lines + dev.err)
    assert KEY not in out and KEY.upper() not in out


def test_offline_queue_drains_exactly_once_in_order(tmp_path: Path, gateway: CoapGateway) -> None:
    with _device(tmp_path, gateway) as dev:
        wait_for(lambda: gateway.reports, 10, "first report")
        dev.json_on()
        (tmp_path / "dev" / "netdown").write_text("down")  # the test flips the network switch
        dev.expect(r"W net down", 5)
        for _ in range(9):
            dev.json("report")
        st = dev.json("status")
        assert st["net"] == "down" and st["queue"] == 9 and len(gateway.reports) == 1
        assert (tmp_path / "dev" / "q.dat").exists(), "batched to flash while offline"
        (tmp_path / "dev" / "netdown").unlink()
        dev.wait_status(lambda s: s["queue"] == 0, 20)
    seqs = [r[11] for r in gateway.reports]
    assert seqs == list(range(1, 11))
    assert [r[15] for r in gateway.reports][1:4] == [0, 1, 2], "queue depth at the time of each report"


def test_gateway_outage_then_reboot_keeps_reports(tmp_path: Path, gateway: CoapGateway) -> None:
    with _device(tmp_path, gateway) as dev:
        wait_for(lambda: gateway.reports, 10, "first report")
        dev.json_on()
        gateway.stop()
        for _ in range(5):
            dev.json("report")
        dev.wait_status(lambda s: s["queue"] == 5, 10)
        assert dev.json("reboot")["rebooting"]  # flushes the queue, reboots in-process
        dev.expect(r"I app boot=2 .* queue=5 ")
        dev.json_on()
        gateway.start()
        dev.wait_status(lambda s: s["queue"] == 0, 30)
    keys = [(r[10], r[11]) for r in gateway.reports]
    for s in range(1, 7):
        assert keys.count((1, s)) == 1, keys
    assert (2, 1) in keys


def test_safe_mode_after_repeated_crashes(tmp_path: Path, gateway: CoapGateway) -> None:
    with _device(tmp_path, gateway, IDA_FAULT="boot") as dev:
        for n in (1, 2, 3):
            dev.expect(rf"I app boot={n} .* safe=0 streak={n}")
            dev.expect(r"E app crash RuntimeError: injected boot fault")
        dev.expect(r"I app boot=4 .* safe=1 streak=4")
        dev.expect(r"W app safe mode")
        dev.json_on()
        st = dev.json("status")
        assert st["safe"] and st["transport"] is None
        assert gateway.reports == []


def test_watchdog_kills_a_stuck_loop(tmp_path: Path, gateway: CoapGateway) -> None:
    dev = _device(tmp_path, gateway, IDA_FAULT="hang", IDA_WDT_MS="1000")
    proc = dev.start().proc
    assert proc is not None
    try:
        proc.wait(10)
    finally:
        dev.stop()
    assert proc.returncode == -9
    assert any("watchdog expired" in line for line in dev.err)


def _heap(dev: DeviceProc, gw: CoapGateway) -> int:
    wait_for(lambda: gw.reports, 15, "first report")
    dev.json_on()
    st = dev.wait_status(lambda s: s["acked"] >= 1)
    return int(st["heap_used"])


def test_heap_after_boot_and_first_report(tmp_path: Path, gateway: CoapGateway) -> None:
    with _device(tmp_path, gateway) as dev:
        source = _heap(dev, gateway)
    mpy = tmp_path / "mpy"
    files = compile_firmware(mpy)
    gateway.reports.clear()
    # the same firmware as .mpy files on the file system (what ida flash writes)
    (mpy / "boot_mpy.py").write_text(
        f"import sys\nsys.path.insert(0, {str(mpy)!r})\nexec(open({str(Path(__file__).resolve().parents[2] / 'firmware' / 'main.py')!r}).read())\n"
    )
    with DeviceProc(tmp_path / "dev", argv=[str(mpy / "boot_mpy.py")], cwd=tmp_path) as dev:
        from_mpy = _heap(dev, gateway)
    gateway.reports.clear()
    # and in place from a ROMFS image, as frozen or ROMFS code would run on the ESP32
    img = romfs_image(files)
    (tmp_path / "fw.romfs").write_bytes(img)
    (tmp_path / "rom").mkdir()
    driver = tmp_path / "rom" / "boot_rom.py"
    driver.write_text(
        "import sys, vfs\n"
        f"f = open({str(tmp_path / 'fw.romfs')!r}, 'rb')\nimg = f.read()\nf.close()\n"
        "vfs.mount(vfs.VfsRom(img), '/rom')\nsys.path.insert(0, '/rom')\n"
        f"exec(open({str(Path(__file__).resolve().parents[2] / 'firmware' / 'main.py')!r}).read())\n"
    )
    with DeviceProc(tmp_path / "dev", argv=[str(driver)], cwd=tmp_path / "rom") as dev:
        from_rom = _heap(dev, gateway) - len(img)
    total_mpy = sum(len(v) for v in files.values())
    print(
        f"device heap after boot + first report (gc.mem_alloc, 64-bit unix port): source {source} B, "
        f".mpy {from_mpy} B, ROMFS in place {from_rom} B (image {len(img)} B excluded); "
        f"firmware .mpy total {total_mpy} B"
    )
    assert total_mpy <= 64 * 1024
    assert from_rom < from_mpy <= source + 4096
