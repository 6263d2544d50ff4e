"""Load the shared wire vectors (tests/vectors/*.json) into Python values ($bytes, $map markers decoded)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

VECTORS = Path(os.environ.get("IDA_VECTORS") or Path(__file__).resolve().parent.parent / "vectors")


def from_json(v: Any) -> Any:
    if isinstance(v, list):
        return [from_json(x) for x in v]
    if isinstance(v, dict):
        if set(v) == {"$bytes"}:
            return bytes.fromhex(v["$bytes"])
        if set(v) == {"$map"}:
            return {from_json(k): from_json(x) for k, x in v["$map"]}
        return {k: from_json(x) for k, x in v.items()}
    return v


def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


def same(a: Any, b: Any) -> bool:
    """Structural equality that also tells 1 from True and 1 from 1.0, and -0.0 from 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and str(a) == str(b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)
