"""``ida demo``: the arguments, the run (start, tell the story, stop on time, Ctrl-C or a failure) and the final
check that nothing is left running."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from tools.errors import CliError
from tools.harness.demo.devices import DemoFleet
from tools.harness.demo.errors import DemoError
from tools.harness.demo.gatewayapi import GatewayApi
from tools.harness.demo.narration import Narrator
from tools.harness.demo.services import Services, leftover_processes
from tools.harness.demo.settings import NODE_LATENCY_MS, STOP_WATCHDOG_S
from tools.harness.demo.story import Story
from tools.support.tasks import TaskSet

__all__ = ["Demo", "add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seconds",
        type=float,
        default=None,
        metavar="S",
        help="stop after S seconds (default $DEMO_SECONDS, else run until Ctrl-C)",
    )
    p.add_argument(
        "--latency",
        type=float,
        default=NODE_LATENCY_MS,
        metavar="MS",
        help=f"latency the recursive node adds to each answer (default {NODE_LATENCY_MS:g} ms)",
    )
    p.add_argument("--keep", action="store_true", help="keep the working directory (logs, data) at the end")


def _seconds(args: argparse.Namespace) -> float | None:
    if args.seconds is not None:
        s: float = args.seconds
    else:
        raw = os.environ.get("DEMO_SECONDS", "").strip()
        if not raw:
            return None
        try:
            s = float(raw)
        except ValueError:
            raise CliError(f"DEMO_SECONDS must be a number of seconds, got {raw!r}") from None
    if not s > 0:
        raise CliError(f"the demo's duration must be more than 0 seconds, got {s:g}")
    return s


class Demo:
    """One run: the services, then the devices and the story; ``failure`` names what died."""

    def __init__(self, workdir: Path, seconds: float | None, narrator: Narrator, latency_ms: float) -> None:
        self.workdir = workdir
        self.seconds = seconds
        self.n = narrator
        self.say = narrator.say
        self.services = Services(workdir, latency_ms, narrator.say)
        self.fleet: DemoFleet | None = None
        self.gateway: GatewayApi | None = None
        self.stop_event = asyncio.Event()
        self.failure: str | None = None
        self.stopped_by: str | None = None

    def fail(self, why: str, details: str = "") -> None:
        """A component died: say so (with ``details``: the end of its log) and stop."""
        if self.failure is None:
            self.failure = why
        self.say(why + details)
        self.stop_event.set()

    async def watch_services(self) -> None:
        self.fail(*await self.services.watch())

    async def main(self) -> None:
        loop = asyncio.get_running_loop()

        def on_signal(name: str) -> None:
            if self.stopped_by is None:
                self.stopped_by = name
            self.stop_event.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig.name)
        tasks = TaskSet()
        try:
            self.services.start()  # blocking, bounded by START_TIMEOUT per component; a signal waits for it
            if self.stop_event.is_set():
                return
            tasks.spawn(self.watch_services())
            s = self.services
            self.gateway = GatewayApi(s.http_port)
            self.fleet = DemoFleet(
                self.workdir, self.say, self.fail, coap_port=s.coap_port, broker_port=s.broker_port
            )
            await self.fleet.start()
            tasks.spawn(self.fleet.status_loop())
            story = tasks.spawn(Story(self.fleet, self.gateway, self.say).tell())
            if self.seconds is not None:
                left: float | None = self.seconds - self.n.elapsed()
                self.say(f"running for {self.seconds:g} s in all (DEMO_SECONDS); Ctrl-C stops it earlier")
            else:
                left = None
                self.say("running until Ctrl-C")
            waiter = asyncio.ensure_future(self.stop_event.wait())
            done, _ = await asyncio.wait({waiter, story}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if story in done and not story.cancelled() and story.exception() is not None:
                raise story.exception()  # type: ignore[misc]
            if self.stopped_by:
                self.say(f"{self.stopped_by}: stopping")
            elif not self.stop_event.is_set():
                self.say(f"{self.seconds:g} s are up: stopping")
            if self.failure is None:
                self.say(await self.gateway.summary(final=True))
        finally:
            await tasks.cancel()
            self.say("stopping in reverse order: devices, gateway, recursive node, broker")
            # every step of the stop is bounded; should one still hang, say where (stderr) and exit, not hang
            faulthandler.dump_traceback_later(STOP_WATCHDOG_S, exit=True)
            if self.fleet is not None:
                await self.fleet.stop()
            self.services.stop()
            faulthandler.cancel_dump_traceback_later()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


def run(args: argparse.Namespace) -> int:
    seconds = _seconds(args)
    narrator = Narrator()
    # `kill -USR1 <pid>` prints where every thread of the demo is (stderr): for a demo that does not stop
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    workdir = Path(tempfile.mkdtemp(prefix="ida-demo-"))
    narrator.say(
        "ida demo: a recursive node, an MQTT broker, the gateway and three devices running the real "
        "firmware, all on this machine"
    )
    demo = Demo(workdir, seconds, narrator, args.latency)
    error: str | None = None
    try:
        asyncio.run(demo.main())
    except DemoError as e:
        error = str(e)
    except KeyboardInterrupt:  # before the signal handlers were in place
        narrator.say("interrupted")
    if error is None:
        error = demo.failure
    # nothing may be left running: no child of ours, nothing that names the working directory
    left = leftover_processes(workdir)
    for pid, cmd in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        narrator.say(f"straggler killed: pid {pid} ({cmd[:120]})")
    if not left:
        narrator.say("nothing left running: every process the demo started has exited")
    if error is not None:
        print(f"ida demo: {error}", file=sys.stderr, flush=True)
        narrator.say(f"demo failed; logs kept in {workdir}")
        return 1
    if args.keep:
        narrator.say(f"logs and data kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    narrator.say("demo finished")
    return 0
