"""Local zone: both file forms, validation, atomic persistent add that keeps other writers' records."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gateway.zone import Zone, ZoneError, dump_zone, parse_zone
from proto.records import Record
from tests.support.upstream_fakes import PUMP, record, value

URLV = {"index": 1, "type": "URL", "data": {"format": "string", "value": "https://x"}, "ttl": 60}


def test_list_and_map_forms() -> None:
    a = parse_zone([{"responseCode": 1, "handle": "88.123.99/A", "values": [URLV]}])
    b = parse_zone({"88.123.99/A": [URLV]})
    assert a == b and a["88.123.99/A"].values[0].data == b"https://x"


def test_handles_are_normalised() -> None:
    z = Zone([Record("0.na/88.123.99", ())])
    assert z.handles() == ["0.NA/88.123.99"]
    assert z.get("0.na/88.123.99") is not None and "0.Na/88.123.99" in z


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ("text", "list of records"),
        ([{"handle": "no-slash", "values": []}], "bad handle"),
        ([{"handle": "88.1/a", "values": {}}], "values must be a list"),
        ([{"handle": "88.1/a", "values": [{"index": 1}]}], "lacks"),
        ([{"handle": "88.1/a", "values": [URLV, URLV]}], "share an index"),
        ([{"handle": "88.x/a"}, {"handle": "88.X/a"}], "twice"),
        ([3], "must be an object"),
    ],
)
def test_bad_zone_data(obj: object, match: str) -> None:
    with pytest.raises(ZoneError, match=match):
        parse_zone(obj)


def test_load_missing_file_is_empty_and_add_creates_it(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "zone.json"
    z = Zone.load(path)
    assert len(z) == 0
    z.add(PUMP)
    assert json.loads(path.read_text()) == dump_zone([PUMP])
    assert Zone.load(path).get(PUMP.handle) == Record(
        PUMP.handle, tuple(v for v in parse_zone(dump_zone([PUMP]))[PUMP.handle].values)
    )


def test_add_keeps_records_added_by_another_writer(tmp_path: Path) -> None:
    path = tmp_path / "zone.json"
    gateway_view = Zone.load(path)
    flash_tool = Zone.load(path)
    flash_tool.add({"handle": "88.123.99/FLASHED-1", "values": [URLV]})
    gateway_view.add(record("88.123.99/RUNTIME-1", value(1, "URL", "https://y")))
    on_disk = Zone.load(path)
    assert on_disk.handles() == ["88.123.99/FLASHED-1", "88.123.99/RUNTIME-1"]
    assert gateway_view.handles() == on_disk.handles()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_add_replaces_and_remove(tmp_path: Path) -> None:
    path = tmp_path / "zone.json"
    z = Zone.load(path)
    z.add({"handle": "88.x/a", "values": [URLV]})
    z.add({"handle": "88.X/a", "values": [dict(URLV, data={"format": "string", "value": "https://new"})]})
    assert len(z) == 1 and z.get("88.x/a").values[0].data == b"https://new"  # type: ignore[union-attr]
    assert z.remove("88.x/a") and not z.remove("88.X/a")
    assert Zone.load(path).handles() == []


def test_bad_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "zone.json"
    path.write_text("{oops")
    with pytest.raises(ZoneError, match="not valid JSON"):
        Zone.load(path)


def test_failed_write_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "zone.json"
    z = Zone.load(path)
    z.add({"handle": "88.1/a", "values": [URLV]})
    before = path.read_bytes()

    def boom(*a: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        z.add({"handle": "88.1/b", "values": [URLV]})
    assert path.read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
