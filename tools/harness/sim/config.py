"""What a simulated fleet is: :class:`SimConfig` (the ``ida sim`` flags as one frozen value) and the devices'
identifiers and transports derived from it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from proto import identifier as ident

__all__ = ["SimConfig", "SimError", "parse_url", "FIRMWARE_MAX_AUTO", "MODES", "TRANSPORTS"]

MODES = ("auto", "firmware", "light")
TRANSPORTS = ("coap", "mqtt", "mix")
FIRMWARE_MAX_AUTO = (
    10  # mode auto: real firmware processes up to this many devices, the light simulator above
)
DEFAULT_PORTS = {"coap": 5683, "mqtt": 1883}


class SimError(Exception):
    """A fleet that cannot run as configured (bad flag, no micropython, broker unreachable...)."""


def parse_url(url: str, scheme: str) -> tuple[str, int]:
    """``coap://host[:port]`` -> (host, port); SimError when it is not that."""
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError:
        raise SimError(f"{url!r} is not {scheme}://host[:port]") from None
    if u.scheme != scheme or not u.hostname or u.path not in ("", "/") or u.query:
        raise SimError(f"{url!r} is not {scheme}://host[:port]")
    return u.hostname, port or DEFAULT_PORTS[scheme]


@dataclass(frozen=True)
class SimConfig:
    """One fleet. ``duration`` None runs until stopped; ``interval`` is the report interval in seconds (the
    firmware needs a whole number in 10-86400; the light simulator takes any positive value);
    ``resolve_every`` 0 = no resolves besides nothing (light) / the firmware's own boot resolve."""

    devices: int
    gateway: str = "coap://127.0.0.1:5683"
    broker: str = "mqtt://127.0.0.1:1883"
    transport: str = "coap"
    interval: float = 60.0
    duration: float | None = None
    mode: str = "auto"
    prefix: str = "88.123.99"
    stem: str = "SIM"
    first: int = 1
    data_dir: Path = field(default_factory=lambda: Path(os.environ.get("IDA_SIM_DATA", "sim-data")))
    resolve_every: float = 0.0
    resolve_ids: tuple[str, ...] = ()  # empty: each device resolves its own identifier
    summary_every: float = 10.0
    drain: float = 5.0  # at stop: wait this long for answers to reports in flight
    coap_sockets: int = 0  # light mode: UDP sockets shared by the devices; 0 = min(devices, 1024)
    mqtt_connections: int = 0  # light mode: 0 = one MQTT connection per device; K = K shared connections
    queue_cap: int = 64  # reports a device keeps unacknowledged (the firmware's flash queue)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise SimError("--devices must be at least 1")
        if self.mode not in MODES:
            raise SimError(f"--mode must be one of {', '.join(MODES)}")
        if self.transport not in TRANSPORTS:
            raise SimError(f"--transport must be one of {', '.join(TRANSPORTS)}")
        if not self.interval > 0:
            raise SimError("--interval must be positive")
        if self.duration is not None and self.duration < 0:
            raise SimError("--duration must not be negative")
        if self.resolve_every < 0 or self.summary_every < 0 or self.drain < 0:
            raise SimError("--resolve-every, --summary-every and drain must not be negative")
        if self.first < 0 or self.coap_sockets < 0 or self.mqtt_connections < 0 or self.queue_cap < 2:
            raise SimError("bad device numbering, socket or connection count")
        if self.uses("coap"):
            parse_url(self.gateway, "coap")
        if self.uses("mqtt"):
            parse_url(self.broker, "mqtt")
        try:
            ident.normalise(f"{self.prefix}/{self.stem}-1")
        except ident.IdentifierError as e:
            raise SimError(f"--prefix {self.prefix!r}: {e}") from None
        for r in self.resolve_ids:
            try:
                ident.normalise(r)
            except ident.IdentifierError as e:
                raise SimError(f"--resolve-id {r!r}: {e}") from None
        if self.effective_mode == "firmware":
            if self.interval != int(self.interval) or not 10 <= self.interval <= 86400:
                raise SimError("firmware mode: --interval must be a whole number of seconds in 10-86400")

    @property
    def effective_mode(self) -> str:
        """``auto`` resolved: real firmware for up to FIRMWARE_MAX_AUTO devices, else the light simulator."""
        if self.mode != "auto":
            return self.mode
        return "firmware" if self.devices <= FIRMWARE_MAX_AUTO else "light"

    def uses(self, transport: str) -> bool:
        return self.transport in (transport, "mix")

    def identifier(self, n: int) -> str:
        """Device ``n`` (0-based) of the fleet: ``<prefix>/<stem>-00001``..."""
        width = max(5, len(str(self.first + self.devices - 1)))
        return ident.normalise(f"{self.prefix}/{self.stem}-{self.first + n:0{width}d}")

    def transport_of(self, n: int) -> str:
        """``mix`` alternates: even devices CoAP, odd devices MQTT."""
        if self.transport == "mix":
            return "coap" if n % 2 == 0 else "mqtt"
        return self.transport
