"""Shared pieces of the fuzz tests (tests/test_fuzz_*.py): a log watcher that fails a test on anything unhandled,
hypothesis strategies for CBOR values and protocol messages, and a raw CoAP encoder that can write what
aiocoap never would (bad versions, token lengths, option deltas, truncated extended fields).

Campaign size: ``IDA_FUZZ_EXAMPLES`` multiplies every test's ``max_examples`` (unset in ``make test``: fixed,
derandomized examples; a by-hand campaign sets e.g. 50 and gets new random examples every run). The firmware
side (tests/device/fuzzlib.py) has ``IDA_FUZZ_SCALE`` and ``IDA_FUZZ_SEED``."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import cbor2
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from proto import devicemsg

SCALE = max(1, int(os.environ.get("IDA_FUZZ_EXAMPLES", "1")))


def fuzz_settings(examples: int, **kw: Any) -> settings:
    """Bounded settings for `make test` (scaled by IDA_FUZZ_EXAMPLES for a by-hand campaign). `make test` draws
    the same examples every run (derandomized); a campaign (IDA_FUZZ_EXAMPLES set) draws new ones each time."""
    kw.setdefault("derandomize", "IDA_FUZZ_EXAMPLES" not in os.environ)
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture,
        ],
        **kw,
    )


# -- logs -------------------------------------------------------------------------------------------------
UNHANDLED = (
    "Traceback",
    "Task exception was never retrieved",
    "Exception in callback",
    "exception was never retrieved",
    "Unhandled",
    "unhandled",
)


class LogWatch(logging.Handler):
    """Collects every log record (any thread) and the asyncio loops' exception-handler calls; ``problems()``
    lists those that show something unhandled: a traceback (exc_info), an ERROR or worse, or one of the
    UNHANDLED phrases. ``allow`` holds substrings of messages that are expected (checked with the message)."""

    def __init__(self, allow: tuple[str, ...] = ()) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.loop_errors: list[dict[str, Any]] = []
        self.allow = allow
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock2:
            self.records.append(record)

    def loop_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        with self._lock2:
            self.loop_errors.append(context)

    def problems(self) -> list[str]:
        out = []
        with self._lock2:
            records = list(self.records)
            loop_errors = list(self.loop_errors)
        for r in records:
            try:
                msg = r.getMessage()
            except Exception as e:  # a record whose arguments do not format is a problem too
                msg = f"<unformattable {r.msg!r}: {e}>"
            bad = r.exc_info is not None or r.levelno >= logging.ERROR or any(p in msg for p in UNHANDLED)
            if bad and not any(a in msg for a in self.allow):
                exc = ""
                if r.exc_info and r.exc_info[1] is not None:
                    exc = f" [{type(r.exc_info[1]).__name__}: {r.exc_info[1]}]"
                out.append(f"{r.levelname} {r.name}: {msg[:500]}{exc}")
        for c in loop_errors:
            err = c.get("exception")
            tb = "".join(traceback.format_exception(err)[-6:]) if isinstance(err, BaseException) else ""
            out.append(f"loop exception handler: {c.get('message')} {err!r}\n{tb}")
        return out

    def clear(self) -> None:
        with self._lock2:
            self.records.clear()
            self.loop_errors.clear()

    def count(self, level: int = logging.WARNING) -> int:
        with self._lock2:
            return sum(1 for r in self.records if r.levelno >= level)


@contextmanager
def watch_logs(allow: tuple[str, ...] = (), level: int = logging.DEBUG) -> Iterator[LogWatch]:
    """A LogWatch on the root logger (level lowered to ``level`` meanwhile)."""
    w = LogWatch(allow)
    root = logging.getLogger()
    old = root.level
    root.setLevel(level)
    root.addHandler(w)
    try:
        yield w
    finally:
        root.removeHandler(w)
        root.setLevel(old)


# -- a service on its own event loop ---------------------------------------------------------------------------
class LoopThread:
    """Runs ``setup`` (returns the CoAP port and a teardown coroutine factory) on a private event loop."""

    def __init__(
        self, watch: LogWatch, setup: Callable[[], Awaitable[tuple[int, Callable[[], Awaitable[None]]]]]
    ) -> None:
        self.watch = watch
        self._setup = setup
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(watch.loop_handler)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="fuzz-loop", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            self.port, teardown = await self._setup()
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        gc.collect()  # lost tasks report "Task exception was never retrieved" when collected
        await asyncio.sleep(0.05)
        await teardown()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        assert self.port, "the gateway did not start"

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self.loop.close()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the gateway's loop and return its result (for reading state without races)."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def assert_clean(self) -> None:
        """No problem logged since the last call (lost tasks are collected first, so they report now)."""
        if not self.loop.is_closed():
            self.call(gc.collect)
            time.sleep(0.01)
        problems = self.watch.problems()
        self.watch.clear()
        assert not problems, "\n".join(problems[:20])


# -- CBOR values and protocol messages --------------------------------------------------------------------
def cbor_scalars(
    ints: st.SearchStrategy[Any], floats: st.SearchStrategy[Any], size: int
) -> st.SearchStrategy[Any]:
    """CBOR's scalar values: ``ints``, ``floats``, booleans, null, and text and byte strings up to ``size``."""
    return ints | floats | st.booleans() | st.none() | st.text(max_size=size) | st.binary(max_size=size)


