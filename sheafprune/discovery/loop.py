"""The discovery loop with density targets: train the mask logits step by step, evaluate on dev, checkpoint, stop
early once the targets are met and accuracy holds, or when the time budget runs out.

What happens within a step is step.py; the schedule is schedule.py; which sheaf is kept and when to stop early is
select.py; checkpoints are state.py. Under Accelerate every rank runs this loop in lockstep: decisions to stop are
taken by all ranks at the same step (evaluation and checkpoints are collectives). The batch and the masks of step s
are pure functions of (seed, s), which is what makes `--resume` reproduce an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..arch import ArchView
from ..config import DiscoverConfig
from ..tasks import Task
from . import state
from .attribution import init_logits
from .data import RankData
from .masks import MaskLogits
from .schedule import plan_stages, ramp_steps, stage_at, targets
from .select import Selection
from .step import TrainStep, complement_every, make_optimizer, normalized


class Trainer:
    def __init__(self, *, cfg: DiscoverConfig, view: ArchView, tokenizer, task: Task, params: MaskLogits,
                 accelerator, work_dir: Path, progress: bool = True, started: Optional[float] = None):
        """`started`: time.perf_counter() when this process began the run (loading the model): --max-minutes
        counts from there."""
        self.started = time.perf_counter() if started is None else started
        self.setup_seconds = 0.0  # this process's time before its first step (set by run)
        self.cfg, self.view, self.task, self.params = cfg, view, task, params
        self.acc, self.work_dir = accelerator, work_dir
        self.progress = progress and accelerator.is_main_process
        self.stages = plan_stages(cfg)
        self.total_steps = sum(s.steps for s in self.stages)
        self.curve: list[dict[str, Any]] = []
        self.step = 0
        self.step_times: list[float] = []  # seconds of each optimizer step of this process (training.step_seconds)
        self.step_cycle = max(complement_every(s) for s in self.stages)  # steps differ in cost within a cycle
        self.elapsed = 0.0
        self.optimizer = make_optimizer(cfg, params, self.stages[0])
        self.data = RankData(cfg=cfg, view=view, tokenizer=tokenizer, task=task, params=params, accelerator=accelerator)
        self.one_step = TrainStep(cfg=cfg, view=view, params=params, data=self.data, accelerator=accelerator,
                                  work_dir=work_dir)
        self.select = Selection(cfg=cfg, params=params, data=self.data, stages=self.stages)

    def init_logits(self) -> None:
        """Before step 1 of a fresh run: attribution-ranked logits (the recipe's init), else keep DiscoGP's constant init."""
        init_logits(cfg=self.cfg, view=self.view, params=self.params, data=self.data, accelerator=self.acc,
                    progress=self.progress)

    def resume(self) -> bool:
        """Load the newest checkpoint of work_dir; False if there is none."""
        return state.resume(self)

    def train_step(self) -> dict[str, Any]:
        return self.one_step(self.step, self.optimizer)

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
                        state.checkpoint(self)
                        raise KeyboardInterrupt
                    if stop:
                        break
            finally:
                bar.close()

    def _one_step(self, bar, log: Optional[Callable[[dict], None]]) -> bool:
        """Train, maybe evaluate and checkpoint one step; True = stop early."""
        stage, local = stage_at(self.stages, self.step)
        if local == 0 and self.step > 0:
            self.optimizer = make_optimizer(self.cfg, self.params, stage)  # a new stage trains other mask types
        t0 = time.perf_counter()
        row = self.train_step()
        self.step += 1
        step_seconds = time.perf_counter() - t0
        self.step_times.append(step_seconds)
        # Stop now if one more step and the closing evaluations would overrun the budget (spent = setup + earlier
        # steps + this one).
        spent = self.setup_seconds + self.elapsed + 2 * max(self.step_times[-self.step_cycle:]) + \
            self.select.closing_seconds()
        out_of_time = self.cfg.max_minutes is not None and self._anyone(spent > 60 * self.cfg.max_minutes)
        stop = out_of_time
        if self.select.evaluate_now(row, stage, local + 1, self.step) or self.step == self.total_steps or out_of_time:
            stop = self.select.eval_and_track(row, stage, local + 1) or out_of_time
        self.elapsed += time.perf_counter() - t0
        if len(self.step_times) == self.step_cycle:
            self._warn_if_the_ramp_outlasts_the_budget(bar)
        row["time"] = round(self.elapsed, 3)
        self.curve.append(row)
        if log is not None and self.acc.is_main_process:
            log(row)
        bar.update(1)
        bar.set_postfix_str(_postfix(row, targets(self.cfg)))
        if self.step % self.cfg.checkpoint_every == 0 or stop:
            state.checkpoint(self)
        return stop

    def _warn_if_the_ramp_outlasts_the_budget(self, bar) -> None:
        """After this process's first cycle of steps: one warning line if, at that pace, the density ramp would end
        after --max-minutes, so the run would stop short of its targets (evaluations not counted: it warns only
        where even the steps alone do not fit)."""
        last = self.stages[-1]
        if self.cfg.max_minutes is None or not targets(self.cfg) or not normalized(last):  # joint only
            return
        ramp_end = sum(s.steps for s in self.stages[:-1]) + ramp_steps(last)
        pace = sum(self.step_times) / len(self.step_times)
        at_ramp_end = self.setup_seconds + self.elapsed + max(ramp_end - self.step, 0) * pace
        if at_ramp_end > 60 * self.cfg.max_minutes and self.acc.is_main_process:
            bar.write(f"warning: at {pace:.1f} s a step the density ramp ends at step {ramp_end}, about "
                      f"{at_ramp_end / 60:.0f} min into a {self.cfg.max_minutes:g}-minute budget: the sheaf will stop "
                      f"short of its targets; lower --steps or --batch-size, or raise --max-minutes", file=sys.stderr)

    def final_logits(self) -> dict[str, Tensor]:
        """The best dev sheaf that met the targets, else the last one (full tensors, on every rank)."""
        best = self.select.best
        src = best["logits"] if best is not None else self.params.named_logits()
        return {k: v.detach().clone().cpu() for k, v in self.params.gather_full(src).items()}

    def _anyone(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any: a decision to stop (Ctrl-C, the time budget) is taken by
        all ranks at the same step, since evaluation and checkpoints are collectives."""
        if self.acc.num_processes == 1:
            return bool(flag)
        return bool(self.acc.reduce(torch.tensor([float(flag)], device=self.acc.device), reduction="sum") > 0)


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
