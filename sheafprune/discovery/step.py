"""One training step of the mask logits: sample masks, score the task with the sheaf and its complement, step the
logits, then project each targeted type onto the ramp's density (top-k by logit).

Data parallelism: every rank draws the same masks (noise seeded by the step), scores its own slice of the global
batch, and gradients are all-reduced (mean) before the step, so N processes compute what one process computes on
the whole batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..arch import ArchView
from ..config import DiscoverConfig
from ..errors import RunFailed
from ..graph import mask_type
from .data import RankData
from .masks import MaskLogits, deterministic_masks, rank_group
from .objective import FAITH_LOSSES, completeness, task_scores
from .schedule import (STRAIGHT_THROUGH_TAUS, Stage, initial_density, lr_at, noise_scale, paper_lambda,
                       plan_stages, stage_at, targets_at)

# AdamW's second-moment decay (the staged preset): a shorter memory than 0.999, since straight-through gradients of
# tau = 0.01 gates are rare spikes.
ADAM_BETA2 = 0.9
# Weight of the completeness loss (DiscoGP's lambda_c): 3 and 10 gave sheaves that fell to a fixed answer order on
# BLiMP anaphor (docs/weight-edge-experiments.md).
LAMBDA_COMPLETE = 1.0
# The joint schedule scores the complement on every COMPLEMENT_EVERY-th step only, its loss weighted by as much: the
# same objective in expectation, at a fraction of the complement's cost (a whole second pass through the writer stack
# and, at weight granularity, through 10^8 masked weights). The staged preset, DiscoGP's own recipe, scores it at
# every step. Measured in docs/step-cost.md.
COMPLEMENT_EVERY = 2


def make_optimizer(cfg: DiscoverConfig, params: MaskLogits, stage: Stage) -> torch.optim.Optimizer:
    """The optimizer of a stage, over the logits of the mask types it trains (the others stop requiring grad).

    The joint schedule: SGD with EMA momentum on gradients divided by their RMS over the mask type or tensor
    (`normalized`, "nsgd"), so a logit moves in proportion to its gradient; AdamW normalizes each entry by its own
    history, so one spike of any size moves a logit by ~6 lr, and the sheaf churns. Both recipes that kept a task
    at 5%/5% on SmolLM2 used it (docs/weight-edge-experiments.md). The staged preset: DiscoGP's AdamW."""
    for key, p in params.named_logits().items():
        p.requires_grad_(mask_type(key) in stage.trained)
    trained = [p for p in params.named_logits().values() if p.requires_grad]
    # fused: one pass over each ~10^8-entry weight-mask tensor instead of one per elementwise op
    if normalized(stage):
        return torch.optim.SGD(trained, lr=cfg.lr, momentum=0.9, dampening=0.9, fused=True)
    return torch.optim.AdamW(trained, lr=cfg.lr, betas=(0.9, ADAM_BETA2), weight_decay=0.0, fused=True)


def complement_every(stage: Stage) -> int:
    """Every how many steps the stage scores the complement (COMPLEMENT_EVERY in the joint schedule, else 1)."""
    return COMPLEMENT_EVERY if normalized(stage) else 1


def normalized(stage: Stage) -> bool:
    """Whether the stage's optimizer takes RMS-normalized gradients (nsgd: the joint schedule)."""
    return stage.sparsity == "top-k"


def _sum_of_squares(t: Tensor) -> Tensor:
    """sum(t^2) in float64, from float32 dot products of 2^20-entry chunks: within ~1e-6 of the float64 sum (one dot
    over 10^8 entries drifts by ~4e-4), at a twentieth of the cost of squaring a float64 copy (0.02 s vs 0.5 s for
    SmolLM2's 10^8 weight-mask gradients, every step)."""
    flat = t.reshape(-1)
    return torch.stack([torch.dot(c, c) for c in flat.split(1 << 20)]).double().sum()


@torch.no_grad()
def normalize_grads(logits: dict[str, Tensor], *, sharded=frozenset(), reduce_sum: Optional[Callable] = None,
                    within: str = "type") -> None:
    """nsgd: divide every gradient by the RMS of the gradients of its mask type (`within` "type") or of its own
    tensor ("tensor"), over all entries.

    Keys in `sharded` hold this rank's rows only: their sum of squares and count are summed over the ranks with
    `reduce_sum`, so every rank divides by the RMS of the full group, as one process would.
    """
    local: dict[tuple[str, bool], Tensor] = {}  # (group, sharded) -> [sum of squares, count]
    for key, p in logits.items():
        if p.grad is not None:
            part = (rank_group(key, within), key in sharded)
            acc = local.setdefault(part, torch.zeros(2, dtype=torch.float64, device=p.grad.device))
            acc[0] += _sum_of_squares(p.grad)
            acc[1] += p.grad.numel()
    total: dict[str, Tensor] = {}
    for (group, is_sharded), acc in local.items():
        if is_sharded and reduce_sum is not None:
            acc = reduce_sum(acc)
        total[group] = total.get(group, 0) + acc
    for key, p in logits.items():
        if p.grad is not None:
            sq, n = total[rank_group(key, within)].tolist()
            p.grad.div_(max((sq / max(n, 1.0)) ** 0.5, 1e-30))


