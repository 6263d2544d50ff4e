"""`ida demo` (what `make demo` runs), as a user runs it: the must-show of issue 9 read from its output.

The full run takes DEMO_SECONDS=45; the other tests stop it early (Ctrl-C) or make a component fail to start.
After every run no process may be left: none whose command line or environment names the demo's working
directory (every process the demo starts gets ``IDA_DEMO_DIR=<dir>``), and none whose parent is the demo.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tools.support.mosquitto import mosquitto_binary

ROOT = Path(__file__).resolve().parents[2]
IDA = ROOT / ".venv" / "bin" / "ida"

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (make setup)")


def _cmd() -> list[str]:
    if IDA.exists():
        return [str(IDA), "demo"]
    return [sys.executable, "-c", "import sys; from tools.cli import main; sys.exit(main())", "demo"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DEMO_SECONDS"}
    env.update(extra)
    return env


def _workdir(out: str) -> str:
    m = re.search(r"working directory (\S+)", out)
    assert m, out
    return m.group(1)


def _left_running(workdir: str, demo_pid: int) -> list[str]:
    """Live processes that name ``workdir`` in their command line or environment, or are children of the demo."""
    needle = workdir.encode()
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            stat = (p / "stat").read_bytes()
            rest = stat[stat.rindex(b")") + 2 :].split()
            if rest[0] == b"Z":
                continue
            cmdline = (p / "cmdline").read_bytes()
            hit = int(rest[1]) == demo_pid or needle in cmdline
            if not hit:
                try:
                    hit = needle in (p / "environ").read_bytes()
                except OSError:
                    pass
        except (OSError, ValueError, IndexError):
            continue
        if hit:
            found.append(p.name + ": " + cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


def _run(env: dict[str, str], timeout: float) -> tuple[subprocess.Popen[str], str, str]:
    """``ida demo`` run to its end (killed after ``timeout`` s): (process, stdout, stderr)."""
    proc = subprocess.Popen(
        _cmd(), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc, out, err


@pytest.mark.slow
def test_demo_shows_both_transports_cache_and_upstream_an_outage_and_leaves_nothing() -> None:
    t0 = time.monotonic()
    proc, out, err = _run(_env(DEMO_SECONDS="45"), 85)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err}"
    assert elapsed < 80, f"the demo took {elapsed:.0f} s"
    workdir = _workdir(out)

    # resolutions from upstream and from the gateway cache, over both transports
    for transport in ("coap", "mqtt"):
        for source in ("from upstream", "from the gateway cache"):
            rx = rf"\({transport}\) resolved \S+ in [\d.]+ ms {source}"
            assert re.search(rx, out), f"no {transport} resolution {source}:\n{out}"
    assert re.search(r"resolved its own identifier \S+ at boot: \d+ values from upstream", out), out

    # a device loses its network, queues reports, then catches up
    assert re.search(r"VALVE-0001 lost its network", out), out
    queued = [
        int(n)
        for n in re.findall(r"VALVE-0001 offline: reports? [\d-]+ queued in flash \((\d+) waiting\)", out)
    ]
    assert queued and max(queued) > 0, out
    m = re.search(r"VALVE-0001 \(coap\) back online: (\d+) queued reports delivered", out)
    assert m and int(m.group(1)) >= max(queued), out
    assert re.search(r"gateway confirms: \d+ reports stored from VALVE-0001", out), out

    # facts from the gateway, the status page, a clean stop
    assert re.search(
        r"gateway: \d+ reports stored, 3 of 3 devices online, \d+ cache lookups: [1-9]\d* hits, [1-9]\d* misses \(hit ratio \d+ %\)",
        out,
    ), out
    assert re.search(r"status page: http://127\.0\.0\.1:\d+/", out), out
    assert "45 s are up: stopping" in out
    assert re.search(r"gateway stopped \(exit code 0\)", out), out
    assert "nothing left running" in out and "straggler" not in out, out
    assert _left_running(workdir, proc.pid) == []
    assert not Path(workdir).exists(), "the working directory is removed after a clean run"


def _reader(stream: object, lines: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.put(line)


def test_ctrl_c_stops_everything_cleanly() -> None:
    proc = subprocess.Popen(
        _cmd(), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while not any("running until Ctrl-C" in s for s in seen):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)  # stop graces: devices 3 s, each of 3 services up to 10 s
        except subprocess.TimeoutExpired:  # say where it hangs: the demo's threads, its children, its output
            proc.send_signal(signal.SIGUSR1)
            time.sleep(1)
            children = subprocess.run(
                ["ps", "-o", "pid,stat,etime,args", "--ppid", str(proc.pid)], capture_output=True, text=True
            ).stdout
            proc.kill()
            _, err = proc.communicate(timeout=10)
            time.sleep(0.2)
            while not lines.empty():
                seen.append(lines.get())
            raise AssertionError(
                f"the demo did not stop within 90 s of SIGINT\n--- its output:\n{''.join(seen)}"
                f"\n--- its children:\n{children}\n--- its threads (SIGUSR1):\n{err}"
            ) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.2)
    while not lines.empty():
        seen.append(lines.get())
    out = "".join(seen)
    assert proc.returncode == 0, out + "\n--- stderr:\n" + (proc.stderr.read() if proc.stderr else "")
    assert "SIGINT: stopping" in out and "3 devices stopped" in out, out
    assert "nothing left running" in out and "straggler" not in out, out
    assert _left_running(_workdir(out), proc.pid) == []


def test_a_component_that_does_not_start_fails_the_demo_with_its_name(tmp_path: Path) -> None:
    fake = tmp_path / "mosquitto"
    fake.write_text("#!/bin/sh\necho 'Error: Address already in use' >&2\nexit 1\n")
    fake.chmod(0o755)
    proc, out, err = _run(_env(IDA_MOSQUITTO=str(fake), TMPDIR=str(tmp_path)), 60)
    assert proc.returncode == 1, out + err
    assert "ida demo: mosquitto exited" in err and "Address already in use" in err, err
    assert "nothing left running" in out, out
    workdir = _workdir(out)
    assert _left_running(workdir, proc.pid) == []
    assert Path(workdir).parent == tmp_path and (Path(workdir) / "mosquitto.log").exists(), (
        "logs are kept when the demo fails"
    )


def test_bad_demo_seconds_is_a_usage_error() -> None:
    proc = subprocess.run(
        _cmd(), cwd=ROOT, env=_env(DEMO_SECONDS="soon"), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "DEMO_SECONDS" in proc.stderr, proc.stderr
