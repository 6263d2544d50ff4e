"""The incremental MQTT reader: stream bytes in, whole packets out (3.1.1 and v5 frame packets alike).

>>> r = Reader(64)
>>> r.feed(bytes.fromhex("30070003612f62"))
[]
>>> [(first >> 4, body) for first, body in r.feed(bytes.fromhex("0078d000"))]
[(3, b'\\x00\\x03a/b\\x00x'), (13, b'')]
"""

from __future__ import annotations

from proto.mqtt.errors import MqttProtocolError
from proto.mqtt.numbers import MAX_REMAINING_LENGTH

__all__ = ["Reader", "DEFAULT_MAX_PACKET"]

DEFAULT_MAX_PACKET = 1 << 20


class Reader:
    """Feed it what the socket read (:meth:`feed`); it returns the packets completed, each as ``(first byte,
    body)``, and keeps the start of an incomplete one.

    ``max_packet`` caps a packet's whole size (fixed header included, as MQTT v5's Maximum Packet Size counts
    it), and with it the buffer: a larger packet raises :class:`MqttProtocolError` as soon as its fixed header
    is read, as does a remaining length longer than 4 bytes or a first byte of packet type 0 (reserved). After
    an error the stream cannot be framed again: close the connection."""

    __slots__ = ("max_packet", "_held", "_size", "_want")

    def __init__(self, max_packet: int = DEFAULT_MAX_PACKET) -> None:
        if not 2 <= max_packet <= MAX_REMAINING_LENGTH + 5:
            raise ValueError(f"max_packet {max_packet} is not 2..{MAX_REMAINING_LENGTH + 5}")
        self.max_packet = max_packet
        self._held: list[bytes] = []  # the start of a packet not yet whole, as read
        self._size = 0  # bytes in _held
        self._want = 0  # the whole size of that packet (0: its fixed header is not whole yet)

    @property
    def buffered(self) -> int:
        """Bytes held of a packet not yet whole (not 0 at the end of the stream: it was cut off)."""
        return self._size

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        if self._held:
            self._held.append(data)
            self._size += len(data)
            if self._size < self._want:
                return []
            buf = b"".join(self._held)
            self._held = []
            self._size = self._want = 0
        else:
            buf = data if type(data) is bytes else bytes(data)
        out: list[tuple[int, bytes]] = []
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            first = buf[pos]
            if first < 0x10:
                raise MqttProtocolError("packet type 0 (reserved)")
            length = buf[pos + 1]
            i = pos + 2
            if length & 0x80:  # a remaining length of more than one byte
                length &= 0x7F
                shift = 7
                while True:
                    if i >= n:
                        self._hold(buf[pos:], 0)
                        return out
                    b = buf[i]
                    i += 1
                    length |= (b & 0x7F) << shift
                    if not b & 0x80:
                        break
                    shift += 7
                    if shift > 21:
                        raise MqttProtocolError("remaining length longer than 4 bytes")
            end = i + length
            if end - pos > self.max_packet:
                raise MqttProtocolError(
                    f"packet of {end - pos} bytes exceeds the maximum of {self.max_packet}"
                )
            if end > n:
                self._hold(buf[pos:], end - pos)
                return out
            out.append((first, buf[i:end]))
            pos = end
        if pos < n:
            self._hold(buf[pos:], 0)
        return out

    def _hold(self, rest: bytes, want: int) -> None:
        self._held = [rest]
        self._size = len(rest)
        self._want = want
