"""Task names -> builders: one dict (`TASKS`, the one list of our tasks) and the one verb that resolves a spec
(`load_task`).

A spec is `name`, `name/arg` (BLiMP paradigms) or `jsonl:PATH`. Every builder has the signature
`build(arg, *, seed, n, tokenizer) -> Task`; load_task then drops first-token collisions when a
tokenizer is given, so all tasks share that rule.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from sheafprune.errors import UserError
from sheafprune.tasks import blimp, facts, ioi, jsonl
from sheafprune.tasks.base import Task, drop_first_token_collisions

Builder = Callable[..., Task]


@dataclass(frozen=True)
class TaskEntry:
    build: Builder
    arg: Optional[str] = None  # what the spec adds to the name, separator first ("/<paradigm>"); None: no argument
    names: Optional[Callable[[], list[str]]] = None  # every nameable spec, where the argument has a known set


TASKS: dict[str, TaskEntry] = {
    "ioi": TaskEntry(ioi.build),
    "capitals": TaskEntry(facts.build),
    "blimp": TaskEntry(blimp.build, "/<paradigm>", lambda: [f"blimp/{p}" for p in blimp.paradigms()]),
    "jsonl": TaskEntry(jsonl.build, ":PATH"),
}


def list_tasks() -> list[str]:
    """Every nameable task: ioi, capitals, each blimp/<paradigm>, and the jsonl:PATH pattern."""
    return [spec for name, entry in TASKS.items()
            for spec in (entry.names() if entry.names else [name + (entry.arg or "")])]


def is_task_spec(spec: str) -> bool:
    """Whether `spec` has the form of one of our tasks' specs: a plain name, or name, separator and an argument
    (which only building the task checks)."""
    return any(spec == name if entry.arg is None else spec.startswith(name + entry.arg[0])
               for name, entry in TASKS.items())


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
    task = TASKS[name].build(arg, seed=seed, n=n, tokenizer=tokenizer)
    if tokenizer is not None:
        task = drop_first_token_collisions(task, tokenizer)
    if not any(task.splits.values()):
        raise UserError(f"task {task.name!r} has no items left after dropping candidates that share a first token")
    return task
