"""Discovery step cost against a plain training step, as ratios measured in one run.

The reference is a plain training forward+backward of the same batch: the stock HF model with every weight
requiring grad, the loss at the last position. Against it: one step of the keep search (head and neuron masks,
mean ablation, KL to cached full-model scores) and one step of target-mode training at weight+edge granularity
and at neuron+head+edge granularity (the sheaf and its complement, through the writer stack), each in fp32 (the
default) and with `--precision bf16`; and, for reference, the plain step itself under bf16 autocast. The bf16 modes
run only where the CPU has bf16 instructions (AMX or AVX512-BF16): emulated, a plain bf16 step is ~20x an fp32 one.
Ratios are to the fp32 plain step. Each configuration runs in its own process, so its peak RSS is its own; every
process times `reps` steps after one warm-up and reports the median; target mode scores the complement on every
other step, so there it is the median of pairs of steps, each pair's mean.

    python -m bench.step_cost --quick     # tiny-llama, seconds
    python -m bench.step_cost             # smollm2-135m, IOI, batch 16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.machine import machine

RESULTS = Path(__file__).parent / "results"
# "MODE bf16": target mode with --precision bf16; "plain bf16": the plain step under bf16 autocast (not a ratio's base)
MODES = ("plain", "plain bf16", "keep", "weight+edge", "neuron+head+edge", "weight+edge bf16", "neuron+head+edge bf16")
TARGETS = {"weight+edge": "weight=0.05,edge=0.05", "neuron+head+edge": "neuron=0.2,head=0.2,edge=0.2"}


def _one(model_name: str, mode: str, batch: int, reps: int) -> dict:
    """Runs inside a child process: the median seconds of one step of `mode`."""
    import torch
    from accelerate import Accelerator

    from sheafprune.arch import view_of
    from sheafprune.config import resolve_config
    from sheafprune.discovery.search import median_step_seconds
    from sheafprune.models import load_model
    from sheafprune.tasks import encode, hold_out, load_task

    model, tok = load_model(model_name)
    task = hold_out(load_task("ioi", tok, seed=0), 100)
    acc = Accelerator(cpu=True)
    mode, _, precision = mode.partition(" ")
    precision = precision or "fp32"
    if mode == "plain":
        for p in model.parameters():
            p.requires_grad_(True)
        b = encode(task, task.items("train")[:batch], tok)

        def step() -> None:
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                               position_ids=b.position_ids).logits
            torch.nn.functional.cross_entropy(logits[:, -1].float(), b.cand_ids[:, 0]).backward()
    elif mode == "keep":
        from sheafprune.discovery.search import KeepSearch

        cfg = resolve_config(overrides={"model": model_name, "batch_size": batch})
        search = KeepSearch(cfg=cfg, view=view_of(model), tokenizer=tok, task=task, accelerator=acc,
                            started=time.perf_counter(), progress=False)
        count = iter(range(10**6))

        def step() -> None:
            search.step(next(count))
    else:
        from sheafprune.masked import mask_shapes
        from sheafprune.discovery.shard import mask_logits_for
        from sheafprune.discovery.loop import Trainer

        cfg = resolve_config(overrides={"model": model_name, "batch_size": batch, "steps": 100,
                                        "target_density": TARGETS[mode], "precision": precision})
        view = view_of(model)
        params = mask_logits_for(cfg, view, mask_shapes(view, cfg.granularity), acc)
        trainer = Trainer(cfg=cfg, view=view, tokenizer=tok, task=task, params=params, accelerator=acc,
                          work_dir=Path("/nonexistent"), progress=False)

        def step() -> None:
            trainer.train_step()
            trainer.step += 1
    cycle = trainer.step_cycle if mode in TARGETS else 1
    step()  # warm-up (also fills the full-model score cache of the first batch)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"mode": mode, "precision": precision, "model": model_name,
            "batch": batch, "seconds": median_step_seconds(times, cycle),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny-llama")
    ap.add_argument("--child", nargs=4, metavar=("MODEL", "MODE", "BATCH", "REPS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_one(args.child[0], args.child[1], int(args.child[2]), int(args.child[3]))))
        return 0
    model, batch, reps = ("tiny-llama", 16, 4) if args.quick else ("smollm2-135m", 16, 6)
    def child(mode: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "bench.step_cost", "--child", model, mode, str(batch), str(reps)],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        return row

    from sheafprune.discovery.verb import native_bf16
    modes = MODES[1:]
    if not native_bf16():  # emulated bf16: a plain bf16 step took 67 s against 3 s in fp32 on an AVX2 EPYC
        modes = tuple(m for m in modes if not m.endswith("bf16"))
        print("skipped the bf16 modes: this CPU has no bf16 instructions (AMX or AVX512-BF16)", flush=True)
    # A plain step before and after each mode: the machine's speed drifts by 10-20% over minutes, so each ratio is
    # taken against the plain steps timed next to it.
    plains, rows = [child("plain")], []
    for mode in modes:  # each mode's row keeps its own mode name; "precision" tells the two apart
        rows.append(child(mode))
        plains.append(child("plain"))
        rows[-1]["plain_seconds"] = round((plains[-2]["seconds"] + plains[-1]["seconds"]) / 2, 4)
    plain = {**plains[0], "seconds": statistics.median(r["seconds"] for r in plains),
             "seconds_each": [r["seconds"] for r in plains], "plain_seconds": None}
    rows.insert(0, plain)
    host = machine()
    for r in rows:
        r["ratio_to_plain"] = round(r["seconds"] / (r["plain_seconds"] or r["seconds"]), 2)
        r["machine"] = host
    print("\n".join(f"{r['mode']:16s} {r['precision']:5s} {r['seconds']:.3f} s/step  {r['ratio_to_plain']:.2f}x plain  "
                    f"peak {r['peak_rss_mb'] / 1024:.2f} GiB" for r in rows))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"step_cost{'_quick' if args.quick else ''}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
