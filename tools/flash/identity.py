"""Per-chip identity: the only per-device data, one small file (``/identity.json``) added to the batch
filesystem image.

The batch image is built once (``build.py``); a chip's image is the batch image with ``/identity.json`` added by
littlefs itself (copy-on-write), so it differs from the batch image in a couple of 4 KiB blocks: the root
directory's metadata block that records the new file and, when the file does not fit inline, its data block.
A chip that already carries the batch image gets only those blocks (:func:`personalise` returns them).

The key is 16 random bytes (``secrets.token_bytes``), hex in the identity file; the ledger and every log only
ever see :func:`key_fingerprint`. The gateway reads keys from the keystore (``keystore.py``).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from gateway import identifier as ident

from .errors import FlashError
from .image import LfsParams, add_files, changed_blocks

IDENTITY_PATH = "/identity.json"  # firmware/carrier/identity.py reads <root>identity.json, root "/" on a chip
KEY_BYTES = 16
TRANSPORTS = ("coap", "mqtt")


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def key_fingerprint(key: bytes) -> str:
    """What the ledger and logs show instead of the key: the first 4 bytes of its SHA-256, in hex -- the same
    short name the firmware prints (``carrier.identity.fingerprint``), so a console can be matched to the
    ledger."""
    return hashlib.sha256(key).hexdigest()[:8]


def check_gateway_url(url: str) -> str:
    """``coap://host[:port]`` or ``mqtt://host[:port]`` (what the firmware accepts); returns the scheme."""
    try:
        u = urlsplit(url)
        u.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        u = None
    if u is None or u.scheme not in TRANSPORTS or not u.hostname or u.path not in ("", "/") or u.query:
        raise FlashError(f"gateway address {url!r} is not coap://host[:port] or mqtt://host[:port]")
    return u.scheme


@dataclass(frozen=True)
class Identity:
    """What ``/identity.json`` holds (format of firmware/carrier/identity.py)."""

    identifier: str
    key: bytes = field(repr=False)
    gateways: tuple[str, ...] = ()  # coap://... and/or mqtt://..., at most one of each
    transport: str = "coap"
    wifi: tuple[str, str] | None = field(default=None, repr=False)  # (ssid, psk)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "identifier", ident.normalise(self.identifier))
        except ident.IdentifierError as e:
            raise FlashError(f"identifier {self.identifier!r} is not valid: {e}") from None
        if len(self.key) != KEY_BYTES:
            raise FlashError(f"identity key must be {KEY_BYTES} bytes, got {len(self.key)}")
        if self.transport not in TRANSPORTS:
            raise FlashError(f"transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        schemes = [check_gateway_url(g) for g in self.gateways]
        if len(set(schemes)) != len(schemes):
            raise FlashError("give at most one gateway address per transport")
        if self.transport not in schemes:
            raise FlashError(f"transport {self.transport} needs a {self.transport}://host[:port] gateway address")

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.key)

    def to_json(self) -> bytes:
        """The identity file: compact, keys sorted, so the same identity always gives the same bytes (and a
        re-flashed chip the same blocks)."""
        doc: dict[str, object] = {"id": self.identifier, "key": self.key.hex(), "transport": self.transport}
        for url in self.gateways:
            doc[url.partition("://")[0]] = url
        if self.wifi:
            doc["wifi"] = {"ssid": self.wifi[0], "psk": self.wifi[1]}
        # ensure_ascii=False: MicroPython's json decodes a \ud83d\ude00 escape pair as two surrogates (CESU-8),
        # which would corrupt an identifier or SSID with a character beyond U+FFFF; raw UTF-8 reads back intact.
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    def __repr__(self) -> str:  # never print the key or the Wi-Fi passphrase
        return f"Identity({self.identifier!r}, key={self.fingerprint}, {self.transport}, {self.gateways})"


def parse_identity(data: bytes) -> Identity:
    try:
        doc = json.loads(data)
        wifi = doc.get("wifi")
        return Identity(
            doc["id"],
            bytes.fromhex(doc["key"]),
            tuple(doc[t] for t in TRANSPORTS if doc.get(t)),
            doc.get("transport", "coap"),
            (wifi["ssid"], wifi.get("psk", "")) if wifi else None,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FlashError(f"not an identity file: {e}") from None


@dataclass(frozen=True)
class ChipImage:
    """The filesystem image for one chip and how it differs from the batch image."""

    image: bytes
    delta: tuple[tuple[int, bytes], ...]  # (offset in the image, data), whole blocks
    block_size: int

    @property
    def delta_bytes(self) -> int:
        return sum(len(d) for _, d in self.delta)

    @property
    def delta_blocks(self) -> int:
        return self.delta_bytes // self.block_size


def personalise(params: LfsParams, batch_image: bytes, identity: Identity) -> ChipImage:
    """The batch image with ``/identity.json`` added, and the blocks that differ from the batch image."""
    image = add_files(params, batch_image, {IDENTITY_PATH: identity.to_json()})
    delta = changed_blocks(batch_image, image, params.block_size)
    return ChipImage(image, tuple(delta), params.block_size)
