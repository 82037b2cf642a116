"""A task is a set of minimal pairs scored by one rule; this file is that rule (items -> tensors -> scores).

Two kinds of task, one scoring contract (`score` returns (B, C) scores, argmax == target means correct):
- "choice": next-token choice at the last prompt position; the scores are the raw logits of each
  candidate's first token (DiscoGP's faithfulness is CE over these C logits).
- "sentence": whole-sentence pairs (good, bad) scored by total log-probability, exactly as lm-eval scores
  BLiMP: each sentence is encoded as `prefix token + tokens(" " + sentence)` and every token after the
  prefix is summed.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sheafprune.errors import UserError

SPLITS = ("train", "dev", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
# lm-eval joins an (empty) context and each multiple-choice continuation with its default
# target_delimiter " ", so BLiMP sentences are scored as " " + sentence.
SENTENCE_DELIMITER = " "


@dataclass(frozen=True)
class Item:
    """One minimal pair (or one multi-class question); `target` indexes the correct candidate."""

    prompt: str  # "choice": context before the answer, no trailing space; "sentence": "" (unused)
    candidates: tuple[str, ...]  # "choice": continuations with one leading space; "sentence": (good, bad)
    target: int = 0


@dataclass(frozen=True)
class Task:
    """A named task with deterministic train/dev/test splits; `notes` records what loading dropped."""

    name: str  # canonical spec: "ioi", "capitals", "blimp/<paradigm>", "jsonl:/abs/path"
    kind: str  # "choice" or "sentence"
    splits: dict[str, list[Item]]
    notes: dict[str, Any] = field(default_factory=dict)

    def items(self, split: str) -> list[Item]:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; use one of {sorted(self.splits)}")
        return self.splits[split]


@dataclass
class Batch:
    """Encoded items, tensors on CPU until `.to(device)`. N rows: N = B ("choice") or 2B ("sentence")."""

    input_ids: torch.Tensor  # (N, T) long, LEFT-padded
    attention_mask: torch.Tensor  # (N, T) long, 1 = real token
    position_ids: torch.Tensor  # (N, T) long, 0 at each row's first real token (HF GPT-2 needs it)
    cand_ids: torch.Tensor  # (B, C) first token id of each candidate ("sentence": zeros)
    target: torch.Tensor  # (B,) long
    kind: str
    score_mask: torch.Tensor | None = None  # (N, T) bool, tokens whose log-prob is summed ("sentence")

    def __len__(self) -> int:
        return self.target.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


def make_splits(
    items: Sequence[Item], *, seed: int, n: int | None = None, groups: Sequence[str] | None = None
) -> dict[str, list[Item]]:
    """Seeded shuffle, keep the first `n` items, cut 0.8/0.1/0.1.

    With `groups` (one key per item), whole groups are shuffled and cut, so items that share a key
    (e.g. one country asked with several templates) never straddle two splits. The cut depends only
    on the number of items (or the sequence of group keys), `seed` and `n`, never on item content, so
    two encodings of the same rows (e.g. BLiMP as "choice" and as "sentence") get the same splits.
    """
    keys = list(groups) if groups is not None else list(range(len(items)))
    assert len(keys) == len(items), f"{len(keys)} group keys for {len(items)} items"
    units: dict[Any, list[Item]] = {}
    for key, item in zip(keys, items):
        units.setdefault(key, []).append(item)
    order = list(units)  # first-seen order: deterministic, independent of hashing
    random.Random(f"split:{seed}").shuffle(order)
    if n is not None:
        kept, total = [], 0
        for key in order:
            if total >= n:
                break
            units[key] = units[key][: n - total]
            kept.append(key)
            total += len(units[key])
        order = kept
    n_dev = round(SPLIT_FRACTIONS[1] * len(order))
    n_test = round(SPLIT_FRACTIONS[2] * len(order))
    n_train = len(order) - n_dev - n_test
    cuts = {"train": order[:n_train], "dev": order[n_train : n_train + n_dev], "test": order[n_train + n_dev :]}
    return {split: [item for key in cut for item in units[key]] for split, cut in cuts.items()}


def held_out_size(task: Task, cap: int) -> int:
    """How many training items a run holds out for judging: `cap`, or a quarter of a small train split."""
    return min(cap, len(task.items("train")) // 4)


def hold_out(task: Task, n: int, *, split: str = "select") -> Task:
    """Move the last `n` training items (the split is already a seeded shuffle) to a new split `split`: items
    that training never sees, for judging candidate sheaves on more than the dev split (held_out_size)."""
    train = task.items("train")
    if n <= 0:
        return task
    if n >= len(train):
        raise UserError(f"holding out {n} items would leave no training items (the train split has {len(train)}); "
                        f"hold out fewer than {len(train)}")
    splits = {**task.splits, "train": train[:-n], split: train[-n:]}
    return dataclasses.replace(task, splits=splits, notes={**task.notes, "held_out_of_train": {split: n}})


def answer_weights(items: Sequence[Item], *, measure: bool = False) -> list[float] | None:
    """Per-item weights under which, within each candidate set, every answer that occurs is the right one
    equally often; None when no candidate set has more than one right answer, when all weights are 1, or (with
    `measure`) when such sets hold fewer than half of the items.

    Items are grouped by their (unordered) candidates; in a group of N items whose K >= 2 distinct right answers
    occur n_a times, an item answered by `a` weighs N / (K * n_a), so the group keeps its total weight N. A
    predictor that ignores the prompt (a fixed order of the answer tokens) then scores exactly chance on every
    such group. Items of a group with one right answer weigh 1 to train on, and 0 with `measure` (a fixed order
    gets all of them right or all wrong, so they cannot tell reading the prompt from a prior). BLiMP's
    anaphor split needs this: ' herself' is right in 519 of its 800 training items, ' itself' in 24, and always
    preferring ' herself' > ' himself' > ' itself' scores 0.81 there without reading the subject.
    """
    groups: dict[tuple[str, ...], Counter] = {}
    for item in items:
        groups.setdefault(tuple(sorted(item.candidates)), Counter())[item.candidates[item.target]] += 1
    mixed = sum(sum(counts.values()) for counts in groups.values() if len(counts) > 1)
    if mixed == 0 or (measure and mixed < len(items) / 2):
        # Measured on a few items only (IOI's test split: 2 of 50 items share a name pair in both orders), a
        # balanced accuracy would be noise: none.
        return None
    weights = []
    for item in items:
        counts = groups[tuple(sorted(item.candidates))]
        weights.append(sum(counts.values()) / (len(counts) * counts[item.candidates[item.target]])
                       if len(counts) > 1 else 0.0 if measure else 1.0)
    return None if all(abs(w - 1.0) < 1e-12 for w in weights) else weights


def token_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids without special tokens (lm-eval's default for HF causal models)."""
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def drop_first_token_collisions(task: Task, tokenizer: Any) -> Task:
    """Drop "choice" candidates whose first token equals another candidate's: the logits can't tell them apart.

    A colliding distractor is removed from the item's candidates; an item whose target collides is
    dropped. Two-way items lose the item; multi-class tasks (one shared candidate tuple) lose every
    answer of a colliding group. Counts go to `notes`.
    """
    if task.kind != "choice":
        return task
    all_cands = sorted({c for items in task.splits.values() for item in items for c in item.candidates})
    first = {c: ids[0] if ids else None for c, ids in zip(all_cands, token_ids(tokenizer, all_cands))}
    splits: dict[str, list[Item]] = {}
    dropped_items, colliding = 0, set()
    for split, items in task.splits.items():
        splits[split] = []
        for item in items:
            counts = Counter(first[c] for c in item.candidates)
            clash = {c for c in item.candidates if counts[first[c]] > 1}
            colliding |= clash
            if item.candidates[item.target] in clash or len(item.candidates) - len(clash) < 2:
                dropped_items += 1
                continue
            kept = tuple(c for c in item.candidates if c not in clash)
            splits[split].append(Item(item.prompt, kept, kept.index(item.candidates[item.target])))
    notes = {**task.notes, "dropped_first_token_collisions": dropped_items}
    if colliding:
        notes["colliding_candidates"] = sorted(colliding)
    return dataclasses.replace(task, splits=splits, notes=notes)


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (N, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (N, T)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


def _prefix_id(tokenizer: Any) -> int:
    """lm-eval's prefix for an empty context: BOS if the tokenizer has one, else EOS."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    assert prefix is not None, "tokenizer has neither bos_token_id nor eos_token_id"
    return prefix


def encode(task: Task, items: list[Item], tokenizer: Any) -> Batch:
    """Tokenize `items` (no special tokens, left padding) into a Batch for `score`."""
    assert items, "encode() needs at least one item"
    pad_id = tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else (tokenizer.eos_token_id or 0)  # value is masked out anyway
    target = torch.tensor([item.target for item in items], dtype=torch.long)  # (B,)
    if task.kind == "choice":
        n_cands = {len(item.candidates) for item in items}
        assert len(n_cands) == 1, f"items in one batch must share the candidate count, got {sorted(n_cands)}"
        rows = token_ids(tokenizer, [item.prompt for item in items])
        assert all(rows), "a prompt tokenizes to nothing; there is no position to read the choice from"
        uniq = sorted({c for item in items for c in item.candidates})
        first = {c: ids[0] for c, ids in zip(uniq, token_ids(tokenizer, uniq)) if ids}
        missing = [c for c in uniq if c not in first]
        assert not missing, f"candidates tokenize to nothing: {missing[:3]}"
        cand_ids = torch.tensor([[first[c] for c in item.candidates] for item in items], dtype=torch.long)  # (B, C)
        ids, mask = _left_pad(rows, pad_id)
        score_mask = None
    elif task.kind == "sentence":
        assert all(len(item.candidates) == 2 for item in items), "sentence items are (good, bad) pairs"
        prefix = _prefix_id(tokenizer)
        sentences = [SENTENCE_DELIMITER + s for item in items for s in item.candidates]  # good, bad, good, ...
        # lm-eval skips the prefix when the text already starts with it; its first token is then the context.
        rows = [toks if toks and toks[0] == prefix else [prefix, *toks] for toks in token_ids(tokenizer, sentences)]
        ids, mask = _left_pad(rows, pad_id)
        first_real = mask.argmax(dim=1, keepdim=True)  # (N, 1) column of each row's prefix token
        cols = torch.arange(ids.shape[1]).unsqueeze(0)  # (1, T)
        score_mask = mask.bool() & (cols > first_real)  # (N, T)
        cand_ids = torch.zeros((len(items), 2), dtype=torch.long)  # (B, 2) unused
    else:
        raise ValueError(f"unknown task kind {task.kind!r}")
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (N, T)
    return Batch(ids, mask, position_ids, cand_ids, target, task.kind, score_mask)


def score(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Candidate scores (B, C) from the model's logits (N, T, V) on `batch.input_ids`; differentiable."""
    if batch.kind == "choice":
        last = logits[:, -1, :].float()  # (B, V): left padding puts every prompt's end at T-1
        return last.gather(1, batch.cand_ids)  # (B, C)
    assert batch.score_mask is not None, "a sentence batch carries score_mask"
    pred = logits[:, :-1, :].float()  # (N, T-1, V) position t predicts token t+1
    nxt = batch.input_ids[:, 1:].unsqueeze(-1)  # (N, T-1, 1)
    logp = (pred.gather(2, nxt) - pred.logsumexp(dim=2, keepdim=True)).squeeze(-1)  # (N, T-1)
    # where(), not a product: logits at padded positions may be inf/NaN and NaN * 0 is NaN.
    logp = torch.where(batch.score_mask[:, 1:], logp, torch.zeros_like(logp))
    return logp.sum(dim=1).view(-1, 2)  # (B, 2) rows were good, bad, good, bad, ...
