"""Messages over the two transports: UDP datagram splitting and reassembly, TCP stream framing.

Over UDP a message longer than 492 bytes is cut into 492-byte pieces, each behind its own envelope with the
same request id, sequence numbers 0, 1, 2, ... and the *total* message length (:func:`split_datagrams`,
:class:`Reassembler`). Over TCP each message is one envelope followed by the whole message
(:class:`StreamFramer`). Inconsistent input raises :class:`HandleFormatError`.
"""

from __future__ import annotations

from dataclasses import replace

from proto.handle.envelope import Envelope, decode_envelope
from proto.handle.errors import HandleFormatError
from proto.handle.numbers import (
    ENV_TC,
    ENVELOPE_SIZE,
    MAX_MESSAGE_SIZE,
    MAX_UDP_DATAGRAM,
    MAX_UDP_MESSAGE_SIZE,
    MAX_UDP_PAYLOAD,
)

__all__ = ["Reassembler", "StreamFramer", "split_datagrams"]


def split_datagrams(
    message: bytes, *, max_datagram: int = MAX_UDP_DATAGRAM, set_tc: bool = False
) -> list[bytes]:
    """Cut an encoded message (TCP form) into UDP datagrams of at most ``max_datagram`` bytes.

    A message that fits is returned as is. Otherwise each piece of ``max_datagram - 20`` message bytes gets
    a copy of the envelope with sequence numbers 0, 1, 2, ... and the total message length, exactly as
    HANDLE.NET servers send (MessageFlag unchanged; ``set_tc`` sets TC on every piece, as HANDLE.NET
    clients do for split requests).
    """
    env = decode_envelope(message)
    if len(message) - ENVELOPE_SIZE != env.message_length:
        raise ValueError("not one complete encoded message")
    if len(message) <= max_datagram:
        return [message]
    piece = max_datagram - ENVELOPE_SIZE
    if piece <= 0:
        raise ValueError(f"max_datagram {max_datagram} leaves no room after the envelope")
    flags = env.flags | ENV_TC if set_tc else env.flags
    body = memoryview(message)[ENVELOPE_SIZE:]
    return [
        replace(env, flags=flags, sequence=seq).encode() + bytes(body[off : off + piece])
        for seq, off in enumerate(range(0, len(body), piece))
    ]


class Reassembler:
    """Collects the datagrams of one message (one request id) and returns the whole message once every
    sequence number is in. Out-of-order and duplicate datagrams are fine; anything inconsistent (another
    request id, another total length, a sequence number out of range, a piece of the wrong size) raises
    HandleFormatError. Pieces are ``piece_size`` bytes (492, HANDLE.NET's size) except the last one; a first
    datagram that holds the whole message is accepted whatever its size.
    """

    def __init__(
        self,
        request_id: int | None = None,
        *,
        max_size: int = MAX_UDP_MESSAGE_SIZE,
        piece_size: int = MAX_UDP_PAYLOAD,
    ) -> None:
        if piece_size <= 0:
            raise ValueError("piece_size must be positive")
        self.request_id = request_id
        self.max_size = max_size
        self.piece_size = piece_size
        self.duplicates = 0
        self._envelope: Envelope | None = None
        self._pieces: dict[int, bytes] = {}
        self._count = 0
        self._done = False

    @property
    def expected(self) -> int | None:
        """Number of datagrams of the message, None before the first one arrived."""
        return self._count if self._envelope is not None else None

    @property
    def received(self) -> int:
        return len(self._pieces)

    @property
    def complete(self) -> bool:
        return self._done

    @property
    def missing(self) -> tuple[int, ...]:
        """Sequence numbers still missing (empty before the first datagram and once complete)."""
        return tuple(i for i in range(self._count) if i not in self._pieces)

    def feed(self, datagram: bytes) -> bytes | None:
        """Add one datagram; returns the whole message (TCP form, sequence 0) when it completes it, else None.
        Datagrams that arrive after completion are counted as duplicates and ignored."""
        env = decode_envelope(datagram, max_size=self.max_size)
        if self.request_id is not None and env.request_id != self.request_id:
            raise HandleFormatError(
                f"datagram for request {env.request_id:#010x}, expected {self.request_id:#010x}"
            )
        payload = bytes(datagram[ENVELOPE_SIZE:])
        first, count = self._envelope, self._count
        if first is None:
            if env.message_length == 0:
                raise HandleFormatError("datagram announces an empty message")
            if env.sequence == 0 and len(payload) == env.message_length:
                self._envelope, self._count, self._pieces[0] = env, 1, payload
                return self._finish()
            first, count = env, -(-env.message_length // self.piece_size)
        elif self._done:
            self.duplicates += 1
            return None
        if (env.message_length, env.session_id, env.major, env.minor) != (
            first.message_length,
            first.session_id,
            first.major,
            first.minor,
        ):
            raise HandleFormatError(
                f"datagram {env.sequence} disagrees with the first one about length/session/version "
                f"({env.message_length} vs {first.message_length} bytes)"
            )
        if env.sequence >= count:
            raise HandleFormatError(
                f"sequence number {env.sequence} out of range for a {count}-datagram message"
            )
        last = count - 1
        want = self.piece_size if env.sequence < last else first.message_length - last * self.piece_size
        if len(payload) != want:
            raise HandleFormatError(
                f"datagram {env.sequence} carries {len(payload)} message bytes, expected {want}"
            )
        if self._envelope is None:  # the first datagram is consistent: commit to its message
            self._envelope, self._count, self.request_id = first, count, env.request_id
        if env.sequence in self._pieces:
            self.duplicates += 1
            return None
        self._pieces[env.sequence] = payload
        return self._finish() if len(self._pieces) == count else None

    def _finish(self) -> bytes:
        assert self._envelope is not None
        self._done = True
        env = replace(self._envelope, sequence=0, flags=self._envelope.flags & ~ENV_TC)
        return env.encode() + b"".join(self._pieces[i] for i in range(self._count))


class StreamFramer:
    """Cuts a TCP byte stream into messages (each: one envelope + the whole message).

    ``feed(data)`` returns the messages completed by ``data`` (TCP form, ready for
    :func:`proto.handle.envelope.decode_message`); ``eof()`` raises HandleFormatError when the stream ends
    inside a message. A bad envelope or an oversized length raises HandleFormatError, and so does every later
    call (the stream cannot be resynchronised).
    """

    def __init__(self, *, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._error: HandleFormatError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        if self._error is not None:
            raise HandleFormatError(str(self._error))
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= ENVELOPE_SIZE:
            try:
                env = decode_envelope(bytes(self._buf[:ENVELOPE_SIZE]), max_size=self.max_size)
            except HandleFormatError as e:
                self._error = e
                raise
            end = ENVELOPE_SIZE + env.message_length
            if len(self._buf) < end:
                break
            out.append(bytes(self._buf[:end]))
            del self._buf[:end]
        return out

    def eof(self) -> None:
        if self._buf:
            raise HandleFormatError(f"stream ended inside a message ({len(self._buf)} bytes buffered)")
