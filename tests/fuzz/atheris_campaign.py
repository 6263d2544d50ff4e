"""Coverage-guided fuzzing of the gateway's parsers with atheris, for long campaigns by hand (not part of `make test`,
and atheris is not a project dependency)::

    .venv/bin/pip install atheris
    .venv/bin/python -m tests.fuzz.atheris_campaign TARGET [libFuzzer flags, e.g. -atheris_runs=2000000 -max_len=2048]

TARGET is one of: wire (proto.devicemsg.decode by message name), handle (the native-protocol codec: message decode,
request/response, result mapping, UDP reassembly, TCP framing), ident (proto.identifier.parse), config
(gateway.config.load on a file), coapfast (the CoAP fast path's classify against aiocoap's decoder). Each target
accepts only the documented error types; anything else is a crash that libFuzzer reports with the input.
The hypothesis tests (tests/test_fuzz_*.py) hold the regression inputs of what these campaigns found.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable

import atheris

with atheris.instrument_imports():
    import tomllib  # noqa: F401 -- instrumented for the config target

    from gateway import config as gwconfig
    from gateway.errors import UpstreamError
    from gateway.frontends import coap_table
    from gateway.upstream import native
    from proto import devicemsg, identifier
    from proto import handle as codec

NAMES = sorted(devicemsg.MESSAGES)


def fuzz_wire(data: bytes) -> None:
    if not data:
        return
    name = NAMES[data[0] % len(NAMES)]
    try:
        fields = devicemsg.decode(name, data[1:])
    except devicemsg.WireError:
        return
    again = devicemsg.encode(name, fields)
    if devicemsg.encode(name, devicemsg.decode(name, again)) != again:
        raise AssertionError("re-encoding is not stable")


def fuzz_handle(data: bytes) -> None:
    try:
        msg = codec.decode_message(data)
        if msg.header.is_request:
            codec.decode_request(msg)
        else:
            native.to_result(codec.decode_response(msg), handle="88.123.99/PUMP-0001")
    except (codec.HandleFormatError, UpstreamError):  # bytes that do not parse; busy/referral/refused codes
        pass
    r = codec.Reassembler()
    cut = [data[i : i + 512] for i in range(0, len(data), 512)] or [b""]
    for piece in reversed(cut):
        try:
            r.feed(piece)
        except codec.HandleFormatError:
            break
    f = codec.StreamFramer()
    try:
        for i in range(0, len(data), 37):
            f.feed(data[i : i + 37])
        f.eof()
    except codec.HandleFormatError:
        pass


def fuzz_ident(data: bytes) -> None:
    try:
        ident = identifier.parse(data)
    except identifier.IdentifierError as e:
        if e.reason not in identifier.REASONS:
            raise
        return
    if identifier.parse(str(ident)) != ident:
        raise AssertionError("normalising is not idempotent")


_CONFIG = os.path.join(
    "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(), f"ida-atheris-{os.getpid()}.toml"
)


def fuzz_config(data: bytes) -> None:
    with open(_CONFIG, "wb") as f:
        f.write(data)
    try:
        gwconfig.load(_CONFIG, env={})
    except gwconfig.ConfigError:
        pass


def fuzz_coapfast(data: bytes) -> None:
    import aiocoap

    got = coap_table.classify(data)
    if got is None:
        return
    try:
        msg = aiocoap.Message.decode(data)
    except (UnicodeDecodeError, aiocoap.error.UnparsableMessage):
        return
    if msg.code != aiocoap.numbers.codes.Code.GET or msg.opt.uri_path[:1] != ("r",) or msg.payload:
        raise AssertionError(f"classify accepted what aiocoap reads as {msg}")
    if list(got[1]) != list(msg.opt.etags):
        raise AssertionError("ETags differ")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "wire": fuzz_wire,
    "handle": fuzz_handle,
    "ident": fuzz_ident,
    "config": fuzz_config,
    "coapfast": fuzz_coapfast,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        raise SystemExit(
            f"usage: python -m tests.fuzz.atheris_campaign {{{'|'.join(TARGETS)}}} [libFuzzer flags]"
        )
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
