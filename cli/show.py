"""`sheafprune show`: draw a sheaf folder as a graph with its kept fraction per layer (a PNG)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    from sheafprune.show import draw_sheaf, format_summary

    print(format_summary(draw_sheaf(args.sheaf_dir, args.out, overwrite=args.overwrite)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="draw a sheaf: kept edges between heads/MLPs, kept fraction per layer (PNG)")
    p.add_argument("sheaf_dir", type=Path, metavar="SHEAF_DIR", help="sheaf folder from `sheafprune discover`")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=_run)
