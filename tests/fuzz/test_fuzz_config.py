"""Fuzzing the gateway's configuration loader (gateway/config.py): whatever the file holds -- random TOML documents
built from the real sections and keys with values of every TOML type (strings, integers, floats with inf and nan,
booleans, dates and times, arrays, inline and nested tables), unknown sections and keys, mutations of
gateway.example.toml, text that is not TOML, bytes that are not UTF-8, deep nesting -- ``load`` returns a
GatewayConfig or raises ConfigError, nothing else; and a config it returns has only finite, in-range numbers.
Command-line overrides get the same treatment.

Campaign size: IDA_FUZZ_EXAMPLES (tests/support/fuzzing.py) multiplies the examples.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway import config as gwconfig
from gateway.config import ConfigError, GatewayConfig
from tests.support.fuzzing import fuzz_settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = (ROOT / "gateway.example.toml").read_text()
SECTIONS = {s: [k for (sec, k, _d, _doc) in gwconfig.options() if sec == s] for s, *_ in gwconfig.options()}


# -- a small TOML writer (enough for every value tomllib can return) ----------------------------------------------
def _key(k: str) -> str:
    return k if k and all(c.isalnum() and c.isascii() or c in "-_" for c in k) else json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(
            v
        )  # TOML basic strings accept JSON's escapes except \/ (json.dumps never writes it)
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def dumps(doc: dict[str, Any]) -> str:
    lines = []
    for k, v in doc.items():
        if not isinstance(v, dict):
            lines.append(f"{_key(k)} = {_value(v)}")
    for k, v in doc.items():
        if isinstance(v, dict):
            lines.append(f"[{_key(k)}]")
            lines += [f"{_key(kk)} = {_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


toml_scalars = (
    st.integers(-(2**63), 2**63 - 1)
    | st.sampled_from([0, 1, -1, 65535, 65536, 2**31, 2**63 - 1])
    | st.floats()
    | st.sampled_from([0.0, -0.0, 0.5, 1.0, float("inf"), float("-inf"), float("nan"), 1e308, 5e-324])
    | st.booleans()
    | st.text(max_size=20)
    | st.sampled_from(
        [
            "",
            " ",
            "127.0.0.1",
            "::",
            "0.0.0.0",
            "mqtt://127.0.0.1:1883",
            "mqtt://u:p@h:1",
            "mqtt://[::1",
            "mqtt://h:99999",
            "hdl://127.0.0.1:2641",
            "http://x",
            "redis://h",
            "debug",
            "\x00",
            "\u00e9",
            "data",
            "/",
            "a" * 300,
        ]
    )
    | st.datetimes(timezones=st.none() | st.just(dt.UTC))
    | st.dates()
    | st.times()
)
toml_values = st.recursive(
    toml_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=8,
)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for sec in draw(
        st.lists(st.sampled_from(sorted(SECTIONS)) | st.text(max_size=6), max_size=5, unique=True)
    ):
        keys = SECTIONS.get(sec, [])
        table: dict[str, Any] = {}
        for k in draw(
            st.lists(st.sampled_from(keys) if keys else st.text(max_size=6), max_size=5, unique=True)
        ):
            table[k] = draw(toml_values)
        if draw(st.integers(0, 9)) == 0:
            table[draw(st.text(max_size=6))] = draw(toml_values)
        doc[sec] = table
    if draw(st.integers(0, 9)) == 0:
        doc[draw(st.text(min_size=1, max_size=6))] = draw(toml_values)  # a top-level key, not a table
    return doc


@st.composite
def mutated_example(draw: st.DrawFn) -> bytes:
    lines = EXAMPLE.splitlines()
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.integers(0, 4))
        i = draw(st.integers(0, len(lines) - 1))
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(i, lines[draw(st.integers(0, len(lines) - 1))])
        elif op == 2 and "=" in lines[i]:
            k = lines[i].split("=", 1)[0]
            lines[i] = f"{k}= {_value(draw(toml_scalars))}"
        elif op == 3:
            lines[i] = lines[i].lstrip("# ")  # uncomment an example line
        else:
            j = draw(st.integers(0, len(lines[i])))
            lines[i] = (
                lines[i][:j]
                + draw(st.sampled_from(['"', "[", "]", "=", "\\", "'''", "\x00", "#", "."]))
                + lines[i][j:]
            )
    return "\n".join(lines).encode()


def _is_finite_config(cfg: GatewayConfig) -> None:
    for sec in dataclasses.fields(cfg):
        section = getattr(cfg, sec.name)
        for f in dataclasses.fields(section):
            v = getattr(section, f.name)
            if isinstance(v, float):
                assert math.isfinite(v), f"[{sec.name}] {f.name} = {v}"


def _load(tmp_path: Path, data: bytes) -> None:
    """``load`` of a file holding ``data`` returns a config with finite numbers or raises ConfigError with a
    message; any other exception fails the test."""
    p = tmp_path / "gateway.toml"
    p.write_bytes(data)
    try:
        cfg = gwconfig.load(p, env={})
    except ConfigError as e:
        assert str(e)
        return
    _is_finite_config(cfg)


@fuzz_settings(100)
@given(documents())
def test_fuzz_random_documents(tmp_path: Path, doc: dict[str, Any]) -> None:
    _load(tmp_path, dumps(doc).encode())
    try:
        cfg = gwconfig.from_mapping(doc, env={})
    except ConfigError:
        return
    _is_finite_config(cfg)


@fuzz_settings(100)
@given(mutated_example() | st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_fuzz_raw_files(tmp_path: Path, data: bytes) -> None:
    _load(tmp_path, data)


@fuzz_settings(100)
@given(st.text(max_size=40), st.sampled_from(["upstream", "coap", "http", "mqtt", "data_dir", "log_level"]))
def test_fuzz_overrides(text: str, which: str) -> None:
    base = gwconfig.load(None, env={})
    kw: dict[str, Any] = {which: [text] if which == "upstream" else text}
    try:
        gwconfig.with_overrides(base, **kw)
    except ConfigError:
        pass


# -- findings -----------------------------------------------------------------------------------------------------
def test_regression_config_file_not_utf8(tmp_path: Path) -> None:
    # fuzz finding: tomllib.load decodes the file itself and raised UnicodeDecodeError (not ConfigError)
    for data in (
        b"\x80",
        b"\xff",
        b'[coap]\nhost = "\xc3\x28"\n',
        b"\xef\xbb\xbf[coap]\n",
        b"\xed\xa0\x80 = 1\n",
    ):
        _load(tmp_path, data)


def test_regression_config_deep_nesting(tmp_path: Path) -> None:
    # fuzz finding: a deeply nested array (or inline table) made tomllib recurse past the interpreter's limit:
    # RecursionError out of load()
    for data in (
        "[coap]\nhost = " + "[" * 5000 + "]" * 5000 + "\n",
        "x = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n",
    ):
        _load(tmp_path, data.encode())


def test_regression_config_non_finite_numbers(tmp_path: Path) -> None:
    # fuzz finding: nan (and inf) passed the checks of every seconds / rate option (nan < 0 and nan <= 0 are
    # false), giving a config with a nan timeout, cache lifetime or rate
    p = tmp_path / "gateway.toml"
    for section, key in (
        ("upstream", "timeout"),
        ("cache", "max_ttl"),
        ("cache", "min_ttl"),
        ("limits", "device_rate"),
        ("upstream", "hedge"),
        ("cache", "flush_interval"),
    ):
        for v in ("nan", "inf", "-nan"):
            p.write_text(f"[{section}]\n{key} = {v}\n")
            try:
                cfg = gwconfig.load(p, env={})
            except ConfigError as e:
                assert f"[{section}] {key}" in str(e)
            else:
                raise AssertionError(
                    f"[{section}] {key} = {v} accepted: {getattr(getattr(cfg, section), key)}"
                )
