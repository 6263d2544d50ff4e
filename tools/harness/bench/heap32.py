"""P4's 32-bit figures: the firmware's heap as an ESP32 has it (4-byte pointers, 16-byte GC blocks), measured on
the 32-bit interpreters of ``tools/harness/mp32.py`` with whole device processes against a real ``ida gateway``.

* ``heap_32_frozen``: ``heap_used`` of the device's ``status`` (``gc.collect()`` then ``gc.mem_alloc()``) after
  boot and the first report acknowledged, with the firmware frozen in (``micropython32-frozen``, an image with no
  code on the filesystem), a plain CoAP device (the issue's baseline);
* ``heap_32_mpy``: the same with a stock runtime (``micropython32``) and the build's ``main.py`` + ``.mpy`` files
  on the filesystem, what ``ida flash build`` makes for a stock ESP32 runtime;
* ``heap_32_frozen_oscore``, ``heap_32_mpy_oscore``: the two with an OSCORE device (its contexts and buffers);
* ``min_heap_32_frozen``: the smallest ``-X heapsize`` (bisected, to ``step`` bytes) at which the frozen device
  boots, has its first report acknowledged, resolves an identifier, has 10 more reports acknowledged and applies
  a config change (set through the gateway's HTTP API, named by the next report's acknowledgement, fetched and
  applied by the device), all of it OSCORE-protected, without a crash or a reboot.

The images are ``ida flash build`` outputs for the simulated unix board (runtime: the interpreter); devices run
them as ``ida device run --image`` does (``tools/commands/device_image.py``), each with a fresh identity (the
gateway's OSCORE replay window is per device). The gateway runs ``[coap] security = "plain"`` (protected requests
are verified, plain ones accepted) with the devices' keys in its keystore, the resolved identifier in its local
zone and no per-device rate limit.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import queue
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.harness.bench.procs import BenchError, Child, free_port
from tools.harness.bench.project import SAMPLE_ID
from tools.support.procs import ida_command

__all__ = ["Heap32Rig", "Probe", "heap32_figures"]

MEASURE_HEAP = 256000  # roomy: heap in use does not depend on it
BISECT_FROM = (8192, 64000)  # (expected to fail, first guess that passes; raised to 112000, 256000 if not)
REPORTS = 10
KEY = bytes(range(16))
CONFIG = """[coap]
host = "127.0.0.1"
port = {coap}
security = "plain"
[http]
host = "127.0.0.1"
port = {http}
[data]
dir = "{data}"
[upstream]
urls = ["hdl://127.0.0.1:9"]
[limits]
device_rate = 0
"""


@dataclass(frozen=True)
class Probe:
    ok: bool
    heap_used: int | None  # after boot + first report
    why: str = ""


class _Device:
    """A device process with its console on pipes, switched to JSON lines."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.err: list[str] = []
        self.crash = ""  # the firmware's "E app crash ..." line (it then resets: in-process on unix)
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain_err, daemon=True).start()
        self.send("json on")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                obj = json.loads(raw)
            except ValueError:
                obj = {"log": raw.decode("utf-8", "replace").strip()}
            if not isinstance(obj, dict):
                continue
            if str(obj.get("log", "")).startswith("E app crash"):
                self.crash = self.crash or obj["log"]
            self.lines.put(obj)

    def _drain_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.err.append(raw.decode("utf-8", "replace").rstrip())

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # it died: the next wait says so

    def wait(self, cmd: str, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.crash:
                raise BenchError(self.crash)
            try:
                obj = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise BenchError(
                        f"device exited {self.proc.returncode}: {' | '.join(self.err[-3:])}"
                    ) from None
                continue
            if obj.get("cmd") == cmd and pred(obj):
                return obj
        raise BenchError(f"no {cmd} reply as awaited within {timeout:.0f} s")

    def status_until(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            self.send("status")
            try:
                return self.wait("status", pred, 1.0)
            except BenchError:
                if time.monotonic() > deadline or self.proc.poll() is not None or self.crash:
                    raise

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                with contextlib.suppress(OSError):  # stdin of a process that died at once
                    f.close()


class Heap32Rig:
    """The gateway, the two images and a supply of provisioned identities; ``probe()`` runs one device."""

    def __init__(self, work: Path, identities: int = 40) -> None:
        from tools.commands.flash.keystore import Keystore
        from tools.commands.flash.register import Registration, register_device

        self.work = work
        self.ids = [f"88.123.99/HEAP32-{n:03d}" for n in range(identities)]
        data = work / "gateway"
        data.mkdir(parents=True, exist_ok=True)
        keys = Keystore.in_dir(data)
        for ident in self.ids:
            keys.put(ident, KEY)
        now = _dt.datetime.now(_dt.UTC)
        register_device(
            Registration(SAMPLE_ID, "02:00:00:00:00:01", "unix", "bench", now), data / "zone.json"
        )
        self.coap, self.http = free_port(), free_port(kind=socket.SOCK_STREAM)
        (work / "gateway.toml").write_text(CONFIG.format(coap=self.coap, http=self.http, data=data))
        self.gateway = Child(
            "gateway", ida_command("gateway", "--config", str(work / "gateway.toml")), log_dir=work
        )
        self.images: dict[bool, tuple[str, Path]] = {}
        self.used = 0

    def __enter__(self) -> Heap32Rig:
        from tools.commands.flash.builder import build
        from tools.harness import mp32

        try:
            for frozen in (True, False):
                exe = str(mp32.ensure(frozen=frozen))
                out = self.work / ("image-frozen" if frozen else "image-mpy")
                build("unix", out, runtime=exe)
                self.images[frozen] = (exe, out)
        except mp32.BuildFailed as e:
            raise BenchError(f"no 32-bit MicroPython: {e}") from None
        self.gateway.start()
        deadline = time.monotonic() + 30
        while not self._http("GET", "/healthz"):
            if not self.gateway.alive() or time.monotonic() > deadline:
                self.gateway.stop()
                raise self.gateway.fail("did not come up")
            time.sleep(0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        self.gateway.stop()

    def _http(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any] | None:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http}{path}",
            data=json.dumps(body).encode() if body is not None else None,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                out: dict[str, Any] = json.loads(r.read())
                return out
        except (OSError, ValueError):
            return None

    def probe(self, frozen: bool, heap: int, workload: bool, secure: bool = True) -> Probe:
        """One fresh device in a ``heap``-byte heap: boot + first report (heap measured), then with ``workload``
        the resolve, 10 reports and a config change; ``secure`` an OSCORE device, else a plain CoAP one."""
        from tools.commands.device_image import install_image
        from tools.commands.flash.identity import Identity
        from tools.harness.sim.provision import device_env

        if self.used >= len(self.ids):
            raise BenchError("heap32: out of provisioned identities")
        ident = self.ids[self.used]
        self.used += 1
        exe, image = self.images[frozen]
        d = (self.work / "devices" / str(self.used)).resolve()
        d.mkdir(parents=True)
        url = f"coap://127.0.0.1:{self.coap}"
        (d / "identity.json").write_bytes(Identity(ident, KEY, (url,), "coap", secure=secure).to_json())
        run = install_image(image, d, exe)
        cmd, extra = run.command(exe, str(heap))
        env = {**device_env(d, uid=f"02{self.used:010x}", interval=3600), **extra}
        dev = _Device(cmd, env, cwd=d)
        try:
            st = dev.status_until(lambda s: s.get("acked", 0) >= 1)
            used = int(st["heap_used"])
            if workload:
                self._workload(dev, ident)
            return Probe(True, used)
        except BenchError as e:
            return Probe(False, None, str(e))
        finally:
            dev.close()

    def _workload(self, dev: _Device, ident: str) -> None:
        dev.send(f"resolve {SAMPLE_ID}")
        dev.wait("resolve", lambda r: "values" in r, 20)
        for _ in range(REPORTS):
            dev.send("report")
        dev.status_until(lambda s: s.get("acked", 0) >= 1 + REPORTS)
        if self._http("PUT", f"/api/devices/{ident}/config", {"interval": 600}) is None:
            raise BenchError(f"the gateway refused a config for {ident}")
        dev.send("report")  # its acknowledgement names the new config, which the device then fetches
        st = dev.status_until(lambda s: s.get("interval") == 600)
        if st.get("boot") != 1 or st.get("safe"):
            raise BenchError(f"the device rebooted (boot {st.get('boot')}, safe {st.get('safe')})")


def _min_heap(rig: Heap32Rig, step: int, notes: list[str]) -> int | None:
    lo, hi = BISECT_FROM
    while not rig.probe(True, hi, workload=True).ok:
        if hi >= MEASURE_HEAP:
            notes.append(f"min_heap_32_frozen: the workload fails even in {hi} bytes")
            return None
        lo, hi = hi, {64000: 112000}.get(hi, MEASURE_HEAP)
    if rig.probe(True, lo, workload=True).ok:
        notes.append(f"min_heap_32_frozen: the workload passes in {lo} bytes already (the bisection's floor)")
        return lo
    while hi - lo > step:
        mid = (lo + hi) // 2 // 16 * 16
        if rig.probe(True, mid, workload=True).ok:
            hi = mid
        else:
            lo = mid
    return hi


def heap32_figures(work: Path, quick: bool = False) -> tuple[dict[str, int | None], list[str]]:
    """The figures (None where a run failed) and notes on what failed."""
    notes: list[str] = []
    figures: dict[str, int | None] = {}
    with Heap32Rig(work) as rig:
        for name, frozen, secure in (
            ("heap_32_frozen", True, False),
            ("heap_32_mpy", False, False),
            ("heap_32_frozen_oscore", True, True),
            ("heap_32_mpy_oscore", False, True),
        ):
            p = rig.probe(frozen, MEASURE_HEAP, workload=False, secure=secure)
            if not p.ok:
                notes.append(f"{name}: {p.why}")
            figures[name] = p.heap_used
        figures["min_heap_32_frozen"] = _min_heap(rig, 4096 if quick else 512, notes)
    return figures, notes


# the goals for the chip (issue 15): what the heap diet is measured against
BUDGETS_32 = {"heap_32_frozen": 16384, "heap_32_mpy": 49152, "min_heap_32_frozen": 32768}
LABELS_32 = {
    "heap_32_frozen": "heap after boot + first report, 32-bit, firmware frozen in",
    "heap_32_mpy": "heap after boot + first report, 32-bit, .mpy on the filesystem",
    "heap_32_frozen_oscore": "the same, frozen, an OSCORE device",
    "heap_32_mpy_oscore": "the same, .mpy on the filesystem, an OSCORE device",
    "min_heap_32_frozen": "smallest heap (bisected) for boot, resolve, 10 reports, config, OSCORE; frozen",
}


def p4_rows(
    work: Path, quick: bool
) -> tuple[dict[str, int | None], list[tuple[str, int | None, int | None]], list[str]]:
    """P4's 32-bit figures, table rows (label, value, budget) and notes; a rig that cannot start is a note."""
    try:
        figures, notes = heap32_figures(work, quick)
    except BenchError as e:
        figures, notes = dict.fromkeys(LABELS_32), [f"32-bit figures not measured: {e}"]
    rows = [(LABELS_32[k], figures[k], BUDGETS_32.get(k)) for k in LABELS_32]
    return figures, rows, notes
