"""Gateway configuration: TOML loading, errors that name the key, flag overrides, docs that list every option."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from gateway import config as gwconfig
from gateway.config import ConfigError
from gateway.resolver import ResolverConfig
from gateway.service import resolver_config
from tools import cli

ROOT = Path(__file__).resolve().parents[3]


def _load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> gwconfig.GatewayConfig:
    p = tmp_path / "gateway.toml"
    p.write_text(text)
    return gwconfig.load(p, env=env or {})


def test_defaults() -> None:
    cfg = gwconfig.load(None, env={})
    assert (cfg.coap.host, cfg.coap.port) == ("127.0.0.1", 5683)
    assert (cfg.http.host, cfg.http.port) == ("127.0.0.1", 8080)
    assert cfg.mqtt.url == ""
    assert cfg.data_dir == Path("data")
    assert gwconfig.load(None, env={"IDA_DATA": "/var/lib/ida"}).data_dir == Path("/var/lib/ida")


def test_full_file(tmp_path: Path) -> None:
    cfg = _load(
        tmp_path,
        """
[coap]
host = "::"
port = 0
[http]
port = 18080
[mqtt]
url = "mqtt://127.0.0.1:1883"
group = "line-3"
[upstream]
urls = ["hdl://10.0.0.5:2641", "http://10.0.0.6:8000"]
timeout = 3
hedge = 0.25
[cache]
max_entries = 500
persist = false
[outbox]
mqtt_topic = "ida/v1/north/reports"
webhook_url = "https://erp.example.com/hook"
[data]
dir = "/tmp/ida-data"
[log]
level = "DEBUG"
""",
        env={"IDA_DATA": "/ignored"},
    )
    assert (cfg.coap.host, cfg.coap.port, cfg.http.port) == ("::", 0, 18080)
    assert cfg.mqtt.group == "line-3"
    assert cfg.upstream.urls == ("hdl://10.0.0.5:2641", "http://10.0.0.6:8000")
    assert cfg.upstream.timeout == 3.0 and isinstance(cfg.upstream.timeout, float)
    assert cfg.cache.max_entries == 500 and cfg.cache.persist is False
    assert cfg.data_dir == Path("/tmp/ida-data")
    assert cfg.log.level == "debug"
    rc = resolver_config(cfg)
    assert rc.upstreams == ["hdl://10.0.0.5:2641", "http://10.0.0.6:8000"]
    assert rc.hedge_delay == 0.25 and rc.timeout == 3.0 and rc.cache.max_entries == 500
    assert rc.data_dir is None  # persist = false: memory-only cache
    assert rc.zone_file == Path("/tmp/ida-data/zone.json")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[coap]\nport = "x"', '[coap] port: expected a port number 0-65535 (0 = any free port), got "x"'),
        (
            "[coap]\nport = 70000",
            "[coap] port: expected a port number 0-65535 (0 = any free port), got 70000",
        ),
        ("[coap]\nport = true", "[coap] port: expected a port number 0-65535 (0 = any free port), got true"),
        (
            "[coap]\nprot = 5683",
            "[coap] prot: unknown key (known: host, port, security, keystore, plain_resolve)",
        ),
        ("[coap]\nhost = ''", '[coap] host: expected a host name or IP address, got ""'),
        ("[colour]\nx = 1", "[colour]: unknown section"),
        ('coap = "x"', 'coap: expected a [coap] table, got "x"'),
        ('[mqtt]\nurl = "tcp://broker"', "[mqtt] url: expected a URL with scheme mqtt://, mqtts://"),
        ('[upstream]\nurls = "hdl://a"', '[upstream] urls: expected a list of URL strings, got "hdl://a"'),
        ('[upstream]\nurls = ["ftp://a"]', "[upstream] urls: upstream URL 'ftp://a': scheme must be"),
        ("[upstream]\ntimeout = 0", "[upstream] timeout: expected a number of seconds > 0, got 0"),
        ("[upstream]\nhedge = -1", "[upstream] hedge: expected a number of seconds >= 0, got -1"),
        ("[cache]\nmax_entries = 0", "[cache] max_entries: expected an integer >= 1, got 0"),
        ("[cache]\nmax_entries = 1.5", "[cache] max_entries: expected an integer >= 1, got 1.5"),
        (
            "[cache]\nprefetch_fraction = 1",
            "[cache] prefetch_fraction: expected a number from 0 up to (not including) 1",
        ),
        ('[cache]\npersist = "yes"', '[cache] persist: expected true or false, got "yes"'),
        ("[cache]\nmin_ttl = 10\nmax_ttl = 5", "[cache] min_ttl: must not exceed max_ttl (5), got 10"),
        ('[log]\nlevel = "loud"', '[log] level: expected one of debug, info, warning, error, got "loud"'),
        ('[outbox]\nmqtt_topic = "north"', "[outbox] mqtt_topic: needs a broker"),
        (
            '[outbox]\nwebhook_url = "ftp://x"',
            "[outbox] webhook_url: expected a URL with scheme http://, https://",
        ),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, text)
    assert str(e.value).startswith(message), str(e.value)
    assert str(e.value).endswith(f"(in {tmp_path / 'gateway.toml'})")


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        gwconfig.load(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        _load(tmp_path, "[coap\nport = 1")


def test_flags_override_the_file(tmp_path: Path) -> None:
    cfg = _load(tmp_path, '[coap]\nport = 1\n[upstream]\nurls = ["hdl://a:1"]\n[data]\ndir = "x"')
    out = gwconfig.with_overrides(
        cfg,
        upstream=["http://b:8000", "hdl+tcp://c:2641"],
        coap="[::1]:0",
        http="0.0.0.0:9000",
        mqtt="mqtt://m:1883",
        data_dir="y",
        log_level="warning",
    )
    assert out.upstream.urls == ("http://b:8000", "hdl+tcp://c:2641")
    assert (out.coap.host, out.coap.port) == ("::1", 0)
    assert (out.http.host, out.http.port) == ("0.0.0.0", 9000)
    assert out.mqtt.url == "mqtt://m:1883" and out.data_dir == Path("y") and out.log.level == "warning"
    assert gwconfig.with_overrides(cfg) == cfg  # nothing given, nothing changed
    assert gwconfig.with_overrides(out, mqtt="").mqtt.url == ""
    for kw, msg in [
        ({"coap": "5683"}, "--coap: expected HOST:PORT"),
        ({"http": "h:99999"}, "--http: expected a port"),
        ({"upstream": ["nope"]}, "--upstream: upstream URL 'nope'"),
        ({"mqtt": "x"}, "--mqtt: expected"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(msg)):
            gwconfig.with_overrides(cfg, **kw)  # type: ignore[arg-type]


def test_cli_print_config_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "g.toml"
    p.write_text('[http]\nport = 1234\n[upstream]\nurls = ["hdl://a:1"]\n')
    assert (
        cli.main(
            ["gateway", "--config", str(p), "--coap", "127.0.0.1:0", "-u", "http://n:8000", "--print-config"]
        )
        == 0
    )
    shown = json.loads(capsys.readouterr().out)
    assert shown["http"]["port"] == 1234 and shown["coap"]["port"] == 0
    assert shown["upstream"]["urls"] == ["http://n:8000"]
    p.write_text('[coap]\nport = "x"\n')
    assert cli.main(["gateway", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert (
        'ida gateway: ConfigError: [coap] port: expected a port number 0-65535 (0 = any free port), got "x"'
        in err
    )


def test_defaults_match_the_resolver() -> None:
    """[upstream] and [cache] defaults are the resolver's own (ResolverConfig), so a bare gateway behaves as the
    resolver's author intended."""
    ours = resolver_config(gwconfig.load(None, env={}))
    theirs = ResolverConfig()
    for f in dataclasses.fields(ResolverConfig):
        if f.name in ("upstreams", "data_dir", "zone_file", "purge_interval"):
            continue
        assert getattr(ours, f.name) == getattr(theirs, f.name), f.name


def test_every_option_is_documented() -> None:
    doc = (ROOT / "docs" / "gateway.md").read_text()
    example_text = (ROOT / "gateway.example.toml").read_text()
    for section, key, _default, _help in gwconfig.options():
        assert re.search(rf"\| `\[{section}\]` \| `{key}` \|", doc), (
            f"docs/gateway.md lacks [{section}] {key}"
        )
    # the example sets every option to its default
    import tomllib

    example = tomllib.loads(example_text)
    for section, key, _default, _help in gwconfig.options():
        assert key in example.get(section, {}), f"gateway.example.toml lacks [{section}] {key}"
    assert gwconfig.from_mapping(example, env={}) == gwconfig.load(None, env={})
