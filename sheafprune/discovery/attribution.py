"""The attribution init: before step 1 of a fresh run, mask logits ranked by how much each entry matters.

The score of a mask entry is |dL/dm| at m = 1 (the full model), L the recipe's faithfulness loss, summed over
INIT_BATCHES training batches: the first-order change of the loss if that entry alone were removed (for edges this
is edge attribution patching with zero ablation; with the recipe's edge_grad "secant", the removal's effect taken
exactly through the reader's norm). Every rank scores its slice of the same global batches and the scores are
all-reduced, so the logits are identical on every rank.
"""

from __future__ import annotations

import torch

from ..arch import ArchView
from ..config import DiscoverConfig
from ..errors import RunFailed
from .data import RankData
from .masks import MaskLogits
from .objective import FAITH_LOSSES, task_scores
from .schedule import INIT_MEAN, attribution_init

INIT_BATCHES = 4  # training batches whose summed |dLoss/dmask| rank the entries


def init_logits(*, cfg: DiscoverConfig, view: ArchView, params: MaskLogits, data: RankData, accelerator,
                progress: bool) -> None:
    """Attribution-ranked logits (the recipe's init), else keep DiscoGP's constant init."""
    if not attribution_init(cfg):
        return
    from tqdm.auto import tqdm

    recipe = cfg.recipe_settings
    shapes = {k: tuple(p.shape) for k, p in params.named_logits().items()}
    ones = {k: torch.ones(shape, device=accelerator.device, requires_grad=True) for k, shape in shapes.items()}
    for b in tqdm(range(INIT_BATCHES), desc="attribution", disable=not progress, leave=False):
        batch = data.local_batch(b)
        scores = task_scores(view, batch, params.for_forward(ones), edge_grad=recipe.edge_grad)
        FAITH_LOSSES[recipe.faith_loss](scores, batch.target).backward()
    scores = {}
    for k, m in ones.items():
        g = m.grad if m.grad is not None else torch.zeros_like(m)
        if accelerator.num_processes > 1 and k not in params.sharded:
            g = accelerator.reduce(g, reduction="mean")
        if not torch.isfinite(g).all():
            raise RunFailed(f"the attribution init got a non-finite gradient for {k}; the model's outputs on "
                            f"this task are not finite (try --init constant)")
        scores[k] = g.abs()
    del ones
    params.init_from_scores(scores, center=INIT_MEAN, spread=recipe.init_spread, seed=cfg.seed,
                            within=recipe.rank_within)
