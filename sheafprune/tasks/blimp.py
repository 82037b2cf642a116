"""BLiMP minimal pairs (Warstadt et al. 2020, CC-BY 4.0), read from the copy vendored in data/blimp/.

A paradigm whose pairs differ in one word after a shared prefix (`one_prefix_method`) becomes a
"choice" task: prompt = the shared prefix, candidates = (" good_word", " bad_word"). The other
paradigms are "sentence" tasks scored by total log-probability, as lm-eval scores BLiMP.
"""

from __future__ import annotations

import difflib
import gzip
import json
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

from sheafprune.errors import UserError
from sheafprune.tasks.base import Item, Task, make_splits

SUFFIX = ".jsonl.gz"


def _data_dir() -> Traversable:
    return resources.files("sheafprune.tasks").joinpath("data", "blimp")


def paradigms() -> list[str]:
    """The 67 paradigm names, sorted."""
    return sorted(p.name[: -len(SUFFIX)] for p in _data_dir().iterdir() if p.name.endswith(SUFFIX))


def read_paradigm(paradigm: str) -> list[dict[str, Any]]:
    """The paradigm's rows in file order; UserError (with close matches) for an unknown name."""
    names = paradigms()
    if paradigm not in names:
        close = difflib.get_close_matches(paradigm, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join('blimp/' + c for c in close)}?" if close else "e.g. blimp/" + names[0]
        raise UserError(f"unknown BLiMP paradigm {paradigm!r}: {hint} (`sheafprune tasks` lists all {len(names)})")
    with _data_dir().joinpath(paradigm + SUFFIX).open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def to_item(row: dict[str, Any], kind: str) -> Item:
    if kind == "choice":
        # The prefix has no trailing space and the words no leading one (checked over all 20 such
        # paradigms); strip anyway so each candidate carries exactly one leading space.
        words = (" " + row["one_prefix_word_good"].strip(), " " + row["one_prefix_word_bad"].strip())
        return Item(prompt=row["one_prefix_prefix"].rstrip(), candidates=words, target=0)
    return Item(prompt="", candidates=(row["sentence_good"], row["sentence_bad"]), target=0)


def build(arg: str | None, *, seed: int, n: int | None, tokenizer: Any = None) -> Task:
    """The `blimp/<paradigm>` task: 1000 pairs (or the first `n` after the seeded shuffle)."""
    if not arg:
        raise UserError(f"blimp needs a paradigm: use blimp/<paradigm>, e.g. blimp/{paradigms()[0]}")
    rows = read_paradigm(arg)
    methods = {bool(row["one_prefix_method"]) for row in rows}
    assert len(methods) == 1, f"blimp/{arg} mixes one_prefix_method values {methods}"
    kind = "choice" if methods.pop() else "sentence"
    items = [to_item(row, kind) for row in rows]
    return Task(name=f"blimp/{arg}", kind=kind, splits=make_splits(items, seed=seed, n=n))
