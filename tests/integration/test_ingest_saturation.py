"""Report ingest past what the gateway commits (issue 14), with a real ``ida gateway`` process on loopback:

* overload: more offered than the registry may hold waiting (a tiny ``[registry] queue_max``), so devices get
  5.03 + Max-Age; afterwards every acknowledged report is stored exactly once and the devices' queues drain;
* SIGKILL under saturation: every report the gateway acknowledged before the kill is in its registry after the
  restart.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.support.faultkit import GatewayProc
from tools.harness.bench.loadgen import LoadGenerator, LoadSpec
from tools.harness.bench.p6 import stored_reports
from tools.harness.sim.config import SimConfig
from tools.harness.sim.light import LightFleet

UPSTREAM = "hdl://127.0.0.1:9"  # nothing listens: reports need no upstream


def _config(**registry: int) -> dict[str, dict[str, object]]:
    return {
        "upstream": {"urls": [UPSTREAM]},
        "limits": {"device_rate": 0.0},  # these devices report far faster than real ones
        "registry": dict(registry),
        "log": {"level": "info"},  # the test reads the listening lines
    }


async def test_overload_answers_come_back_later_and_loses_nothing(tmp_path: Path) -> None:
    gw = GatewayProc(tmp_path / "gw", _config(queue_max=4))
    gw.start()
    try:
        cfg = SimConfig(
            devices=100,
            gateway=f"coap://127.0.0.1:{gw.coap_port}",
            interval=0.1,
            mode="light",
            stem="OVL",
            data_dir=tmp_path / "sim",
            coap_sockets=8,
            queue_cap=64,
            summary_every=0,
            seed=14,
        )
        fleet = LightFleet(cfg)
        await fleet.start()
        await asyncio.sleep(3.0)  # ~3,000 reports offered at ~1,000/s against a queue of 4
        result = await fleet.stop(drain=60.0)  # no new reports; queued ones go on until acknowledged
    finally:
        gw.terminate()
    c = result.counters
    print(
        f"\nFIGURES overload made={c.made} acked={c.acked} busy={c.busy} retried={c.retried} pending={result.pending}"
    )
    assert c.busy > 0, "the gateway never said 'come back later': the test did not overload it"
    assert (c.rejected, c.dropped, c.timeouts) == (0, 0, 0)
    assert result.pending == 0 and c.acked == c.made  # every device's queue drained
    stored, twice = stored_reports(gw.registry)
    boot = fleet.boot
    want = {cfg.identifier(n): set(range(1, d.seq + 1)) for n, d in enumerate(fleet.devices)}
    assert sum(len(s) for s in want.values()) == c.made
    got = {dev: seqs for (dev, b), seqs in stored.items() if b == boot}
    assert got == want and twice == 0  # every acknowledged report stored, none twice, nothing else


async def test_sigkill_under_saturation_keeps_every_acknowledged_report(tmp_path: Path) -> None:
    gw = GatewayProc(tmp_path / "gw", _config())
    gw.start()
    spec = LoadSpec(
        "127.0.0.1",
        gw.coap_port,
        (),
        concurrency=256,
        duration=4.0,
        reports=256,
        boot=7,
        ack_timeout=0.5,
        max_retransmit=1,
    )
    loop = asyncio.get_running_loop()
    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(loop.time())
        gw.kill9()

    loop.call_later(1.5, kill)  # the load is at full speed by then
    try:
        result = await LoadGenerator(spec).run()
    finally:
        if not killed_at:
            gw.kill9()
    acked = {dev: last for dev, last in result.acked.items() if last}
    total = sum(acked.values())
    assert killed_at and total > 500, f"only {total} reports acknowledged before the kill"
    gw.start()  # the same data dir: the registry after the restart
    try:
        stored, twice = stored_reports(gw.registry)
    finally:
        gw.terminate()
    missing = [
        (dev, seq) for dev, last in acked.items() for seq in range(1, last + 1) if seq not in stored[(dev, 7)]
    ]
    print(f"\nFIGURES sigkill acknowledged={total} missing={len(missing)} stored_twice={twice}")
    assert not missing and twice == 0
