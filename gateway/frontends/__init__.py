"""Front ends: how devices, phones and operators reach the resolver and the registry.

common.py   shared pieces: the registry interface they use, error -> code mapping, filters, in-flight count
hotpath.py  what the two fast paths share: keeping a pre-encoded answer equal to the resolver's (CacheGuard)
coap.py     CoAP (aiocoap): /r/<identifier>, /d/<id>/rpt, /d/<id>/cfg, /.well-known/core
coap_site.py         the aiocoap resource tree (routes, the observable device resource)
coap_socket.py       the CoAP UDP socket: bind, read per wake-up, send with packet info, back-pressure
coap_fast.py         the fast path: cached resolutions answered from pre-encoded bytes (proto.coap.Server)
coap_table.py        its table: which request bytes key it (classify), the pre-encoded answer of an entry
coap_reports.py      reports from the socket straight to the registry's group commit, answered after it
coap_aiocoap.py      the one place datagrams meet aiocoap (its transport ABCs), and the contract relied on
coap_security.py     OSCORE: the site wrappers, modes, metrics
coap_credentials.py  OSCORE: keystore lookups, device contexts, the gateway's sequence numbers
http.py     HTTP (aiohttp): Handle REST /api/handles, /api/devices, /healthz, /metrics
mqtt.py     MQTT: the ida/v1/d/<dev>/ topic tree, put together from
  mqtt_link.py      the device link: requests (answered from pre-encoded answers, the rest handed on) and reports
  mqtt_session.py   its asyncio MQTT v5 session with the broker (proto/mqtt framing)
  mqtt_window.py    the session's QoS 1 window: packet ids, the broker's Receive Maximum, messages waiting
  mqtt_table.py     its table of pre-encoded answers (kept equal to the resolver by hotpath.CacheGuard)
  mqtt_requests.py  resolve requests that need the resolver: decode, resolve, answer
  mqtt_reports.py   reports: decode, check, commit, report_ack after the commit (on either link)
  mqtt_devices.py   config acks, status, desired config (on the paho link, gateway/paholink.py)
  mqtt_answers.py   what they share: answer fields and bytes, counting
"""
