"""Sheaf selection: which of the sheaves a run passes through it returns, and when it may stop early.

Once a sheaf meets the density targets it is judged on dev (or on dev plus the held-out select items): the best so
far is remembered, and the run stops early once the ramp is over and that best sheaf is accurate and complete.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch
from torch import Tensor

from ..config import DiscoverConfig
from ..tasks import answer_weights
from .data import RankData
from .masks import MaskLogits
from .objective import metrics_from_scores
from .schedule import Stage, ramp_steps, targets


# Training items held out to judge candidate sheaves together with dev (tasks.held_out_size: at most a quarter of the
# train split): dev alone is 100 items in BLiMP (one standard error ~0.05), and an anaphor run stopped on a dev reading of
# 0.87 that scored 0.72 on test. Both recipes that kept a task at 5%/5% on SmolLM2 judged on dev + 200.
SELECT_ITEMS = 200



def _accuracy_key(dev: dict[str, float]) -> str:
    """The answer-balanced accuracy where the split measures one (skewed answers: tasks.answer_weights), else the
    accuracy: a sheaf that only prefers some answer tokens whatever the prompt then wins no judgement."""
    return "balanced_accuracy" if "sheaf_balanced_accuracy" in dev else "accuracy"


def dev_rank(dev: dict[str, float]) -> list[float]:
    """Order of sheaves that meet the targets: first those that pass early stopping's test (sheaf_done: accurate
    and complete), so the sheaf that stops a run is also the one it keeps; then dev accuracy (answer-balanced where
    the split has skewed answers); among equals, the complement closest to chance."""
    acc = _accuracy_key(dev)
    return [float(sheaf_done(dev)), dev[f"sheaf_{acc}"],
            -abs(dev["complement_accuracy"] - dev["chance"])]


def sheaf_done(dev: dict[str, float]) -> bool:
    """Early stopping's test (once the targets are met and the ramp is over): the sheaf keeps >= 95% of the full
    model's dev accuracy, and its complement is within 0.05 of chance, so that the test's "<= 0.6 for two-way
    tasks" holds with about one standard error (~0.05 at 100 items) to spare. At 0.1 an anaphor run stopped with a
    dev complement of 0.59 and scored 0.61 on test."""
    acc = _accuracy_key(dev)
    holds = dev[f"sheaf_{acc}"] >= 0.95 * dev[f"full_{acc}"]
    return holds and dev["complement_accuracy"] <= dev["chance"] + 0.05


def _metrics(split: str, scores: tuple[Tensor, Tensor, Tensor, Tensor], weights: Optional[list[float]]) -> dict:
    """Metrics of (full, sheaf, complement, target) scores, answer-balanced ones too where `weights` are given."""
    return metrics_from_scores(*scores, split=split, weights=weights)


def targets_met(cfg: DiscoverConfig, kept: dict[str, float]) -> bool:
    # 2% relative slack: a target of 3% is met at 3.06%.
    return all(kept.get(t, 1.0) <= d * 1.02 + 1e-9 for t, d in targets(cfg).items())


class Selection:
    """Judges the run's sheaves on dev (and select) and keeps the best one: `best` {"step", "dev_accuracy", "rank",
    "judged", "logits"}, or None while no sheaf has met the targets."""

    def __init__(self, *, cfg: DiscoverConfig, params: MaskLogits, data: RankData, stages: list[Stage]):
        self.cfg, self.params, self.data, self.stages = cfg, params, data, stages
        self.best: Optional[dict[str, Any]] = None
        task = data.task
        t0 = time.perf_counter()
        self.full_dev = data.scores("dev", None)
        # Seconds of one sheaf + complement dev evaluation (two passes over dev); measured at every evaluation.
        self.dev_eval_seconds = 2 * (time.perf_counter() - t0)
        # The held-out "select" split (tasks.hold_out) judges candidates together with dev.
        self.full_select = data.scores("select", None) if "select" in task.splits else None
        self.pooled_weights = (answer_weights(task.items("dev") + task.items("select"), measure=True)
                               if self.full_select is not None else None)

    def closing_seconds(self) -> float:
        """What a run still spends once it decides to stop: the closing dev evaluation (and select, if held out),
        then the test evaluation (full model, sheaf and complement: 1.5 dev evaluations per item), so --max-minutes
        bounds the whole run."""
        task = self.data.task
        n_dev, n_test = len(task.items("dev")), len(task.items("test"))
        n_select = len(task.items("select")) if self.full_select is not None else 0
        return self.dev_eval_seconds * (1 + n_select / max(n_dev, 1) + 1.5 * n_test / max(n_dev, 1))

    def evaluate(self, split: str, trained: tuple[str, ...], full=None) -> dict[str, float]:
        return _metrics(split, self.data.split_scores(split, trained, full), self.data.answer_weights.get(split))

    def evaluate_now(self, row: dict[str, Any], stage: Stage, local: int, step: int) -> bool:
        """Every eval_every steps once a sheaf could be kept (the ramp is over or the targets are nearly met);
        before that an evaluation only feeds the log, and runs 4x less often (each one scores the dev split twice:
        ~15 s on SmolLM2 with one thread, a third of a 5-step interval)."""
        if step % self.cfg.eval_every:
            return False
        could_keep = (local >= ramp_steps(stage) or stage.sparsity != "top-k"
                      or targets_met(self.cfg, row["kept"]))
        return could_keep or step % (4 * self.cfg.eval_every) == 0

    def eval_and_track(self, row: dict[str, Any], stage: Stage, local: int) -> bool:
        """After the ramp, or once within the slack of its targets, first project the sheaf onto them
        (MaskLogits.project; part of the training state, checkpointed with it); then dev metrics into `row`;
        remember the best sheaf that meets the targets, judged on dev, or on dev + select where held out
        (then also in `row["selection"]`). True = stop early."""
        last_stage = stage is self.stages[-1]
        ramp_done = local >= ramp_steps(stage)
        # Also project a sheaf within the 2% slack of its targets: the sheaf kept as best is never above them.
        if (ramp_done or targets_met(self.cfg, row["kept"])) and stage.sparsity == "top-k":
            shifts = self.params.project({t: d for t, d in targets(self.cfg).items() if t in stage.trained})
            if shifts:
                row["projected"] = shifts
                row["kept"] = self.params.kept(stage.trained)
        t0 = time.perf_counter()
        dev_scores = self.data.split_scores("dev", stage.trained, full=self.full_dev)
        self.dev_eval_seconds = time.perf_counter() - t0
        dev = row["dev"] = _metrics("dev", dev_scores, self.data.answer_weights.get("dev"))
        if not (last_stage and targets_met(self.cfg, row["kept"])):
            return False
        judged = dev
        if self.full_select is not None:
            # Only a sheaf whose dev reading could beat the best (judged on dev + select) is scored on the select
            # split too; the others cannot become the best.
            if self.best is not None and not dev_rank(dev) > self.best["rank"]:
                return self.best_is_done(ramp_done)
            select = self.data.split_scores("select", stage.trained, full=self.full_select)
            judged = row["selection"] = _metrics("dev+select", tuple(torch.cat(pair) for pair in zip(dev_scores, select)),
                                                 self.pooled_weights)
        rank = dev_rank(judged)
        if self.best is None or rank > self.best["rank"]:
            self.best = {"step": row["step"], "dev_accuracy": rank[1], "rank": rank, "judged": judged,
                         "logits": {k: v.detach().clone() for k, v in self.params.named_logits().items()}}
        return self.best_is_done(ramp_done)

    def best_is_done(self, ramp_done: bool) -> bool:
        """Early stopping, once the ramp is over: the best sheaf so far (the one the run returns) passes sheaf_done
        as judged, the first key of its rank. It may date from the end of the ramp: a run whose later sheaves never
        beat it would otherwise train on to its last step and return it anyway."""
        return self.cfg.early_stop and ramp_done and self.best is not None and self.best["rank"][0] == 1.0
