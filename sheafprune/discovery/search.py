"""The keep search: the smallest structured sheaf (attention heads and MLP neurons) that still does the task.

What a user asks for is "as small as it gets while the task holds", not a density, so the density is searched:
- masks: one logit per attention head and per MLP neuron; the mask is deterministic, sigmoid(logit / T), with the
  temperature T falling as the density does, so the soft sheaf trained on converges to the hard one judged;
- mean ablation: a pruned unit writes its mean output over the task's training prompts instead of zero (circuit
  work's mean ablation, FLAP's bias compensation); the constant folds into a bias, so compaction stays exact;
- faithfulness: KL(full || sheaf) over the candidates; the full model's scores are computed once per item. KL
  does not saturate on a sheaf surer than the full model and does not reward a fixed answer preference;
- density: one multiplier per unit type, raised by dual ascent while the soft sheaf is denser than a target that
  halves every HALVING_STEPS steps from 1 down to FLOOR;
- judging: every `eval_every` steps the hard sheaf at the current target (top-k logits per type) is scored on dev
  and the held-out select items; the smallest that keeps `keep` x the full model's accuracy (and its
  answer-balanced accuracy, where the answers are skewed) is the result. The search ends at the floor, when
  PATIENCE judgements in a row fail, or when the time budget runs out;
- a ranked restart: the logits start equal, so the first top-k cuts fall in the order Adam's equal-sized steps leave
  them. Where that breaks the task at once (nothing smaller held), the search runs once more from logits spread by
  attribution rank, the units least used by the task cut first. Equal logits are the first try because their picks
  held on fresh items better wherever both found a sheaf. If nothing smaller holds, the result is the full model:
  never a broken one.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..arch import ArchView
from ..config import DiscoverConfig
from ..errors import RunFailed
from ..graph import is_type, mask_type, mean_key, mean_of
from ..masked import mask_shapes, masked_forward
from ..tasks import Task, answer_weights, encode
from .data import batch_indices
from .gates import soft_mask
from .objective import FullScores, accuracy, faithfulness, floor_verdict, kl_to_full, split_scores, task_scores

SEARCH_TYPES = ("neuron", "head")
FLOOR = 0.02  # the smallest density tried (a few heads and ~30 neurons per layer of SmolLM2)
HALVING_STEPS = 40  # steps per halving of the target density
T_FINAL = 0.05  # the temperature reached at the floor: sigmoid(logit / T) is then near 0/1 for |logit| > 0.2
INIT_LOGIT = 2.0  # sigmoid(2) = 0.88: every unit starts kept
DUAL_LR = 2.0  # dual-ascent step of the density multipliers
PATIENCE = 3  # failed judgements in a row that end the search
RANKED_SPREAD = 1.0  # the ranked restart's logits span INIT_LOGIT +- RANKED_SPREAD, least used unit lowest
RANKED_BATCHES = 4  # training batches the ranked restart's attribution is summed over
MEAN_ITEMS = 256  # training items the unit means are taken over
SELECT_ITEMS = 100  # training items held out to judge with dev (tasks.held_out_size): 200 judged in all at 1000 items



def ramp_target(step: int) -> float:
    """The target density after `step` steps: halves every HALVING_STEPS steps, down to FLOOR."""
    return max(FLOOR, 0.5 ** (step / HALVING_STEPS))


def temperature(target: float) -> float:
    """T = 1 at density 1, T_FINAL at the floor, geometric in between (log-linear in the target)."""
    frac = math.log(target) / math.log(FLOOR)  # 0 at density 1, 1 at the floor
    return T_FINAL ** frac


def _by_type(logits: dict[str, Tensor]) -> dict[str, tuple[list[str], Tensor]]:
    """Per unit type present: its keys and all its logits as one flat tensor."""
    out = {}
    for t in SEARCH_TYPES:
        keys = [k for k in logits if is_type(k, t)]
        if keys:
            out[t] = keys, torch.cat([logits[k].detach().flatten() for k in keys])
    return out


def top_k_masks(logits: dict[str, Tensor], density: dict[str, float]) -> dict[str, Tensor]:
    """0/1 masks keeping the `density[type]` fraction of each type's units with the largest logits (at least one)."""
    out: dict[str, Tensor] = {}
    for t, (keys, flat) in _by_type(logits).items():
        threshold = flat.topk(max(1, round(density[t] * flat.numel()))).values[-1]
        out.update({key: (logits[key].detach() >= threshold).float() for key in keys})
    return out