def cbor_trees(
    scalars: st.SearchStrategy[Any], keys: st.SearchStrategy[Any], max_leaves: int
) -> st.SearchStrategy[Any]:
    """Arrays and maps (keys from ``keys``) of up to 5 items, nested over ``scalars``."""
    return st.recursive(
        scalars,
        lambda kids: st.lists(kids, max_size=5) | st.dictionaries(keys, kids, max_size=5),
        max_leaves=max_leaves,
    )


cbor_values = cbor_trees(
    cbor_scalars(
        st.integers(min_value=-(2**64), max_value=2**64 - 1)
        | st.sampled_from(
            [0, 1, 23, 24, 255, 256, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, -1, -(2**63)]
        ),
        st.floats(width=64) | st.sampled_from([1.0, 2.0, 10.0, 20.0, float("nan"), float("inf")]),
        30,
    ),
    st.integers(-3, 30) | st.text(max_size=6) | st.sampled_from([1.0, 2.0, True, False]),
    15,
)


def _field_value(name: str) -> st.SearchStrategy[Any]:
    """A value that passes proto.devicemsg's check for ``name`` (so the rest of the message gets checked too)."""
    uint = st.integers(0, 2**64 - 1) | st.sampled_from([0, 1, 2**32, 2**63])
    text = st.text(max_size=40) | st.sampled_from(["88.123.99/PUMP-0001", "0.na/x", "x/\u00e9", "/"])
    table: dict[str, st.SearchStrategy[Any]] = {
        "token": st.binary(min_size=1, max_size=8),
        "etag": st.binary(min_size=1, max_size=8),
        "id": text,
        "msg": text,
        "board": text,
        "fw": text,
        "rssi": st.integers(-(2**63), 2**63 - 1),
        "values": st.lists(st.tuples(uint, text, text | st.binary(max_size=20), uint).map(list), max_size=4),
        "types": st.lists(text, max_size=3),
        "indexes": st.lists(uint, max_size=3),
        "sensors": st.dictionaries(
            st.text(max_size=8),
            st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text() | st.booleans(),
            max_size=3,
        ),
        "meta": st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=3),
        "interval": st.integers(10, 86400),
        "source": st.integers(0, 3),
        "online": st.booleans(),
    }
    return table.get(name, uint)


