"""What an export measures on each file it writes: bytes, CPU latency on the task's prompts, and accuracy on the
task's test split, scored by the same loop that scores the masked sheaf (objective.split_scores_of)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..discovery.objective import accuracy, split_scores_of
from ..tasks import Task, score

REPS = 5  # timed calls per file (after one warm-up), interleaved
LogitsFn = Callable[[Tensor, Tensor], Tensor]  # (input_ids, attention_mask) -> logits (B, T, V)


def time_interleaved(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
    """Median seconds per call of each fn, calls interleaved so machine load hits every side alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def torch_logits_fn(model: torch.nn.Module) -> LogitsFn:
    def logits(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        with torch.inference_mode():
            return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return logits


def split_accuracy(logits_of: LogitsFn, task: Task, tokenizer: Any, split: str) -> float:
    """Accuracy on `split` of a model given as a logits function (torch or onnxruntime)."""
    scores, target = split_scores_of(lambda b: score(logits_of(b.input_ids, b.attention_mask), b), tokenizer, task,
                                     split=split)
    return accuracy(scores, target)


# How far two fp32 computations of the same deep model may drift apart, relative to the largest logit: fp32 keeps ~7
# digits and SmolLM2's residual stream carries activations of ~2e4 through 30 layers, and onnxruntime's kernels
# (their own exp and logistic approximations among them) round differently from torch's. Measured on the make-demo
# SmolLM2 sheaves: a compaction exact in fp64 was 1.3e-3 from its masked model on logits of ~30; onnxruntime was
# 1.7e-4 from torch on an AVX-512 Xeon and 6.7e-4 (logits ~18) on an AVX2 EPYC. Storage below fp32 (fp16: 5e-4
# relative per weight, bf16: 4e-3) and wrong arithmetic stay far above it.
FP32_RTOL = 1e-4


def max_logit_diff(ref: Tensor, got: Tensor, attention_mask: Tensor) -> float:
    """max |got - ref| over real tokens and real logits (not the lowest-float logits of ids a task vocabulary drops)."""
    ref, got = ref.float(), got.float()
    real = attention_mask.bool()[..., None] & (ref > torch.finfo(ref.dtype).min)  # (B, T, V)
    return float((got - ref).abs().masked_fill(~real, 0).max())


def measure_files(folder: Path, runners: dict[str, tuple[str, LogitsFn]], *, task: Task, tokenizer: Any,
                  split: str, input_ids: Tensor, attention_mask: Tensor,
                  known: Optional[dict[str, float]] = None) -> list[dict[str, Any]]:
    """One row per file: {file, dtype, bytes, latency_ms, accuracy}. `runners`: file name -> (dtype, logits fn);
    latency is the median over REPS calls on (input_ids, attention_mask), all files timed interleaved; `known`:
    accuracies already measured, by file name."""
    known = known or {}
    seconds = time_interleaved({f: (lambda fn=fn: fn(input_ids, attention_mask)) for f, (_, fn) in runners.items()},
                               REPS)
    return [{"file": f, "dtype": dtype, "bytes": (folder / f).stat().st_size,
             "latency_ms": round(1e3 * seconds[f], 3),
             "accuracy": known[f] if f in known else split_accuracy(fn, task, tokenizer, split)}
            for f, (dtype, fn) in runners.items()]
