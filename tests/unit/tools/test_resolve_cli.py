"""`ida resolve` end to end against a Handle REST node on 127.0.0.1 (running in a thread of its own)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.upstream_fakes import PUMP, RestNode, free_port
from tools.cli import main


@pytest.fixture(scope="module")
def node() -> Iterator[RestNode]:
    loop = asyncio.new_event_loop()
    n = RestNode([PUMP])
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(n.start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(n.stop())
        loop.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert ready.wait(5)
    yield n
    loop.call_soon_threadsafe(loop.stop)
    t.join(5)


@pytest.fixture(autouse=True)
def _no_env_upstream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IDA_UPSTREAM", raising=False)


def test_json_prints_the_handle_rest_record(node: RestNode, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["resolve", "88.123.99/PUMP-0001", "--upstream", node.url, "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    body = json.loads(out)
    assert body["responseCode"] == 1 and body["handle"] == "88.123.99/PUMP-0001"
    assert [v["type"] for v in body["values"]] == ["URL", "EMAIL", "HS_ADMIN"]
    assert body["values"][0]["data"] == {"format": "string", "value": "https://example.org/pump/0001"}


def test_text_output_is_a_table(node: RestNode, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["resolve", "88.123.99/PUMP-0001", "-u", node.url])
    out = capsys.readouterr().out
    assert rc == 0
    assert "source: upstream" in out and ("ttl: 300 s" in out or "ttl: 299 s" in out)
    assert "admin 200:0.NA/88.123.99 permissions 111111111111" in out
    assert "https://example.org/pump/0001" in out and "service@example.org" in out
    assert out.splitlines()[1].split() == ["index", "type", "ttl", "data"]


def test_filters(node: RestNode, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["resolve", "88.123.99/PUMP-0001", "-u", node.url, "--json", "--type", "EMAIL"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert [v["type"] for v in body["values"]] == ["EMAIL"]
    assert main(["resolve", "88.123.99/PUMP-0001", "-u", node.url, "--index", "7"]) == 1
    assert "values not found" in capsys.readouterr().err


def test_not_found_exits_1(node: RestNode, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["resolve", "88.123.99/PUMP-9999", "--upstream", node.url, "--json"])
    cap = capsys.readouterr()
    assert rc == 1
    assert "not found" in cap.err
    assert json.loads(cap.out) == {
        "responseCode": 100,
        "handle": "88.123.99/PUMP-9999",
        "message": "88.123.99/PUMP-9999: handle not found",
    }


def test_bad_identifier_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["resolve", "88.123..99/x"]) == 2
    err = capsys.readouterr().err
    assert "bad identifier" in err and "EMPTY_SEGMENT" in err


def test_bad_upstream_url_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["resolve", "88.123.99/PUMP-0001", "--upstream", "gopher://x"]) == 2
    assert "'gopher://x'" in capsys.readouterr().err


def test_all_upstreams_down_exits_3_quickly(capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.monotonic()
    rc = main(
        [
            "resolve",
            "88.123.99/PUMP-0001",
            "-u",
            f"http://127.0.0.1:{free_port()}",
            "-u",
            f"http://127.0.0.1:{free_port()}",
            "--timeout",
            "3",
        ]
    )
    assert rc == 3
    assert time.monotonic() - t0 < 1.0
    err = capsys.readouterr().err
    assert "all upstreams failed" in err


def test_foreign_prefix_exits_3_naming_the_refusal(
    node: RestNode, capsys: pytest.CaptureFixture[str]
) -> None:
    """A prefix the node does not host (301): the same output as any resolution no node could answer."""
    body = b'{"responseCode": 301, "handle": "99.999/X", "message": "server not responsible for handle"}'
    node.canned["99.999/X"] = (404, body, 0.0)
    try:
        assert main(["resolve", "99.999/X", "-u", node.url]) == 3
    finally:
        del node.canned["99.999/X"]
    assert capsys.readouterr().err.splitlines() == [
        "ida resolve: 99.999/X: all upstreams failed, nothing cached",
        f"  {node.url}: UpstreamRefused: 99.999/X: HTTP 404 responseCode 301: server not responsible for handle",
    ]


def test_env_upstream_is_the_default(
    node: RestNode, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IDA_UPSTREAM", node.url)
    assert main(["resolve", "88.123.99/PUMP-0001"]) == 0
    assert "source: upstream" in capsys.readouterr().out


def test_data_dir_keeps_the_answer_across_runs(
    node: RestNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["resolve", "88.123.99/PUMP-0001", "-u", node.url, "--data-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    assert (tmp_path / "cache.sqlite3").exists()
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["resolve", "88.123.99/PUMP-0001", "-u", dead, "--data-dir", str(tmp_path)]) == 0
    assert "source: cache" in capsys.readouterr().out


def test_data_dir_zone_answers_without_upstream(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "zone.json").write_text(
        json.dumps(
            [
                {
                    "handle": "88.123.99/FACTORY-1",
                    "values": [
                        {
                            "index": 1,
                            "type": "URL",
                            "data": {"format": "string", "value": "https://factory/1"},
                            "ttl": 60,
                        }
                    ],
                }
            ]
        )
    )
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["resolve", "88.123.99/FACTORY-1", "-u", dead, "--data-dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["values"][0]["data"]["value"] == "https://factory/1"
