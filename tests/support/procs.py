"""Child processes of the test helpers (tests/support/brokers.py, tests/support/faultkit.py, tests/support/fwdevice.py): stop one."""

from __future__ import annotations

import subprocess


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 5.0) -> int | None:
    """SIGTERM, then SIGKILL when it has not exited after ``grace`` s; its exit code (None: no process)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode
