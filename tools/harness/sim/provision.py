"""Provision and start one device that runs the real firmware (``firmware/main.py``) under the MicroPython unix
port -- used by ``ida sim`` in firmware mode, and meant for ``ida device run`` too.

    ident = provision(Path("sim-data/dev1"), "88.123.99/PUMP-0001", coap="coap://127.0.0.1:5683")
    env = device_env(Path("sim-data/dev1"), uid=uid_for(1), interval=60)
    device = device_process("dev1", Path("sim-data/dev1"), env).start()     # its console is stdin/stdout
    device.ask("status", 5)

The data dir is the device's flash: ``identity.json`` (what the flashing tool writes: identifier, transport,
gateway addresses, the 16-byte key in hex), and whatever the firmware keeps there itself (boot counter, report
queue, config). Provisioning again keeps the device's key and rewrites ``identity.json`` only when something
changed, so a device keeps its identity, boot counter and queue across runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tools.harness.sim.config import SimError
from tools.support.console.process import ConsoleProcess
from tools.support.procs import micropython_binary

if TYPE_CHECKING:
    from tools.commands.flash.identity import Identity

__all__ = [
    "provision",
    "device_env",
    "device_command",
    "device_process",
    "uid_for",
    "FIRMWARE_DIR",
    "IDENTITY_FILE",
]

FIRMWARE_DIR = Path(__file__).resolve().parents[3] / "firmware"
IDENTITY_FILE = "identity.json"


def provision(
    data_dir: Path,
    identifier: str,
    *,
    coap: str | None = None,
    mqtt: str | None = None,
    transport: str = "coap",
    key: bytes | None = None,
) -> Identity:
    """Write ``<data_dir>/identity.json`` for the firmware (atomically: temp file, then rename). An existing
    identity's key is kept unless ``key`` is given; the file is left alone when nothing changed. Raises
    SimError for a bad identifier, address or transport."""
    from tools.commands.flash.errors import FlashError  # the flashing tool's identity format and checks
    from tools.commands.flash.identity import Identity, new_key, parse_identity

    path = Path(data_dir) / IDENTITY_FILE
    old: bytes | None = None
    try:
        old = path.read_bytes()
    except OSError:
        pass
    if key is None and old is not None:
        try:
            key = parse_identity(old).key
        except FlashError:
            key = None
    try:
        ident = Identity(identifier, key or new_key(), tuple(u for u in (coap, mqtt) if u), transport)
    except FlashError as e:
        raise SimError(str(e)) from None
    data = ident.to_json()
    if data != old:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(IDENTITY_FILE + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as e:
            raise SimError(f"cannot write {path}: {e.strerror or e}") from None
    return ident


def uid_for(n: int) -> str:
    """A unique id (6 bytes hex, locally administered like a MAC) for simulated device number ``n``."""
    return f"02{n & 0xFFFFFFFFFF:010x}"


def device_env(
    data_dir: Path,
    *,
    uid: str | None = None,
    interval: int | None = None,
    wdt_ms: int = 0,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a firmware process (see the top of firmware/main.py). ``wdt_ms`` 0 turns the
    software watchdog off: a host under load should not 'reset' a simulated device."""
    env = dict(os.environ if base is None else base)
    env.pop("MICROPYPATH", None)  # main.py puts its own directory first
    env["IDA_DATA"] = str(data_dir)
    env["IDA_WDT_MS"] = str(wdt_ms)
    if uid:
        env["IDA_UID"] = uid
    if interval is not None:
        env["IDA_INTERVAL"] = str(int(interval))
    return env


def device_process(
    name: str, data_dir: Path, env: dict[str, str], micropython: str | None = None, **console: Any
) -> ConsoleProcess:
    """The firmware of the device provisioned in ``data_dir`` as a
    :class:`~tools.support.console.process.ConsoleProcess` (not started): it runs in its data dir with ``env``
    (:func:`device_env`), its stderr to ``<data_dir>/stderr.log``, its console on pipes; ``console`` are the
    other options (timeouts, transcript, callbacks, loop, error type)."""
    cmd = device_command(micropython)
    return ConsoleProcess(name, cmd, env=env, cwd=data_dir, log=data_dir / "stderr.log", **console)


def device_command(micropython: str | None = None, heap: str | None = None) -> list[str]:
    """``micropython [-X heapsize=...] firmware/main.py``; :class:`~tools.support.procs.ProcessError` when there
    is no ``micropython``."""
    cmd = [micropython or micropython_binary()]
    if heap:
        cmd += ["-X", f"heapsize={heap}"]
    return [*cmd, str(FIRMWARE_DIR / "main.py")]
