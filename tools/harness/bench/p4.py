"""P4: firmware footprint, measured with the real tools: the MicroPython unix port and mpy-cross.

* 32-bit figures (``heap32.py``): the heap of a whole device process on the 32-bit interpreter (an ESP32's
  pointer and GC block sizes), firmware frozen in and as ``.mpy``, and the smallest heap that runs it; the rest
  below is the 64-bit host build, labelled so.

* heap: ``gc.mem_alloc()`` (after ``gc.collect()``) of the application state after boot and the first report
  acknowledged, on the firmware test rig (``tests/device/fwfakes.Rig``: the real ``carrier.app`` on a fake
  HAL, against a loopback CoAP gateway), running under ``micropython``. The 64-bit unix build has 8-byte
  pointers and 32-byte GC blocks, so this over-states the ESP32 figure; code loaded as bytecode is reported
  separately (on the device it would be frozen or in ROMFS).
* ``.mpy``: every firmware module compiled with mpy-cross as ``ida flash build`` does (``main.py``/``boot.py``
  stay source), summed.
* request bytes: ``carrier.coapmsg.resolve_request`` for a 24-character identifier, 2-byte token, under micropython.

There is no anchor: the goals are absolute budgets of the device.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from tools.harness.bench.procs import BenchError, repo_root
from tools.harness.bench.scenario import BenchOptions, ScenarioResult, scenario
from tools.support.procs import ProcessError, micropython_binary

__all__ = ["run_p4", "GOAL_P4", "mpy_sizes", "micropython_figures"]

GOAL_P4 = (
    "heap after boot + first report <= 32 KB (64-bit, application state); total .mpy <= 64 KB; CoAP resolve "
    "request <= 48 B (24-char id); 32-bit: heap_32_frozen <= 16 KB, heap_32_mpy <= 48 KB, min_heap_32_frozen <= 32 KB"
)
LIMITS_P4 = (
    "Measured on the MicroPython unix port (64-bit: 8-byte pointers, 32-byte GC blocks), not on an ESP32; "
    "the heap figure is the application state only (the code loaded as bytecode is listed separately)."
)
HEAP_BUDGET = 32 * 1024
MPY_BUDGET = 64 * 1024
REQUEST_BUDGET = 48
ID24 = "88.123.99/PUMP-0001-ABCD"

_SCRIPT = r"""
import gc, json, sys
out = {}
def alloc():
    gc.collect(); gc.collect()
    return gc.mem_alloc()
try:
    m0 = alloc()
    from carrier import app, coap, coapmsg, console, queue, reporter, rcache, unload  # what a CoAP device keeps
    from carrier import startup, identity, idsyntax, config, qfile  # boot only: loaded, then dropped again
    unload("startup", "identity", "idsyntax", "config", "qfile")  # (compiled from source: their names stay)
    del startup, identity, idsyntax, config, qfile
    m1 = alloc()
    out["code_bytes"] = m1 - m0
    buf = bytearray(96)
    out["request_bytes"] = coapmsg.resolve_request(buf, 1, 0x0102, ID24.encode())
except Exception as e:
    out["import_error"] = "%s: %s" % (type(e).__name__, e)
try:
    import fwfakes
    r = fwfakes.Rig()
    m2 = alloc()
    try:
        a = r.boot()
        if not r.run(5000, lambda: a.reporter.acked >= 1):
            raise RuntimeError("first report not acknowledged within 5 s of rig time")
        r.app.step(r.hal.now)
        m3 = alloc()
    finally:
        try:
            fwfakes.log_reset()
        except Exception:
            pass
        r.close()
    out["heap_state_bytes"] = m3 - m2
    out["heap_process_bytes"] = m3
except Exception as e:
    out["heap_error"] = "%s: %s" % (type(e).__name__, e)
