"""Indirect object identification (Wang et al. 2022), generated from templates: who receives the object?

"When Mary and John went to the store, John gave a drink to" -> " Mary" (the indirect object, IO) vs
" John" (the subject, S). Both name orders occur in equal numbers: ABBA (IO named first) and BABA
(S named first), so position alone never predicts the answer.
"""

from __future__ import annotations

import random
from typing import Any

from sheafprune.errors import UserError
from sheafprune.tasks.base import Item, Task, make_splits

DEFAULT_N = 1000

# Every name is one token with its leading space for GPT-2 BPE and for the SmolLM2 tokenizer
# (tests/test_tasks.py checks GPT-2), so " IO" and " S" differ in their first token.
NAMES = (
    "Mary John Tom James Dan Sid Martin Amy Alice Paul Kate Mark Lisa Michael David Sarah Laura Anna "
    "Robert Richard Peter George Daniel Emma Rose Jack Steven Ben Sam Chris Adam Brian Kevin Eric Ryan "
    "Jason Jessica Jennifer Andrew Matthew Joseph Thomas Charles William Henry Edward Jacob Luke Tim "
    "Jeff Scott Greg Frank Max Joe Bob Bill Jim Anne Elizabeth Grace Helen Julia Karen Linda Nancy "
    "Rachel Susan Lucy Emily Victoria Patrick Simon Alex Carl Jane Sophie Oliver Harry Charlie Kelly"
).split()
PLACES = (
    "store garden restaurant school hospital office station house park library beach market museum "
    "church bank hotel airport theater farm"
).split()
# Consonant-initial so the templates' "a {obj}" stays grammatical.
OBJECTS = (
    "drink ring basket book bone computer necklace snack candle bottle towel ball letter gift pen bag hat box"
).split()

# {A} and {B} are the two names in order of mention; {S} is the subject, who repeats. SmolLM2-135M-
# Instruct gets >= 95% of each template right in both orders; a "{S} gave it to" variant that it got
# 20% right on ABBA was dropped, since a task the full model fails gives no circuit to find.
TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} gave a {obj} to",
    "When {A} and {B} got a {obj} at the {place}, {S} decided to give it to",
    "After {A} and {B} went to the {place}, {S} gave a {obj} to",
    "Then, {A} and {B} went to the {place}. {S} gave a {obj} to",
    "While {A} and {B} were working at the {place}, {S} gave a {obj} to",
    "After {A} and {B} had lunch at the {place}, {S} offered a {obj} to",
    "While {A} and {B} were commuting to the {place}, {S} handed a {obj} to",
    "After lunch, {A} and {B} went to the {place}. {S} gave a {obj} to",
    "When {A} and {B} arrived at the {place}, {S} gave a {obj} to",
    "The {place} was quiet when {A} and {B} came in. {S} passed a {obj} to",
)


def generate(n: int, *, seed: int) -> list[Item]:
    """`n` distinct IOI items; even indices ABBA, odd indices BABA."""
    # Far below the number of distinct prompts, so drawing until `n` distinct ones ends quickly.
    limit = len(TEMPLATES) * len(NAMES) * (len(NAMES) - 1) * len(PLACES) * len(OBJECTS) // 100
    if n > limit:
        raise UserError(f"ioi has too few distinct prompts for n={n}; use n <= {limit}")
    rng = random.Random(f"ioi:{seed}")
    items: list[Item] = []
    seen: set[str] = set()
    while len(items) < n:
        template = rng.choice(TEMPLATES)
        io, s = rng.sample(NAMES, 2)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        first, second = (io, s) if len(items) % 2 == 0 else (s, io)  # ABBA, then BABA
        prompt = template.format(A=first, B=second, S=s, place=place, obj=obj)
        if prompt in seen:  # a duplicate could land in two splits
            continue
        seen.add(prompt)
        items.append(Item(prompt=prompt, candidates=(" " + io, " " + s), target=0))
    return items


def build(arg: str | None, *, seed: int, n: int | None, tokenizer: Any = None) -> Task:
    """The `ioi` task: `n` generated items (default 500), split 0.8/0.1/0.1."""
    if arg is not None:
        raise UserError(f"task 'ioi' takes no '/{arg}' suffix; use plain 'ioi' (n sets how many items)")
    items = generate(DEFAULT_N if n is None else n, seed=seed)
    return Task(name="ioi", kind="choice", splits=make_splits(items, seed=seed))
