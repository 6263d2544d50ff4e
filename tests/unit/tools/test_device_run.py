"""`ida device run` (tools/commands/device_run.py): provisioning a device's data dir (new, kept, updated, refused,
forced), and the command itself as a subprocess -- the real firmware's console over a pipe, SIGTERM = a clean
stop that flushes the report queue, a second run keeping identity, key, boot counter and queue, one device per
data dir, and Ctrl-C typed on a real terminal (pty) stopping it once."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.support.devicerun import ROOT, IdaDevice
from tools.cli import main
from tools.commands.device_run import default_data_dir, prepare, uid_from_identifier
from tools.commands.flash.identity import key_fingerprint
from tools.errors import CliError
from tools.harness.bench.procs import free_port

ID = "88.123.99/PUMP-0001"


def _doc(d: Path) -> dict[str, str]:
    doc: dict[str, str] = json.loads((d / "identity.json").read_text())
    return doc


# -- provisioning ------------------------------------------------------------------------------------------------
def test_prepare_provisions_then_keeps_identity_and_key(tmp_path: Path) -> None:
    d = tmp_path / "dev"
    p = prepare("88.123.99/pump-0001", d, gateway="coap://127.0.0.1:5700")
    doc = _doc(d)
    assert p.action == "provisioned" and p.identifier == "88.123.99/pump-0001" and p.transport == "coap"
    assert doc["id"] == "88.123.99/pump-0001" and doc["coap"] == "coap://127.0.0.1:5700" and "mqtt" not in doc
    assert p.fingerprint == key_fingerprint(bytes.fromhex(doc["key"]))
    assert json.loads((d / "board.json").read_text())["name"] == "unix"
    mtime = (d / "identity.json").stat().st_mtime_ns
    again = prepare("88.123.99/pump-0001", d)  # flags left out: the stored values
    assert (
        again.action == "kept" and again.fingerprint == p.fingerprint and again.gateway_url.endswith(":5700")
    )
    assert (d / "identity.json").stat().st_mtime_ns == mtime, "an unchanged identity is not rewritten"
    moved = prepare("88.123.99/pump-0001", d, transport="mqtt", broker="mqtt://127.0.0.1:1999")
    doc = _doc(d)
    assert moved.action == "updated" and moved.fingerprint == p.fingerprint and moved.transport == "mqtt"
    assert (
        doc["transport"] == "mqtt"
        and doc["mqtt"] == "mqtt://127.0.0.1:1999"
        and doc["coap"].endswith(":5700")
    )
    assert prepare("88.123.99/pump-0001", d).transport == "mqtt", "a re-run without --transport keeps mqtt"


def test_prepare_default_dir_prefix_case_and_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    p = prepare("88.abc.99/Pump/7", transport="mqtt")
    assert p.data_dir == Path("devices") / "88.ABC.99%2FPump%2F7" == default_data_dir("88.ABC.99/Pump/7")
    doc = _doc(tmp_path / p.data_dir)
    assert doc["id"] == "88.ABC.99/Pump/7" and doc["mqtt"] == "mqtt://127.0.0.1:1883" and "coap" not in doc
    assert uid_from_identifier(ID) != uid_from_identifier("88.123.99/PUMP-0002")
    assert len(bytes.fromhex(uid_from_identifier(ID))) == 6


def test_prepare_refuses_another_devices_dir_unless_forced(tmp_path: Path) -> None:
    d = tmp_path / "dev"
    first = prepare(ID, d)
    (d / "q.dat").write_bytes(b"queued reports of PUMP-0001")
    (d / "config.json").write_text("{}")
    (d / "kv").mkdir()
    (d / "kv" / "boot").write_bytes(b"\x07\x00\x00\x00")
    with pytest.raises(CliError, match=r"holds the identity of '88.123.99/PUMP-0001'.*--force"):
        prepare("88.123.99/PUMP-0002", d)
    assert _doc(d)["id"] == ID and (d / "q.dat").exists()
    forced = prepare("88.123.99/PUMP-0002", d, force=True)
    assert forced.action == "re-provisioned" and forced.fingerprint != first.fingerprint
    assert _doc(d)["id"] == "88.123.99/PUMP-0002"
    assert not (d / "q.dat").exists() and not (d / "config.json").exists()
    assert (d / "kv" / "boot").read_bytes() == b"\x07\x00\x00\x00", (
        "the boot counter stays: (boot, seq) unique"
    )
    (d / "identity.json").write_text("not json")
    with pytest.raises(CliError, match="not valid JSON"):
        prepare("88.123.99/PUMP-0002", d)
    assert prepare("88.123.99/PUMP-0002", d, force=True).action == "re-provisioned"


def test_prepare_reads_the_key_the_firmware_moved_to_its_secret_store(tmp_path: Path) -> None:
    """The firmware's console (`config set transport ...`) saves identity.json without the key and keeps the key
    in kv/key: the identity is still this device's, with that key."""
    d = tmp_path / "dev"
    (d / "kv").mkdir(parents=True)
    key = bytes(range(16))
    (d / "kv" / "key").write_bytes(key)
    (d / "identity.json").write_text(
        json.dumps({"id": ID, "transport": "coap", "coap": "coap://127.0.0.1:5683"})
    )
    p = prepare(ID, d)
    assert p.action == "kept" and p.fingerprint == key_fingerprint(key)
    assert "key" not in _doc(d)
    p = prepare(ID, d, gateway="coap://127.0.0.1:5999")
    assert p.action == "updated" and p.fingerprint == key_fingerprint(key) and _doc(d)["key"] == key.hex()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--identifier", "no-separator"], "is not valid"),
        (["--identifier", ID, "--gateway", "http://x"], "coap://host"),
        (["--identifier", ID, "--board", "nope"], "unknown board"),
        (["--identifier", ID, "--board", "esp32-devkitc"], "simulated boards only (unix)"),
        (["--identifier", ID, "--interval", "5"], "10-86400"),
        (["--identifier", ID, "--uid", "xyz"], "--uid"),
    ],
)
def test_cli_rejects_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["device", "run", "--data-dir", str(tmp_path / "d"), *args]) == 2
    assert message in capsys.readouterr().err
    assert main(["device"]) == 2


