"""Task names -> builders: one dict (`TASKS`) and the one verb that resolves a spec (`load_task`).

A spec is `name`, `name/arg` (BLiMP paradigms) or `jsonl:PATH`. Every builder has the signature
`build(arg, *, seed, n, tokenizer) -> Task`; load_task then drops first-token collisions when a
tokenizer is given, so all tasks share that rule.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from sheafprune.errors import UserError
from sheafprune.tasks import blimp, facts, ioi, jsonl
from sheafprune.tasks.base import Task, drop_first_token_collisions

Builder = Callable[..., Task]

TASKS: dict[str, Builder] = {
    "ioi": ioi.build,
    "capitals": facts.build,
    "blimp": blimp.build,
    "jsonl": jsonl.build,
}


def list_tasks() -> list[str]:
    """Every nameable task: ioi, capitals, each blimp/<paradigm>, and the jsonl:PATH pattern."""
    return ["ioi", "capitals", *(f"blimp/{p}" for p in blimp.paradigms()), "jsonl:PATH"]


def parse_spec(spec: str) -> tuple[str, str | None]:
    """'jsonl:PATH' -> ('jsonl', PATH); 'blimp/x' -> ('blimp', 'x'); 'ioi' -> ('ioi', None)."""
    if spec.startswith("jsonl:"):
        return "jsonl", spec[len("jsonl:") :]
    name, _, arg = spec.partition("/")
    return name, arg or None


def _unknown(spec: str) -> UserError:
    if spec.endswith((".jsonl", ".json")):
        return UserError(f"unknown task {spec!r}: for your own items file write jsonl:{spec}")
    close = difflib.get_close_matches(spec, list_tasks(), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return UserError(
        f"unknown task {spec!r}: {hint}valid tasks are ioi, capitals, blimp/<paradigm> "
        f"(e.g. blimp/anaphor_gender_agreement) and jsonl:PATH; `sheafprune tasks` lists them all"
    )


def load_task(spec: str, tokenizer: Any = None, *, seed: int = 0, n: int | None = None) -> Task:
    """Build the task named by `spec` with deterministic seeded splits.

    `n` caps the number of items (for ioi: how many to generate, default 500). With a tokenizer,
    "choice" candidates whose first tokens collide are dropped (counted in `task.notes`), and jsonl
    text that tokenizes to nothing is an error. Every bad input raises UserError with one line.
    """
    if n is not None and n < 1:
        raise UserError(f"n must be a positive number of items, got {n}")
    name, arg = parse_spec(spec.strip())
    if name not in TASKS:
        raise _unknown(spec)
    task = TASKS[name](arg, seed=seed, n=n, tokenizer=tokenizer)
    if tokenizer is not None:
        task = drop_first_token_collisions(task, tokenizer)
    if not any(task.splits.values()):
        raise UserError(f"task {task.name!r} has no items left after dropping candidates that share a first token")
    return task
