"""The only trained parameters: one logit per mask entry, and the Lagrange multipliers of the density
controller. The frozen model is never part of this module, so data-parallel training all-reduces
just the logits' gradients and every rank holds identical masks.

Density controller (a Lagrangian for the inequality k_t <= rho_t, acting as a decoupled drift): for each mask
type t with a target rho_t, a multiplier lambda_t >= 0 is raised by dual ascent after every step,
lambda_t <- lambda_t + dual_lr * (k_t - rho_t) while k_t > rho_t and 0 otherwise, k_t being the kept fraction of
the deterministic sheaf (logit > 0), the density that is finally reported. The multiplier acts on the logits as
a drift, logit <- logit - lr * lambda_t after the optimizer step (like AdamW's decoupled weight decay), not
through the loss: Adam's per-entry normalization would otherwise scale the pull by the rare, huge
straight-through gradients of tau = 0.01 gates, and the density stalls far above the target. The task loss
(through Adam, at most ~lr per step) keeps what the task needs; everything else drifts below zero.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from .gates import GATES, logistic_noise
from .sheaf import mask_type


class MaskLogits(nn.Module):
    def __init__(self, shapes: Mapping[str, tuple[int, ...]], *, targets: Mapping[str, float], init_mean: float,
                 init_std: float, seed: int):
        super().__init__()
        self.keys = list(shapes)
        g = torch.Generator().manual_seed(seed)
        self.logits = nn.ParameterList(
            [nn.Parameter(torch.randn(shapes[k], generator=g) * init_std + init_mean) for k in self.keys])
        self.target_types = [t for t in ("weight", "neuron", "head", "edge") if t in targets]
        self.register_buffer("multipliers", torch.zeros(len(self.target_types)))  # (types,) lambda_t

    def named_logits(self) -> dict[str, Tensor]:
        return dict(zip(self.keys, self.logits))

    def forward(self, *, trained: tuple[str, ...], gate: str, taus: Mapping[str, float], noise_seed: int,
                frozen_masks: Optional[Mapping[str, Tensor]] = None) -> tuple[dict, dict, dict]:
        """Sample masks for one step. Returns (masks, complement masks, expected density per trained type).

        The noise depends only on `noise_seed`, so every rank (and a resumed run) draws the same masks.
        Types not in `trained` use `frozen_masks` (their deterministic masks) in both the sheaf and the
        complement: only trained types are flipped (DESIGN.md defect 2).
        """
        g = torch.Generator().manual_seed(noise_seed)
        fn = GATES[gate]
        masks, comp, kept, count = {}, {}, {}, {}
        for key, logit in zip(self.keys, self.logits):
            t = mask_type(key)
            if t not in trained:
                if frozen_masks is not None:
                    masks[key] = comp[key] = frozen_masks[key]
                continue
            noise = logistic_noise(logit.shape, generator=g).to(logit.device)
            m = fn.sample(logit, noise, taus[t])
            masks[key], comp[key] = m, 1.0 - m
            p = fn.p_keep(logit)
            kept[t] = kept.get(t, 0.0) + p.sum()
            count[t] = count.get(t, 0) + p.numel()
        density = {t: kept[t] / count[t] for t in kept}
        return masks, comp, density

    @torch.no_grad()
    def kept(self, types: tuple[str, ...]) -> dict[str, float]:
        """Kept fraction of the deterministic masks (logit > 0) per mask type."""
        kept: dict[str, int] = {}
        total: dict[str, int] = {}
        for key, logit in zip(self.keys, self.logits):
            t = mask_type(key)
            if t in types:
                kept[t] = kept.get(t, 0) + int((logit > 0).sum())
                total[t] = total.get(t, 0) + logit.numel()
        return {t: kept[t] / total[t] for t in kept}

    @torch.no_grad()
    def drift(self, types: tuple[str, ...], lr: float) -> None:
        """logit <- logit - lr * lambda_t for every targeted type t being trained."""
        lam = {t: float(self.multipliers[i]) for i, t in enumerate(self.target_types)}
        for key, logit in zip(self.keys, self.logits):
            t = mask_type(key)
            if t in types and lam.get(t, 0.0) > 0:
                logit.sub_(lr * lam[t])

    @torch.no_grad()
    def dual_step(self, kept: Mapping[str, float], targets: Mapping[str, float], lr: float) -> None:
        for i, t in enumerate(self.target_types):
            if t in kept and t in targets:
                gap = kept[t] - targets[t]
                # Reset once met: an integral that only decays slowly would keep pruning far past the target.
                self.multipliers[i] = float(self.multipliers[i]) + lr * gap if gap > 0 else 0.0


def ramp(step: int, *, start: float, end: float, steps: int) -> float:
    """Linear interpolation from start (step 0) to end (step >= steps)."""
    if steps <= 0 or step >= steps:
        return end
    return start + (end - start) * step / steps
