# ruff: noqa: B023 -- the closures below run inside the iteration that made them
# A device for tests/integration/test_mqtt_security.py, run by the real micropython (MICROPYPATH=firmware):
#   micropython tests/device/mqtt_tls_device.py <identity JSON> <CA file or -> <action> [<action>...]
# It drives carrier.mqttdevice.Transport (TLS when the identity's mqtt address is mqtts://) and prints one JSON line
# per action, so the test reads results as they come:
#   up                 wait for CONNACK (or the first refusal)   -> {"a": "up", "ok", "ms", "reason", "refused",
#                                                                   "heap", "peak"} (heap: in use after connect)
#   resolve[=ID]       resolve ID (default: own id)              -> {"a": "resolve", "code", "values"}
#   report[=CLAIM]     report claiming id CLAIM (default own)    -> {"a": "report", "code"}
#   pub=TOPIC          QoS 1 PUBLISH of b"spoof" to any topic     -> {"a": "pub", "pid"}
#   sub=TOPIC          SUBSCRIBE to any topic                     -> {"a": "sub", "ok"}
#   wait=MS            keep polling; print what arrived           -> {"a": "wait", "got": [[topic, payload hex]...]}
import gc
import json
import sys
import time

gc.collect()
HEAP0 = gc.mem_alloc()

from carrier import cbor, identity, mqtt, mqttdevice  # noqa: E402

WAIT_MS = 15000


def out(d):
    print(json.dumps(d))


def run(t, done, ms=WAIT_MS):
    t0 = time.ticks_ms()
    while not done() and time.ticks_diff(time.ticks_ms(), t0) < ms:
        t.poll(time.ticks_ms())
        time.sleep_ms(2)
    return done()


def main():
    ident = identity.parse(json.loads(sys.argv[1]))
    if sys.argv[2] != "-":
        ident.ca_path = sys.argv[2]
    t = mqttdevice.Transport(ident, keepalive=30)
    c = t.client
    got = []
    inner = c.on_msg

    def on_msg(topic, payload, retained):
        got.append([bytes(topic).decode(), bytes(payload).hex()])
        inner(topic, payload, retained)

    c.on_msg = on_msg
    subacks = []
    c.on_suback = lambda pid, ok: subacks.append(ok)
    t0 = time.ticks_ms()
    t.start(t0)
    seq = 0
    for action in sys.argv[3:]:
        name, _, arg = action.partition("=")
        res = []
        if name == "up":
            peak = [0]

            def connected():
                peak[0] = max(peak[0], gc.mem_alloc())  # sampled between polls: handshake state included
                return c.state == mqtt.UP or (t.session.attempts and c.state == mqtt.IDLE and c.reason)

            run(t, connected)
            ms = time.ticks_diff(time.ticks_ms(), t0)
            run(t, lambda: len(subacks), 3000)  # online status out, subscriptions acknowledged
            gc.collect()
            out(
                {
                    "a": "up",
                    "ok": c.state == mqtt.UP,
                    "ms": ms,
                    "reason": c.reason,
                    "refused": c.refused,
                    "heap": gc.mem_alloc() - HEAP0,
                    "peak": peak[0] - HEAP0,
                }
            )
        elif name == "resolve":
            t.resolve(arg or ident.id, res.append)
            run(t, lambda: res)
            r = res[0] if res else (-9, None, None, 0, "timeout")
            out({"a": "resolve", "code": r[0], "values": r[2], "msg": r[4]})
        elif name == "report":
            seq += 1
            pl = cbor.dumps(
                {2: arg or ident.id, 10: 1, 11: seq, 12: 5, 13: 100000, 14: 0, 15: 0, 16: "unix", 17: "test"}
            )
            ok = t.report(pl, 1, seq, lambda code, b, s: res.append(code))
            run(t, lambda: res or not ok)
            out({"a": "report", "code": res[0] if res else -9})
        elif name == "pub":
            pid = c.publish(arg.encode(), b"spoof", 1, False, time.ticks_ms())
            run(t, lambda: not c.inflight(), 3000)
            out({"a": "pub", "pid": pid, "acked": not c.inflight()})
        elif name == "sub":
            n = len(subacks)
            c.subscribe([(arg.encode(), 1)], time.ticks_ms())
            run(t, lambda: len(subacks) > n, 3000)
            out({"a": "sub", "ok": subacks[-1] if len(subacks) > n else None})
        elif name == "wait":
            n = len(got)
            run(t, lambda: False, int(arg))
            out({"a": "wait", "got": got[n:], "state": c.state})
    t.stop()


main()
