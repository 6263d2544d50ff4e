"""An aiohttp application served on loopback for a test (a Handle REST upstream, a webhook consumer):
:func:`serve` for an application as it is, :class:`LoopbackApp` for a test double that is one."""

from __future__ import annotations

from typing import Self

from aiohttp import web

__all__ = ["LoopbackApp", "serve"]


async def serve(app: web.Application, host: str = "127.0.0.1") -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``host`` at a free port: (runner, port); ``await runner.cleanup()`` stops it."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, 0).start()
    return runner, int(runner.addresses[0][1])


class LoopbackApp:
    """A test double that is an HTTP server on a free loopback port: a subclass adds its handlers in
    :meth:`routes` and names the path of its :attr:`url` in :attr:`path`; ``await x.start()`` serves it (and
    returns it), ``await x.stop()`` stops it."""

    path = ""

    def __init__(self) -> None:
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def routes(self, router: web.UrlDispatcher) -> None:
        raise NotImplementedError

    async def start(self) -> Self:
        app = web.Application()
        self.routes(app.router)
        self._runner, self.port = await serve(app)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
