"""What a sheaf is trained for and judged by: faithfulness on the task, completeness of what was pruned
away, expected density per mask type, and the accuracies / KL reported for full model, sheaf and complement.

All task losses work on candidate scores (B, C) from `tasks.score`: the candidates' logits for next-token
tasks, the sentences' total log-probabilities for whole-sentence pairs.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..arch import ArchView
from ..masked import masked_forward
from ..tasks import Batch, Task, answer_weights, encode, score


def task_scores(view: ArchView, batch: Batch, masks: Optional[Mapping[str, Tensor]], *,
                edge_grad: str = "gradient") -> Tensor:
    logits = masked_forward(view, batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids, masks=masks, last_only=batch.kind == "choice",
                            edge_grad=edge_grad)  # (N, T or 1, V)
    return score(logits, batch)  # (B, C)


def faithfulness(scores: Tensor, target: Tensor) -> Tensor:
    """CE over the candidates toward the right one (DiscoGP's two-way CE; multi-class CE over the answers)."""
    return F.cross_entropy(scores, target)


def margin_loss(scores: Tensor, target: Tensor) -> Tensor:
    """Minus the right candidate's margin over the others, s_target - logsumexp(s_others) (the logit difference of a
    two-way task): a faithfulness loss that never saturates. The CE's gradient vanishes once the sheaf is sure of
    its answers (measured on SmolLM2/IOI with the sigmoid gate: CE <= 0.003 from step 5, so training
    had no signal about what it could still remove until the sheaf broke); the margin's does not."""
    right = scores.gather(1, target[:, None]).squeeze(1)  # (B,)
    others = scores.scatter(1, target[:, None], float("-inf"))  # (B, C)
    return (torch.logsumexp(others, dim=-1) - right).mean()


def kl_to_full(scores: Tensor, full: Tensor) -> Tensor:
    """KL(full || sheaf) of the candidate distributions, mean over items (Edge Pruning's faithfulness). Unlike the
    CE it does not saturate on a sheaf surer than the full model, and a fixed answer preference does not pay."""
    return F.kl_div(scores.float().log_softmax(-1), full.float().log_softmax(-1), log_target=True,
                    reduction="batchmean")


# (scores, target, full model's scores) -> loss
FAITH_LOSSES = {"ce": faithfulness, "margin": margin_loss}


class FullScores:
    """The full model's candidate scores of a split's items, computed once per item: the full model never changes."""

    def __init__(self, view: ArchView, task: Task, tokenizer, *, split: str = "train", device=None):
        self.view, self.task, self.tok, self.device = view, task, tokenizer, device
        self.items = task.items(split)
        self.cache: dict[int, Tensor] = {}

    @torch.no_grad()
    def __call__(self, idx: Sequence[int]) -> Tensor:
        """(B, C) scores of items `idx` of the split."""
        missing = sorted({i for i in idx if i not in self.cache})
        if missing:
            batch = encode(self.task, [self.items[i] for i in missing], self.tok)
            batch = batch.to(self.device) if self.device is not None else batch
            for i, s in zip(missing, task_scores(self.view, batch, None).float()):
                self.cache[i] = s
        return torch.stack([self.cache[i] for i in idx])


def completeness(scores: Tensor) -> Tensor:
    """CE toward the uniform distribution over candidates: the pruned-away part should be at chance."""
    return -F.log_softmax(scores, dim=-1).mean()


def kl_div(scores_p: Tensor, scores_q: Tensor) -> Tensor:
    """Mean KL(p || q) of the candidate distributions."""
    lp, lq = F.log_softmax(scores_p, dim=-1), F.log_softmax(scores_q, dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean()


def accuracy(scores: Tensor, target: Tensor, weights: Optional[Tensor] = None) -> float:
    right = (scores.argmax(-1) == target).float()
    return float(right.mean() if weights is None else (right * weights).sum() / weights.sum())


def split_scores(view: ArchView, tokenizer, task: Task, masks: Optional[Mapping[str, Tensor]], *,
                 split: str, batch_size: int = 32, device=None) -> tuple[Tensor, Tensor]:
    """Scores (n, C) and targets (n,) of a whole split under `masks` (None = the full model)."""
    return split_scores_of(lambda batch: task_scores(view, batch, masks), tokenizer, task, split=split,
                           batch_size=batch_size, device=device)


@torch.no_grad()
def split_scores_of(scores_of: Callable[[Batch], Tensor], tokenizer, task: Task, *, split: str,
                    batch_size: int = 32, device=None) -> tuple[Tensor, Tensor]:
    """Scores (n, C) and targets (n,) of a whole split, `scores_of(batch)` giving a batch's (B, C) scores: the one
    loop every model is scored by (masked forward, an exported model in torch or onnxruntime)."""
    items = task.items(split)
    outs, targets = [], []
    for start in range(0, len(items), batch_size):
        batch = encode(task, items[start:start + batch_size], tokenizer)
        if device is not None:
            batch = batch.to(device)
        outs.append(scores_of(batch).float().cpu())
        targets.append(batch.target.cpu())
    return torch.cat(outs), torch.cat(targets)


def sheaf_metrics(view: ArchView, tokenizer, task: Task, masks: Mapping[str, Tensor],
                  complement: Mapping[str, Tensor], *, split: str = "test", batch_size: int = 32,
                  full: Optional[tuple[Tensor, Tensor]] = None, device=None) -> dict:
    """Accuracy of full model, sheaf and complement, KL(sheaf || full), and the share of accuracy kept.

    `full` may pass precomputed (scores, targets) of the full model on this split. Where the split's answers are
    skewed (tasks.answer_weights), the answer-balanced accuracies too.
    """
    kw = dict(split=split, batch_size=batch_size, device=device)
    full_s, target = full if full is not None else split_scores(view, tokenizer, task, None, **kw)
    sheaf_s, _ = split_scores(view, tokenizer, task, masks, **kw)
    comp_s, _ = split_scores(view, tokenizer, task, complement, **kw)
    return metrics_from_scores(full_s, sheaf_s, comp_s, target, split=split,
                               weights=answer_weights(task.items(split), measure=True))


def metrics_from_scores(full: Tensor, sheaf: Tensor, complement: Tensor, target: Tensor, *, split: str,
                        weights: Optional[Sequence[float]] = None) -> dict:
    """The reported metrics from the candidate scores (n, C) of full model, sheaf and complement.

    With `weights` (tasks.answer_weights of the split) also the answer-balanced accuracies, on which a fixed
    preference among the answer tokens scores chance.
    """
    full_acc, sheaf_acc = accuracy(full, target), accuracy(sheaf, target)
    w = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    balanced = {} if w is None else {
        f"{name}_balanced_accuracy": accuracy(s, target, w)
        for name, s in (("full", full), ("sheaf", sheaf), ("complement", complement))}
    return {
        "split": split, "n": int(target.numel()),
        "full_accuracy": full_acc, "sheaf_accuracy": sheaf_acc,
        "complement_accuracy": accuracy(complement, target),
        "chance": 1.0 / full.shape[-1] if full.numel() else float("nan"),
        "kl": float(kl_div(sheaf, full)),
        "accuracy_kept": sheaf_acc / full_acc if full_acc > 0 else float("nan"),
        **balanced,
    }


def floor_verdict(metrics: Mapping[str, float], keep: float) -> Optional[str]:
    """None if the sheaf keeps the task on these metrics (accuracy, and answer-balanced accuracy where reported,
    at least `keep` x the full model's); else one line that says by how much it misses."""
    misses = []
    for key, name in (("accuracy", "accuracy"), ("balanced_accuracy", "answer-balanced accuracy")):
        full, sheaf = metrics.get(f"full_{key}"), metrics.get(f"sheaf_{key}")
        if full is None or sheaf is None:
            continue
        if sheaf < keep * full - 1e-9:
            misses.append(f"{name} {sheaf:.3f} < {keep:g} x full {full:.3f}")
    if not misses:
        return None
    return f"{'; '.join(misses)} ({metrics.get('split', 'test')} split, n={metrics.get('n', '?')})"
