"""The aiocoap resource tree the CoAP front end serves (docs/protocol.md "CoAP"):

    /.well-known/core            link format (aiocoap's WKCResource)
    /r/<identifier path>         :class:`ResolveResource` -> ``CoapFrontEnd.resolve``
    /d/<identifier path>/<leaf>  :class:`DeviceResource` -> ``CoapFrontEnd.device``; GET .../cfg is observable

Both resources are ``PathCapable``: aiocoap's ``Site`` hands them the rest of the path as ``uri_path``. The
resources route only; what a request means is the front end's (gateway/frontends/coap.py).
"""

from __future__ import annotations

from typing import Any, Protocol

import aiocoap
from aiocoap import resource
from aiocoap.blockwise import Block2Cache
from aiocoap.numbers.codes import Code
from aiocoap.util.linkformat import Link, LinkFormat

from proto import identifier

__all__ = ["ResolveResource", "DeviceResource", "build_site", "REPORT", "CONFIG"]

REPORT = "rpt"
CONFIG = "cfg"


class Answering(Protocol):
    """The front end, as the resources see it."""

    async def resolve(
        self, request: aiocoap.Message, path: tuple[str, ...] | None = None
    ) -> aiocoap.Message: ...

    async def device(self, request: aiocoap.Message) -> aiocoap.Message: ...


class ResolveResource(resource.Resource, resource.PathCapable):
    """``/r/<identifier path>``: receives the identifier's segments as ``uri_path``.

    Block-wise answers (RFC 7959) are its own, from a ``Block2Cache`` of its own (:attr:`blocks`): aiocoap's
    assembly is asked for requests with Block1 only (a resolve has no body), so a plain GET -- every miss of the
    fast path, which calls :meth:`answer` directly -- costs the resolution and no block-wise bookkeeping."""

    def __init__(self, frontend: Answering) -> None:
        super().__init__()
        self._fe = frontend
        self.blocks = Block2Cache()

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        return request.opt.block1 is not None

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return await self.answer(request)

    async def answer(self, request: aiocoap.Message, path: tuple[str, ...] | None = None) -> aiocoap.Message:
        """The resolution; an answer larger than the peer's maximum payload, or than the block it asked for, is cut
        into blocks and kept for the later ones. ``path`` is the identifier's segments of a request that still
        has the ``r`` in front (a fast-path miss: aiocoap's site did not strip it)."""
        if request.opt.block2 is not None:
            return await self.blocks.extract_or_insert(request, lambda: self._fe.resolve(request, path))
        response = await self._fe.resolve(request, path)
        if len(response.payload) <= request.remote.maximum_payload_size:
            return response
        if path is not None:  # kept under the key of the later blocks, which come through aiocoap's site
            request.opt.uri_path = path

        async def rendered() -> aiocoap.Message:
            return response

        return await self.blocks.extract_or_insert(request, rendered)

    def get_resources_as_linkheader(self) -> LinkFormat:
        return LinkFormat([Link("", [("rt", "ida.resolve"), ("ct", "60 50")])])


class DeviceResource(resource.ObservableResource, resource.PathCapable):
    """``/d/<identifier path>/<rpt|cfg>``; GET .../cfg is observable (notified on a desired-config change)."""

    def __init__(self, frontend: Answering) -> None:
        super().__init__()
        self._fe = frontend
        self._watchers: dict[str, set[Any]] = {}

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return await self._fe.device(request)

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return await self._fe.device(request)

    async def add_observation(self, request: aiocoap.Message, serverobservation: Any) -> None:
        path = request.opt.uri_path
        if request.code != Code.GET or len(path) < 2 or path[-1] != CONFIG:
            _decline(serverobservation)
            return
        try:
            ident = identifier.normalise("/".join(path[:-1]))
        except identifier.IdentifierError:
            _decline(serverobservation)
            return
        watchers = self._watchers.setdefault(ident, set())
        watchers.add(serverobservation)

        def cancel() -> None:
            watchers.discard(serverobservation)
            if not watchers and self._watchers.get(ident) is watchers:
                del self._watchers[ident]

        serverobservation.accept(cancel)

    def observers(self, ident: str) -> int:
        return len(self._watchers.get(ident, ()))

    def notify(self, ident: str) -> None:
        """Re-render GET .../cfg for everyone observing ``ident`` (called when its desired config changed)."""
        try:
            ident = identifier.normalise(ident)
        except identifier.IdentifierError:
            return
        for obs in list(self._watchers.get(ident, ())):
            obs.trigger()

    def get_resources_as_linkheader(self) -> LinkFormat:
        return LinkFormat([Link("", [("rt", "ida.device"), ("ct", "60")])])


def _decline(serverobservation: Any) -> None:
    """Serve an Observe request as a plain one. aiocoap 0.4.17 calls the cancellation callback of every
    observation it offered, accepted or not: one left unaccepted raised AttributeError after the answer went
    out, logged as "Task exception was never retrieved" (fuzz finding). Accept with nothing to cancel, then
    deregister at once: the answer goes out without Observe and ends the observation."""
    serverobservation.accept(lambda: None)
    serverobservation.deregister()


def build_site(frontend: Answering) -> tuple[resource.Site, ResolveResource, DeviceResource]:
    """The site with its three resources; the ``/r`` and ``/d`` resources too."""
    site = resource.Site()
    site.add_resource(
        (".well-known", "core"), resource.WKCResource(site.get_resources_as_linkheader, impl_info=None)
    )
    resolve = ResolveResource(frontend)
    site.add_resource(("r",), resolve)
    devices = DeviceResource(frontend)
    site.add_resource(("d",), devices)
    return site, resolve, devices
