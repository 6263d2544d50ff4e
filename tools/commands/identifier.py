"""`ida identifier ID...`: check identifiers as the gateway would, print the normalised form or the reason."""

from __future__ import annotations

import argparse
import json

from proto import identifier


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("identifiers", nargs="+", metavar="ID")
    p.add_argument("--json", action="store_true", help="one JSON object per identifier")


def run(args: argparse.Namespace) -> int:
    bad = 0
    for text in args.identifiers:
        try:
            ident = identifier.parse(text)
        except identifier.IdentifierError as e:
            bad += 1
            if args.json:
                print(json.dumps({"input": text, "valid": False, "reason": e.reason, "detail": e.detail}))
            else:
                print(f"{text!r}: invalid, {e.reason}: {e.detail}")
            continue
        if args.json:
            print(
                json.dumps(
                    {
                        "input": text,
                        "valid": True,
                        "normalised": str(ident),
                        "prefix": ident.prefix,
                        "suffix": ident.suffix,
                    },
                    ensure_ascii=False,
                )
            )
        else:
            print(f"{ident}")
    return 1 if bad else 0
