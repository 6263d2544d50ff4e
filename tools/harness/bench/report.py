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


def _headline(r: ScenarioResult) -> str:
    f = r.figures
    if r.key == "P1":
        return (
            f"P1 gateway {_cell(f.get('rps'))} req/s, p50 {_cell(f.get('p50_ms'))} ms, p99 {_cell(f.get('p99_ms'))} ms"
            f" | x libcoap {_cell(f.get('ratio_libcoap'))}, x aiocoap {_cell(f.get('ratio_aiocoap'))}, "
            f"x raw UDP {_cell(f.get('ratio_raw_udp'))}, x raw UDP batched {_cell(f.get('ratio_raw_udp_drain'))}"
        )
    if r.key == "P3":
        return (
            f"P3 upstream requests for {f.get('concurrent_misses')} concurrent misses: {f.get('upstream_requests')}"
            f" | miss overhead p50 {_cell(f.get('miss_overhead_p50_ms'))} ms"
        )
    if r.key == "P2":
        return (
            f"P2 gateway {_cell(f.get('rps'))} req/s over MQTT, p50 {_cell(f.get('p50_ms'))} ms, p99 "
            f"{_cell(f.get('p99_ms'))} ms | x bare MQTT responder {_cell(f.get('ratio_mqtt_raw'))}"
        )
    if r.key == "P4":
        return (
            f"P4 heap {_cell(f.get('heap_bytes'))} B, .mpy {_cell(f.get('mpy_bytes'))} B, resolve request "
            f"{_cell(f.get('request_bytes'))} B"
        )
    if r.key == "P5":
        return (
            f"P5 gateway CPU {_cell(f.get('gateway_cpu'))} of a core for {_cell(f.get('reports_per_s'))} reports/s "
            f"({_cell(f.get('reports_acked'))}/{_cell(f.get('reports_sent'))} acknowledged)"
        )
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
