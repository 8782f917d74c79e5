"""``sdslora methods``: list the registered methods with their options and citations."""

from __future__ import annotations

import argparse
import dataclasses


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list the available methods and their options")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .methods import METHODS

    for spec in METHODS.values():
        defaults = dataclasses.asdict(spec.options_cls())  # resolved defaults (e.g. SDS's refresh_align)
        opts = ", ".join(f"{k}={v!r}" for k, v in defaults.items())
        print(f"{spec.name:12s} {spec.description}")
        print(f"{'':12s} options: {opts or '-'}")
        print(f"{'':12s} cite: {spec.citation}")
    return 0
