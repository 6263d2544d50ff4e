"""Reports of a benchmark run: plain text (terminal), one JSON object (``--json``), Markdown (``--out``)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from tools.harness.bench.scenario import ScenarioResult

__all__ = ["as_json", "as_text", "as_markdown", "machine_info"]


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.3f}".rstrip("0").rstrip(".") if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }
    try:
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    exe = shutil.which("coap-server-notls")
    if exe:
        try:
            out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=5)  # usage, then exit
            first = (out.stdout + out.stderr).split("\n")
            ver = next((line for line in first if "coap-server" in line and " v" in line), "")
            info["libcoap"] = ver.split(" -- ")[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import aiocoap

        info["aiocoap"] = getattr(aiocoap, "__version__", None) or _dist_version("aiocoap")
    except ImportError:
        pass
    return info


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def as_json(results: Sequence[ScenarioResult]) -> str:
    return json.dumps({r.key: r.as_json() for r in results}, sort_keys=False)


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [[_cell(c).replace("**", "") for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(columns)]
    out = ["  " + "  ".join(h.ljust(w) for h, w in zip(columns, widths, strict=True))]
    for r in cells:
        out.append(
            "  "
            + "  ".join(
                (c.rjust(w) if i else c.ljust(w)) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return out


# one line per scenario: ``{figure}`` is shown as a table cell, ``{figure!s}`` as it is
_HEADLINES = {
    "P1": "P1 gateway {rps} req/s, p50 {p50_ms} ms, p99 {p99_ms} ms | x libcoap {ratio_libcoap}, x aiocoap "
    "{ratio_aiocoap}, x raw UDP {ratio_raw_udp}, x raw UDP batched {ratio_raw_udp_drain}",
    "P2": "P2 gateway {rps} req/s over MQTT, p50 {p50_ms} ms, p99 {p99_ms} ms | x bare MQTT responder "
    "{ratio_mqtt_raw}",
    "P3": "P3 upstream requests for {concurrent_misses!s} concurrent misses: {upstream_requests!s} | miss "
    "overhead p50 {miss_overhead_p50_ms} ms",
    "P4": "P4 heap {heap_bytes} B, .mpy {mpy_bytes} B, resolve request {request_bytes} B",
    "P5": "P5 gateway CPU {gateway_cpu} of a core for {reports_per_s} reports/s ({reports_acked}/{reports_sent} "
    "acknowledged)",
}


class _Figure:
    """A figure in a headline template: formatted as a cell, ``!s`` as it is."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __format__(self, spec: str) -> str:
        return _cell(self.value)

    def __str__(self) -> str:
        return str(self.value)


class _Figures(dict[str, _Figure]):
    def __missing__(self, key: str) -> _Figure:
        return _Figure(None)


def _headline(r: ScenarioResult) -> str:
    f = r.figures
    template = _HEADLINES.get(r.key)
    if template is not None:
        return template.format_map(_Figures({k: _Figure(v) for k, v in f.items()}))
    keys = [k for k in f if k not in ("meets_goal",)][:5]
    return f"{r.key} " + ", ".join(f"{k} {_cell(f[k])}" for k in keys)


def as_text(results: Sequence[ScenarioResult]) -> str:
    lines: list[str] = []
    for r in results:
        lines.append(f"== {r.key}: {r.title}   (goal: {r.goal})")
        if r.skipped is not None:
            lines.append(f"  not measured: {r.skipped}")
            lines.append("")
            continue
        if r.rows:
            lines += _table(r.columns, r.rows)
        lines.append("  " + _headline(r))
        if "meets_goal" in r.figures:
            lines.append(f"  goal met: {'yes' if r.figures['meets_goal'] else 'no'}")
        lines += [f"  note: {n}" for n in r.notes]
        lines.append(f"  ({r.seconds:g} s)")
        lines.append("")
    return "\n".join(lines)


def as_markdown(results: Sequence[ScenarioResult], command: str, info: dict[str, Any] | None = None) -> str:
    info = info or machine_info()
    out = [
        "# Benchmarks",
        "",
        "Generated by `ida bench` (tools/harness/bench). Every figure is measured in the same run as its anchors, under the "
        "same load generator; compare ratios, not absolute numbers (the machine is shared and noisy).",
        "",
        f"- command: `{command}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        "- machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        "",
    ]
    for r in results:
        out.append(f"## {r.key}: {r.title}")
        out.append("")
        out.append(f"Goal: {r.goal}.")
        out.append("")
        if r.skipped is not None:
            out.append(f"Not measured: {r.skipped}")
            out.append("")
            continue
        if r.rows:
            out.append("| " + " | ".join(r.columns) + " |")
            out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(r.columns))) + "|")
            for row in r.rows:
                out.append("| " + " | ".join(_cell(c) for c in row) + " |")
            out.append("")
        out.append(_headline(r).split(" ", 1)[1] + ".")
        if "meets_goal" in r.figures:
            out.append(f"Goal met: **{'yes' if r.figures['meets_goal'] else 'no'}**.")
        out.append("")
        out += [f"- {n}" for n in r.notes]
        if r.notes:
            out.append("")
        if r.limits:
            out += [f"What limits it: {r.limits}", ""]
    out.append(f"Reproduce: `{command}` (Python {sys.version.split()[0]}).")
    out.append("")
    return "\n".join(out)
