"""`ida console` (tools/commands/console): the real firmware runs under `micropython` on the master side of a
pseudo-terminal, the tool opens the slave path with pyserial like a USB serial port. A real gateway (in this
process, answering from its local zone) serves the device's resolves. Shown: status, resolve, config set,
inspect (report + transcript without the key), opening the port twice without restarting the device,
garbage on the line in both directions, a restart behind the tool's back, a power cycle during a command,
a boot loop with crash reports; and, with a scripted fake port, the parser and session edge cases."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import pty
import re
import secrets
import select
import signal
import struct
import subprocess
import threading
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.mpcollect import ROOT
from tools.commands.console import PortInfo, choose_port, default_transcript_path, inspect
from tools.commands.console import cli as console_cli
from tools.commands.console.interactive import run_interactive
from tools.errors import CliError
from tools.support.boards import UsbId
from tools.support.console import (
    AmbiguousPort,
    BadCommand,
    Banner,
    CommandTimeout,
    Crash,
    DeviceConsole,
    DeviceReset,
    Garbage,
    LineParser,
    Log,
    NoPortFound,
    PortError,
    Reply,
    Text,
    Timeouts,
    Transcript,
    open_port,
)
from tools.support.console.protocol import DEVICE_MAX_LINE
from tools.support.console.scrub import scrub, scrub_obj
from tools.support.procs import micropython_binary

PUMP = "88.123.99/PUMP-0001"
URL = "https://example.com/pumps/0001"
BOOT_TIMEOUT = 20.0  # the device's first boot on a loaded machine
# generous limits: the machine is shared; the firmware answers in milliseconds when it is scheduled
SLOW = Timeouts(command=15.0, json_mode=5.0, boot_wait=20.0)


# --- a real gateway (local zone) in a background event loop ------------------------------------------------


VALVE = "88.123.99/VALVE-0002"
VALVE_URL = "https://example.com/valves/0002"


class GatewayThread:
    """`ida gateway` (gateway.service.Gateway) with its local zone holding PUMP, and `ida node` (NodeServer)
    as its upstream holding VALVE and hosting the prefix (so other handles are "not found", 100)."""

    def __init__(self, data_dir: Path) -> None:
        from gateway import config as gwconfig
        from gateway.service import Gateway
        from tools.harness.node.server import NodeServer

        data_dir.mkdir(parents=True, exist_ok=True)
        zone = [
            {
                "handle": PUMP,
                "values": [
                    {"index": 1, "type": "URL", "data": {"format": "string", "value": URL}, "ttl": 86400},
                    {
                        "index": 2,
                        "type": "EMAIL",
                        "data": {"format": "string", "value": "service@example.com"},
                        "ttl": 86400,
                    },
                ],
            }
        ]
        (data_dir / "zone.json").write_text(json.dumps(zone))
        valve = {
            "handle": VALVE,
            "values": [
                {"index": 1, "type": "URL", "data": {"format": "string", "value": VALVE_URL}, "ttl": 3600}
            ],
        }
        self.node = NodeServer([valve], handle="127.0.0.1:0", http=None, prefixes=["88.123.99"])
        self.data_dir = data_dir
        self.gw: Any = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway", daemon=True)
        self._config = (gwconfig, Gateway)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def start(self) -> int:
        gwconfig, Gateway = self._config
        self.thread.start()
        self._run(self.node.start())
        cfg = gwconfig.with_overrides(
            gwconfig.load(None, env={}),
            coap="127.0.0.1:0",
            http="127.0.0.1:0",
            upstream=[self.node.handle_url],
            data_dir=str(self.data_dir),
        )
        self.gw = Gateway(cfg)
        self._run(self.gw.start())
        coap = self.gw.addresses.coap
        assert coap is not None
        return int(coap[1])

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            if self.gw is not None:
                self._run(self.gw.stop())
        with contextlib.suppress(Exception):
            self._run(self.node.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def coap_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    try:
        gw = GatewayThread(tmp_path_factory.mktemp("gateway"))
    except ModuleNotFoundError as e:  # pragma: no cover - gateway/service.py not in this tree
        pytest.skip(f"the gateway service is not available: {e}")
    port = gw.start()
    try:
        yield port
    finally:
        gw.stop()


# --- the device on a pseudo-terminal -----------------------------------------------------------------------


class PtyDevice:
    """The firmware under `micropython`, its console on the master side of a pty; ``path`` is the slave (the
    "serial port"). The harness keeps the slave open too, so the device never sees a hang-up when the tool
    closes the port; it can also play a wire fault: ``to_tool`` puts bytes on the line as if the device sent
    them, ``to_device`` as if the host did."""

    def __init__(self, root: Path, coap_port: int, key: str) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        identity = {"id": PUMP, "transport": "coap", "coap": f"coap://127.0.0.1:{coap_port}", "key": key}
        (root / "identity.json").write_text(json.dumps(identity))
        self.master, self.slave = pty.openpty()
        tty.setraw(self.slave)  # no echo of the device's output back into its input before a tool opens it
        self.path = os.ttyname(self.slave)
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr = open(root / "stderr.txt", "ab")  # noqa: SIM115
        self.pids: list[int] = []

    def start(self, wait: bool = True, **env: str) -> None:
        e = dict(os.environ, IDA_DATA=str(self.root), IDA_WDT_MS="0", **env)
        self.proc = subprocess.Popen(
            [micropython_binary(), "-X", "heapsize=2M", str(ROOT / "firmware" / "main.py")],
            stdin=self.master,
            stdout=self.master,
            stderr=self.stderr,
            env=e,
            cwd=self.root,
        )
        self.pids.append(self.proc.pid)
        if wait:  # until its boot log is out (no tool attached yet: the harness is the only reader)
            assert b"I app id=" in self.read_until(b"I app id=", BOOT_TIMEOUT), self.stderr_text()

    def boots(self) -> int:
        """The boot counter the firmware keeps in its flash (kv/boot)."""
        try:
            data = (self.root / "kv" / "boot").read_bytes()
        except OSError:
            return 0
        return struct.unpack("<I", data)[0] if len(data) == 4 else 0

    def wait_boots(self, n: int, timeout: float = BOOT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while self.boots() < n:
            assert self.proc is not None and self.proc.poll() is None, self.stderr_text()
            assert time.monotonic() < deadline, f"device did not reach boot {n}: {self.stderr_text()}"
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def to_tool(self, data: bytes) -> None:
        os.write(self.master, data)

    def to_device(self, data: bytes) -> None:
        os.write(self.slave, data)

    def terminal(self, line: str, until: bytes, timeout: float = 10.0) -> bytes:
        """Be a plain terminal on the port (no tool attached): type ``line``, read until ``until``."""
        os.write(self.slave, line.encode() + b"\r")
        return self.read_until(until, timeout)

    def read_until(self, until: bytes, timeout: float) -> bytes:
        buf = b""
        deadline = time.monotonic() + timeout
        while until not in buf and time.monotonic() < deadline:
            r, _, _ = select.select([self.slave], [], [], 0.1)
            if r:
                buf += os.read(self.slave, 4096)
        return buf

    def stderr_text(self) -> str:
        self.stderr.flush()
        return (self.root / "stderr.txt").read_text(errors="replace")[-2000:]

    def close(self) -> None:
        self.kill()
        self.stderr.close()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def key() -> str:
    return secrets.token_hex(16)


@pytest.fixture
def device(tmp_path: Path, coap_port: int, key: str) -> Iterator[PtyDevice]:
    dev = PtyDevice(tmp_path / "flash", coap_port, key)
    try:
        dev.start()
        yield dev
    finally:
        dev.close()


def session(dev: PtyDevice, **kw: Any) -> DeviceConsole:
    kw.setdefault("timeouts", SLOW)
    return DeviceConsole.open(dev.path, **kw)


def inject(s: DeviceConsole, dev: PtyDevice, data: bytes) -> None:
    """Put more bytes on the line than the pty buffers (4 KiB) while the session reads them."""
    t = threading.Thread(target=dev.to_tool, args=(data,))
    t.start()
    while t.is_alive():
        s.poll()
    t.join()


def ida_console(*argv: str) -> tuple[int, str]:
    """`ida console ARGV` through the module's own add_arguments/run; (exit code, stdout)."""
    p = argparse.ArgumentParser(prog="ida console")
    console_cli.add_arguments(p)
    args = p.parse_args(list(argv))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = console_cli.run(args)
        except CliError as e:
            out.write(f"CliError: {e}\n")
            code = e.exit_code
    return code, out.getvalue()


