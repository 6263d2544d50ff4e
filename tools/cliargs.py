"""What the command modules share about their options: :func:`namesakes`, the options a library call takes
under their own names, so a command passes them on in one line instead of ``name=args.name`` for each."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["namesakes"]


def namesakes(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """``{name: args.name}`` for each of ``names`` (argparse dests): keyword arguments of the same names."""
    return {name: getattr(args, name) for name in names}
