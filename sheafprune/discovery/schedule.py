"""The training schedule: pure functions of the config, the stage and the step within it.

A run is one or two stages (`plan_stages`); within a stage the density targets and the noise scale ramp from
their start to their end over the first `warmup` share of its steps, then the lr may decay. DiscoGP's staged
preset weighs sparsity by `paper_lambda` instead of ramping targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import DiscoverConfig
from .gates import GATES

# DiscoGP's initial mask logits, N(INIT_MEAN, INIT_STD): every entry starts kept (P(keep) = sigmoid(1) = 0.73
# under the concrete gate's noise); the attribution init spreads them over INIT_MEAN +- init_spread instead.
INIT_MEAN, INIT_STD = 1.0, 0.01
# The joint schedule's density ramp: cubic (Zhu & Gupta's gradual pruning: fast first, slow near the target) over the
# first WARMUP of the steps, then the lr decays linearly to LR_FINAL_SHARE of itself by the last step, so the sheaf
# stops churning at the target (at lr 0.1 a step moves ~0.1 of the logits packed near 0 across it). Measured on
# SmolLM2 at 5%/5% (docs/weight-edge-experiments.md): the linear ramp over 60% at a constant lr left IOI and anaphor
# at chance; the recipes that kept either task both used these.
WARMUP = 0.4
LR_FINAL_SHARE = 0.1


@dataclass(frozen=True)
class Stage:
    name: str
    trained: tuple[str, ...]
    steps: int
    # "top-k": projected onto the ramp's density every step; "paper-*": DiscoGP's sparsity loss weights (paper_lambda)
    sparsity: str  # "top-k" | "paper-weights" | "paper-edges"


def plan_stages(cfg: DiscoverConfig) -> list[Stage]:
    if cfg.schedule == "joint":
        return [Stage("joint", tuple(cfg.granularity), cfg.steps, "top-k")]
    nodes = tuple(g for g in cfg.granularity if g != "edge")
    stages = [Stage("weights", nodes, cfg.steps, "paper-weights")] if nodes else []
    if "edge" in cfg.granularity:
        stages.append(Stage("edges", ("edge",), cfg.steps, "paper-edges"))
    return stages


def stage_at(stages: list[Stage], step: int) -> tuple[Stage, int]:
    """The stage of global step `step` and the step within it (past the end: the last stage's end)."""
    for stage in stages:
        if step < stage.steps:
            return stage, step
        step -= stage.steps
    return stages[-1], stages[-1].steps


def paper_lambda(stage: Stage, step: int) -> float:
    """DiscoGP's per-epoch sparsity weights, stretched over the stage's steps: weights ramp 1 -> 1000;
    edges ramp 1 -> 100 over the first 20%, down to 0.01 over the next 20%, then stay at 0.01."""
    frac = step / max(stage.steps, 1)
    if stage.sparsity == "paper-weights":
        return 1.0 + 999.0 * frac
    if frac < 0.2:
        return 1.0 + 99.0 * frac / 0.2
    if frac < 0.4:
        return 100.0 * (0.01 / 100.0) ** ((frac - 0.2) / 0.2)
    return 0.01


def ramp(step: int, *, start: float, end: float, steps: int, shape: str = "linear") -> float:
    """From start (step 0) to end (step >= steps): linear, or cubic (Zhu & Gupta's gradual-pruning schedule,
    end + (start - end) * (1 - step/steps)^3: fast at first, slow near the end, so more steps are spent close to
    the target)."""
    if steps <= 0 or step >= steps:
        return end
    frac = step / steps
    if shape == "cubic":
        return end + (start - end) * (1.0 - frac) ** 3
    return start + (end - start) * frac


def targets(cfg: DiscoverConfig) -> dict[str, float]:
    """The density target of each targeted mask type, where the ramp ends."""
    return {t: float(d) for t, d in cfg.target_density.items()}


def ramp_steps(stage: Stage) -> int:
    """Steps of the stage over which the density target (and the noise scale) ramp; after them the lr decays."""
    return int(WARMUP * stage.steps)


def targets_at(cfg: DiscoverConfig, stage: Stage, local: int, start_density: float) -> dict[str, float]:
    """The density target of each targeted type the stage trains, at step `local` of the stage."""
    warm = ramp_steps(stage)
    return {t: ramp(local, start=start_density, end=d, steps=warm, shape="cubic")
            for t, d in targets(cfg).items() if t in stage.trained}


def noise_scale(cfg: DiscoverConfig, stage: Stage, local: int) -> float:
    """1 (DiscoGP) in the staged preset; the recipe's noise_start -> noise_final over the warmup in the joint
    schedule."""
    if stage.sparsity != "top-k":
        return 1.0
    recipe = cfg.recipe_settings
    return ramp(local, start=recipe.noise_start, end=recipe.noise_final, steps=ramp_steps(stage))


def lr_at(cfg: DiscoverConfig, stage: Stage, local: int) -> float:
    """cfg.lr; in the joint schedule, after the ramp, linear from lr to LR_FINAL_SHARE * lr at the last step."""
    warm = ramp_steps(stage)
    if stage.sparsity != "top-k" or local < warm:
        return cfg.lr
    return ramp(local - warm, start=cfg.lr, end=LR_FINAL_SHARE * cfg.lr, steps=max(stage.steps - 1 - warm, 1))


def attribution_init(cfg: DiscoverConfig) -> bool:
    """Whether the run starts from attribution-ranked logits (joint schedule only), else DiscoGP's constant init."""
    return cfg.recipe_settings.init == "attribution" and cfg.schedule == "joint"


def initial_density(cfg: DiscoverConfig) -> float:
    """Expected kept fraction of the initial logits under the first step's noise scale: where the target
    ramp starts. From the init's distribution, not the logits, so a resumed run computes the same ramp."""
    stage = plan_stages(cfg)[0]
    scale = noise_scale(cfg, stage, 0)
    c, a = INIT_MEAN, cfg.recipe_settings.init_spread
    grid = c + a * torch.linspace(-1, 1, 2001) if attribution_init(cfg) else torch.tensor([c])
    return float(GATES[cfg.recipe_settings.gate].p_keep(grid, scale).mean())  # attribution: logits uniform in c +- a


# The concrete gate's straight-through temperature of each mask type (the sigmoid gate has none): DiscoGP's 0.01 for
# weights; node masks (neurons, heads) are few and coarse like edges, and get the edge temperature, 1.
STRAIGHT_THROUGH_TAUS = {"weight": 0.01, "neuron": 1.0, "head": 1.0, "edge": 1.0}