def centered_logits(logits: dict[str, Tensor], masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """Logits shifted per type so that exactly the units of `masks` are > 0 (the sheaf's test-time rule)."""
    out: dict[str, Tensor] = {}
    for t, (keys, flat) in _by_type(logits).items():
        kept = torch.cat([masks[k].flatten() for k in keys]).bool()
        lo = flat[~kept].max() if (~kept).any() else flat.min() - 2.0
        mid = (lo + flat[kept].min()) / 2
        out.update({k: (logits[k].detach() - mid).cpu() for k in keys})
    return out


@torch.no_grad()
def unit_means(view: ArchView, task: Task, tokenizer, *, device, batch_size: int) -> dict[str, Tensor]:
    """Each head's mean output (H, D) and each MLP neuron's mean hidden value (I,) over the real tokens of the
    first MEAN_ITEMS training prompts (sentence tasks: both sentences), keyed as the masked forward reads them."""
    items = task.items("train")[:MEAN_ITEMS]
    sums: dict[str, Tensor] = {}
    count = 0
    for start in range(0, len(items), batch_size):
        batch = encode(task, items[start:start + batch_size], tokenizer).to(device)
        taps: dict[str, Tensor] = {}
        masked_forward(view, batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                       last_only=True, taps=taps)
        real = batch.attention_mask.bool()  # (N, T)
        count += int(real.sum())
        for key, x in taps.items():
            if is_type(key, "head"):
                s = x[:, real].double().sum(1)  # (H, D)
            else:
                s = x[real].double().sum(0)  # (I,)
            sums[key] = sums[key] + s if key in sums else s
    return {mean_key(k): (v / max(count, 1)).float() for k, v in sums.items()}


@dataclass
class Judgement:
    step: int
    density: dict[str, float]  # kept fraction per type
    size: float  # kept fraction of the maskable parameters (unit_params)
    accuracy: float
    full_accuracy: float
    balanced: Optional[float] = None
    full_balanced: Optional[float] = None
    masks: dict[str, Tensor] = field(default_factory=dict, repr=False)
    logits: dict[str, Tensor] = field(default_factory=dict, repr=False)  # when judged: their top-k is `masks`

    def holds(self, keep: float) -> bool:
        """The floor rule export applies to test metrics (objective.floor_verdict), on the judged items."""
        metrics = {"full_accuracy": self.full_accuracy, "sheaf_accuracy": self.accuracy}
        if self.balanced is not None:
            metrics.update(full_balanced_accuracy=self.full_balanced, sheaf_balanced_accuracy=self.balanced)
        return floor_verdict(metrics, keep) is None

    def row(self) -> dict[str, Any]:
        out = {"density": {t: round(d, 5) for t, d in self.density.items()}, "size": round(self.size, 5),
               "accuracy": self.accuracy, "full_accuracy": self.full_accuracy}
        if self.balanced is not None:
            out.update(balanced_accuracy=self.balanced, full_balanced_accuracy=self.full_balanced)
        return out


@dataclass
class SearchResult:
    logits: dict[str, Tensor]  # centered: exactly the kept units are > 0
    means: dict[str, Tensor]  # mean/<type>/<l>: what pruned units write
    curve: list[dict[str, Any]]
    best: Judgement
    steps: int
    step_seconds: list[float]
    judged_on: str
    stopped: str
    passes: list[str]  # "equal" logits, then "ranked" by attribution where equal logits kept nothing smaller


class KeepSearch:
    """One search run: state, step and judgement; `run` is the loop."""

    def __init__(self, *, cfg: DiscoverConfig, view: ArchView, tokenizer, task: Task, accelerator,
                 started: float, progress: bool):
        self.cfg, self.view, self.tok, self.task, self.acc = cfg, view, tokenizer, task, accelerator
        self.device, self.started = accelerator.device, started
        self.progress = progress and accelerator.is_main_process
        self.logits = {k: torch.full(s, INIT_LOGIT, device=self.device, requires_grad=True)
                       for k, s in mask_shapes(view, cfg.granularity).items()}
        self._reset_training_state()
        self.n_units = {t: sum(v.numel() for k, v in self.logits.items() if is_type(k, t)) for t in SEARCH_TYPES}
        self.unit_params = unit_params(view)
        # Mean ablation: zero ablation kept IOI at 0.68 where the means kept 0.99 with half the heads removed.
        self.means = {k: v for k, v in unit_means(view, task, tokenizer, device=self.device,
                                                  batch_size=cfg.batch_size).items()
                      if mask_type(mean_of(k)) in cfg.granularity}
        self.train_items = task.items("train")
        # Skewed right answers (BLiMP anaphor: ' herself' in 519 of 800 items): every right answer is drawn equally
        # often within its candidate set, so a fixed answer preference gains nothing in training.
        self.train_weights = answer_weights(self.train_items)
        self.full_scores = FullScores(view, task, tokenizer, device=self.device)
        self.judge_split = ["dev"] + (["select"] if "select" in task.splits else [])
        self.judge_items = [it for s in self.judge_split for it in task.items(s)]
        self.judge_task = Task(task.name, task.kind, {"judge": self.judge_items})
        self.judge_weights = answer_weights(self.judge_items, measure=True)
        t0 = time.perf_counter()
        self.judge_full = self._judge_scores(None)
        self.judge_seconds = time.perf_counter() - t0

    def _reset_training_state(self) -> None:
        """Density multipliers at 0 and a fresh Adam over the logits: a pass starts from its logits alone."""
        self.multipliers = {t: 0.0 for t in SEARCH_TYPES}
        self.optimizer = torch.optim.Adam(list(self.logits.values()), lr=self.cfg.lr)

    @torch.no_grad()
    def _spread(self, scores: dict[str, Tensor]) -> None:
        """Logits INIT_LOGIT +- RANKED_SPREAD by each unit's rank within its type (lowest = least used)."""
        for t, (keys, flat) in _by_type(scores).items():
            rank = flat.argsort().argsort().float() / max(flat.numel() - 1, 1)
            spread = INIT_LOGIT + RANKED_SPREAD * (2 * rank - 1)
            start = 0
            for k in keys:
                n = self.logits[k].numel()
                self.logits[k].copy_(spread[start:start + n].view_as(self.logits[k]))
                start += n

    def rank_by_attribution(self) -> None:
        """Restart from logits ranked by |dCE/dmask| at the full model, summed over RANKED_BATCHES training batches:
        under mean ablation that is (output - mean) . dCE/doutput, the first-order cost of removing the unit. The
        KL's gradient is zero at the full model, hence the CE toward the right answers."""
        ones = {k: torch.ones_like(v, requires_grad=True) for k, v in self.logits.items()}
        for b in range(RANKED_BATCHES):
            batch, _ = self._batch(b)
            faithfulness(task_scores(self.view, batch, self.forward_masks(ones)), batch.target).backward()
        scores = {}
        for k, m in ones.items():
            g = m.grad.abs() if m.grad is not None else torch.zeros_like(m)
            scores[k] = self.acc.reduce(g, reduction="mean") if self.acc.num_processes > 1 else g
        if not all(torch.isfinite(g).all() for g in scores.values()):
            raise RunFailed("the ranked restart got a non-finite gradient: the model's outputs on this task are not "
                            "finite")
        self._spread(scores)
        self._reset_training_state()

    def _judge_scores(self, masks: Optional[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
        return split_scores(self.view, self.tok, self.judge_task, masks, split="judge",
                            batch_size=max(self.cfg.batch_size, 32), device=self.device)

    def forward_masks(self, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        return {**masks, **self.means}

    def size(self, density: dict[str, float]) -> float:
        """The kept fraction of the maskable parameters at these densities."""
        total = sum(self.unit_params[t] * self.n_units[t] for t in density)
        return sum(self.unit_params[t] * self.n_units[t] * d for t, d in density.items()) / total

    def judge(self, step: int, density: dict[str, float]) -> Judgement:
        masks = top_k_masks(self.logits, density)
        density = {t: float(torch.cat([m.flatten() for k, m in masks.items() if is_type(k, t)]).mean())
                   for t in density}
        (full_s, target), (sheaf_s, _) = self.judge_full, self._judge_scores(self.forward_masks(masks))
        w = None if self.judge_weights is None else torch.tensor(self.judge_weights)
        return Judgement(step=step, density=density, size=self.size(density), accuracy=accuracy(sheaf_s, target),
                         full_accuracy=accuracy(full_s, target),
                         balanced=None if w is None else accuracy(sheaf_s, target, w),
                         full_balanced=None if w is None else accuracy(full_s, target, w),
                         masks={k: v.cpu() for k, v in masks.items()},
                         logits={k: v.detach().cpu().clone() for k, v in self.logits.items()})

    def _batch(self, step: int) -> tuple[Any, list[int]]:
        idx = batch_indices(step, n=len(self.train_items), size=self.cfg.batch_size, seed=self.cfg.seed,
                            weights=self.train_weights)
        per = self.cfg.batch_size // self.acc.num_processes
        mine = idx[self.acc.process_index * per:(self.acc.process_index + 1) * per]
        return encode(self.task, [self.train_items[i] for i in mine], self.tok).to(self.device), mine

    def step(self, step: int) -> dict[str, Any]:
        target = ramp_target(step)
        temp = temperature(target)
        soft = {k: soft_mask(v, temp) for k, v in self.logits.items()}
        batch, idx = self._batch(step)
        kl = kl_to_full(task_scores(self.view, batch, self.forward_masks(soft)), self.full_scores(idx))
        dens = {t: torch.cat([soft[k] for k in soft if is_type(k, t)]).mean()
                for t in SEARCH_TYPES if any(is_type(k, t) for k in soft)}
        loss = kl + sum(self.multipliers[t] * d for t, d in dens.items())
        if not torch.isfinite(loss):
            raise RunFailed(f"the keep search's loss became {float(loss.detach())} at step {step} (try a lower --lr)")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.acc.num_processes > 1:
            for p in self.logits.values():
                p.grad = self.acc.reduce(p.grad, reduction="mean")
        self.optimizer.step()
        density = {t: float(d.detach()) for t, d in dens.items()}
        if self.acc.num_processes > 1:
            kl = self.acc.reduce(kl.detach(), reduction="mean")
        for t, d in density.items():  # the soft density is computed from the logits alone: equal on every rank
            self.multipliers[t] = max(0.0, self.multipliers[t] + DUAL_LR * (d - target))
        return {"step": step + 1, "kl": float(kl.detach()), "target": round(target, 5), "temperature": round(temp, 4),
                "density": density, "multipliers": dict(self.multipliers)}

    def _out_of_time(self, step_seconds: float) -> bool:
        if self.cfg.max_minutes is None:
            return False
        n_test = len(self.task.items("test"))
        closing = self.judge_seconds * (1 + 2 * n_test / max(len(self.judge_items), 1))
        spent = time.perf_counter() - self.started
        return spent + 2 * step_seconds + closing > 60 * self.cfg.max_minutes

    def run(self, *, log: Optional[Callable[[dict], None]] = None) -> SearchResult:
        full = self.judge(0, {t: 1.0 for t in self.n_units if self.n_units[t]})
        curve: list[dict[str, Any]] = []
        times: list[float] = []
        passes = ["equal"]
        best, stopped = self._pass(full, curve, times, log=log, init="equal")
        if best is full and stopped != "time":
            passes.append("ranked")
            self.rank_by_attribution()
            best, stopped = self._pass(full, curve, times, log=log, init="ranked")
        logits = centered_logits(best.logits, best.masks)
        return SearchResult(logits=logits, means={k: v.cpu() for k, v in self.means.items()}, curve=curve,
                            best=best, steps=len(times), step_seconds=times, judged_on="+".join(self.judge_split),
                            stopped=stopped, passes=passes)

    def _pass(self, best: Judgement, curve: list[dict[str, Any]], times: list[float], *,
              log: Optional[Callable[[dict], None]], init: str) -> tuple[Judgement, str]:
        """Lower the density from 1 until the floor, PATIENCE failed judgements in a row or the time budget; the
        smallest sheaf that held (or `best`) and why the pass stopped. Rows are appended to `curve`."""
        from tqdm.auto import tqdm

        fails, stopped, step = 0, "steps", 0
        bar = tqdm(total=self.cfg.steps, disable=not self.progress, dynamic_ncols=True, mininterval=1.0,
                   desc="keep search" + (" (ranked restart)" if init == "ranked" else ""))
        try:
            while step < self.cfg.steps:
                t0 = time.perf_counter()
                row = self.step(step)
                row["init"] = init
                step += 1
                times.append(time.perf_counter() - t0)
                out_of_time = self._out_of_time(times[-1])
                at_floor = row["target"] <= FLOOR
                if step % self.cfg.eval_every == 0 or out_of_time or at_floor:
                    # The hard sheaf where the soft one is: the target once the soft density has reached it.
                    j = self.judge(step, {t: max(row["target"], d) for t, d in row["density"].items()})
                    holds = j.holds(self.cfg.keep)
                    row["judged"] = {**j.row(), "holds": holds}
                    if holds:
                        fails = 0
                        if j.size < best.size:
                            best = j
                    elif j.size < best.size:
                        fails += 1
                curve.append(row)
                if log is not None and self.acc.is_main_process:
                    log(row)
                bar.update(1)
                bar.set_postfix_str(_postfix(row, best))
                if out_of_time or at_floor or fails >= PATIENCE:
                    stopped = "time" if out_of_time else "floor" if at_floor else "accuracy"
                    break
        finally:
            bar.close()
        return best, stopped


def unit_params(view: ArchView) -> dict[str, int]:
    """Weights one unit holds: a neuron its input (and gate) column and output row; a head its query and output
    slices plus its share of its KV head's key and value slices."""
    s = view.spec
    kv_share = 2 * s.d_model * s.d_head * s.n_kv_heads // s.n_heads
    return {"neuron": (3 if s.gated else 2) * s.d_model, "head": 2 * s.d_model * s.d_head + kv_share}


def median_step_seconds(times: list[float], cycle: int = 1) -> Optional[float]:
    """The median seconds of one step, over whole cycles of `cycle` steps where steps differ in a cycle (the joint
    schedule scores the complement on every other step): the median of the cycles' means."""
    n = len(times) // cycle * cycle or len(times)
    means = [sum(times[i:i + cycle]) / len(times[i:i + cycle]) for i in range(0, n, cycle)]
    return round(statistics.median(means), 3) if means else None


def _postfix(row: dict[str, Any], best: Judgement) -> str:
    dens = " ".join(f"{t[0]}={d:.1%}" for t, d in row["density"].items())
    s = f"kl {row['kl']:.3f} target {row['target']:.1%} {dens} best {best.size:.1%}"
    if "judged" in row:
        j = row["judged"]
        s += f" judged {j['size']:.1%}: {j['accuracy']:.2f}/{j['full_accuracy']:.2f}"
        if "balanced_accuracy" in j:
            s += f" balanced {j['balanced_accuracy']:.2f}/{j['full_balanced_accuracy']:.2f}"
    return s
