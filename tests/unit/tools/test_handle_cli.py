"""`ida handle create|add|modify|remove|delete` against a real `ida node` process (native and REST): what it
prints, its JSON, its exit codes, and one clear line per error (exists, not homed, not authorized, wrong key,
upstream down, bad input)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import dsa

from proto.handle.keys import encode_private_key
from tests.support.captures import ADMIN
from tools.cli import main
from tools.support.procs import Process, free_port, ida_command

KEY = str(ADMIN / "admpriv.bin")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("handlecli")
    cmd = ida_command(
        "node", "--handle", "127.0.0.1:0", "--http", "127.0.0.1:0", "--prefix", "88.123.99",
        "--admin-key", f"300:0.NA/88.123.99={ADMIN / 'admpub.bin'}",
        "--admin-secret", "301:0.NA/88.123.99=s3cret",
    )  # fmt: skip
    with Process("node", cmd, log=tmp / "node.log", stdout=True).start() as proc:
        rest = proc.wait_line(rb"^http listening on (127\.0\.0\.1:\d+)", timeout=30).group(
            1
        )  # printed second
        (native,) = (
            m.group(1)
            for x in proc.stdout_lines
            if (m := re.match(rb"handle udp\+tcp listening on (\S+)", x))
        )
        other = tmp / "other.bin"
        other.write_bytes(encode_private_key(dsa.generate_private_key(1024)))
        yield {"hdl": f"hdl://{native.decode()}", "http": f"http://{rest.decode()}", "other": str(other)}
        proc.stop()


def ida(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["handle", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def native(node: dict[str, str], verb: str, handle: str, *extra: str) -> list[str]:
    return [verb, handle, "-u", node["hdl"], "--auth", "300:0.NA/88.123.99", "--key", KEY, *extra]


def test_create_then_each_operation(node: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    h = "88.123.99/CLI-1"
    rc, out, err = ida(capsys, *native(node, "create", h, "--value", "1:URL:https://id.example.com/CLI-1"))
    assert rc == 0 and err == ""
    assert out.startswith(f"created {h} at {node['hdl']} (session ") and "challenge answered" in out
    rc, out, _ = ida(capsys, *native(node, "add", h, "--value", "2:MAC:24:0a:c4:12:34:56", "--json"))
    assert rc == 0 and json.loads(out) == {
        "responseCode": 1,
        "handle": h,
        "operation": "add",
        "node": node["hdl"],
    }
    assert ida(capsys, *native(node, "modify", h, "--value", "2:MAC:24:0a:c4:00:00:00"))[0] == 0
    assert ida(capsys, *native(node, "remove", h, "--index", "2"))[:2] == (
        0,
        f"removed from {h} at {node['hdl']} (session 4, challenge answered)\n",
    )
    rc = main(["resolve", h, "-u", node["hdl"], "--json"])
    record = json.loads(capsys.readouterr().out)
    assert rc == 0 and [(v["index"], v["type"]) for v in record["values"]] == [(1, "URL"), (100, "HS_ADMIN")]
    assert record["values"][1]["data"]["value"] == {
        "handle": "0.NA/88.123.99",
        "index": 300,
        "permissions": "111111111111",
    }
    assert ida(capsys, *native(node, "delete", h))[0] == 0


@pytest.mark.parametrize(
    ("argv", "rc", "line"),
    [
        (["create", "88.123.99/CLI-2", "--value", "1:URL:x"], 1, "88.123.99/CLI-2 already exists at"),
        (["create", "77.1/CLI-2"], 1, "does not home prefix 77.1: it is not that prefix's primary (301)"),
        (["modify", "88.123.99/NOPE", "--value", "1:URL:x"], 1, "88.123.99/NOPE does not exist at"),
    ],
)
def test_refusals_are_one_line(
    node: dict[str, str], capsys: pytest.CaptureFixture[str], argv: list[str], rc: int, line: str
) -> None:
    if argv[1] == "88.123.99/CLI-2":
        ida(capsys, *native(node, "create", "88.123.99/CLI-2"))
    code, out, err = ida(capsys, *native(node, argv[0], argv[1], *argv[2:]))
    assert (
        code == rc and out == "" and line in err and err.count("\n") == 1 and err.startswith("ida handle: ")
    )


def test_wrong_key_and_not_authorized_are_told_apart(
    node: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = [
        "create",
        "88.123.99/CLI-3",
        "-u",
        node["hdl"],
        "--auth",
        "300:0.NA/88.123.99",
        "--key",
        node["other"],
    ]
    rc, _, err = ida(capsys, *wrong)
    assert rc == 1 and "wrong key (403)" in err and err.count("\n") == 1
    stranger = ["create", "88.123.99/CLI-3", "-u", node["hdl"], "--auth", "302:0.NA/88.123.99", "--key", KEY]
    rc, out, err = ida(capsys, *stranger, "--json")
    assert rc == 1 and "not authorized (400): 302:0.NA/88.123.99 is not an administrator" in err
    assert json.loads(out)["error"] == "not-authorized" and json.loads(out)["responseCode"] == 400


def test_upstream_down_and_bad_input(node: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    down = f"hdl://127.0.0.1:{free_port(also_tcp=True)}"
    rc, _, err = ida(
        capsys, "create", "88.123.99/CLI-4", "-u", down, "--auth", "300:0.NA/88.123.99", "--key", KEY
    )
    assert rc == 3 and "upstream down" in err and err.count("\n") == 1
    for argv, line in (
        (native(node, "create", "88.123.99/CLI-4", "--value", "one:URL:x"), "expected INDEX:TYPE:DATA"),
        (native(node, "add", "88.123.99/CLI-4"), "add needs at least one --value"),
        (native(node, "create", "no-slash"), "bad identifier"),
        (
            ["create", "88.123.99/X", "-u", node["hdl"], "--auth", "300:0.NA/88.123.99"],
            "needs the admin's private key (--key FILE)",
        ),
        (
            ["create", "88.123.99/X", "-u", node["hdl"], "--auth", "300:0.NA/X", "--key", "/nonexistent"],
            "cannot read",
        ),
    ):
        rc, _, err = ida(capsys, *argv)
        assert rc == 2 and line in err, (argv, err)


def test_rest_with_basic_auth(
    node: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADMIN_SECRET", "s3cret")
    base = ["-u", node["http"], "--auth", "301:0.NA/88.123.99", "--secret-env", "ADMIN_SECRET"]
    rc, out, _ = ida(capsys, "create", "88.123.99/REST-1", *base, "--value", "1:URL:https://r/1")
    assert rc == 0 and out == f"created 88.123.99/REST-1 at {node['http']}\n"
    rc, _, err = ida(capsys, "create", "88.123.99/REST-1", *base)
    assert rc == 1 and "already exists" in err
    monkeypatch.setenv("ADMIN_SECRET", "nope")
    rc, _, err = ida(capsys, "delete", "88.123.99/REST-1", *base)
    assert rc == 1 and "wrong key (403)" in err
