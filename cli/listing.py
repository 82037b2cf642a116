"""`sheafprune models` and `sheafprune tasks`: what can be named."""

from __future__ import annotations

import argparse


def _models(args: argparse.Namespace) -> int:
    from sheafprune.models import list_models

    for row in list_models():
        name, desc = row if isinstance(row, tuple) else (row, "")
        print(f"{name:16s} {desc}")
    print("(also: a local Hugging Face model folder, or a hub id where the hub is reachable)")
    return 0


def _tasks(args: argparse.Namespace) -> int:
    from sheafprune.tasks import list_tasks

    for name in list_tasks():
        print(name)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("models", help="list model names").set_defaults(func=_models)
    sub.add_parser("tasks", help="list task names").set_defaults(func=_tasks)