# --- the real firmware through a pty -----------------------------------------------------------------------


def test_status_resolve_and_config_set_through_the_port(device: PtyDevice) -> None:
    with session(device) as s:
        st = s.command("status")
        assert (
            st.ok and st.fields["id"] == PUMP and st.fields["boot"] == 1 and st.fields["transport"] == "coap"
        )

        r = s.command("resolve " + PUMP)  # answered by the gateway's local zone, through CoAP
        assert r.ok, r.obj
        assert r.fields["code"] == 1 and r.fields["source"] in ("zone", "cache", "device-cache")
        assert URL in json.dumps(r.fields["values"])
        r = s.command("resolve " + VALVE)  # not in the zone: the gateway asks its upstream (ida node)
        assert r.ok and r.fields["code"] == 1 and VALVE_URL in json.dumps(r.fields["values"]), r.obj
        missing = s.command("resolve 88.123.99/NO-SUCH-PUMP")
        assert not missing.ok and missing.fields["code"] == 100, missing.obj
        assert not s.command("resolve no-separator").ok  # refused by the device's parser

        assert s.command("config set interval 45").fields == {"interval": 45}
        assert s.command("config get interval").fields == {"interval": 45}
        assert s.command("status").fields["interval"] == 45
        bad = s.command("config set interval soon")
        assert not bad.ok and "seconds" in (bad.error or "")
        assert s.stats.resets == 0 and s.stats.garbage == 0

    code, out = ida_console(device.path, "status", "--json")
    assert code == 0, out
    reply = json.loads(out)
    assert reply["ok"] is True and reply["cmd"] == "status" and reply["interval"] == 45
    code, out = ida_console(device.path, "resolve", "88.123.99/NO-SUCH-PUMP", "--json")
    assert code == 1 and json.loads(out)["code"] == 100
    code, out = ida_console(device.path, "config", "set", "interval", "60")
    assert code == 0 and out.strip() == "interval: 60"
    code, out = ida_console(device.path, "net")
    assert code == 0 and "net: up" in out and "transport_on: True" in out


