"""``inspect``: one report of a device for a service record.

:func:`inspect` runs ``id``, ``status``, ``net``, ``config get``, ``log N`` and ``selftest`` through a
:class:`~tools.support.console.device.DeviceConsole` and returns a :class:`Report`: the sections as the device
answered them (secrets scrubbed), the queue figures taken from ``status``, what the session saw on the line
(restarts, crash reports, garbage), the problems found (a failed self-test, safe mode, network or transport
down, dropped reports, a crash...) and notes. A section the device could not answer is recorded with the
reason; the rest of the report is still collected. ``report.text()`` is for people, ``report.to_json()`` for
tools; :func:`default_transcript_path` names the transcript file to attach (``transcripts/<id>-<time>.txt``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.support.console import ConsoleError, DeviceConsole
from tools.support.console.scrub import scrub_obj
from tools.support.console.transcript import utc_stamp

__all__ = ["LOG_LINES", "Report", "STEPS", "default_transcript_path", "inspect"]

LOG_LINES = 30
"""Recent log lines collected."""

STEPS: tuple[tuple[str, str], ...] = (
    ("id", "id"),
    ("status", "status"),
    ("net", "net"),
    ("config", "config get"),
    ("log", "log {n}"),
    ("selftest", "selftest"),
)
QUEUE_FIELDS = ("queue", "dropped", "seq", "acked", "last_ack", "interval")
SECTIONS = ("id", "status", "net", "config", "queue", "log", "selftest")


@dataclass
class Report:
    port: str
    time: float
    sections: dict[str, Any] = field(default_factory=dict)  # name -> the reply's fields (log: list of lines)
    errors: dict[str, str] = field(default_factory=dict)  # name -> why it could not be collected
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    session: dict[str, Any] = field(default_factory=dict)
    transcript: str | None = None

    @property
    def identifier(self) -> str | None:
        for name in ("id", "status", "config"):
            v = self.sections.get(name, {}).get("id")
            if isinstance(v, str) and v:
                return v
        return None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tool": "ida console inspect",
            "time": utc_stamp(self.time, ms=False),
            "port": self.port,
            "identifier": self.identifier,
            "ok": self.ok,
            "problems": list(self.problems),
            "notes": list(self.notes),
        }
        for name in SECTIONS:
            out[name] = self.sections.get(name)
        out["errors"] = dict(self.errors)
        out["session"] = self.session
        out["transcript"] = self.transcript
        return out

    def text(self) -> str:
        who = self.identifier or "an unprovisioned device"
        verdict = "OK" if self.ok else f"{len(self.problems)} PROBLEM(S)"
        lines = [f"Inspection of {who} on {self.port or '?'} at {utc_stamp(self.time, ms=False)}: {verdict}"]
        for title, items in (("problems", self.problems), ("notes", self.notes)):
            if items:
                lines.append(f"{title}:")
                lines += [f"  - {x}" for x in items]
        for name in SECTIONS:
            lines.append("")
            lines.append(f"[{name}]")
            if name in self.errors:
                lines.append(f"  not collected: {self.errors[name]}")
            body = self.sections.get(name)
            if name == "log" and isinstance(body, list):
                lines += [f"  {x}" for x in body] or ["  (empty)"]
            elif isinstance(body, dict):
                lines += _fields(body)
        s = self.session
        if s:
            lines += ["", "[session]"]
            lines.append(
                f"  restarts: {s.get('resets', 0)}  retries: {s.get('retries', 0)}  crash reports: "
                f"{len(s.get('crashes', []))}  garbled lines: {s.get('garbage', 0)}  rejected by device: "
                f"{s.get('rejected', 0)}"
            )
            for crash in s.get("crashes", []):
                lines.append("  crash report:")
                lines += [f"    {x}" for x in crash]
        if self.transcript:
            lines += ["", f"transcript: {self.transcript}"]
        return "\n".join(lines) + "\n"


def _fields(d: dict[str, Any], indent: str = "  ") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            if k == "checks":
                out.append(
                    f"{indent}{k}: " + " ".join(f"{c}={'ok' if ok else 'FAIL'}" for c, ok in v.items())
                )
            else:
                out.append(f"{indent}{k}:")
                out += _fields(v, indent + "  ")
        elif isinstance(v, list):
            out.append(f"{indent}{k}:")
            out += [f"{indent}  {' '.join(str(y) for y in x) if isinstance(x, list) else x}" for x in v]
        else:
            out.append(f"{indent}{k}: {v}")
    return out


def inspect(session: DeviceConsole, log_lines: int = LOG_LINES, clock: Any = time.time) -> Report:
    """Collect the report (see the module docstring). Raises only :class:`~tools.support.console.errors.PortError`
    (the port itself failed); a command that times out or fails is recorded in ``report.errors``."""
    from tools.support.console import PortError

    report = Report(port=session.name, time=clock())
    session.transcript.note("inspect: collecting id, status, net, config, log, selftest")
    for name, template in STEPS:
        line = template.format(n=log_lines)
        try:
            reply = session.command(line)
        except PortError:
            raise
        except ConsoleError as e:
            report.errors[name] = str(e)
            continue
        fields = scrub_obj(reply.fields)
        if name == "log":
            report.sections["log"] = list(fields.get("lines") or [])
        else:
            report.sections[name] = fields
        if not reply.ok:
            report.errors[name] = reply.error or "the device refused"
    status = report.sections.get("status")
    if isinstance(status, dict):
        report.sections["queue"] = {k: status[k] for k in QUEUE_FIELDS if k in status}
    report.session = session.stats.as_dict()
    _judge(report)
    return report


def _judge(r: Report) -> None:
    p, n = r.problems, r.notes
    for name, why in r.errors.items():
        p.append(f"{name}: {why}")
    ident = r.sections.get("id") or {}
    if ident and not ident.get("id"):
        p.append(f"not provisioned ({ident.get('error') or 'no identity'})")
    st = r.sections.get("status") or {}
    if st.get("safe") is True:
        p.append("safe mode: console only, no network (quick crashes in a row at boot, or the button held)")
    if st.get("net") == "down":
        p.append("network down: reports queue in flash")
    elif st and st.get("id") and not st.get("safe") and st.get("transport_on") is False:
        p.append(f"transport {st.get('transport')} not running (last error: {st.get('last_error')})")
    if isinstance(st.get("dropped"), int) and st["dropped"] > 0:
        p.append(f"{st['dropped']} report(s) dropped: the flash queue overflowed")
    if isinstance(st.get("queue"), int) and st["queue"] > 0:
        n.append(f"{st['queue']} report(s) waiting in the flash queue")
    if isinstance(st.get("errors"), int) and st["errors"] > 0:
        n.append(f"{st['errors']} transport error(s) since boot; last: {st.get('last_error')}")
    sel = r.sections.get("selftest") or {}
    if sel and sel.get("pass") is not True:
        failed = [k for k, v in (sel.get("checks") or {}).items() if v is not True]
        p.append("self-test failed: " + (", ".join(failed) or "see [selftest]"))
    log = r.sections.get("log") or []
    errors = [x for x in log if isinstance(x, str) and x.startswith("E ")]
    if errors:
        n.append(f"{len(errors)} error line(s) in the recent log, last: {errors[-1]}")
    s = r.session
    if s.get("crashes"):
        p.append(f"{len(s['crashes'])} crash report(s) on the console: {s['crashes'][0][0]}")
    if s.get("resets"):
        n.append(f"the device restarted {s['resets']} time(s) during the session")
    if s.get("garbage") or s.get("rejected"):
        n.append(
            f"{s.get('garbage', 0)} garbled line(s) on the line ({s.get('rejected', 0)} rejected by the device)"
        )


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def default_transcript_path(report: Report, directory: Path | str = "transcripts") -> Path:
    """``<directory>/<identifier>-<UTC time>.txt`` (identifier made file-name safe; ``uid-<hex>`` or
    ``unknown`` for an unprovisioned device)."""
    ident = report.identifier
    if ident is None:
        uid = (report.sections.get("id") or {}).get("uid")
        ident = f"uid-{uid}" if uid else "unknown"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(report.time))
    return Path(directory) / f"{_UNSAFE.sub('_', ident).strip('_') or 'device'}-{stamp}.txt"
