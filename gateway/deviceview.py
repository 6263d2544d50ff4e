"""JSON-ready views of the registry's rows: a device (its row, the newest report, the desired config's state)
and a device's recent reports. Stored report fields are read in both layouts (``gateway/reportstore.py``): CBOR
(``devicemsg.Report.raw``) and the JSON text of files written before it."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from proto import devicemsg


def stored_fields(value: str | bytes) -> dict[str, Any]:
    """A stored report's fields by name, without ``id`` (CBOR of this layout, JSON text of layout 0)."""
    fields = json.loads(value) if isinstance(value, str) else devicemsg.stored_fields(value)
    fields.pop("id", None)
    return dict(fields)


def recent(c: sqlite3.Connection, ident: str, limit: int) -> list[dict[str, Any]]:
    """A device's newest ``limit`` reports, newest first: fields + boot, seq, received, transport (+ peer)."""
    rows = c.execute(
        "SELECT boot, seq, received, transport, peer, fields FROM reports WHERE device = ?"
        " ORDER BY boot DESC, seq DESC LIMIT ?",
        (ident, limit),
    ).fetchall()
    out = []
    for boot, seq, received, transport, peer, fields in rows:
        d = stored_fields(fields)
        d.update(boot=boot, seq=seq, received=received, transport=transport)
        if peer is not None:
            d["peer"] = peer
        out.append(d)
    return out


def last_report(
    received: float | None, transport: str | None, fields: str | bytes | None
) -> dict[str, Any] | None:
    """The ``last_report`` of a device view from its newest ``reports`` row (None: it has none)."""
    if fields is None:
        return None
    d = stored_fields(fields)
    d.update(received=None if received is None else round(received, 3), transport=transport)
    return d


# the newest report of the device `d` (columns r.received, r.transport, r.fields)
NEWEST_REPORT_JOIN = (
    " LEFT JOIN reports r ON r.device = d.id AND (r.boot, r.seq) ="
    " (SELECT boot, seq FROM reports WHERE device = d.id ORDER BY boot DESC, seq DESC LIMIT 1)"
)


_COLUMNS = (
    "d.id, d.board, d.fw, d.transport, d.peer, d.online, d.status_changed, d.first_seen, d.last_seen,"
    " r.received, r.transport, r.fields, d.reports, d.duplicates, d.cfgver, d.cfg, d.cfg_set, d.ack_cfgver,"
    " d.ack_code, d.ack_msg, d.ack_time"
)
DEVICE_SELECT = f"SELECT {_COLUMNS} FROM devices d{NEWEST_REPORT_JOIN}"


def device_dict(r: tuple[Any, ...]) -> dict[str, Any]:
    """A row of ``DEVICE_SELECT`` as the device view (``Registry.devices()``, ``Registry.device()``)."""
    (
        ident,
        board,
        fw,
        transport,
        peer,
        online,
        status_changed,
        first_seen,
        last_seen,
        last_received,
        last_transport,
        last_fields,
        reports,
        duplicates,
        _issued,
        cfg_text,
        cfg_set,
        ack_ver,
        ack_code,
        ack_msg,
        ack_time,
    ) = r
    last = last_report(last_received, last_transport, last_fields)
    desired = json.loads(cfg_text) if cfg_text else None
    if desired is None:
        state = "none"
    elif ack_ver == desired["cfgver"]:
        state = "applied" if ack_code == devicemsg.OK else "rejected"
    else:
        state = "pending"
    return {
        "id": ident,
        "board": board,
        "fw": fw,
        "transport": transport,
        "peer": peer,
        "online": None if online is None else bool(online),
        "status_changed": status_changed,
        "first_seen": first_seen,
        "last_seen": last_seen,
        "queue": last.get("queue") if last else None,
        "dropped": last.get("dropped") if last else None,
        "reports_total": reports,
        "duplicates_total": duplicates,
        "last_report": last,
        "config": {
            "desired": desired,
            "set_at": cfg_set,
            "acked_cfgver": ack_ver,
            "ack_code": ack_code,
            "ack_msg": ack_msg,
            "acked_at": ack_time,
            "state": state,  # none | pending | applied | rejected
        },
    }