@st.composite
def message_maps(draw: st.DrawFn, name: str | None = None) -> dict[Any, Any]:
    """An int-keyed protocol message (mostly valid), then a few perturbations: a key dropped, a value of
    another type, a key replaced by an equal float or bool, unknown keys."""
    name = name or draw(st.sampled_from(sorted(devicemsg.MESSAGES)))
    required, optional = devicemsg.MESSAGES[name]
    m: dict[Any, Any] = {}
    for k in required:
        m[devicemsg.KEYS[k]] = draw(_field_value(k))
    for k in optional:
        if draw(st.booleans()):
            m[devicemsg.KEYS[k]] = draw(_field_value(k))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.integers(0, 4))
        keys = list(m)
        if op == 0 and keys:
            del m[draw(st.sampled_from(keys))]
        elif op == 1 and keys:
            m[draw(st.sampled_from(keys))] = draw(cbor_values)
        elif op == 2 and keys:
            k = draw(st.sampled_from(keys))
            m[float(k) if isinstance(k, int) else k] = m.pop(k)
        elif op == 3:
            m[draw(st.integers(-5, 40) | st.text(max_size=4))] = draw(cbor_values)
        elif op == 4 and keys:
            k = draw(st.sampled_from(keys))
            m[k] = draw(_field_value(draw(st.sampled_from(sorted(devicemsg.KEYS)))))
    return m


def cbor_payloads(name: str | None = None) -> st.SearchStrategy[bytes]:
    """Payload bytes: protocol-shaped maps, any CBOR value, raw bytes, CBOR with tags / indefinite lengths."""

    def dump(v: Any) -> bytes:
        try:
            return cbor2.dumps(v)
        except Exception:
            return b"\xa0"

    odd = st.sampled_from(
        [
            b"\x9f\x01\x02\xff",  # indefinite array
            b"\xbf\x01\x02\xff",  # indefinite map
            b"\xc2\x49\x01" + b"\x00" * 8,  # bignum 2**64
            b"\xc1\x1b\x7f\xff\xff\xff\xff\xff\xff\xff",  # epoch datetime far away
            b"\xd8\x1c\x81\xd8\x1d\x00",  # shareable list containing a reference to itself
            b"\xd9\xd9\xf7\xa0",  # self-described CBOR
            b"\x9b\xff\xff\xff\xff\xff\xff\xff\xff",  # array claiming 2**64-1 items
            b"\x5b\x00\x00\x00\x10\x00\x00\x00\x00",  # byte string claiming 64 GiB
            b"\x81" * 5000 + b"\x00",  # deep nesting
            b"\xa1" * 3000 + b"\x00" * 3001,
            b"\xfb\x7f\xf8\x00\x00\x00\x00\x00\x00",  # NaN
            b"\xf8\x20",  # simple value 32
        ]
    )
    return (
        message_maps(name).map(dump)
        | cbor_values.map(dump)
        | st.binary(max_size=64)
        | odd
        | st.tuples(message_maps(name).map(dump), st.binary(max_size=4)).map(lambda t: t[0] + t[1])
    )


# -- raw CoAP ---------------------------------------------------------------------------------------------
def _ext(v: int) -> tuple[int, bytes]:
    if v < 13:
        return v, b""
    if v < 269:
        return 13, bytes([v - 13])
    return 14, (v - 269).to_bytes(2, "big")


def coap_encode(
    ver: int,
    mtype: int,
    token: bytes,
    code: int,
    mid: int,
    options: list[tuple[int, bytes]],
    payload: bytes,
    tkl: int | None = None,
) -> bytes:
    """A CoAP datagram, options sorted by number (so deltas are >= 0), TKL overridable."""
    tkl = len(token) if tkl is None else tkl
    out = bytearray(
        [((ver & 3) << 6) | ((mtype & 3) << 4) | (tkl & 15), code & 255, (mid >> 8) & 255, mid & 255]
    )
    out += token
    last = 0
    for num, val in sorted(options, key=lambda o: o[0]):
        dn, dext = _ext(num - last)
        ln, lext = _ext(len(val))
        out.append((dn << 4) | ln)
        out += dext + lext + val
        last = num
    if payload:
        out += b"\xff" + payload
    return bytes(out)


def uint_bytes(v: int) -> bytes:
    return v.to_bytes((v.bit_length() + 7) // 8, "big") if v else b""
