"""Fragility benchmark: how much of a model can be zero-masked at random, or in the order of a first-order
ranking, before a task breaks. It explains why DiscoGP's gate at noise scale 1 trains on a broken model: with its
logits at 1, every sampled mask drops each weight and each edge with probability 1 - sigmoid(1) = 0.27.

For each mask type alone (the other all kept), dev accuracy and CE of the model with:
- a random fraction p of the entries removed (seeded);
- the lowest fraction removed by attribution |dCE/dmask| at the full model (2 training batches of 16), or by
  weight magnitude |w| (weights only);
- edges only, iterative: rescored at the current masks every round by |dCE/dmask| or by the secant (edge_grad);
and the CE when every outgoing edge of one writer (the embeddings or one MLP) is removed.

    python -m bench.fragility              # smollm2-135m, IOI dev (a few minutes on 2 cores)
    python -m bench.fragility --quick      # tiny-llama, seconds

Results: bench/results/fragility[_quick].json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench.machine import machine

RESULTS = Path(__file__).parent / "results"
FRACTIONS = {"random": (0.02, 0.07, 0.27), "attribution": (0.07, 0.5, 0.95), "magnitude": (0.07, 0.5, 0.95)}
ITERATIVE_ROUNDS = 9  # to 0.05^(9/30) = 41% of the edges kept


def _lowest_removed(scores: dict[str, torch.Tensor], frac: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Masks keeping all but the `frac` lowest-scored entries over all the given tensors (threshold from a sample)."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    if flat.numel() > 5_000_000:
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))[:5_000_000]]
    threshold = flat.kthvalue(max(1, int(frac * flat.numel()))).values
    return {k: (s > threshold).float() for k, s in scores.items()}


def _iterative_edge_pruning(view, tok, task, shapes: dict, judge) -> list[dict]:
    """Edges only: ITERATIVE_ROUNDS rounds, each rescoring the kept edges at the current masks (2 training batches of
    16) and removing the lowest-scored ones down to 0.05^(round/30) kept; scored by |dCE/dmask| (autograd) or by
    |the secant| (edge_grad "secant": the removal taken exactly through the reader's norm)."""
    from sheafprune.discovery.objective import faithfulness, task_scores
    from sheafprune.graph import mask_type
    from sheafprune.tasks import encode

    edge_keys = [k for k in shapes if mask_type(k) == "edge"]
    total = sum(torch.Size(shapes[k]).numel() for k in edge_keys)
    train = task.items("train")
    rows = []
    for estimator in ("gradient", "secant"):
        masks = {k: torch.ones(shapes[k]) for k in edge_keys}
        for r in range(1, ITERATIVE_ROUNDS + 1):
            ms = {k: m.clone().requires_grad_(True) for k, m in masks.items()}
            for b in range(2):
                start = (2 * r + b) * 16
                batch = encode(task, train[start:start + 16], tok)
                faithfulness(task_scores(view, batch, ms, edge_grad=estimator), batch.target).backward()
            scores = {k: ms[k].grad.abs().masked_fill(masks[k] == 0, float("-inf")) for k in edge_keys}
            flat = torch.cat([v.flatten() for v in scores.values()])
            threshold = flat.kthvalue(total - int(0.05 ** (r / 30) * total)).values
            masks = {k: (v > threshold).float() for k, v in scores.items()}
            if r % 3 == 0:
                kept = sum(float(m.sum()) for m in masks.values()) / total
                rows.append({"type": "edge", "removed": f"iterative {estimator}", "fraction": round(1 - kept, 3),
                             **judge(masks)})
    return rows


def measure(model_name: str, task_name: str) -> dict:
    from sheafprune.arch import view_of
    from sheafprune.masked import mask_shapes
    from sheafprune.models import load_model
    from sheafprune.discovery.objective import accuracy, faithfulness, split_scores, task_scores
    from sheafprune.graph import mask_type, weight_name
    from sheafprune.tasks import encode, load_task

    model, tok = load_model(model_name)
    view = view_of(model)
    task = load_task(task_name, tok, seed=0)
    shapes = mask_shapes(view, ("weight", "edge"))
    full_scores, target = split_scores(view, tok, task, None, split="dev")

    def judge(masks: dict) -> dict:
        s, _ = split_scores(view, tok, task, {**{k: torch.ones(v) for k, v in shapes.items()}, **masks}, split="dev")
        return {"accuracy": round(accuracy(s, target), 4), "ce": round(float(faithfulness(s, target)), 4)}

    ones = {k: torch.ones(s, requires_grad=True) for k, s in shapes.items()}
    train = task.items("train")
    for b in range(2):
        batch = encode(task, train[b * 16:(b + 1) * 16], tok)
        faithfulness(task_scores(view, batch, ones), batch.target).backward()
    attribution = {k: m.grad.abs() for k, m in ones.items()}
    del ones
    weights = view.maskable()
    rows = []
    g = torch.Generator().manual_seed(0)
    for t in ("weight", "edge"):
        keys = [k for k in shapes if mask_type(k) == t]
        for p in FRACTIONS["random"]:
            rows.append({"type": t, "removed": "random", "fraction": p,
                         **judge({k: (torch.rand(shapes[k], generator=g) >= p).float() for k in keys})})
        rankings = {"attribution": {k: attribution[k] for k in keys}}
        if t == "weight":
            rankings["magnitude"] = {k: weights[weight_name(k)].detach().abs() for k in keys}
        for name, scores in rankings.items():
            for p in FRACTIONS[name]:
                rows.append({"type": t, "removed": f"lowest {name}", "fraction": p, **judge(_lowest_removed(scores, p))})
    rows += _iterative_edge_pruning(view, tok, task, shapes, judge)
    print(*(f"{r['type']:6s} {r['removed']:21s} {r['fraction']:.2f}  acc {r['accuracy']:.2f}  CE {r['ce']:.3f}"
            for r in rows), sep="\n", flush=True)
    graph = view.graph
    names = graph.writers()
    edge_keys = [k for k in shapes if mask_type(k) == "edge"]
    writers = []
    for w in [0] + [graph.writers_before_mlp(layer) for layer in range(view.spec.n_layers)]:  # `in` and each MLP
        masks = {k: torch.ones(shapes[k]) for k in edge_keys}
        for k in edge_keys:
            if w < shapes[k][0]:
                masks[k][w] = 0.0
        writers.append({"writer": names[w], **judge(masks)})
    writers.sort(key=lambda r: -r["ce"])
    print("writers whose outgoing edges matter most:", ", ".join(f"{r['writer']} CE {r['ce']:.2f}" for r in writers[:5]))
    return {"model": model_name, "task": task_name, "split": "dev", "n": int(target.numel()),
            "full": {"accuracy": round(accuracy(full_scores, target), 4),
                     "ce": round(float(faithfulness(full_scores, target)), 4)},
            "removal": rows, "writers": writers, "machine": machine()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny-llama instead of smollm2-135m")
    args = ap.parse_args(argv)
    result = measure("tiny-llama" if args.quick else "smollm2-135m", "ioi")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"fragility{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"full model: acc {result['full']['accuracy']:.2f} CE {result['full']['ce']:.3f}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
