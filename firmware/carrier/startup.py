# The boot sequence of app.App (docs/firmware.md#boot-and-robustness): board, boot counter, crash streak and
# safe mode, console, identity (none -> console-only provisioning mode), config, queue, reporter, network and
# the transport the identity names. Only boot runs this module: App.boot() drops it again afterwards, with
# identity.py, idsyntax.py, config.py and hal/boardfile.py, so a device that runs holds none of their code
# (carrier.unload).
import gc
import struct
import select

from carrier import VERSION, config, identity, log
from carrier.app import SAFE_AFTER
from carrier.console import Console
from carrier.queue import Queue
from carrier.reporter import Reporter

def boot(app):
    h = app.hal
    wdt_ms, interval, fault = app.args
    now = h.ticks()
    app._last = now
    b = h.kv_get("boot")  # the boot counter
    app.boot_n = n = (struct.unpack("<I", b)[0] if b and len(b) == 4 else 0) + 1
    h.kv_set("boot", struct.pack("<I", n))
    app.streak = app._streak(1)
    app.safe = app.streak > SAFE_AFTER or h.button()
    app.console = c = Console(app, h.con_write, h.con_read, h.board.console != "stdio")
    log.sink = c.log_line
    try:
        app.ident = i = identity.load(h)
    except identity.IdentityError as e:
        app.ident_error = str(e)
        i = None
    app.cfg = cfg = config.load(h, interval or 60)
    app.queue = q = Queue(h.root + "q.dat")
    log.i("app", "boot=%d fw=%s board=%s safe=%d streak=%d queue=%d dropped=%d corrupt=%d" % (
        app.boot_n, VERSION, h.board.name, app.safe, app.streak, q.count, q.dropped, q.corrupt))
    if cfg.error:
        log.w("cfg", cfg.error)
    if h.con is not None:
        app.poller.register(h.con, select.POLLIN)
        app._con_reg = True
    h.wdt_start(wdt_ms)
    if fault == "hang":  # test hook: a stuck loop, which the watchdog must end
        while True:
            h.sleep_ms(100)
    if i is None:
        log.w("app", "not provisioned (%s): console only; use: provision <id> <url>" % (
            app.ident_error or "no identity.json"))
        return
    log.i("app", "id=%s transport=%s key=%s" % (i.id, i.transport, identity.fingerprint(i.key)))
    if app.safe:
        log.w("app", "safe mode: %d quick crashes in a row (or button held): console only, no network"
              % (app.streak - 1))
        return
    app.reporter = r = Reporter(h, i.id, q, app.boot_n, cfg.interval, h.board.name, VERSION)
    r.start(now)
    cfg.on_change = app._cfg_changed
    if fault == "boot":
        raise RuntimeError("injected boot fault")
    h.net_set(True, i.wifi)
    # boot's garbage (JSON of the files, log lines, grown tables) goes before the transport takes its buffers
    # (the largest the device keeps): they then sit low in the heap, beside the rest, and the free heap above
    # them stays in one piece for the datagrams, the largest allocations the device makes while it runs
    gc.collect()
    # imported here: a device loads only the transport it uses
    if i.transport == "mqtt":
        from carrier import mqttdevice
        t = mqttdevice.Transport(i, app.poller)
    elif i.secure:  # OSCORE-protected CoAP (docs/security.md)
        from carrier import oscore
        t = oscore.Client(i, app.poller, store=h)
    else:
        from carrier import coap
        t = coap.Client(i, app.poller)
    t.on_config = app._on_config
    app.transport = t
