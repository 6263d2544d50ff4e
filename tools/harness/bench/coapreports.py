"""Report mode of the CoAP load generator (``loadgen.py``): simulated devices that each ``POST /d/<id>/rpt``
their next report, one in flight at a time, as the firmware does (P6, the ingest tests)."""

from __future__ import annotations

from proto import devicemsg
from proto.coap import request_template, uint_value
from proto.coap.numbers import Code, ContentFormat, Option

__all__ = ["ReportDevice", "report_device_id"]


class ReportDevice:
    """One simulated device of report mode: ``POST /d/<id>/rpt`` with its next report, one in flight at a time.

    ``seq`` counts up from 1 after every 2.04 (acknowledged = durably stored, the gateway's promise); any other
    answer or no answer sends the same report again, as the firmware does. ``acked`` is the last acknowledged seq.
    The payload is the report the firmware sends (canonical CBOR), written once per device up to ``seq``."""

    __slots__ = ("ident", "boot", "seq", "acked", "template", "_head", "_tail")

    def __init__(self, number: int, boot: int, confirmable: bool = True, token_len: int = 2) -> None:
        self.ident = report_device_id(number)
        self.boot = boot
        self.seq = 1
        self.acked = 0
        prefix, _, suffix = self.ident.partition("/")
        self.template = request_template(
            ("d", prefix, *suffix.split("/"), "rpt"),
            confirmable=confirmable,
            code=int(Code.POST),
            token_len=token_len,
            options=((int(Option.CONTENT_FORMAT), uint_value(int(ContentFormat.CBOR))),),
        )
        fields = {
            "id": self.ident,
            "boot": boot,
            "seq": 0,
            "uptime": 3600,
            "heap": 41000,
            "rssi": -60,
            "queue": 0,
            "board": "esp32-devkitc",
            "fw": "bench",
        }
        whole = devicemsg.encode("report", fields)
        at = whole.index(b"\x0b\x00")  # key 11 (seq) = 0: the seq goes here
        self._head, self._tail = whole[: at + 1], whole[at + 2 :]

    def payload(self) -> bytes:
        seq = self.seq
        return self._head + (bytes((seq,)) if seq < 24 else _cbor_uint(seq)) + self._tail


def report_device_id(number: int) -> str:
    """The identifier of report-mode device ``number``."""
    return f"88.123.99/LOAD-{number:07d}"


def _cbor_uint(n: int) -> bytes:
    for limit, head, size in ((0x100, 0x18, 1), (0x10000, 0x19, 2), (0x100000000, 0x1A, 4)):
        if n < limit:
            return bytes((head,)) + n.to_bytes(size, "big")
    return b"\x1b" + n.to_bytes(8, "big")
