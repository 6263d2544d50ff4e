"""What the demo reads from the gateway over HTTP: ``/healthz`` while it starts, ``/api/status``,
``/api/devices`` and ``/metrics`` for the summaries it tells. Blocking ``urllib`` calls, run in a worker thread
from the event loop (:meth:`GatewayApi.json`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.request
from typing import Any

from tools.harness.demo.errors import DemoError

__all__ = ["GatewayApi", "http_get"]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(HTTP status, body); an error status is an answer too."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


def mqtt_ready(http_port: int) -> bool:
    """Whether ``/healthz`` says the MQTT front end has subscribed on the broker."""
    with contextlib.suppress(OSError, ValueError):
        _, body = http_get(f"http://127.0.0.1:{http_port}/healthz", timeout=2)
        return bool(json.loads(body).get("components", {}).get("mqtt") == "ready")
    return False


class GatewayApi:
    def __init__(self, http_port: int) -> None:
        self.http_port = http_port

    async def json(self, path: str) -> Any:
        code, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{self.http_port}{path}")
        if code != 200:
            raise DemoError(f"gateway answered {code} to GET {path}")
        return json.loads(body)

    async def metrics(self) -> dict[str, float]:
        """``/metrics`` as numbers; labelled series are summed per name-with-labels."""
        _, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{self.http_port}/metrics")
        out: dict[str, float] = {}
        for line in body.decode("utf-8", "replace").splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = out.get(name, 0.0) + float(value) if "{" in name else float(value)
        return out

    async def summary(self, final: bool = False) -> str:
        """One line: reports stored, devices online, cache lookups (hits, misses, ratio), upstream, outbox."""
        try:
            st = await self.json("/api/status")
            m = await self.metrics()
        except (OSError, ValueError, DemoError) as e:
            return f"gateway status not available: {e}"
        # cache hits and misses from /metrics: they include the CoAP fast path's hits, which the status page's
        # list of recent resolutions (resolutions by source) does not see
        reports = int(m.get("ida_reports_total", 0))
        hits, misses = int(m.get("ida_cache_hits_total", 0)), int(m.get("ida_cache_misses_total", 0))
        ratio = f" (hit ratio {100 * hits / (hits + misses):.0f} %)" if hits + misses else ""
        cache = st.get("cache", {})
        ups = [u for u in st.get("upstream", []) if u.get("requests")]
        lat = ""
        if ups and ups[0].get("latency_mean_ms") is not None:
            lat = f", upstream {ups[0]['requests']} requests, {ups[0]['latency_mean_ms']:.1f} ms mean"
        depth = (st.get("outbox") or {}).get("depth")
        return (
            f"gateway{' (final)' if final else ''}: {reports} reports stored, {st.get('devices_online', 0)} of "
            f"{st.get('devices_total', 0)} devices online, {hits + misses} cache lookups: {hits} hits, "
            f"{misses} misses{ratio}, {cache.get('entries', 0)} cache entries{lat}"
            + (f", outbox {depth}" if depth is not None else "")
        )

    async def reports_of(self, ident: str, name: str) -> str | None:
        """``gateway confirms: N reports stored from NAME, the last one seq S of boot B`` (None: not known)."""
        with contextlib.suppress(OSError, ValueError, DemoError):
            rows = (await self.json("/api/devices")).get("devices", [])
            row = next((r for r in rows if r.get("id") == ident), None)
            if row:
                last = row.get("last_report") or {}
                return (
                    f"gateway confirms: {row.get('reports_total')} reports stored from {name}, the last one "
                    f"seq {last.get('seq')} of boot {last.get('boot')}"
                )
        return None
