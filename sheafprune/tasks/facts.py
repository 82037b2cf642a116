"""Factual recall as a multi-class choice: "The capital of France is" -> " Paris" among every capital.

Every item shares one candidate tuple (all answers, with their leading space) and targets its own
answer, so faithfulness is CE over the answer vocabulary. Each country is asked with several templates;
splits are cut by country so a fact seen in training is never tested.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from sheafprune.errors import UserError
from sheafprune.tasks.base import Item, Task, make_splits

TEMPLATES = (
    "The capital of {country} is",
    "The capital city of {country} is",
    "The name of the capital city of {country} is",
)


def capitals() -> list[tuple[str, str]]:
    """(country, capital) pairs, public facts vendored as data/capitals.json."""
    text = resources.files("sheafprune.tasks").joinpath("data/capitals.json").read_text(encoding="utf-8")
    return [(country, capital) for country, capital in json.loads(text)]


def build(arg: str | None, *, seed: int, n: int | None, tokenizer: Any = None) -> Task:
    """The `capitals` task; answers whose first token collides are dropped later, when a tokenizer is given."""
    if arg is not None:
        raise UserError(f"task 'capitals' takes no '/{arg}' suffix; use plain 'capitals'")
    pairs = capitals()
    answers = tuple(" " + capital for _, capital in pairs)
    items, groups = [], []
    for i, (country, _) in enumerate(pairs):
        for template in TEMPLATES:
            items.append(Item(prompt=template.format(country=country), candidates=answers, target=i))
            groups.append(country)
    return Task(name="capitals", kind="choice", splits=make_splits(items, seed=seed, n=n, groups=groups))
