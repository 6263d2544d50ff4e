"""The local zone: identifiers provisioned at the factory, answered before the cache and without upstream.

File format (UTF-8 JSON), one of:

* a list of records in the Handle REST shape (``responseCode`` optional and ignored)::

    [{"handle": "88.123.99/PUMP-0001",
      "values": [{"index": 1, "type": "URL", "data": {"format": "string", "value": "https://..."},
                  "ttl": 86400}]}]

* an object mapping each handle to its list of values (same value shape)::

    {"88.123.99/PUMP-0001": [{"index": 1, "type": "URL", "data": {"format": "string", "value": "..."}}]}

Handles are normalised (prefix upper-cased); a handle given twice is an error. :meth:`Zone.add` adds or
replaces one record and, when the zone has a file, rewrites it in the list form (sorted by handle):
under an exclusive ``flock`` on ``<file>.lock`` it re-reads the file (so records another process such as
``tools/commands/flash`` added meanwhile are kept), writes a temp file in the same directory, fsyncs it and
``os.replace``\\ s it over the zone file -- a crash leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from proto import identifier
from proto.records import HandleValue, Record, RecordFormatError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["Zone", "ZoneError", "parse_zone", "dump_zone"]

log = logging.getLogger(__name__)


class ZoneError(ValueError):
    """A zone file or record that does not follow the documented format."""


def _normalised(handle: Any, where: str) -> str:
    if not isinstance(handle, str):
        raise ZoneError(f"{where}: handle must be a string")
    try:
        return identifier.normalise(handle)
    except identifier.IdentifierError as e:
        raise ZoneError(f"{where}: bad handle {handle!r}: {e}") from None


def parse_zone(obj: Any, source: str = "zone") -> dict[str, Record]:
    """Records (keyed by normalised handle) from the decoded JSON of a zone file."""
    out: dict[str, Record] = {}
    items: list[tuple[str, Any, str]] = []
    if isinstance(obj, list):
        for i, rec in enumerate(obj):
            where = f"{source}[{i}]"
            if not isinstance(rec, dict):
                raise ZoneError(f"{where}: a record must be an object with handle and values")
            items.append((_normalised(rec.get("handle"), where), rec.get("values", []), where))
    elif isinstance(obj, dict):
        for h, values in obj.items():
            where = f"{source}[{h!r}]"
            items.append((_normalised(h, where), values, where))
    else:
        raise ZoneError(f"{source}: must be a JSON list of records or an object of handle -> values")
    for handle, values, where in items:
        if not isinstance(values, list):
            raise ZoneError(f"{where}: values must be a list")
        if handle in out:
            raise ZoneError(f"{where}: handle {handle} is given twice")
        try:
            vals = tuple(HandleValue.from_rest(v) for v in values)
        except RecordFormatError as e:
            raise ZoneError(f"{where}: {e}") from None
        indexes = [v.index for v in vals]
        if len(set(indexes)) != len(indexes):
            raise ZoneError(f"{where}: two values share an index")
        out[handle] = Record(handle, vals)
    return out


def dump_zone(records: Iterable[Record]) -> list[dict[str, Any]]:
    """The list form of a zone file (without responseCode), sorted by handle."""
    return [
        {"handle": r.handle, "values": [v.to_rest() for v in r.values]}
        for r in sorted(records, key=lambda r: r.handle)
    ]


def _read(path: Path) -> dict[str, Record]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise ZoneError(f"{path}: cannot read zone file: {e}") from None
    if not text.strip():
        return {}
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise ZoneError(f"{path}: not valid JSON: {e}") from None
    return parse_zone(obj, str(path))


def _write_atomic(path: Path, records: Iterable[Record]) -> None:
    data = json.dumps(dump_zone(records), ensure_ascii=False, indent=1).encode() + b"\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


class Zone:
    """Records served locally. ``path`` (optional) is the zone file that :meth:`add` keeps up to date."""

    def __init__(self, records: Iterable[Record] = (), *, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._records: dict[str, Record] = {}
        for r in records:
            h = _normalised(r.handle, "record")
            self._records[h] = Record(h, r.values)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Zone:
        """The zone in ``path``; a missing file gives an empty zone that :meth:`add` will create."""
        zone = cls(path=path)
        zone.reload()
        return zone

    def reload(self) -> None:
        """Read the zone file again (records added at run time without a file are dropped)."""
        if self.path is None:
            return
        self._records = _read(self.path)
        log.info("zone.loaded path=%s records=%d", self.path, len(self._records))

    def get(self, handle: str) -> Record | None:
        """The record of a handle (any spelling of the prefix), or None."""
        rec = self._records.get(handle)
        if rec is None:
            try:
                rec = self._records.get(identifier.normalise(handle))
            except identifier.IdentifierError:
                return None
        return rec

    def get_normalised(self, name: str) -> Record | None:
        """The record of an already normalised handle (:func:`proto.identifier.normalise`), or None."""
        return self._records.get(name)

    def add(self, record: Record | dict[str, Any], *, persist: bool = True) -> Record:
        """Add or replace one record (a Record or its Handle REST JSON form); returns it normalised.

        With a zone file and ``persist``, the file is rewritten atomically before the record is served.
        """
        if isinstance(record, dict):
            parsed = parse_zone([record], "record")
            (rec,) = parsed.values()
        else:
            h = _normalised(record.handle, "record")
            rec = Record(h, record.values)
            parse_zone(dump_zone([rec]), "record")  # same checks as a file (unique indexes, valid values)
        if self.path is not None and persist:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _locked(self.path):
                on_disk = _read(self.path)
                on_disk[rec.handle] = rec
                _write_atomic(self.path, on_disk.values())
            self._records.update(on_disk)
        else:
            self._records[rec.handle] = rec
        log.info(
            "zone.add handle=%s values=%d persisted=%s",
            rec.handle,
            len(rec.values),
            self.path is not None and persist,
        )
        return rec

    def remove(self, handle: str, *, persist: bool = True) -> bool:
        h = _normalised(handle, "remove")
        if self.path is not None and persist:
            with _locked(self.path):
                on_disk = _read(self.path)
                found = on_disk.pop(h, None) is not None
                if found:
                    _write_atomic(self.path, on_disk.values())
            self._records.pop(h, None)
            return found
        return self._records.pop(h, None) is not None

    def handles(self) -> list[str]:
        return sorted(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, handle: object) -> bool:
        return isinstance(handle, str) and self.get(handle) is not None
