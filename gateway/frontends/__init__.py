"""Front ends: how devices, phones and operators reach the resolver and the registry.

common.py   shared pieces: the registry interface they use, error -> code mapping, filters, in-flight count
coap.py     CoAP (aiocoap): /r/<identifier>, /d/<id>/rpt, /d/<id>/cfg, /.well-known/core
http.py     HTTP (aiohttp): Handle REST /api/handles, /api/devices, /healthz, /metrics
mqtt.py     MQTT (paho-mqtt): the ida/v1/d/<dev>/ topic tree
"""