class TrainStep:
    """Call with the global step and the optimizer: trains one step, returns its row of the training curve."""

    def __init__(self, *, cfg: DiscoverConfig, view: ArchView, params: MaskLogits, data: RankData,
                 accelerator, work_dir: Path):
        self.cfg, self.view, self.params, self.data = cfg, view, params, data
        self.acc, self.work_dir = accelerator, work_dir
        self.stages = plan_stages(cfg)
        self.start_density = initial_density(cfg)
        self.taus = STRAIGHT_THROUGH_TAUS
        # bf16 training passes (--precision bf16): the matmuls run in bf16 and the writer stack holds bf16 rows;
        # attention, the norms' statistics, the LM head and the losses stay fp32 (masked.py). Evaluations never
        # autocast: every sheaf judged is fp32's.
        self.dtype = torch.bfloat16 if cfg.precision == "bf16" else None
        self._frozen_for: Optional[str] = None

    def _frozen(self, stage: Stage) -> Optional[dict[str, Tensor]]:
        """Deterministic masks of the types this stage does not train (fixed for the whole stage)."""
        if stage.trained == tuple(self.cfg.granularity):
            return None
        if self._frozen_for != stage.name:
            self._frozen_masks = {k: v for k, v in deterministic_masks(self.params).items()
                                  if mask_type(k) not in stage.trained}
            self._frozen_for = stage.name
        return self._frozen_masks

    def __call__(self, step: int, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        # The last step's gradients go before the forward: at weight granularity they are model-sized and would sit
        # beside the forward's activations (all logits': a stage that no longer trains a type drops its gradients).
        for p in self.params.parameters():
            p.grad = None
        stage, local = stage_at(self.stages, step)
        frozen = self._frozen(stage)
        scale = noise_scale(self.cfg, stage, local)
        targets = targets_at(self.cfg, stage, local, self.start_density)
        # the projection moves targeted types; only the others' expected density enters the loss
        in_loss = [t for t in stage.trained if t not in targets] if stage.sparsity == "top-k" else None
        recipe = self.cfg.recipe_settings
        every = complement_every(stage)
        masks, comp, dens = self.params(trained=stage.trained, gate=recipe.gate, taus=self.taus,
                                        noise_seed=self.cfg.seed * 1_000_003 + step, noise_scale=scale,
                                        frozen_masks=frozen, density_grad=in_loss, complement=step % every == 0)
        batch = self.data.local_batch(step)
        scores = self._scores(batch, masks)
        faith = FAITH_LOSSES[recipe.faith_loss](scores, batch.target)
        complete = completeness(self._scores(batch, comp)) if comp is not None else None
        if stage.sparsity == "top-k":
            # Targeted types are projected onto their ramp (masks.project); the others get DiscoGP's
            # plain sparsity pressure.
            untargeted = [dens[t] for t in dens if t not in targets]
            sparse = torch.stack(untargeted).mean() if untargeted else torch.zeros((), device=faith.device)
        else:
            sparse = paper_lambda(stage, local) * torch.stack(list(dens.values())).mean()
        loss = faith + sparse + (LAMBDA_COMPLETE * every * complete if complete is not None else 0.0)
        if not torch.isfinite(loss):
            kept = (f"the last good checkpoint is in {self.work_dir}" if any(self.work_dir.glob("ckpt-*.json"))
                    else "no checkpoint was written yet")
            raise RunFailed(f"loss became {float(loss.detach())} at step {step}; {kept} (try a lower --lr)")
        lr = lr_at(self.cfg, stage, local)
        self._descend(loss, optimizer, lr, normalized(stage))
        expected = {t: float(d.detach()) for t, d in dens.items()}
        if stage.sparsity == "top-k":
            # Top-k at every step: a threshold from a 2M-entry sample (kthvalue over all of SmolLM2's 134M weight
            # logits costs ~1.7 s); evaluations project exactly.
            self.params.project(targets, exact=True, sample=2_000_000, seed=self.cfg.seed * 1_000_003 + step)
        kept = self.params.kept(stage.trained)
        nan = torch.full((), float("nan"), device=faith.device)
        vals = torch.stack([loss.detach(), faith.detach(), nan if complete is None else complete.detach()])
        if self.acc.num_processes > 1:
            vals = self.acc.reduce(vals, reduction="mean")
        return {"step": step + 1, "stage": stage.name, "loss": float(vals[0]), "faith": float(vals[1]),
                "complete": None if complete is None else float(vals[2]),  # None: not scored this step
                "expected": expected, "kept": kept, "target": targets,
                "noise": round(scale, 4), "lr": lr}

    def _scores(self, batch, masks: dict[str, Tensor]) -> Tensor:
        """The task's candidate scores (fp32) under `masks`, from a training pass in the run's precision."""
        device = self.acc.device.type
        with torch.autocast(device, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            scores = task_scores(self.view, batch, masks, edge_grad=self.cfg.recipe_settings.edge_grad)
        return scores.float()

    def _descend(self, loss: Tensor, optimizer: torch.optim.Optimizer, lr: float, nsgd: bool) -> None:
        """Backward, the ranks' mean gradient (nsgd: normalized), one optimizer step at `lr`."""
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss.backward()
        for key, p in self.params.named_logits().items():  # data parallel: mean of the ranks' gradients
            if p.grad is not None and self.acc.num_processes > 1 and key not in self.params.sharded:
                p.grad = self.acc.reduce(p.grad, reduction="mean")
        if nsgd:
            reduce = (lambda x: self.acc.reduce(x, reduction="sum")) if self.acc.num_processes > 1 else None
            normalize_grads(self.params.named_logits(), sharded=self.params.sharded, reduce_sum=reduce,
                            within=self.cfg.recipe_settings.rank_within)
        optimizer.step()