def test_opening_the_port_does_not_restart_the_device(device: PtyDevice) -> None:
    assert device.proc is not None
    with session(device) as s:
        first = s.command("status").fields
    time.sleep(1.2)
    with session(device) as s:
        second = s.command("status").fields
        assert s.stats.resets == 0
    assert first["boot"] == second["boot"] == 1 == device.boots()
    assert second["uptime"] >= first["uptime"] + 1  # kept counting: no restart in between
    assert device.proc.poll() is None and device.pids == [device.proc.pid]
    # the tool left the console in text mode for the next person with a plain terminal
    assert b"id: " + PUMP.encode() in device.terminal("id", b"fw: ")


def test_inspect_report_and_transcript(
    device: PtyDevice, key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out = ida_console(device.path, "inspect")
    assert code == 0, out
    assert out.startswith(f"Inspection of {PUMP} on {device.path}") and ": OK" in out.splitlines()[0]
    for section in ("[id]", "[status]", "[net]", "[config]", "[queue]", "[log]", "[selftest]", "[session]"):
        assert section in out
    assert "checks: " in out and "FAIL" not in out
    files = list((tmp_path / "transcripts").glob("*.txt"))
    assert len(files) == 1 and re.fullmatch(r"88\.123\.99_PUMP-0001-\d{8}T\d{6}Z\.txt", files[0].name)
    text = files[0].read_text()
    for cmd in ("id", "status", "net", "config", "log", "selftest"):
        assert f'"cmd": "{cmd}"' in text
    assert (
        "> json off" in text
        and "# inspection report" in text
        and f"transcript: {files[0].relative_to(tmp_path)}" in out
    )
    fingerprint = json.loads(re.search(r'< (\{"ok": true, "cmd": "id".*)', text)[1])["key"]  # type: ignore[index]
    assert re.fullmatch(r"[0-9a-f]{8}", fingerprint)
    assert key not in text and key.upper() not in text

    # the JSON report, transcript to a named file
    path = tmp_path / "service-record" / "t.txt"
    code, out = ida_console(device.path, "inspect", "--json", "--transcript", str(path))
    assert code == 0, out
    report = json.loads(out)
    assert report["ok"] is True and report["identifier"] == PUMP and report["transcript"] == str(path)
    assert report["selftest"]["pass"] is True and report["queue"]["dropped"] == 0
    assert report["id"]["key"] == fingerprint and report["config"]["key"] == fingerprint
    assert report["log"] and all(isinstance(x, str) for x in report["log"])
    text = path.read_text()
    assert text.count("# ida console transcript") == 1 and "# inspection report" in text and key not in text

    # a device that starts leaking something key-like: scrubbed from transcript and report all the same
    with session(device) as s:
        device.to_tool(
            f"key: {key}\r\n".encode()
            + json.dumps({"log": f"W wifi psk=hunter2 key={key}"}).encode()
            + b"\r\n"
        )
        leaky = inspect(s)
    text = s.transcript.text()
    assert "key: <redacted>" in text and "psk=<redacted> key=<redacted>" in text
    assert key not in text and "hunter2" not in text and key not in json.dumps(leaky.to_json())


def test_garbage_on_the_line_is_survived(device: PtyDevice) -> None:
    with session(device) as s:
        assert s.command("status").ok
        # towards the tool: bytes at the wrong baud rate, control characters, a crash banner, a huge line,
        # and a line the "device" never finishes (it glues onto the next real reply)
        device.to_tool(b"\x00\xff\xfe\x80\x81 noise\r\n\x1b[0;32mI (1234) colour log\x1b[0m\r\nab\x07cd\r\n")
        device.to_tool(
            b"Guru Meditation Error: Core  0 panic'ed (LoadProhibited)\r\nBacktrace: 0x400d1234\r\n"
        )
        inject(s, device, b"x" * 20000 + b"\r\n" + b"\xff\xfe\xfd")
        st = s.command("status")
        assert st.ok and st.fields["boot"] == 1
        # towards the device: half a line of junk that the next command's line end flushes out
        device.to_device(b"\xff\xfe half a line")
        assert s.command("id").fields["id"] == PUMP
        device.to_device(b"\x01\x02 control")
        assert s.command("net").ok
        assert s.stats.garbage >= 4 and s.stats.rejected >= 2
        assert [c[0] for c in s.stats.crashes] == ["Guru Meditation Error: Core  0 panic'ed (LoadProhibited)"]
        report = inspect(s)
    assert not report.ok and any("crash report" in p for p in report.problems)
    assert any("garbled" in n for n in report.notes)
    assert report.sections["selftest"]["pass"] is True and s.stats.resets == 0


def test_restart_behind_the_tools_back_is_survived(device: PtyDevice) -> None:
    with session(device) as s:
        assert s.command("status").fields["boot"] == 1
        device.to_device(
            b"\r\nreboot\r\n"
        )  # a reset the tool did not ask for (button, watchdog, another host)
        device.wait_boots(2)
        st = s.command("status")  # the banner is waiting: JSON mode is turned on again first
        assert st.ok and st.fields["boot"] == 2
        assert s.stats.resets == 1
        r = s.reboot()  # a requested reboot waits for the device to come back
        assert r.fields == {"rebooting": True}
        assert s.command("status").fields["boot"] == 3 and s.stats.resets == 2
    text = s.transcript.text()
    assert text.count("device restart detected") == 2


def test_power_cycle_during_a_command_is_survived(device: PtyDevice) -> None:
    with session(device) as s:
        assert s.command("status").fields["boot"] == 1
        device.kill()  # power gone; the command is sent to a dead device, which comes back 0.5 s later
        threading.Timer(0.5, lambda: device.start(wait=False)).start()
        before = s.stats.resets
        st = s.command("status")
        seen = s.transcript.text() + device.stderr_text()
        assert st.ok and st.fields["boot"] == 2, seen
        assert s.stats.resets == before + 1 and s.stats.retries <= 1, seen
        assert s.command("id").fields["id"] == PUMP
    assert len(device.pids) == 2


def test_boot_loop_crash_reports_and_safe_mode(tmp_path: Path, coap_port: int, key: str) -> None:
    """The tool is connected when a device with a boot fault is powered: three crashes (traceback on the
    console), then safe mode. inspect reports both; nothing crashes the session."""
    dev = PtyDevice(tmp_path / "flash", coap_port, key)
    try:
        with session(dev) as s:
            dev.start(wait=False, IDA_FAULT="boot")
            dev.wait_boots(4)
            report = inspect(s)
    finally:
        dev.close()
    assert report.sections["status"]["safe"] is True and report.sections["status"]["boot"] == 4
    assert any(p.startswith("safe mode") for p in report.problems)
    crashes = report.session["crashes"]
    assert len(crashes) == 3, crashes
    assert all(
        any("Traceback" in line for line in c) and any("injected boot fault" in line for line in c)
        for c in crashes
    )
    assert any("crash report" in p for p in report.problems)


def test_interactive_line_mode(device: PtyDevice) -> None:
    lines = iter(["help", "status", "inspect", "json on", "id"])

    def read_line(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    with session(device) as s:
        assert run_interactive(s, read_line=read_line, out=out) == 0
    text = out.getvalue()
    assert "commands:" in text and "factory-reset" in text and "local commands: inspect" in text
    assert "boot: 1" in text and "transport_on: True" in text  # the firmware's own text mode
    assert f"Inspection of {PUMP}" in text and "[selftest]" in text
    assert '{"ok": true, "cmd": "id"' in text  # the technician switched JSON on by hand
    assert b"id: " + PUMP.encode() in device.terminal("id", b"fw: ")  # and the tool switched it off again

    # --json: JSON lines, and JSON again after the device restarted
    out = io.StringIO()
    with session(device) as s:

        def typist(prompt: str) -> str:  # a person reads the screen before typing on
            typed.append(prompt)
            if len(typed) == 1:
                return "reboot"
            if len(typed) == 2:
                deadline = time.monotonic() + BOOT_TIMEOUT
                while not (s.stats.resets == 1 and s.json) and time.monotonic() < deadline:
                    time.sleep(0.02)
                return "status"
            raise EOFError

        typed: list[str] = []
        assert run_interactive(s, json_mode=True, read_line=typist, out=out) == 0
    text = out.getvalue()
    assert (
        '{"ok": true, "cmd": "reboot", "rebooting": true}' in text
        and "[device restarted] I app boot=2" in text
    )
    assert re.search(r'\{"ok": true, "cmd": "status", "id": "[^"]+", "boot": 2,', text), text

    def interrupted(prompt: str) -> str:
        raise KeyboardInterrupt

    with session(device) as s:
        assert run_interactive(s, read_line=interrupted, out=io.StringIO()) == 130
        assert s.closed is False
    assert s.closed is True


def test_busy_and_missing_ports(device: PtyDevice, tmp_path: Path) -> None:
    with session(device):
        with pytest.raises(PortError, match="busy"):
            open_port(device.path)
    with pytest.raises(PortError, match="no such port"):
        open_port(str(tmp_path / "ttyUSB9"))
    code, out = ida_console(str(tmp_path / "ttyUSB9"), "status")
    assert code == 2 and "no such port" in out


# --- opening without a reset, finding ports ----------------------------------------------------------------


class RecordingSerial:
    """Stands in for serial.Serial(): records attribute writes and calls in order."""

    exclusive: bool | None = None
    log: list[tuple[str, Any]]

    def __init__(self) -> None:
        object.__setattr__(self, "log", [])

    def __setattr__(self, name: str, value: Any) -> None:
        self.log.append((name, value))
        object.__setattr__(self, name, value)

    def open(self) -> None:
        self.log.append(("open()", None))


def test_dtr_and_rts_are_released_before_the_open_and_never_touched_after() -> None:
    ser = open_port("/dev/ttyUSB0", 115200, serial_factory=RecordingSerial)
    events = [name for name, _ in ser.log]
    opened = events.index("open()")
    assert ("dtr", False) in ser.log[:opened] and ("rts", False) in ser.log[:opened]
    assert not any(name in ("dtr", "rts") for name in events[opened:])
    assert ("exclusive", True) in ser.log and ("baudrate", 115200) in ser.log


def test_choose_port_by_usb_id() -> None:
    cp2102 = PortInfo("/dev/ttyUSB0", 0x10C4, 0xEA60, "CP2102N USB to UART Bridge Controller", "0001")
    jtag = PortInfo("/dev/ttyACM0", 0x303A, 0x1001, "USB JTAG/serial debug unit")
    mouse = PortInfo("/dev/ttyS0", None, None, "n/a")
    ftdi = PortInfo("/dev/ttyUSB1", 0x0403, 0x6001, "FT232R")
    assert choose_port(ports=[mouse, cp2102, ftdi]) == "/dev/ttyUSB0"
    assert choose_port(ports=[jtag, mouse]) == "/dev/ttyACM0"  # the S3's native USB, from its board file
    with pytest.raises(NoPortFound) as none:
        choose_port(ports=[mouse, ftdi])
    assert "10c4:ea60" in str(none.value) and "/dev/ttyUSB1 [0403:6001] FT232R" in str(none.value)
    assert "/dev/ttyS0 [-]" in str(none.value)
    with pytest.raises(AmbiguousPort) as many:
        choose_port(ports=[cp2102, jtag, ftdi])
    assert (
        "/dev/ttyUSB0" in str(many.value)
        and "/dev/ttyACM0" in str(many.value)
        and "ttyUSB1" not in str(many.value)
    )
    assert choose_port([UsbId(0x0403, 0x6001)], ports=[cp2102, ftdi]) == "/dev/ttyUSB1"


def test_cli_without_port_names_what_it_found(monkeypatch: pytest.MonkeyPatch) -> None:
    from tools.commands.console import ports

    monkeypatch.setattr(ports, "list_serial_ports", lambda: [PortInfo("/dev/ttyS4", None, None, "n/a")])
    code, out = ida_console("status")
    assert code == 2 and "no Espressif console port found" in out and "/dev/ttyS4" in out
    assert console_cli.split_words(["/dev/ttyUSB0", "status"]) == ("/dev/ttyUSB0", ["status"])
    assert console_cli.split_words(["COM7", "id"]) == ("COM7", ["id"])
    assert console_cli.split_words(["rfc2217://host:4000"]) == ("rfc2217://host:4000", [])
    assert console_cli.split_words(["config", "get"]) == (None, ["config", "get"])


def test_console_is_registered_in_the_ida_command() -> None:
    from tools.cli import SUBCOMMANDS

    assert ("console", "tools.commands.console.cli", "technician's serial console") in SUBCOMMANDS


# --- the parser (bytes in, events out) --------------------------------------------------------------------

STREAM = (
    b'{"ok": true, "cmd": "status", "boot": 3}\r\n'
    b'{"log": "I app id=88.1/x key=a8faed6a"}\n'
    b"I app boot=4 fw=0.1.0 board=esp32-devkitc safe=0\r"
    b"rst:0x1 (POWERON_RESET),boot:0x13 (SPI_FAST_FLASH_BOOT)\r\n"
    b"ets Jul 29 2019 12:21:46\r\n\r\n"
    b"Traceback (most recent call last):\r\n"
    b'  File "main.py", line 3, in <module>\r\n'
    b"\xff\xfe\x00garbage\r\n"
    b'\xff\xff{"ok": false, "cmd": "?", "error": "bad input: not UTF-8"}\r\n'
    b"id: 88.1/x\n"
)


def test_parser_events_whole_and_byte_by_byte() -> None:
    whole = LineParser().feed(STREAM)
    p = LineParser()
    one = [ev for i in range(len(STREAM)) for ev in p.feed(STREAM[i : i + 1])]
    assert whole == one
    kinds = [type(ev).__name__ for ev in whole]
    assert kinds == [
        "Reply",
        "Log",
        "Banner",
        "Banner",
        "Banner",
        "Crash",
        "Text",
        "Garbage",
        "Garbage",
        "Reply",
        "Text",
    ]
    assert (
        isinstance(whole[0], Reply)
        and whole[0].ok
        and whole[0].cmd == "status"
        and whole[0].fields == {"boot": 3}
    )
    assert isinstance(whole[1], Log) and whole[1].text == "I app id=88.1/x key=a8faed6a"
    assert [ev.kind for ev in whole if isinstance(ev, Banner)] == ["app", "rom", "rom"]
    assert isinstance(whole[7], Garbage) and whole[7].reason == "not UTF-8"
    assert isinstance(whole[8], Garbage) and whole[8].data == b"\xff\xff"
    assert isinstance(whole[9], Reply) and whole[9].cmd == "?" and whole[9].error == "bad input: not UTF-8"


def test_parser_edge_cases() -> None:
    p = LineParser(max_line=100)
    assert p.feed(b"x" * 150) == [Garbage(b"x" * 64, "line too long (over 100 bytes)")]
    assert p.feed(b"y" * 50) == []  # still the same overlong line: dropped
    assert p.feed(b'\n{"ok": true, "cmd": "id"}\n') == [
        Reply({"ok": True, "cmd": "id"}, '{"ok": true, "cmd": "id"}')
    ]
    assert p.feed(b"half a li") == [] and p.pending == b"half a li"
    assert p.flush() == [Garbage(b"half a li", "partial line")] and p.pending == b""
    assert LineParser().feed(b"\x1b[0;31mE (512) boot: colour\x1b[0m\r\n") == [Text("E (512) boot: colour")]
    assert LineParser().feed(b'{"not": "a reply"}\n') == [Text('{"not": "a reply"}')]
    assert LineParser().feed(b'{"ok": true, "cmd": "st\n') == [Text('{"ok": true, "cmd": "st')]
    assert LineParser().feed(b'{"log": "E app crash RuntimeError: x"}\n') == [
        Crash("E app crash RuntimeError: x")
    ]
    salvaged = LineParser().feed(b"\xe0\x80 I app boot=7 fw=0.1.0\n")
    assert isinstance(salvaged[0], Garbage) and salvaged[1] == Banner("app", "I app boot=7 fw=0.1.0")
    assert LineParser().feed("résumé: naïve ✓\n".encode()) == [Text("résumé: naïve ✓")]
    assert LineParser().feed(b"\r\n\n\r  \n") == []


def test_device_max_line_matches_the_firmware() -> None:
    src = (ROOT / "firmware" / "carrier" / "console.py").read_text()
    assert int(re.search(r"^MAXLINE = (\d+)", src, re.M)[1]) == DEVICE_MAX_LINE  # type: ignore[index]


# --- scrubbing -------------------------------------------------------------------------------------------

KEY = "00112233445566778899aabbccddeeff"


def test_scrub_keeps_fingerprints_and_removes_keys() -> None:
    assert (
        scrub('{"ok": true, "cmd": "id", "key": "a8faed6a"}')
        == '{"ok": true, "cmd": "id", "key": "a8faed6a"}'
    )
    assert scrub(f'{{"cmd": "x", "key": "{KEY}", "n": 1}}') == '{"cmd": "x", "key": "<redacted>", "n": 1}'
    assert (
        scrub(f'{{"key": {{"hex": "{KEY}"}}, "psk": "hunter2"}}')
        == '{"key": "<redacted>", "psk": "<redacted>"}'
    )
    assert scrub(f"key: {KEY}") == "key: <redacted>" and scrub("key: a8faed6a") == "key: a8faed6a"
    assert scrub("  password: letmein") == "  password: <redacted>"
    assert (
        scrub(f"I app id=88.1/x key=a8faed6a psk=abc monkey={KEY[:8]}")
        == "I app id=88.1/x key=a8faed6a psk=<redacted> monkey=00112233"
    )
    assert (
        scrub(f"> provision 88.1/x coap://h:5683 {KEY[:20]}") == "> provision 88.1/x coap://h:5683 <redacted>"
    )
    assert scrub(f"blob {KEY}{KEY} end") == "blob <redacted> end"
    for harmless in ("pass: True", "checks: fs=ok", f"id: {PUMP}", "uid: 020000000001", "keys: 3"):
        assert scrub(harmless) == harmless
    assert scrub_obj({"key": KEY, "checks": {"key": "a8faed6a"}, "lines": [f"x {KEY}"], "n": 1}) == {
        "key": "<redacted>",
        "checks": {"key": "a8faed6a"},
        "lines": ["x <redacted>"],
        "n": 1,
    }


def test_transcript_stream_save_and_scrub(tmp_path: Path) -> None:
    t = Transcript("/dev/ttyUSB0", 115200, clock=lambda: 1767225600.25)
    path = t.attach(tmp_path / "live.txt")
    t.sent(f"provision 88.1/x coap://h {KEY}")
    t.received(Text(f"key: {KEY}"))
    t.received(Garbage(b"\xff", "not UTF-8"))
    t.note("device restart detected")
    t.section("report", "line 1\nline 2")
    assert path.read_text() == t.text()  # streamed as it grew
    t.close()
    saved = t.save(tmp_path / "copy" / "t.txt").read_text()
    assert saved == t.text() and KEY not in saved
    assert saved.splitlines()[:2] == [
        "# ida console transcript",
        "# port: /dev/ttyUSB0  baud: 115200  opened: 2026-01-01T00:00:00Z",
    ]
    assert "2026-01-01T00:00:00.250Z > provision 88.1/x coap://h <redacted>" in saved
    assert (
        "< key: <redacted>" in saved
        and "! not UTF-8: b'\\xff'" in saved
        and "# device restart detected" in saved
    )


# --- the session against a scripted port (fake clock: no real waiting) ------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class ScriptedPort:
    """A device stand-in: ``answer(line, port)`` is called for each line written and returns the bytes the
    device sends back; a read with nothing queued advances the fake clock by ``timeout``."""

    def __init__(self, clock: Clock, answer: Callable[[str, ScriptedPort], bytes]) -> None:
        self.clock = clock
        self.answer = answer
        self.timeout: float | None = None
        self.rx = bytearray()
        self.lines: list[str] = []
        self.closed = False
        self.json = False

    @property
    def in_waiting(self) -> int:
        return len(self.rx)

    def read(self, size: int = 1, /) -> bytes:
        if not self.rx:
            self.clock.t += self.timeout or 0.05
            return b""
        out = bytes(self.rx[:size])
        del self.rx[:size]
        return out

    def write(self, data: bytes, /) -> int:
        for line in re.split(rb"\r\n|\r|\n", data):
            if line:
                text = line.decode()
                self.lines.append(text)
                self.rx += self.answer(text, self)
        return len(data)

    def close(self) -> None:
        self.closed = True


def firmware(boot: list[int]) -> Callable[[str, ScriptedPort], bytes]:
    """Answers like the firmware: json on|off, status (with the boot counter in ``boot[0]``), id."""

    def answer(line: str, port: ScriptedPort) -> bytes:
        words = line.split()
        if words[:1] == ["json"]:
            port.json = words[1] == "on"
            return (
                b'{"ok": true, "cmd": "json", "json": %s}\n' % (b"true" if port.json else b"false")
                if port.json
                else b"json: False\n"
            )
        if not port.json:
            return b"%s: 1\n" % words[0].encode()
        if words[0] == "status":
            return b'{"ok": true, "cmd": "status", "boot": %d}\n' % boot[0]
        return b'{"ok": false, "cmd": "%s", "error": "unknown command (try help)"}\n' % words[0].encode()

    return answer


def scripted(
    answer: Callable[[str, ScriptedPort], bytes], **kw: Any
) -> tuple[DeviceConsole, ScriptedPort, Clock]:
    clock = Clock()
    port = ScriptedPort(clock, answer)
    return DeviceConsole(port, name="fake", clock=clock, **kw), port, clock


def test_session_matches_its_reply_among_logs_stale_replies_and_rejections() -> None:
    base = firmware([1])

    def answer(line: str, port: ScriptedPort) -> bytes:
        if line == "status" and port.json:
            return (
                b'{"log": "I rep seq=4"}\n{"ok": false, "cmd": "?", "error": "bad input: not UTF-8"}\n'
                b'{"ok": true, "cmd": "id", "id": "late"}\n' + base(line, port)
            )
        return base(line, port)

    seen: list[Any] = []
    s, port, _ = scripted(answer, on_event=seen.append)
    port.rx += b'{"ok": true, "cmd": "status", "boot": 99}\n'  # a stale reply from an earlier session
    r = s.command("status")
    assert r.fields == {"boot": 1} and s.stats.rejected == 1
    assert port.lines == ["json on", "status"]
    assert not any(
        isinstance(ev, Reply) and ev.cmd in ("json",) for ev in seen
    )  # consumed replies not passed on
    assert any(isinstance(ev, Log) for ev in seen)
    assert s.command("nonsense").error == "unknown command (try help)"
    s.close()
    assert port.lines[-1] == "json off" and port.closed and not port.json


def test_session_resolve_ignores_a_late_answer_for_another_identifier() -> None:
    def answer(line: str, port: ScriptedPort) -> bytes:
        if line.startswith("resolve"):
            return (
                b'{"ok": true, "cmd": "resolve", "id": "88.1/OLD", "code": 1}\n'
                b'{"ok": false, "cmd": "resolve", "id": "88.1/new", "code": 100, "error": "not found"}\n'
            )
        return firmware([1])(line, port)

    s, _, _ = scripted(answer)
    r = s.command("resolve 88.1/NEW")
    assert r.fields["id"] == "88.1/new" and r.fields["code"] == 100


def test_session_timeout_and_bad_commands() -> None:
    def answer(line: str, port: ScriptedPort) -> bytes:
        return b"" if line == "selftest" else firmware([1])(line, port)

    s, _, clock = scripted(answer)
    start = clock.t
    with pytest.raises(CommandTimeout, match="'selftest' within 10 s"):
        s.command("selftest")
    assert 10 <= clock.t - start < 11
    with pytest.raises(CommandTimeout, match="within 0.5 s"):
        s.command("selftest", timeout=0.5)
    with pytest.raises(BadCommand, match="too long"):
        s.command("resolve " + "x" * DEVICE_MAX_LINE)
    with pytest.raises(BadCommand, match="control"):
        s.command("status\nreboot")
    with pytest.raises(BadCommand, match="empty"):
        s.command("   ")

    silent, _, _ = scripted(lambda line, port: b"")
    with pytest.raises(CommandTimeout, match="json on"):
        silent.command("status")


def test_session_retries_once_after_a_restart_during_a_command() -> None:
    boot = [1]

    def answer(line: str, port: ScriptedPort) -> bytes:
        if line == "status" and port.json and boot[0] == 1:
            boot[0] = 2
            port.json = False  # restarted: fresh console in text mode
            return b"ets Jun  8 2016 00:22:57\r\n\r\nrst:0x1 (POWERON_RESET),boot:0x13\r\nI app boot=2 fw=0.1.0\r\n"
        return firmware(boot)(line, port)

    s, port, _ = scripted(answer)
    assert s.command("status").fields == {"boot": 2}
    assert (s.stats.resets, s.stats.retries) == (1, 1)  # three banner lines, one restart
    assert port.lines == ["json on", "status", "json on", "status"]
    assert "sending it again" in s.transcript.text()


def test_session_notices_text_mode_without_a_banner() -> None:
    boot = [1]

    def answer(line: str, port: ScriptedPort) -> bytes:
        if line == "status" and boot[0] == 1:
            boot[0] = 2
            port.json = False  # the banner was lost (other baud rate while booting)
            return b"\xf0\x9f\xff\x00\r\nstatus\r\nid: 88.1/x\r\nboot: 2\r\n"
        return firmware(boot)(line, port)

    s, port, _ = scripted(answer)
    s.command("json on")
    assert s.command("status").fields == {"boot": 2} and s.stats.resets == 1


def test_session_does_not_repeat_reboot_and_gives_up_on_a_boot_loop() -> None:
    def answer(line: str, port: ScriptedPort) -> bytes:
        if line == "reboot" and port.json:
            port.json = False
            return b"I app boot=5\r\n"  # restarted before it could answer
        return firmware([1])(line, port)

    s, port, _ = scripted(answer)
    with pytest.raises(DeviceReset, match="not sent again"):
        s.command("reboot")
    assert port.lines.count("reboot") == 1

    def loop(line: str, port: ScriptedPort) -> bytes:
        return b"Guru Meditation Error: Core 0 panic'ed\r\nBacktrace: 0x1\r\nI app boot=1\r\n"

    s, _, _ = scripted(loop)
    with pytest.raises(DeviceReset, match="keeps restarting"):
        s.command("status")
    assert len(s.stats.crashes) >= 2 and s.stats.crashes[0] == [
        "Guru Meditation Error: Core 0 panic'ed",
        "Backtrace: 0x1",
    ]


def test_factory_reset_is_confirmed_with_yes_and_waits_for_the_restart() -> None:
    def answer(line: str, port: ScriptedPort) -> bytes:
        if line == "factory-reset":
            port.confirm = True  # type: ignore[attr-defined]
            return b'{"ok": true, "cmd": "factory-reset", "confirm": "type YES"}\n'
        if getattr(port, "confirm", False):
            port.confirm = False  # type: ignore[attr-defined]
            port.json = False
            return (
                b'{"ok": true, "cmd": "factory-reset", "erased": true}\n'
                if line == "YES"
                else b'{"ok": false, "cmd": "factory-reset", "error": "cancelled"}\n'
            ) + b"I app boot=1\r\n"
        return firmware([1])(line, port)

    s, port, _ = scripted(answer)
    r = s.factory_reset()
    assert r.ok and r.fields == {"erased": True} and s.json
    assert port.lines == ["json on", "factory-reset", "YES", "json on"]


def test_report_judgement_and_transcript_name() -> None:
    def answer(line: str, port: ScriptedPort) -> bytes:
        w = line.split()[0]
        replies: dict[str, dict[str, Any]] = {
            "id": {"id": None, "error": "no identity.json", "uid": "020000000007", "board": "unix"},
            "status": {
                "id": None,
                "boot": 9,
                "safe": True,
                "net": "down",
                "queue": 3,
                "dropped": 2,
                "errors": 0,
            },
            "net": {"net": "down"},
            "log": {"lines": ["I app boot=9", "E app crash OSError: 28"]},
            "selftest": {"pass": False, "checks": {"fs": True, "identity": False, "net": False}},
        }
        if w == "json":
            return firmware([1])(line, port)
        if w == "config":
            return b""  # never answers
        return json.dumps({"ok": True, "cmd": w, **replies[w]}).encode() + b"\n"

    s, _, _ = scripted(answer, timeouts=Timeouts(command=1.0, per_command={}))
    report = inspect(s, clock=lambda: 1767225600.0)
    assert report.identifier is None and not report.ok
    assert report.errors == {
        "config": "no reply to 'config get' within 1 s (is the device powered and running the ida firmware? check the port and --baud)"
    }
    problems = "\n".join(report.problems)
    for part in (
        "not provisioned (no identity.json)",
        "safe mode",
        "network down",
        "2 report(s) dropped",
        "self-test failed: identity, net",
        "config: no reply",
    ):
        assert part in problems
    assert report.sections["queue"] == {"queue": 3, "dropped": 2}
    assert any("error line(s) in the recent log" in n for n in report.notes)
    assert default_transcript_path(report) == Path("transcripts/uid-020000000007-20260101T000000Z.txt")
    text = report.text()
    assert "[config]\n  not collected: no reply" in text and "checks: fs=ok identity=FAIL net=FAIL" in text
    doc = report.to_json()
    assert doc["ok"] is False and doc["config"] is None and doc["time"] == "2026-01-01T00:00:00Z"


def test_factory_reset_and_provision_through_the_cli(
    device: PtyDevice, coap_port: int, tmp_path: Path
) -> None:
    code, out = ida_console(device.path, "factory-reset")  # not a terminal and no --yes: refused
    assert code == 2 and "--yes" in out
    code, out = ida_console(device.path, "factory-reset", "--yes")
    assert code == 0 and out.strip() == "erased: True", out
    code, out = ida_console(device.path, "id", "--json")
    reply = json.loads(out)
    assert code == 0 and reply["id"] is None and "error" in reply  # provisioning mode after the erase

    new_key = secrets.token_hex(16)
    record = tmp_path / "provision.txt"
    code, out = ida_console(
        device.path,
        "provision",
        "88.123.99/PUMP-0077",
        f"coap://127.0.0.1:{coap_port}",
        new_key,
        "--transcript",
        str(record),
    )
    assert code == 0 and "rebooting: True" in out, out
    device.wait_boots(3)
    code, out = ida_console(device.path, "status")
    assert code == 0 and "id: 88.123.99/PUMP-0077" in out and "transport_on: True" in out, out
    text = record.read_text()
    assert "> provision 88.123.99/PUMP-0077 coap://127.0.0.1" in text and "<redacted>" in text
    assert new_key not in text
