"""Upstream side of the resolver: clients of recursive nodes and the pool that picks between them.

``base`` holds the small interface every client implements (``Upstream``: ``resolve`` + ``close``) and the
result shape; ``rest`` is the Handle REST JSON client (aiohttp); the native Handle protocol client lives
in :mod:`gateway.upstream.native`; ``pool`` turns a list of URLs into clients with health tracking,
failover and hedging.
"""
