"""`sheafprune eval`: lm-eval results and sheaf metrics for an export folder, a sheaf folder or a model."""

from __future__ import annotations

import argparse
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    from sheafprune.evaluation import evaluate, format_report

    report = evaluate(args.path, tasks=args.tasks, limit=args.limit, batch_size=args.batch_size, out=args.out)
    print(format_report(report))
    if args.out is not None:
        print(f"report written to {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate an export, a sheaf or a model with lm-eval (+ sheaf metrics)")
    p.add_argument("path", help="export folder, sheaf folder, model folder or model name (see `sheafprune models`)")
    p.add_argument("--tasks", help="comma-separated: ioi, capitals, blimp/<paradigm>, jsonl:PATH, lm-eval names "
                                   "such as blimp_<paradigm> (default: the sheaf's own task)")
    p.add_argument("--limit", type=int, help="at most N documents per task (and N test items for sheaf metrics)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="sequences per forward pass (default 32)")
    p.add_argument("--out", type=Path, help="JSON report to write (lm-eval results, sheaf metrics, identity)")
    p.set_defaults(func=_run)
