"""The keystore: every provisioned device's key, by identifier, for the gateway (OSCORE, MQTT credentials).

File ``<data dir>/keystore.json``, mode 0600 (directory created 0700), UTF-8 JSON::

    {"format": 1,
     "keys": {"88.123.99/PUMP-000001": {"key": "<32 hex digits>", "fingerprint": "1a2b3c4d",
                                        "created": "2026-11-22T10:00:00Z"}}}

Identifiers are normalised (prefix upper-case). ``ida flash`` stores a new key (:meth:`Keystore.rekey`) every
time it writes any block of a chip's filesystem or over its ``nvs`` partition -- the device's OSCORE sequence
number starts again with that storage rewritten, and a reused key would then reuse nonces -- and it does so
before it writes, so the gateway (which re-reads this file when it changes) knows the new key by the time the
chip boots with it. Only a re-flash that writes neither keeps the key. Writes take an exclusive ``flock`` on
``keystore.json.lock`` (two stations may share a data dir), re-read the file, write a temp file (0600 from the
start), fsync and ``os.replace`` it: a crash leaves the old or the new file. This file and the devices are the
only places a key is stored; the ledger holds only its fingerprint.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
from collections.abc import Iterator
from pathlib import Path

from proto import identifier as ident

from .errors import KeystoreError
from .identity import KEY_BYTES, key_fingerprint, new_key

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

FILENAME = "keystore.json"
FORMAT = 1


class Keystore:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @classmethod
    def in_dir(cls, data_dir: str | os.PathLike[str]) -> Keystore:
        return cls(Path(data_dir) / FILENAME)

    def get(self, identifier: str) -> bytes | None:
        entry = self._read().get(ident.normalise(identifier))
        return bytes.fromhex(entry["key"]) if entry else None

    def get_or_create(self, identifier: str) -> bytes:
        """The identifier's key; a new random one (persisted before it is returned) when it has none."""
        h = ident.normalise(identifier)
        with self._locked():
            keys = self._read()
            if h in keys:
                return bytes.fromhex(keys[h]["key"])
            key = new_key()
            keys[h] = _entry(key)
            self._write(keys)
            return key

    def rekey(self, identifier: str, key: bytes | None = None) -> bytes:
        """Store a new random key (or ``key``) for the identifier, replacing any old one; returns it. Durable
        (fsynced, renamed into place) when it returns."""
        key = new_key() if key is None else key
        self.put(identifier, key)
        return key

    def put(self, identifier: str, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise KeystoreError(f"a key is {KEY_BYTES} bytes, got {len(key)}")
        with self._locked():
            keys = self._read()
            keys[ident.normalise(identifier)] = _entry(key)
            self._write(keys)

    def identifiers(self) -> list[str]:
        return sorted(self._read())

    def fingerprint(self, identifier: str) -> str | None:
        key = self.get(identifier)
        return key_fingerprint(key) if key else None

    # -- file ------------------------------------------------------------------------------------------------
    def _read(self) -> dict[str, dict[str, str]]:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise KeystoreError(f"{self.path}: cannot read the keystore ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("keys"), dict):
            raise KeystoreError(f"{self.path}: not a keystore of format {FORMAT}")
        return dict(doc["keys"])

    def _write(self, keys: dict[str, dict[str, str]]) -> None:
        data = json.dumps({"format": FORMAT, "keys": dict(sorted(keys.items()))}, indent=1).encode() + b"\n"
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a stale .tmp may have had other bits
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _entry(key: bytes) -> dict[str, str]:
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"key": key.hex(), "fingerprint": key_fingerprint(key), "created": now}
