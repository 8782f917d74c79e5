"""``sdslora evidence``: rebuild the evidence report from the run records a study wrote (``compare --evidence``).

    sdslora evidence docs/evidence -o docs/evidence.md
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evidence", help="rebuild the evidence report (Markdown + plots) from the run records of "
                                        "studies made with compare --lr-sweep ... --evidence DIR/<setting>")
    p.add_argument("root", nargs="?", default="docs/evidence", help="folder holding one sub-folder per study "
                                                                    "(default docs/evidence)")
    p.add_argument("--output", "-o", default=None, help="Markdown file (default: <root>.md beside the folder)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .experiments.evidence import build_report

    root = Path(args.root)
    out = Path(args.output) if args.output else root.with_suffix(".md")
    try:
        summary = build_report(root, out)
    except ValueError as e:
        print(f"sdslora evidence: error: {e}", file=sys.stderr)
        return 2
    n = sum(s["n_runs"] for s in summary["settings"].values())
    print(f"report: {out} ({len(summary['settings'])} setting(s), {n} runs)")
    return 0
