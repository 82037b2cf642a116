"""`--vocab task`: keep embedding and head rows only for the tokens the sheaf's task uses.

Kept: every token of the task's items in all splits, tokenized as the task encodes them (prompts, sentences and
their prefix token; for next-token tasks every token of each candidate, not only the first that is scored), plus the
tokenizer's special tokens. Any other input id reads one fallback row, the mean embedding over the full vocabulary;
any other output id gets the dtype's lowest float as its logit (modeling_sheaf.py). The row selection is
`reduce_vocab`, on the compacted state dict.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..compact import Compacted
from ..tasks import Task, encode
from ..tasks.base import token_ids

VOCABS = ("full", "task")


def task_token_ids(task: Task, tokenizer: Any, vocab_size: int) -> list[int]:
    """Sorted ids (< vocab_size) of every token the task's items use, plus the tokenizer's special tokens."""
    kept: set[int] = set(getattr(tokenizer, "all_special_ids", []) or [])
    items = [item for split in task.splits.values() for item in split]
    by_count: dict[int, list] = {}  # encode() wants one candidate count per batch
    for item in items:
        by_count.setdefault(len(item.candidates), []).append(item)
    for group in by_count.values():
        batch = encode(task, group, tokenizer)
        kept.update(batch.input_ids[batch.attention_mask.bool()].tolist())
        if task.kind == "choice":
            kept.update(batch.cand_ids.flatten().tolist())
    if task.kind == "choice":
        candidates = sorted({c for item in items for c in item.candidates})
        kept.update(i for ids in token_ids(tokenizer, candidates) for i in ids)
    return sorted(i for i in kept if 0 <= i < vocab_size)


def reduce_vocab(c: Compacted, keep: list[int]) -> Compacted:
    """The compacted model with embedding (and untied head) rows for `keep` only, plus the fallback row: the mean
    embedding over the full vocabulary (computed in fp64 before any row is dropped)."""
    t = dict(c.tensors)
    embed = t["embed.weight"]  # (V, D)
    rows = torch.tensor(keep, dtype=torch.long)  # (K,)
    fallback = embed.double().mean(0).to(embed.dtype)  # (D,)
    t["embed.weight"] = torch.cat([embed[rows], fallback[None]]).contiguous()  # (K + 1, D)
    if "lm_head.weight" in t:
        t["lm_head.weight"] = t["lm_head.weight"][rows].contiguous()  # (K, D)
    stats = {**c.stats, "params": sum(v.numel() for v in t.values())}
    return dataclasses.replace(c, config={**c.config, "vocab_keep": list(keep)}, tensors=t, stats=stats)


def vocab_info(c: Compacted) -> dict[str, Any]:
    """What the export's metadata and card say about the vocabulary."""
    keep = c.config.get("vocab_keep") or []
    if not keep:
        return {"vocab": "full"}
    return {"vocab": "task", "vocab_kept": len(keep), "vocab_size": c.config["vocab_size"],
            "vocab_fallback_row": len(keep)}
