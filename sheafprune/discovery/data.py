"""What each process trains and is judged on. Data parallelism is explicit: the global batch of step s is a pure
function of (seed, s) and every process takes its slice of it; a split is scored in shards, one per process, and
the scores are gathered on every process. So N processes compute what one process computes, and a resumed run
draws the batches an uninterrupted one draws.
"""

from __future__ import annotations

import random
from typing import Optional

import torch
from torch import Tensor

from ..arch import ArchView
from ..config import DiscoverConfig
from ..tasks import Task, answer_weights, encode
from .masks import MaskLogits, deterministic_masks
from .objective import split_scores


def batch_indices(step: int, *, n: int, size: int, seed: int, weights: Optional[list[float]] = None) -> list[int]:
    """Item indices of global step `step`: consecutive slices of per-epoch seeded permutations; with `weights`,
    `size` draws with replacement in proportion to them, seeded by (seed, step)."""
    if weights is not None:
        return random.Random(f"weighted:{seed}:{step}").choices(range(n), weights=weights, k=size)
    out: list[int] = []
    pos = step * size
    while len(out) < size:
        epoch, offset = divmod(pos, n)
        perm = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        take = perm[offset:offset + size - len(out)]
        out += take
        pos += len(take)
    return out


class RankData:
    """This process's training items of each step, and the scores of whole splits under the sheaf's masks."""

    def __init__(self, *, cfg: DiscoverConfig, view: ArchView, tokenizer, task: Task, params: MaskLogits,
                 accelerator):
        self.cfg, self.view, self.tok, self.task = cfg, view, tokenizer, task
        self.params, self.acc = params, accelerator
        self.device = accelerator.device
        # Answer-balanced weights of each split (None where no candidate set has a skewed answer): the training
        # sampler draws by them, so every right answer of a candidate set is drawn equally often and a fixed answer
        # preference gains nothing (as in the keep search); dev and test metrics report the balanced accuracy.
        # Dev and test are measured without the candidate sets that have one right answer: a fixed order scores chance.
        self.answer_weights = {split: answer_weights(task.items(split), measure=split != "train")
                               for split in task.splits}

    def local_indices(self, step: int) -> list[int]:
        """This rank's training items of global step `step`."""
        idx = batch_indices(step, n=len(self.task.items("train")), size=self.cfg.batch_size, seed=self.cfg.seed,
                            weights=self.answer_weights["train"])
        per = self.cfg.batch_size // self.acc.num_processes
        return idx[self.acc.process_index * per:(self.acc.process_index + 1) * per]

    def local_batch(self, step: int):
        items = self.task.items("train")
        return encode(self.task, [items[i] for i in self.local_indices(step)], self.tok).to(self.device)

    def scores(self, split: str, masks) -> tuple[Tensor, Tensor]:
        """Scores of `split`, each rank scoring a shard, gathered on every rank."""
        from accelerate.utils import gather_object

        masks = self.params.for_forward(masks)  # every rank, even one without items: it may take part in gathers
        items = self.task.items(split)
        shard = Task(self.task.name, self.task.kind, {split: items[self.acc.process_index::self.acc.num_processes]})
        s, t = split_scores(self.view, self.tok, shard, masks, split=split, batch_size=self.cfg.batch_size,
                            device=self.device) if shard.items(split) else (torch.zeros(0, 0), torch.zeros(0))
        rows = gather_object([(i * self.acc.num_processes + self.acc.process_index, s[i].tolist(), int(t[i]))
                              for i in range(len(t))])
        rows.sort()
        return torch.tensor([r[1] for r in rows]), torch.tensor([r[2] for r in rows])

    def split_scores(self, split: str, trained: tuple[str, ...], full=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(full, sheaf, complement) scores and the targets of a split; `full`: the full model's, if known."""
        full_s, target = full or self.scores(split, None)
        sheaf_s, _ = self.scores(split, deterministic_masks(self.params))
        comp_s, _ = self.scores(split, deterministic_masks(self.params, trained, complement=True))
        return full_s, sheaf_s, comp_s, target
