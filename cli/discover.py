"""`sheafprune discover`: learn a sheaf and write its folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from sheafprune.config import PRECISIONS, PRESETS, RECIPES, DiscoverConfig, resolve_config


def add_discover_options(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    """Options shared by `discover` and `export --model ... --task ...`."""
    p.add_argument("--model", help="model name (see `sheafprune models`), HF folder or hub id")
    p.add_argument("--task", help="task name (see `sheafprune tasks`)")
    p.add_argument("--granularity", help="any of weight,neuron,head,edge (default neuron,head; weight and edge "
                                         "need --target-density)")
    p.add_argument("--target-density", dest="target_density",
                   help="kept fraction per type, e.g. weight=0.03,edge=0.03 (default: none, search for the smallest "
                        "sheaf that keeps the task)")
    p.add_argument("--preset", choices=list(PRESETS),
                   help="default (the keep search) or discogp (DiscoGP's recipe: weight and edge masks, weights then "
                        "edges); --config and flags override it")
    p.add_argument("--keep", type=float, help="the floor: share of the full model's accuracy to keep (default 0.95)")
    p.add_argument("--recipe", choices=list(RECIPES),
                   help="how the masks train toward --target-density: joint (default: all types together, a "
                        "noise-free gate, margin loss, attribution init, secant edge gradient) or discogp (DiscoGP's "
                        "staged weights-then-edges, its concrete gate and CE)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--precision", choices=list(PRECISIONS),
                   help="arithmetic of the training passes with --target-density: fp32 (default) or bf16 (about a "
                        "fifth less time a step where the machine has bf16, e.g. AMX; it lost IOI's 5%%/5%% sheaf "
                        "in the joint recipe); evaluations and the kept sheaf are always fp32")
    p.add_argument("--eval-every", dest="eval_every", type=int, help="steps between dev evaluations (best-sheaf tracking)")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-minutes", dest="max_minutes", type=float, help="wall-clock budget for discovery")
    p.add_argument("--n-items", dest="n_items", type=int, help="number of generated items (ioi)")
    p.add_argument("--shard-masks", dest="shard_masks", action="store_true", default=None,
                   help="under several processes (accelerate launch), shard the weight-mask logits, their optimizer "
                        "state and the weights they gate by rows over the processes: each holds ~1/N; same result "
                        "(see README, 'Several processes or GPUs')")
    p.add_argument("--config", type=Path, help="YAML file of options (CLI flags override it)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")


def config_from_args(args: argparse.Namespace) -> DiscoverConfig:
    keys = ("model", "task", "granularity", "target_density", "keep", "recipe", "steps", "batch_size", "lr",
            "precision", "eval_every", "seed", "n_items", "max_minutes", "shard_masks")
    return resolve_config(yaml_path=args.config, overrides={k: getattr(args, k, None) for k in keys},
                          preset=getattr(args, "preset", None))


def _run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from sheafprune.discovery import discover

    cfg = config_from_args(args)
    sheaf = discover(cfg, out=args.out, resume=args.resume, overwrite=args.overwrite)
    if not PartialState().is_main_process:  # under `accelerate launch` one line, not one per process
        return 0
    d = ", ".join(f"{k} {v:.2%}" for k, v in sheaf.density().items())
    m = sheaf.meta.get("metrics", {})
    line = (f"sheaf written to {args.out}: kept {d}; test accuracy full {m.get('full_accuracy', float('nan')):.3f}, "
            f"sheaf {m.get('sheaf_accuracy', float('nan')):.3f}, complement {m.get('complement_accuracy', float('nan')):.3f}")
    if "sheaf_balanced_accuracy" in m:
        line += (f" (answer-balanced: full {m['full_balanced_accuracy']:.3f}, sheaf {m['sheaf_balanced_accuracy']:.3f}, "
                 f"complement {m['complement_balanced_accuracy']:.3f})")
    print(line)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("discover", help="learn a sheaf (joint weight/edge pruning)")
    add_discover_options(p)
    p.add_argument("--out", type=Path, default=Path("exports/sheaf"), help="sheaf folder to write")
    p.set_defaults(func=_run)