print("P4JSON " + json.dumps(out))
""".replace("ID24", repr(ID24))


def micropython_figures(timeout: float = 120.0) -> dict[str, Any]:
    """Run the measuring script under micropython (firmware and its test rig on MICROPYPATH)."""
    try:
        exe = micropython_binary()
    except ProcessError as e:
        raise BenchError(str(e)) from None
    root = repo_root()
    env = dict(os.environ, MICROPYPATH=f"{root / 'firmware'}:{root / 'tests' / 'device'}:.frozen")
    proc = subprocess.run(
        [exe, "-X", "heapsize=4M", "-c", _SCRIPT],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=root,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("P4JSON "):
            out: dict[str, Any] = json.loads(line[7:])
            return out
    raise BenchError(f"micropython exited {proc.returncode}: {(proc.stderr or proc.stdout)[-800:]}")


def mpy_sizes() -> dict[str, int]:
    """Device path -> bytes of every firmware file as ``ida flash build`` puts it on the filesystem."""
    try:
        from tools.commands.flash.builder import FIRMWARE_DIR, SOURCE_FILES, compile_py, firmware_sources
    except ImportError as e:
        raise BenchError(f"tools.commands.flash.builder not available: {e}") from None
    out = {}
    for rel in firmware_sources(FIRMWARE_DIR):
        data = (FIRMWARE_DIR / rel).read_bytes()
        if rel.suffix == ".py" and str(rel) not in SOURCE_FILES:
            out[rel.with_suffix(".mpy").as_posix()] = len(compile_py(data, rel.as_posix()))
        else:
            out[rel.as_posix()] = len(data)
    return out


@scenario("P4", "firmware footprint (micropython, mpy-cross)", GOAL_P4, LIMITS_P4)
def run_p4(opts: BenchOptions) -> ScenarioResult:
    res = ScenarioResult(
        "P4", "firmware footprint (micropython, mpy-cross)", GOAL_P4, columns=("figure", "value", "budget")
    )
    mp = micropython_figures()
    sizes = mpy_sizes()
    mpy_total = sum(v for k, v in sizes.items() if k.endswith(".mpy"))
    unix_hal = sum(v for k, v in sizes.items() if k.endswith("hal/unix.mpy"))
    src_total = sum(v for k, v in sizes.items() if not k.endswith(".mpy"))
    heap = mp.get("heap_state_bytes")
    req = mp.get("request_bytes")
    res.figures = {
        "heap_bytes": heap,
        "code_bytes_in_heap": mp.get("code_bytes"),
        "mpy_bytes": mpy_total,
        "mpy_bytes_without_unix_hal": mpy_total - unix_hal,
        "source_bytes": src_total,
        "request_bytes": req,
    }
    for k in ("import_error", "heap_error"):
        if k in mp:
            res.notes.append(f"{k.replace('_', ' ')}: {mp[k]}")
    from tools.harness.bench.heap32 import BUDGETS_32, p4_rows

    h32, rows32, notes32 = p4_rows(opts.logs() / "heap32", opts.quick)
    res.figures.update(h32)
    res.notes += notes32
    res.figures["meets_goal"] = (
        all((v := h32[k]) is not None and v <= b for k, b in BUDGETS_32.items())
        and heap is not None
        and heap <= HEAP_BUDGET
        and mpy_total <= MPY_BUDGET
        and req is not None
        and req <= REQUEST_BUDGET
    )
    res.rows = [
        *rows32,
        ("heap after boot + first report (application state, 64-bit unix port)", heap, HEAP_BUDGET),
        ("firmware code loaded as bytecode into the heap (64-bit unix port)", mp.get("code_bytes"), None),
        (f"total .mpy ({sum(1 for k in sizes if k.endswith('.mpy'))} modules)", mpy_total, MPY_BUDGET),
        ("  of which hal/unix.mpy (not needed on the ESP32)", unix_hal, None),
        ("files kept as source (main.py, boot.py, ...)", src_total, None),
        (f"CoAP resolve request, {len(ID24)}-character identifier", req, REQUEST_BUDGET),
    ]
    largest = sorted(((v, k) for k, v in sizes.items() if k.endswith(".mpy")), reverse=True)[:4]
    res.notes.append("largest modules: " + ", ".join(f"{k} {v} B" for v, k in largest))
    res.notes.append(
        "the 64-bit figures come from the 64-bit unix port (8-byte pointers): an upper bound for the ESP32; "
        "the 32-bit ones from whole device processes against a gateway (plain CoAP devices, OSCORE ones where "
        "named; tools/harness/bench/heap32.py)"
    )
    return res
