"""Upstream side of the resolver: clients of recursive nodes and the pool that picks between them.

``base`` holds the small interface every client implements (``Upstream``: ``resolve`` + ``close``), the
result shape, and :func:`~gateway.upstream.base.outcome_of` -- which outcomes count against a node's health
(node failures only; "not responsible" and referrals are answers about the name); ``native`` is the Handle
native-protocol client (asyncio over :mod:`proto.handle`) and turns a decoded answer into a result or a
``gateway.errors`` type; ``rest`` is the Handle REST JSON client (aiohttp); ``pool`` turns a list of URLs
into clients with health tracking, failover and hedging; ``urls`` parses upstream URLs and makes the client
for each; ``stats`` holds the per-node counters and latency histogram. ``admin`` is the administration client of
the native protocol (create, delete, add, remove, modify: session, challenge, HS_MAC) and ``admin_rest`` the same
over the REST API; they live here, next to the resolution clients of the same nodes, and are used by ``ida handle``
and the factory's registration queue (``tools/commands/flash``).
"""
