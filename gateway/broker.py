"""Where the MQTT broker is and how the gateway logs in to it, for every broker connection the gateway opens (the
front end's paho link and device link, the outbox's MQTT sink): the broker URL (:func:`parse_url` ->
:class:`BrokerAddress`), the gateway's credentials and CA (:class:`MqttAuth`, ``[mqtt] username``,
``password_file``, ``ca_file``) and unique client ids (:func:`default_client_id`). No I/O but reading the password
file; no paho."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

__all__ = ["BrokerAddress", "MqttAuth", "parse_url", "default_client_id", "DEFAULT_PORT", "DEFAULT_TLS_PORT"]

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_url(url: str) -> BrokerAddress:
    """``mqtt://[user[:password]@]host[:port]`` (1883) or ``mqtts://…`` (TLS, 8883); a bare ``host:port`` is mqtt."""
    if "://" not in url:
        url = "mqtt://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp"):
        raise ValueError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r} has no host")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (DEFAULT_TLS_PORT if tls else DEFAULT_PORT)
    except ValueError as e:
        raise ValueError(f"broker URL {url!r}: {e}") from None
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return BrokerAddress(parts.hostname, port, user, password, tls)


@dataclass(frozen=True, slots=True)
class MqttAuth:
    """The gateway's own broker credentials and the CA its TLS connection verifies the broker against
    (``[mqtt] username``, ``password_file``, ``ca_file``). The password never reaches a log line or a repr."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None

    @classmethod
    def from_files(cls, username: str = "", password_file: str = "", ca_file: str = "") -> MqttAuth:
        """Read the password file (its first line); ValueError naming the file (never its content)."""
        password = None
        if password_file:
            try:
                password = Path(password_file).read_text(encoding="utf-8").splitlines()[0].strip()
            except (OSError, UnicodeDecodeError, IndexError) as e:
                raise ValueError(
                    f"[mqtt] password_file: cannot read a password from {password_file!r}: "
                    f"{getattr(e, 'strerror', None) or 'empty or not UTF-8'}"
                ) from None
        if ca_file and not Path(ca_file).is_file():
            raise ValueError(f"[mqtt] ca_file: no such file {ca_file!r}")
        return cls(username or None, password, ca_file or None)


def default_client_id(prefix: str = "ida-gw") -> str:
    """Unique per process and instance, at most 23 characters (the MQTT 3.1.1 limit some brokers still apply)."""
    return f"{prefix}-{os.getpid() % 100000}-{secrets.token_hex(3)}"[:23]
