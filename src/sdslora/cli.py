"""The ``sdslora`` command line. Each sub-command lives in its own module and registers itself in COMMANDS:
``module path -> function(subparsers)`` that adds its parser and sets ``func`` (returning an exit code).

Start-up stays light: building the parser imports every ``cli_*`` module, so those import torch, transformers and
the rest of the library only inside their command functions (``sdslora --help``, ``--version`` and ``methods`` do
not import torch; ``tests/test_readme.py`` checks it)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from . import __version__

# sub-command modules; each exposes `register(subparsers)`. Modules that fail to import (missing optional
# dependencies) are reported when the user asks for them, not at start-up.
COMMANDS: dict[str, str] = {
    "methods": "sdslora.cli_methods",
    "train": "sdslora.cli_train",
    "eval": "sdslora.cli_eval",
    "compare": "sdslora.cli_compare",
    "diagnose": "sdslora.cli_diagnose",
    "data": "sdslora.cli_data",
    "evidence": "sdslora.cli_evidence",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdslora", description="SDS-LoRA and the adapters it is compared with")
    parser.add_argument("--version", action="version", version=f"sdslora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        if importlib.util.find_spec(module) is None:  # a command module this installation does not have
            continue
        try:
            importlib.import_module(module).register(sub)
        except ImportError as e:  # optional dependency missing: keep the command visible with a clear message
            p = sub.add_parser(name, help=f"(unavailable: {e})")
            p.set_defaults(func=lambda _args, e=e: _unavailable(e))
    return parser


def _unavailable(err: Exception) -> int:
    print(f"sdslora: this command needs an optional dependency: {err}. Try: pip install 'sdslora[demo]'",
          file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
