"""Per-chip identity: the only per-device data, one small file (``/identity.json``) added to the batch
filesystem image.

The batch image is built once (``build.py``); a chip's image is the batch image with ``/identity.json`` added by
littlefs itself (copy-on-write), so it differs from the batch image in a couple of 4 KiB blocks: the root
directory's metadata block that records the new file and, when the file does not fit inline, its data block.
A chip that already carries the batch image gets only those blocks (:func:`personalise` returns them).

The key is 16 random bytes (``secrets.token_bytes``), hex in the identity file; the ledger and every log only
ever see :func:`key_fingerprint`. The gateway reads keys from the keystore (``keystore.py``).

The file is kept as short as the firmware allows, because littlefs stores a file of at most ``cache_size`` = 128
bytes inline in its directory's metadata block (1 block per chip) and a longer one in a data block of its own
(2 blocks): what the firmware assumes anyway (``"transport": "coap"``, ``"secure": false``) is left out.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from proto import identifier as ident

from .errors import FlashError
from .image import LfsParams, add_files, changed_blocks

IDENTITY_PATH = "/identity.json"  # firmware/carrier/identity.py reads <root>identity.json, root "/" on a chip
CA_NAME = "ca.crt"  # the identity's "ca": the broker's CA, under the device's data root (carrier/identity.py)
CA_PATH = "/" + CA_NAME
KEY_BYTES = 16
TRANSPORTS = ("coap", "mqtt")
SCHEMES = {"coap": "coap", "mqtt": "mqtt", "mqtts": "mqtt"}  # URL scheme -> transport (mqtts = MQTT over TLS)


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def key_fingerprint(key: bytes) -> str:
    """What the ledger and logs show instead of the key: the first 4 bytes of its SHA-256, in hex -- the same
    short name the firmware prints (``carrier.identity.fingerprint``), so a console can be matched to the
    ledger."""
    return hashlib.sha256(key).hexdigest()[:8]


def check_gateway_url(url: str) -> str:
    """``coap://host[:port]``, ``mqtt://host[:port]`` or ``mqtts://host[:port]`` (MQTT over TLS): what the
    firmware accepts. Returns the transport (``coap`` or ``mqtt``)."""
    try:
        u = urlsplit(url)
        u.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        u = None
    if (
        u is None
        or u.scheme not in SCHEMES
        or not url.startswith(u.scheme + "://")
        or not u.hostname
        or u.path not in ("", "/")
        or u.query
    ):
        raise FlashError(
            f"gateway address {url!r} is not coap://host[:port], mqtt://host[:port] or mqtts://host[:port]"
        )
    return SCHEMES[u.scheme]


def check_gateways(gateways: tuple[str, ...], transport: str) -> None:
    """At most one address per transport, and one for ``transport``; :class:`FlashError` otherwise."""
    if transport not in TRANSPORTS:
        raise FlashError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
    schemes = [check_gateway_url(g) for g in gateways]
    if len(set(schemes)) != len(schemes):
        raise FlashError("give at most one gateway address per transport")
    if transport not in schemes:
        raise FlashError(f"transport {transport} needs a {transport}://host[:port] gateway address")


def uses_tls(gateways: tuple[str, ...]) -> bool:
    """An ``mqtts://`` address is among ``gateways``: the device needs the broker's CA."""
    return any(g.startswith("mqtts://") for g in gateways)


@dataclass(frozen=True)
class Identity:
    """What ``/identity.json`` holds (format of firmware/carrier/identity.py)."""

    identifier: str
    key: bytes = field(repr=False)
    gateways: tuple[str, ...] = ()  # coap://... and/or mqtt(s)://..., at most one per transport
    transport: str = "coap"
    wifi: tuple[str, str] | None = field(default=None, repr=False)  # (ssid, psk)
    secure: bool = (
        False  # "secure": true = CoAP OSCORE-protected with the key (``ida flash`` sets it by default)
    )
    ca: str | None = None  # "ca": the CA file for mqtts://, a name under the data root (e.g. "ca.crt")

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "identifier", ident.normalise(self.identifier))
        except ident.IdentifierError as e:
            raise FlashError(f"identifier {self.identifier!r} is not valid: {e}") from None
        if len(self.key) != KEY_BYTES:
            raise FlashError(f"identity key must be {KEY_BYTES} bytes, got {len(self.key)}")
        check_gateways(self.gateways, self.transport)
        if self.ca is not None and (not self.ca or "\0" in self.ca):
            raise FlashError(f"ca must be a file name, got {self.ca!r}")

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.key)

    def to_json(self, compact: bool = False) -> bytes:
        """The identity file: no spaces, keys sorted, so the same identity always gives the same bytes (and a
        re-flashed chip the same blocks). ``secure`` and ``ca`` appear only when set; ``compact`` (what
        :func:`personalise` writes to a chip) also leaves out ``"transport": "coap"``, the firmware's default:
        every byte past 128 costs the chip a second 4 KiB block."""
        doc: dict[str, object] = {"id": self.identifier, "key": self.key.hex()}
        if not compact or self.transport != "coap":
            doc["transport"] = self.transport
        for url in self.gateways:
            doc[check_gateway_url(url)] = url
        if self.secure:
            doc["secure"] = True
        if self.ca is not None:
            doc["ca"] = self.ca
        if self.wifi:
            doc["wifi"] = {"ssid": self.wifi[0], "psk": self.wifi[1]}
        # ensure_ascii=False: MicroPython's json decodes a \ud83d\ude00 escape pair as two surrogates (CESU-8),
        # which would corrupt an identifier or SSID with a character beyond U+FFFF; raw UTF-8 reads back intact.
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    def __repr__(self) -> str:  # never print the key or the Wi-Fi passphrase
        sec = "oscore" if self.secure else "insecure"
        return (
            f"Identity({self.identifier!r}, key={self.fingerprint}, {self.transport}, {self.gateways}, {sec})"
        )


def parse_identity(data: bytes) -> Identity:
    try:
        doc = json.loads(data)
        wifi = doc.get("wifi")
        secure = doc.get("secure", False)
        if not isinstance(secure, bool):
            raise TypeError("secure must be true or false")
        return Identity(
            doc["id"],
            bytes.fromhex(doc["key"]),
            tuple(doc[t] for t in TRANSPORTS if doc.get(t)),
            doc.get("transport") or "coap",
            (wifi["ssid"], wifi.get("psk", "")) if wifi else None,
            secure,
            doc.get("ca"),
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


def personalise(
    params: LfsParams, batch_image: bytes, identity: Identity, extra: Mapping[str, bytes] | None = None
) -> ChipImage:
    """The batch image with ``/identity.json`` (and ``extra`` files, e.g. a CA the batch image lacks) added,
    and the blocks that differ from the batch image."""
    image = add_files(params, batch_image, {**(extra or {}), IDENTITY_PATH: identity.to_json(compact=True)})
    delta = changed_blocks(batch_image, image, params.block_size)
    return ChipImage(image, tuple(delta), params.block_size)
