"""One way to start a throwaway Mosquitto, for ``ida demo``, ``ida bench`` (P2, P5) and the test fixtures
(tests/support/brokers.py, tests/support/secure_broker.py).

:func:`config` is the config of such a broker: one anonymous listener (loopback unless told otherwise), no
persistence, its log on stderr (the caller sends that to a log file). :func:`start` runs ``mosquitto -c`` through
the caller's own process object (``spawn``: a :class:`tools.support.procs.Process`, the bench's ``Child``, the
tests' ``Broker``) and returns it once the port accepts TCP connections; a broker that exits, or does not accept
within ``timeout``, is stopped and the process object's ``fail(why)`` raised (so each caller raises its own error).

Started as root, Mosquitto switches to its own user unless the config names one, and a change of user clears the
parent-death signal (``PR_SET_PDEATHSIG``, which the demo and the tests set): a SIGKILLed demo or pytest would
leave its broker running. :func:`config` therefore keeps the invoking user (:func:`keep_user`); a throwaway
loopback broker needs no other.
"""

from __future__ import annotations

import os
import pwd
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from tools.support.procs import wait_port

__all__ = ["config", "keep_user", "mosquitto_binary", "start"]


class Process(Protocol):
    def alive(self) -> bool: ...

    def fail(self, why: str) -> Exception: ...

    def stop(self) -> object: ...


P = TypeVar("P", bound=Process)


def mosquitto_binary() -> str | None:
    """``$IDA_MOSQUITTO``, else /usr/sbin/mosquitto, else ``mosquitto`` on PATH; None when none exists."""
    env = os.environ.get("IDA_MOSQUITTO")
    for cand in (env, "/usr/sbin/mosquitto", shutil.which("mosquitto")):
        if cand and Path(cand).exists():
            return cand
    return None


def keep_user() -> str:
    """The config line that keeps Mosquitto the invoking user when started as root (else nothing to say)."""
    return f"user {pwd.getpwuid(os.geteuid()).pw_name}\n" if os.geteuid() == 0 else ""


def config(
    port: int, host: str = "127.0.0.1", *, max_keepalive: int = 300, notice: bool = True, extra: str = ""
) -> str:
    """A throwaway broker's config: anonymous listener on ``host:port``, no persistence, log to stderr (errors,
    warnings and, with ``notice``, notices), ``extra`` lines, the invoking user kept."""
    return (
        f"listener {port} {host}\nallow_anonymous true\npersistence false\nlog_dest stderr\n"
        "log_type error\nlog_type warning\n"
        + ("log_type notice\n" if notice else "")
        + f"max_keepalive {max_keepalive}\nset_tcp_nodelay true\n"
        + extra
        + keep_user()
    )


def start(cmd: Sequence[str], spawn: Callable[[list[str]], P], host: str, port: int, timeout: float) -> P:
    """``spawn(cmd)`` (a started process object), returned once ``host:port`` accepts a TCP connection."""
    proc = spawn(list(cmd))
    try:
        accepting = wait_port(host, port, proc.alive, timeout)
    except TimeoutError:
        proc.stop()
        raise proc.fail(f"did not accept connections on port {port} within {timeout:.0f} s") from None
    if not accepting:
        proc.stop()
        raise proc.fail("exited while starting")
    return proc
