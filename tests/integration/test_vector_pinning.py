"""One byte changed in a shared vector must fail both the CPython and the MicroPython vector suites."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.mpcollect import ROOT

CASES = [
    ("messages.json", "messages", 10),  # a report
    ("cbor.json", "items", 30),
]


def _run_suite(target: str, vectors: Path) -> tuple[int, str]:
    env = dict(os.environ, IDA_VECTORS=str(vectors))
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", target],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    return r.returncode, r.stdout


@pytest.mark.parametrize(("file", "section", "index"), CASES)
def test_one_byte_changed_fails_both_runtimes(tmp_path: Path, file: str, section: str, index: int) -> None:
    vectors = tmp_path / "vectors"
    shutil.copytree(ROOT / "tests" / "vectors", vectors)
    doc = json.loads((vectors / file).read_text(encoding="utf-8"))
    case = doc[section][index]
    raw = bytearray(bytes.fromhex(case["hex"]))
    raw[-1] ^= 0x01  # one byte of the encoded form changes
    case["hex"] = raw.hex()
    (vectors / file).write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")

    code_cpy, out_cpy = _run_suite("tests/unit/proto/test_device_vectors.py", vectors)
    code_mpy, out_mpy = _run_suite("tests/device/test_carrier_vectors.py", vectors)
    assert code_cpy == 1 and re.search(r"\b1 failed\b|\b2 failed\b", out_cpy), out_cpy[-2000:]
    assert (
        code_mpy == 1
        and "MicroPython 0 passed" not in out_mpy
        and re.search(r"MicroPython \d+ passed, [1-9]", out_mpy)
    ), out_mpy[-2000:]

    # the unchanged copy passes both, so the failure above is the changed byte
    shutil.copy(ROOT / "tests" / "vectors" / file, vectors / file)
    assert _run_suite("tests/unit/proto/test_device_vectors.py", vectors)[0] == 0
    assert _run_suite("tests/device/test_carrier_vectors.py", vectors)[0] == 0
