"""Helpers of the tests (no tests here).

* ``mpcollect`` -- the pytest plugin that runs tests/device under ``micropython``; ``mp`` -- run MicroPython
  code from a CPython test.
* ``fwdevice`` -- a firmware process with its console (``DeviceProc``), a CoAP gateway stub, ROMFS images;
  ``devicerun`` -- the same started as ``ida device run``.
* ``brokers`` -- a real Mosquitto and a paho device; ``secure_broker`` -- one configured by ``ida broker``.
* ``faultkit`` -- real redis-server, gateway and node processes, SQLite checks, a full disk; ``fleet`` -- a
  webhook consumer and a fleet of light MQTT devices.
* ``gwhelpers`` and ``upstream_fakes`` -- fake resolvers, upstreams, clocks and records for the gateway tests;
  ``webapp`` -- an aiohttp app on a free port; ``coapraw`` -- a raw CoAP client (hand-made datagrams) for the
  CoAP front-end tests.
* ``flashutil`` -- builds and esptool runs for the flash tests; ``fuzzing`` -- hypothesis strategies;
  ``vecload`` -- the shared wire vectors.
"""
