"""A device started the way a person starts one: ``ida device run`` as a subprocess, its console (the firmware's
stdin/stdout, passed through) on pipes. ``IdaDevice`` is tests/support/fwdevice.py's ``DeviceProc`` (``send``,
``expect``, ``json``, ``json_on``, ``wait_status``, ``stop`` = SIGTERM) with the ``ida`` command line instead of
``micropython firmware/main.py``."""

from __future__ import annotations

import os
from pathlib import Path

from tests.support.fwdevice import DeviceProc
from tests.support.mpcollect import ROOT
from tools.support.procs import ida_command

__all__ = ["IdaDevice", "ROOT"]


class IdaDevice(DeviceProc):
    """``ida device run --identifier ID --data-dir DIR ARGS...``; ``stderr`` lines (this command's own messages)
    land in ``err``."""

    def __init__(
        self, data_dir: Path, identifier: str, *args: str, cwd: Path = ROOT, default_dir: bool = False
    ) -> None:
        where = () if default_dir else ("--data-dir", str(data_dir))
        cmd = ida_command("device", "run", "--identifier", identifier, *where, *args)
        super().__init__(data_dir, cwd=cwd, cmd=cmd)
        self.env["PYTHONPATH"] = str(ROOT) + os.pathsep + self.env.get("PYTHONPATH", "")
