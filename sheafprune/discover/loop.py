"""The discovery loop under Accelerate: sample masks, score the task with the sheaf and its complement,
step the mask logits, evaluate on dev, checkpoint, stop early once the targets are met and accuracy holds.

Data parallelism is explicit: every rank draws the same masks (noise seeded by step), scores its own slice
of the global batch, and gradients are all-reduced (mean) before the step, so N processes compute what one
process computes on the whole batch. The batch of step s is a pure function of (seed, s), and so are the
masks, which is what makes `--resume` reproduce an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..arch import ArchView
from ..config import DiscoverConfig
from ..errors import RunFailed, UserError
from ..sheaf import mask_type
from ..tasks import Task, answer_weights, encode
from .gates import GATES, deterministic
from .masks import MaskLogits, ramp, rank_group
from .objective import FAITH_LOSSES, FullScores, completeness, metrics_from_scores, split_scores, task_scores
from .state import load_latest, save_checkpoint


@dataclass(frozen=True)
class Stage:
    name: str
    trained: tuple[str, ...]
    steps: int
    sparsity: str  # "controller" | "paper-weights" | "paper-edges"


def plan_stages(cfg: DiscoverConfig) -> list[Stage]:
    if cfg.schedule == "joint":
        return [Stage("joint", tuple(cfg.granularity), cfg.steps, "controller")]
    nodes = tuple(g for g in cfg.granularity if g != "edge")
    stages = [Stage("weights", nodes, cfg.steps, "paper-weights")] if nodes else []
    if "edge" in cfg.granularity:
        stages.append(Stage("edges", ("edge",), cfg.steps, "paper-edges"))
    return stages


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
            acc += torch.stack([p.grad.double().square().sum(), torch.tensor(float(p.grad.numel()), dtype=torch.float64,
                                                                            device=p.grad.device)])
    total: dict[str, Tensor] = {}
    for (group, is_sharded), acc in local.items():
        if is_sharded and reduce_sum is not None:
            acc = reduce_sum(acc)
        total[group] = total.get(group, 0) + acc
    for key, p in logits.items():
        if p.grad is not None:
            sq, n = total[rank_group(key, within)].tolist()
            p.grad.div_(max((sq / max(n, 1.0)) ** 0.5, 1e-30))


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


def _accuracy_key(dev: dict[str, float], balanced: bool) -> str:
    return "balanced_accuracy" if balanced and "sheaf_balanced_accuracy" in dev else "accuracy"


def dev_rank(dev: dict[str, float], *, balanced: bool) -> list[float]:
    """Order of sheaves that meet the targets: first those that pass early stopping's test (sheaf_done: accurate
    and complete), so the sheaf that stops a run is also the one it keeps; then dev accuracy (answer-balanced with
    `balanced`, where the split has skewed answers); among equals, the complement closest to chance."""
    acc = _accuracy_key(dev, balanced)
    return [float(sheaf_done(dev, balanced=balanced)), dev[f"sheaf_{acc}"],
            -abs(dev["complement_accuracy"] - dev["chance"])]


def sheaf_done(dev: dict[str, float], *, balanced: bool) -> bool:
    """Early stopping's test (once the targets are met and the ramp is over): the sheaf keeps >= 95% of the full
    model's dev accuracy, and its complement is within 0.05 of chance, so that the test's "<= 0.6 for two-way
    tasks" holds with about one standard error (~0.05 at 100 items) to spare. At 0.1 an anaphor run stopped with a
    dev complement of 0.59 and scored 0.61 on test."""
    acc = _accuracy_key(dev, balanced)
    holds = dev[f"sheaf_{acc}"] >= 0.95 * dev[f"full_{acc}"]
    return holds and dev["complement_accuracy"] <= dev["chance"] + 0.05


class Trainer:
    def __init__(self, *, cfg: DiscoverConfig, view: ArchView, tokenizer, task: Task, params: MaskLogits,
                 accelerator, work_dir: Path, progress: bool = True, started: Optional[float] = None):
        """`started`: time.perf_counter() when this process began the run (loading the model): --max-minutes
        counts from there."""
        self.started = time.perf_counter() if started is None else started
        self.setup_seconds = 0.0  # this process's time before its first step (set by run)
        self.cfg, self.view, self.tok, self.task = cfg, view, tokenizer, task
        self.params, self.acc, self.work_dir = params, accelerator, work_dir
        self.progress = progress and accelerator.is_main_process
        self.device = accelerator.device
        self.stages = plan_stages(cfg)
        self.total_steps = sum(s.steps for s in self.stages)
        self.targets = {t: float(d) for t, d in cfg.target_density.items()}
        self.start_density = self._initial_density()
        # Node masks (neurons, heads) are few and coarse like edges: they get the edge temperature.
        self.taus = {"weight": cfg.tau_weight, "neuron": cfg.tau_edge, "head": cfg.tau_edge, "edge": cfg.tau_edge}
        self.curve: list[dict[str, Any]] = []
        self.best: Optional[dict[str, Any]] = None  # {"step", "dev_accuracy", "logits"}
        self.step = 0
        self.step_times: list[float] = []  # seconds of each optimizer step of this process (training.step_seconds)
        self.elapsed = 0.0
        self.optimizer = self._make_optimizer(self.stages[0])
        # Answer-balanced weights of each split (None where no candidate set has a skewed answer): the training
        # sampler uses them with cfg.balance_answers; dev and test metrics always report the balanced accuracy.
        # Dev and test are measured without the candidate sets that have one right answer: a fixed order scores chance.
        self.full_scores = FullScores(view, task, tokenizer, device=self.device)
        self.answer_weights = {split: answer_weights(task.items(split), measure=split != "train")
                               for split in task.splits}
        t0 = time.perf_counter()
        self.full_dev = self._scores("dev", None)
        # Seconds of one sheaf + complement dev evaluation (two passes over dev); measured at every evaluation.
        self.dev_eval_seconds = 2 * (time.perf_counter() - t0)
        # cfg.select_items: the held-out "select" split (tasks.hold_out) judges candidates together with dev.
        self.full_select = self._scores("select", None) if "select" in task.splits else None
        self.pooled_weights = (answer_weights(task.items("dev") + task.items("select"), measure=True)
                               if self.full_select is not None else None)

    # --- initialization ---------------------------------------------------------------------------
    def _attribution_init(self) -> bool:
        return self.cfg.init == "attribution" and self.cfg.schedule == "joint"

    def _initial_density(self) -> float:
        """Expected kept fraction of the initial logits under the first step's noise scale: where the target
        ramp starts. From the init's distribution, not the logits, so a resumed run computes the same ramp."""
        stage = self.stages[0]
        scale = self._noise_scale(stage, 0)
        c, a = self.cfg.init_mean, self.cfg.init_spread
        grid = c + a * torch.linspace(-1, 1, 2001) if self._attribution_init() else torch.tensor([c])
        return float(GATES[self.cfg.gate].p_keep(grid, scale).mean())  # attribution: logits uniform in c +- a

    def init_logits(self) -> None:
        """Before step 1 of a fresh run: attribution-ranked logits (cfg.init), else keep DiscoGP's constant init.

        The score of a mask entry is |dL/dm| at m = 1 (the full model), L the faithfulness loss (cfg.faith_loss),
        summed over cfg.init_batches training batches: the first-order change of the loss if that entry alone were
        removed (for edges this is edge attribution patching with zero ablation; with cfg.edge_grad "secant", the
        removal's effect taken exactly through the reader's norm). Every rank scores its slice of the
        same global batches and the scores are all-reduced, so the logits are identical on every rank.
        """
        if not self._attribution_init():
            return
        from tqdm.auto import tqdm

        shapes = {k: tuple(p.shape) for k, p in self.params.named_logits().items()}
        ones = {k: torch.ones(shape, device=self.device, requires_grad=True) for k, shape in shapes.items()}
        for b in tqdm(range(self.cfg.init_batches), desc="attribution", disable=not self.progress, leave=False):
            batch = self._local_batch(b)
            scores = task_scores(self.view, batch, self.params.for_forward(ones), edge_grad=self.cfg.edge_grad)
            init_loss = "ce" if self.cfg.faith_loss == "kl" else self.cfg.faith_loss  # KL's gradient is 0 here
            FAITH_LOSSES[init_loss](scores, batch.target, None).backward()
        scores = {}
        for k, m in ones.items():
            g = m.grad if m.grad is not None else torch.zeros_like(m)
            if self.acc.num_processes > 1 and k not in self.params.sharded:
                g = self.acc.reduce(g, reduction="mean")
            if not torch.isfinite(g).all():
                raise RunFailed(f"the attribution init got a non-finite gradient for {k}; the model's outputs on "
                                f"this task are not finite (try --init constant)")
            scores[k] = g.abs()
        del ones
        self.params.init_from_scores(scores, center=self.cfg.init_mean, spread=self.cfg.init_spread, seed=self.cfg.seed,
                                     within=self.cfg.rank_within)

    # --- pieces ----------------------------------------------------------------------------------
    def _make_optimizer(self, stage: Stage):
        for key, p in self.params.named_logits().items():
            p.requires_grad_(mask_type(key) in stage.trained)
        trained = [p for p in self.params.named_logits().values() if p.requires_grad]
        if self.cfg.optimizer == "nsgd":  # gradients normalized per type in train_step
            return torch.optim.SGD(trained, lr=self.cfg.lr, momentum=0.9, dampening=0.9)
        return torch.optim.AdamW(trained, lr=self.cfg.lr, betas=(0.9, self.cfg.adam_beta2), weight_decay=0.0)

    def _stage_at(self, step: int) -> tuple[Stage, int]:
        for stage in self.stages:
            if step < stage.steps:
                return stage, step
            step -= stage.steps
        return self.stages[-1], self.stages[-1].steps

    def masks(self, trained: tuple[str, ...] | None = None, *, complement: bool = False) -> dict[str, Tensor]:
        """Deterministic masks; with `complement`, the `trained` types flipped."""
        trained = trained or tuple(self.cfg.granularity)
        out = {}
        for key, logit in self.params.named_logits().items():
            m = deterministic(logit.detach())
            out[key] = 1.0 - m if complement and mask_type(key) in trained else m
        return out

    def _frozen(self, stage: Stage) -> Optional[dict[str, Tensor]]:
        """Deterministic masks of the types this stage does not train (fixed for the whole stage)."""
        if stage.trained == tuple(self.cfg.granularity):
            return None
        if getattr(self, "_frozen_for", None) != stage.name:
            self._frozen_masks = {k: v for k, v in self.masks().items() if mask_type(k) not in stage.trained}
            self._frozen_for = stage.name
        return self._frozen_masks

    def _scores(self, split: str, masks) -> tuple[Tensor, Tensor]:
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

    def _split_scores(self, split: str, trained: tuple[str, ...], full=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(full, sheaf, complement) scores and the targets of a split; `full`: the full model's, if known."""
        full_s, target = full or self._scores(split, None)
        sheaf_s, _ = self._scores(split, self.masks())
        comp_s, _ = self._scores(split, self.masks(trained, complement=True))
        return full_s, sheaf_s, comp_s, target

    def evaluate(self, split: str, trained: tuple[str, ...], full=None) -> dict[str, float]:
        return _metrics(split, self._split_scores(split, trained, full), self.answer_weights.get(split))

    def _local_indices(self, step: int) -> list[int]:
        """This rank's training items of global step `step`."""
        weights = self.answer_weights["train"] if self.cfg.balance_answers else None
        idx = batch_indices(step, n=len(self.task.items("train")), size=self.cfg.batch_size, seed=self.cfg.seed,
                            weights=weights)
        per = self.cfg.batch_size // self.acc.num_processes
        return idx[self.acc.process_index * per:(self.acc.process_index + 1) * per]

    def _local_batch(self, step: int):
        items = self.task.items("train")
        return encode(self.task, [items[i] for i in self._local_indices(step)], self.tok).to(self.device)

    def _ramp_steps(self, stage: Stage) -> int:
        """Steps of the stage over which the density target (and the noise scale) ramp; after them the lr decays."""
        return int(self.cfg.warmup * stage.steps)

    def _targets_now(self, stage: Stage, local: int) -> dict[str, float]:
        warm = self._ramp_steps(stage)
        return {t: ramp(local, start=self.start_density, end=d, steps=warm, shape=self.cfg.ramp)
                for t, d in self.targets.items() if t in stage.trained}

    def _noise_scale(self, stage: Stage, local: int) -> float:
        """1 (DiscoGP) in the staged preset; noise_start -> noise_final over the warmup in the joint schedule."""
        if stage.sparsity != "controller":
            return 1.0
        return ramp(local, start=self.cfg.noise_start, end=self.cfg.noise_final, steps=self._ramp_steps(stage))

    def _lr(self, stage: Stage, local: int) -> float:
        """cfg.lr; in the joint schedule with lr_final set, linear from lr at the ramp's end to lr_final at the last step."""
        warm = self._ramp_steps(stage)
        if stage.sparsity != "controller" or self.cfg.lr_final is None or local < warm:
            return self.cfg.lr
        return ramp(local - warm, start=self.cfg.lr, end=self.cfg.lr_final, steps=max(stage.steps - 1 - warm, 1))

    # --- one step --------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        stage, local = self._stage_at(self.step)
        frozen = self._frozen(stage)
        scale = self._noise_scale(stage, local)
        masks, comp, dens = self.params(trained=stage.trained, gate=self.cfg.gate, taus=self.taus,
                                        noise_seed=self.cfg.seed * 1_000_003 + self.step, noise_scale=scale,
                                        frozen_masks=frozen)
        batch = self._local_batch(self.step)
        scores = task_scores(self.view, batch, masks, edge_grad=self.cfg.edge_grad)
        full = self.full_scores(self._local_indices(self.step)) if self.cfg.faith_loss == "kl" else None
        faith = FAITH_LOSSES[self.cfg.faith_loss](scores, batch.target, full)
        complete = completeness(task_scores(self.view, batch, comp, edge_grad=self.cfg.edge_grad))
        targets = self._targets_now(stage, local)
        if stage.sparsity == "controller":
            # Targeted types are pulled by the controller's drift (masks.py); the others get DiscoGP's
            # plain sparsity pressure.
            untargeted = [dens[t] for t in dens if t not in targets]
            sparse = torch.stack(untargeted).mean() if untargeted else torch.zeros((), device=faith.device)
        else:
            sparse = paper_lambda(stage, local) * torch.stack(list(dens.values())).mean()
        loss = faith + self.cfg.lambda_complete * complete + sparse
        if not torch.isfinite(loss):
            kept = (f"the last good checkpoint is in {self.work_dir}" if any(self.work_dir.glob("ckpt-*.json"))
                    else "no checkpoint was written yet")
            raise RunFailed(f"loss became {float(loss.detach())} at step {self.step}; {kept} (try a lower --lr)")
        lr = self._lr(stage, local)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for key, p in self.params.named_logits().items():  # data parallel: mean of the ranks' gradients
            if p.grad is not None and self.acc.num_processes > 1 and key not in self.params.sharded:
                p.grad = self.acc.reduce(p.grad, reduction="mean")
        if self.cfg.optimizer != "adamw":
            reduce = (lambda x: self.acc.reduce(x, reduction="sum")) if self.acc.num_processes > 1 else None
            normalize_grads(self.params.named_logits(),
                            sharded=self.params.sharded, reduce_sum=reduce, within=self.cfg.rank_within)
        self.optimizer.step()
        expected = {t: float(d.detach()) for t, d in dens.items()}
        if stage.sparsity == "controller" and self.cfg.control == "project":
            # Top-k at every step: a threshold from a 2M-entry sample (kthvalue over all of SmolLM2's 134M weight
            # logits costs ~1.7 s); evaluations project exactly.
            self.params.project(targets, exact=True, sample=2_000_000, seed=self.cfg.seed * 1_000_003 + self.step)
        elif stage.sparsity == "controller":
            self.params.dual_step(self.params.kept(stage.trained), targets, self.cfg.dual_lr)
            self.params.drift(stage.trained, lr)
        kept = self.params.kept(stage.trained)
        vals = torch.stack([loss.detach(), faith.detach(), complete.detach()])
        if self.acc.num_processes > 1:
            vals = self.acc.reduce(vals, reduction="mean")
        return {"step": self.step + 1, "stage": stage.name, "loss": float(vals[0]), "faith": float(vals[1]),
                "complete": float(vals[2]), "expected": expected, "kept": kept, "target": targets,
                "noise": round(scale, 4), "lr": lr}

    # --- the loop --------------------------------------------------------------------------------
    def _targets_met(self, kept: dict[str, float]) -> bool:
        # 2% relative slack: a target of 3% is met at 3.06%.
        return all(kept.get(t, 1.0) <= d * 1.02 + 1e-9 for t, d in self.targets.items())

    def _eval_and_track(self, row: dict[str, Any], stage: Stage, local: int) -> bool:
        """After the ramp, or once within the slack of its targets, first project the sheaf onto them
        (MaskLogits.project; part of the training state, checkpointed with it); then dev metrics into `row`;
        remember the best sheaf that meets the targets, judged on dev, or on dev + select with cfg.select_items
        (then also in `row["selection"]`). True = stop early."""
        last_stage = stage is self.stages[-1]
        ramp_done = local >= self._ramp_steps(stage)
        # Also project a sheaf within the 2% slack of its targets: the sheaf kept as best is never above them.
        if (ramp_done or self._targets_met(row["kept"])) and stage.sparsity == "controller":
            shifts = self.params.project({t: d for t, d in self.targets.items() if t in stage.trained})
            if shifts:
                row["projected"] = shifts
                row["kept"] = self.params.kept(stage.trained)
        t0 = time.perf_counter()
        dev_scores = self._split_scores("dev", stage.trained, full=self.full_dev)
        self.dev_eval_seconds = time.perf_counter() - t0
        dev = row["dev"] = _metrics("dev", dev_scores, self.answer_weights.get("dev"))
        if not (last_stage and self._targets_met(row["kept"])):
            return False
        balanced = self.cfg.balance_answers
        judged = dev
        if self.full_select is not None:
            # Only a sheaf whose dev reading could beat the best (judged on dev + select) is scored on the select
            # split too; the others cannot become the best.
            if self.best is not None and not dev_rank(dev, balanced=balanced) > self.best["rank"]:
                return self._best_is_done(ramp_done)
            select = self._split_scores("select", stage.trained, full=self.full_select)
            judged = row["selection"] = _metrics("dev+select", tuple(torch.cat(pair) for pair in zip(dev_scores, select)),
                                                 self.pooled_weights)
        rank = dev_rank(judged, balanced=balanced)
        if self.best is None or rank > self.best["rank"]:
            self.best = {"step": row["step"], "dev_accuracy": rank[1], "rank": rank, "judged": judged,
                         "logits": {k: v.detach().clone() for k, v in self.params.named_logits().items()}}
        return self._best_is_done(ramp_done)

    def _best_is_done(self, ramp_done: bool) -> bool:
        """Early stopping, once the ramp is over: the best sheaf so far (the one the run returns) passes sheaf_done
        as judged, the first key of its rank. It may date from the end of the ramp: a run whose later sheaves never
        beat it would otherwise train on to its last step and return it anyway."""
        return self.cfg.early_stop and ramp_done and self.best is not None and self.best["rank"][0] == 1.0

    def _evaluate_now(self, row: dict[str, Any], stage: Stage, local: int) -> bool:
        """Every eval_every steps once a sheaf could be kept (the ramp is over or the targets are nearly met);
        before that an evaluation only feeds the log, and runs 4x less often (each one scores the dev split twice:
        ~15 s on SmolLM2 with one thread, a third of a 5-step interval)."""
        if self.step % self.cfg.eval_every:
            return False
        could_keep = (local >= self._ramp_steps(stage) or stage.sparsity != "controller"
                      or self._targets_met(row["kept"]))
        return could_keep or self.step % (4 * self.cfg.eval_every) == 0

    def _checkpoint(self) -> None:
        # Sharded logits are gathered (every rank takes part), so a checkpoint always holds the full state.
        tensors = {f"logits/{k}": v for k, v in self.params.gather_full(self.params.named_logits()).items()}
        tensors["multipliers"] = self.params.multipliers
        if self.best is not None:
            tensors.update({f"best/{k}": v for k, v in self.params.gather_full(self.best["logits"]).items()})
        opt_state = self.params.gather_state(self.optimizer.state_dict(), self.optimizer)
        if not self.acc.is_main_process:
            return
        best = None if self.best is None else {k: v for k, v in self.best.items() if k != "logits"}
        save_checkpoint(self.work_dir, step=self.step, tensors=tensors, optimizer_state=opt_state,
                        info={"config": self.cfg.to_dict(), "curve": self.curve, "best": best,
                              "elapsed": self.elapsed})

    def resume(self) -> bool:
        """Load the newest checkpoint of work_dir; False if there is none."""
        found = load_latest(self.work_dir)
        if found is None:
            return False
        tensors, opt_state, info = found
        saved = dict(info["config"])
        now = self.cfg.to_dict()
        # shard_masks may differ: a checkpoint holds the full state either way.
        differ = sorted(k for k in now if k not in ("steps", "early_stop", "max_minutes", "shard_masks")
                        and saved.get(k, False if k == "shard_masks" else None) != now[k])
        if differ:
            raise UserError(f"--resume: the checkpoint in {self.work_dir} was made with different options "
                            f"({', '.join(differ)}); use the same options or drop --resume")
        with torch.no_grad():
            mine = self.params.local({k: tensors[f"logits/{k}"] for k in self.params.keys})
            for k, p in self.params.named_logits().items():
                p.copy_(mine[k])
            self.params.multipliers.copy_(tensors["multipliers"])
        self.step, self.curve, self.elapsed = int(info["step"]), list(info["curve"]), float(info["elapsed"])
        if info.get("best") is not None:
            best = self.params.local({k[5:]: v for k, v in tensors.items() if k.startswith("best/")})
            self.best = {**info["best"], "logits": dict(best)}
        stage, _ = self._stage_at(self.step)
        self.optimizer = self._make_optimizer(stage)
        self.optimizer.load_state_dict(self.params.local_state(opt_state, self.optimizer))
        return True

    def run(self, *, log: Optional[Callable[[dict], None]] = None) -> None:
        """Train until the last stage ends or early stopping.

        Ctrl-C (SIGINT) is deferred to the end of the current step, which is then checkpointed, so a resumed
        run continues from a consistent state; a second Ctrl-C stops at once (the last periodic checkpoint
        stands).
        """
        from tqdm.auto import tqdm

        self.setup_seconds = time.perf_counter() - self.started
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, desc="discover",
                   dynamic_ncols=True, mininterval=1.0)
        with _deferred_sigint() as interrupted:
            try:
                while self.step < self.total_steps:
                    stop = self._one_step(bar, log)
                    if self._anyone(interrupted()):  # ranks stop at the same step: the checkpoint is collective
                        self._checkpoint()
                        raise KeyboardInterrupt
                    if stop:
                        break
            finally:
                bar.close()

    def _one_step(self, bar, log: Optional[Callable[[dict], None]]) -> bool:
        """Train, maybe evaluate and checkpoint one step; True = stop early."""
        stage, local = self._stage_at(self.step)
        if local == 0 and self.step > 0:
            self.optimizer = self._make_optimizer(stage)  # a new stage trains other mask types
        t0 = time.perf_counter()
        row = self.train_step()
        self.step += 1
        step_seconds = time.perf_counter() - t0
        self.step_times.append(step_seconds)
        # Stop now if one more step and the closing evaluations would overrun the budget (spent = setup + earlier
        # steps + this one).
        out_of_time = self.cfg.max_minutes is not None and self._anyone(
            self.setup_seconds + self.elapsed + 2 * step_seconds + self._closing_seconds() > 60 * self.cfg.max_minutes)
        stop = out_of_time
        if self._evaluate_now(row, stage, local + 1) or self.step == self.total_steps or out_of_time:
            stop = self._eval_and_track(row, stage, local + 1) or out_of_time
        self.elapsed += time.perf_counter() - t0
        row["time"] = round(self.elapsed, 3)
        self.curve.append(row)
        if log is not None and self.acc.is_main_process:
            log(row)
        bar.update(1)
        bar.set_postfix_str(_postfix(row, self.targets))
        if self.step % self.cfg.checkpoint_every == 0 or stop:
            self._checkpoint()
        return stop

    def _closing_seconds(self) -> float:
        """What a run still spends once it decides to stop: the closing dev evaluation (and select, if held out),
        then the test evaluation (full model, sheaf and complement: 1.5 dev evaluations per item), so --max-minutes
        bounds the whole run."""
        n_dev, n_test = len(self.task.items("dev")), len(self.task.items("test"))
        n_select = len(self.task.items("select")) if self.full_select is not None else 0
        return self.dev_eval_seconds * (1 + n_select / max(n_dev, 1) + 1.5 * n_test / max(n_dev, 1))

    def final_logits(self) -> dict[str, Tensor]:
        """The best dev sheaf that met the targets, else the last one (full tensors, on every rank)."""
        src = self.best["logits"] if self.best is not None else self.params.named_logits()
        return {k: v.detach().clone().cpu() for k, v in self.params.gather_full(src).items()}

    def _anyone(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any: a decision to stop (Ctrl-C, the time budget) is taken by
        all ranks at the same step, since evaluation and checkpoints are collectives."""
        if self.acc.num_processes == 1:
            return bool(flag)
        return bool(self.acc.reduce(torch.tensor([float(flag)], device=self.device), reduction="sum") > 0)


@contextlib.contextmanager
def _deferred_sigint():
    """Yield a function telling whether Ctrl-C was pressed; the first press only sets that flag."""
    pressed = {"n": 0}

    def handler(signum, frame):
        pressed["n"] += 1
        if pressed["n"] > 1:
            raise KeyboardInterrupt
        print("\ninterrupted: finishing this step and checkpointing (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False  # signal handlers can only be installed from the main thread
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: pressed["n"] > 0
    finally:
        signal.signal(signal.SIGINT, previous)


def _postfix(row: dict[str, Any], targets: dict[str, float]) -> str:
    kept = " ".join(f"{t[0]}={d:.1%}" + (f"/{targets[t]:.1%}" if t in targets else "") for t, d in row["kept"].items())
    s = f"loss {row['loss']:.3f} faith {row['faith']:.3f} {kept}"
    if "dev" in row:
        dev = row["dev"]
        s += f" dev {dev['sheaf_accuracy']:.2f}/{dev['full_accuracy']:.2f}"
        if "sheaf_balanced_accuracy" in dev:
            s += f" balanced {dev['sheaf_balanced_accuracy']:.2f}/{dev['full_balanced_accuracy']:.2f}"
    if "selection" in row:
        sel = row["selection"]
        key = "balanced_accuracy" if "sheaf_balanced_accuracy" in sel else "accuracy"
        s += f" dev+select {sel[f'sheaf_{key}']:.2f}/{sel[f'full_{key}']:.2f}"
    return s


def _metrics(split: str, scores: tuple[Tensor, Tensor, Tensor, Tensor], weights: Optional[list[float]]) -> dict:
    """Metrics of (full, sheaf, complement, target) scores, answer-balanced ones too where `weights` are given."""
    return metrics_from_scores(*scores, split=split, weights=weights)


def write_jsonl(path: Path) -> Callable[[dict], None]:
    def log(row: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    return log