# -- the command as a subprocess ---------------------------------------------------------------------------------
def test_run_console_over_a_pipe_then_sigterm_and_a_second_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "dev"
    dead = f"coap://127.0.0.1:{free_port()}"  # nothing listens: reports stay queued
    dev = IdaDevice(d, ID, "--gateway", dead, "--interval", "10").start()
    try:
        dev.expect(r"^I app id=88\.123\.99/PUMP-0001 transport=coap", 20)
        dev.json_on()
        st = dev.json("status")
        assert (
            st["ok"]
            and st["id"] == ID
            and st["boot"] == 1
            and st["interval"] == 10
            and st["transport"] == "coap"
        )
        info = dev.json("id")
        assert info["key"] == key_fingerprint(bytes.fromhex(_doc(d)["key"]))
        assert info["uid"] == uid_from_identifier(ID) and info["board"] == "unix"
        queued = dev.json("report")["queue"]
        assert queued >= 1
        assert main(["device", "run", "--identifier", ID, "--data-dir", str(d)]) == 2
        assert "already running" in capsys.readouterr().err
        t0 = time.monotonic()
        assert dev.proc is not None
        dev.proc.send_signal(signal.SIGTERM)
        rc = dev.proc.wait(10)
        took = time.monotonic() - t0
    finally:
        dev.stop()
    assert rc == 130 and took < 4, (rc, took, dev.err[-5:])
    assert any("identity provisioned" in line for line in dev.err)
    assert (d / "q.dat").stat().st_size > 0, "SIGTERM stops the device cleanly: its queue is flushed to flash"

    with IdaDevice(d, ID) as dev2:  # no flags: the stored gateway, the same key, the next boot, the queue
        dev2.json_on()
        st = dev2.json("status")
        assert st["boot"] == 2 and st["queue"] >= queued
        assert dev2.json("id")["key"] == info["key"]
    assert any("identity kept" in line and dead in line for line in dev2.err)


def test_ctrl_c_on_a_terminal_stops_the_device_once(tmp_path: Path) -> None:
    """On a terminal the device shares the foreground process group: Ctrl-C reaches it from the line discipline
    and `ida device run` must not send a second SIGINT (MicroPython exits at once, without its clean stop, on a
    second pending SIGINT)."""
    d = tmp_path / "dev"
    prepare(ID, d, gateway=f"coap://127.0.0.1:{free_port()}")
    pid, fd = pty.fork()
    if pid == 0:  # the child: `ida device run` with the pty as its controlling terminal
        os.environ["PYTHONPATH"] = str(ROOT)
        os.chdir(ROOT)
        os.execv(
            sys.executable,
            [
                sys.executable,
                "-c",
                "import sys; from tools.cli import main; sys.exit(main())",
                "device",
                "run",
                "--identifier",
                ID,
                "--data-dir",
                str(d),
            ],
        )
    out = b""

    def read_until(token: bytes, timeout: float) -> bool:
        nonlocal out
        end = time.monotonic() + timeout
        while token not in out and time.monotonic() < end:
            r, _, _ = select.select([fd], [], [], 0.1)
            if r:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    return token in out
                if not chunk:
                    break
                out += chunk
        return token in out

    try:
        assert read_until(b"I net coap started", 20), out.decode(errors="replace")
        os.write(fd, b"report\r")
        assert read_until(b"queue: ", 10), out.decode(errors="replace")
        t0 = time.monotonic()
        os.write(fd, b"\x03")  # Ctrl-C
        read_until(b"KeyboardInterrupt", 5)
        deadline = time.monotonic() + 10
        status = None
        while status is None and time.monotonic() < deadline:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
            else:
                read_until(b"\x00", 0.1)
        assert status is not None, "ida device run did not exit after Ctrl-C"
        assert os.waitstatus_to_exitcode(status) == 130 and time.monotonic() - t0 < 5
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
    assert (d / "q.dat").stat().st_size > 0, "the device stopped cleanly (queue flushed), not killed"
