# Heap of a booted device that has made (and had acknowledged) its first report, against the loopback CoAP gateway
# (heapfig.py measures: gc.mem_alloc() after gc.collect(), allocation counts with the collector off); the loop
# allocates nothing per idle iteration, over CoAP and over MQTT, and the steady state does not grow report after
# report; plus the bytes of one resolve request. Figures depend on the interpreter: on the 64-bit unix build GC
# blocks are 32 bytes and pointers 8, and code imported from source is bytecode in the heap; the 32-bit build with
# the firmware frozen in measures as an ESP32 would (tools/harness/bench/heap32.py: whole device processes).
import gc
import select
import socket
from mptest import eq, note, ok
import fwfakes
import heapfig

TARGET = 32 * 1024


def test_heap_after_boot_and_first_report():
    f = heapfig.figures()
    note(
        "heap after boot + first report: application state %(state_bytes)d B, code the device keeps %(code_bytes)d"
        " B, process total %(heap_bytes)d B; allocated per idle loop %(idle_step)d B, per report"
        " %(report_cycle)d B" % f
    )
    ok(f["state_bytes"] <= TARGET, "application state over %d B: %d" % (TARGET, f["state_bytes"]))
    eq(f["idle_step"], 0, "bytes allocated per idle loop iteration")


def test_steady_state_does_not_grow():
    # ten more reports made, sent, acknowledged and removed: the heap the device holds is what it was (the in-test
    # gateway's own list of the reports it got is emptied each time: it is not the device's)
    r = fwfakes.Rig()

    def reports(n):
        for _ in range(n):
            heapfig.report_cycle(r)
            r.srv.reports = []

    try:
        a = heapfig.booted(r)
        reports(10)  # whatever the first reports made lazily (nothing expected) is not counted
        before = heapfig.alloc()
        reports(10)
        after = heapfig.alloc()
        eq((a.reporter.acked, a.queue.count), (21, 0))
        eq(after - before, 0, "heap held after 10 more reports")
        eq(heapfig.idle_step(r), 0, "bytes allocated per idle loop iteration after them")
    finally:
        fwfakes.log_reset()
        r.close()


def _broker_socket():
    # MicroPython has no getsockname(): take the first free port of a range
    for port in range(47400, 47500):
        s = socket.socket()
        try:
            s.bind(socket.getaddrinfo("127.0.0.1", port)[0][-1])
        except OSError:
            s.close()
            continue
        s.listen(1)
        return s, port
    raise OSError("no free port")


def test_mqtt_idle_loop_allocates_nothing():
    # the device protocol over MQTT on a real loopback TCP connection to a broker played by the test: once the
    # transport is up (CONNACK, status published, subscriptions acknowledged), idle polls allocate nothing
    from carrier import identity, mqttdevice

    srv, port = _broker_socket()
    conn = None
    try:
        i = identity.parse(
            {"id": fwfakes.ID, "transport": "mqtt", "mqtt": "mqtt://127.0.0.1:%d" % port, "key": fwfakes.KEY}
        )
        poller = select.poll()
        t = mqttdevice.Transport(i, poller)
        t.start(0)
        t.poll(0)
        conn, _ = srv.accept()
        conn.setblocking(False)
        now = 1
        answered = False
        while not t.ready() and now < 200:
            t.poll(now)
            try:
                got = conn.recv(512)
            except OSError:
                got = b""
            if got and not answered:
                conn.send(b"\x20\x02\x00\x00")  # CONNACK: accepted
                answered = True
            now += 1
        ok(t.ready(), "transport up")
        for _ in range(20):  # the status PUBLISH and the SUBSCRIBE go out; answer the SUBSCRIBE
            t.poll(now)
            now += 1
        try:
            conn.recv(512)
        except OSError:
            pass
        conn.send(b"\x90\x05\x00\x01\x01\x01\x01")  # SUBACK (pid 1): QoS 1 x3
        for _ in range(20):
            t.poll(now)
            now += 1

        def step():
            t.poll(now)

        n = heapfig.allocated(step, 200)
        eq(n, 0, "bytes allocated per idle MQTT poll")
        ok(t.ready(), "still up")
        note("MQTT transport: %d B allocated per idle poll" % n)
    finally:
        if conn is not None:
            conn.close()
        srv.close()
        gc.collect()


def test_resolve_request_bytes():
    from carrier import coapmsg

    buf = bytearray(64)
    n = coapmsg.resolve_request(buf, 1, 2, b"88.123.99/PUMP-0001-ABCD")
    note("CoAP resolve request for a 24-character identifier: %d bytes (target <= 48)" % n)
    ok(n <= 48)
