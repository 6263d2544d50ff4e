"""Front ends: how devices, phones and operators reach the resolver and the registry.

common.py   shared pieces: the registry interface they use, error -> code mapping, filters, in-flight count
coap.py     CoAP (aiocoap): /r/<identifier>, /d/<id>/rpt, /d/<id>/cfg, /.well-known/core
http.py     HTTP (aiohttp): Handle REST /api/handles, /api/devices, /healthz, /metrics
mqtt.py     MQTT: the ida/v1/d/<dev>/ topic tree, put together from
  mqtt_reports.py   reports, config acks, status, desired config (on the paho link, gateway/paholink.py)
  mqtt_resolve.py   the resolve link: requests answered from pre-encoded answers, the rest handed on
  mqtt_session.py   its asyncio MQTT v5 session with the broker (proto/mqtt framing)
  mqtt_table.py     its table of pre-encoded answers (kept equal to the resolver by hotpath.CacheGuard)
  mqtt_requests.py  resolve requests that need the resolver: decode, resolve, answer
  mqtt_answers.py   what they share: answer fields and bytes, counting
"""
