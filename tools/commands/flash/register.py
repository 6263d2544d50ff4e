"""Register a provisioned device in the gateway's local zone, so it resolves in the factory with no uplink.

The record of ``<identifier>`` gets four values (Handle value types of our own, upper-case as Handle types are):

    index 1  MAC         the chip's base MAC, ``aa:bb:cc:dd:ee:ff``
    index 2  BOARD       the board file name, e.g. ``esp32-devkitc``
    index 3  FW_VERSION  the firmware version of the batch build
    index 4  PRODUCED    production time, ISO 8601 UTC

They replace the values at those indexes and keep any other value the record already has. The zone is
``gateway.zone.Zone`` (its file format and atomic, locked ``add``), at ``<data dir>/zone.json`` unless told
otherwise; the gateway serves it with ``[zone] file = ".../zone.json"``.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path

from proto.records import HandleValue, Record

ZONE_FILENAME = "zone.json"
VALUE_INDEXES = {"MAC": 1, "BOARD": 2, "FW_VERSION": 3, "PRODUCED": 4}


@dataclass(frozen=True)
class Registration:
    identifier: str
    mac: str
    board: str
    firmware_version: str
    produced: _dt.datetime


def production_values(reg: Registration) -> tuple[HandleValue, ...]:
    ts = int(reg.produced.timestamp())
    text = {
        "MAC": reg.mac,
        "BOARD": reg.board,
        "FW_VERSION": reg.firmware_version,
        "PRODUCED": reg.produced.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return tuple(HandleValue(VALUE_INDEXES[t], t, text[t].encode(), timestamp=ts) for t in VALUE_INDEXES)


def register_device(reg: Registration, zone_file: str | os.PathLike[str]) -> Record:
    """Add or update the device's record in the zone file; returns the record as stored."""
    from gateway.zone import Zone

    zone = Zone.load(Path(zone_file))
    ours = production_values(reg)
    old = zone.get(reg.identifier)
    keep = tuple(v for v in old.values if v.index not in VALUE_INDEXES.values()) if old else ()
    return zone.add(Record(reg.identifier, tuple(sorted(keep + ours, key=lambda v: v.index))))
