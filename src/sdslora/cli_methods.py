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
        opts = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(spec.options_cls))
        print(f"{spec.name:12s} {spec.description}")
        print(f"{'':12s} options: {opts or '-'}")
        print(f"{'':12s} cite: {spec.citation}")
    return 0
