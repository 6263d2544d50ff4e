"""The one error the MQTT codec raises for bytes it cannot read."""

from __future__ import annotations

__all__ = ["MqttProtocolError"]


class MqttProtocolError(ValueError):
    """Bytes from the peer that are not MQTT as this side speaks it (the reader cannot frame them, or a packet's
    body does not parse). MQTT has no way to skip a packet it cannot frame: the connection is closed."""
