"""The edge gateway: asyncio front ends in front of a DNS-grade resolver, a device registry and a durable outbox.

One resolution, in the order it travels (the wire formats are ``proto/``'s)::

    frontends/   how devices, phones and operators reach it: CoAP (coap*.py), MQTT (mqtt*.py), HTTP (http.py);
                 the map of its modules is frontends/__init__.py
    resolution.py  what front ends see of the resolver: Answer, Resolving, the AnswerCache view, the status hook
    resolver.py    zone > cache > single-flight upstream > stale (settings: resolver_config.py)
    zone.py        identifiers provisioned at the factory, answered first
    cache.py       the answer cache's rules (cache_store.py: its CBOR form and SQLite file); shared_cache.py:
                   the Redis tier several gateways share
    upstream/      the recursive nodes: pool.py (health, failover, hedging), native.py (Handle native client),
                   rest.py (Handle REST client), admin.py / admin_rest.py (registration), urls.py, stats.py

One report: ``frontends/coap_reports.py`` or ``frontends/mqtt_reports.py`` -> ``registry.py`` (devices, configs;
deviceconfig.py, deviceview.py) -> ``ingest.py`` (the group-commit queue, overload) -> ``reportstore.py`` (the
tables) -> ``outbox.py`` (northbound, at least once, to the sinks of ``sinks.py``).

Also: service.py (assembles it all for ``ida gateway``), config.py (the TOML file), status.py (the status page),
metrics.py, ratelimit.py, errors.py, logfmt.py, aio.py (asyncio steps the services share), broker.py + paholink.py
(the MQTT broker connection of paho).
"""

__version__ = "0.1.0"
