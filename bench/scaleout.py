"""Data parallelism on one multi-core machine: N processes x 1 thread against 1 process x N threads, the same
global batch, the same discovery (`sheafprune discover`, target mode), compared by the median seconds per
optimizer step each run records in sheaf.json (`training.step_seconds`).

    python -m bench.scaleout            # smollm2-135m, weight+edge and neuron+head+edge, batch 16, 2 cores
    python -m bench.scaleout --quick    # tiny-llama (seconds)

The runs go one after another, never side by side. Results: bench/results/scaleout[_quick].json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.machine import machine

RESULTS = Path(__file__).parent / "results"
BIN = Path(sys.executable).parent
GRANULARITIES = {"weight+edge": ["--granularity", "weight,edge", "--target-density", "weight=0.05,edge=0.05"],
                 "node+edge": ["--granularity", "neuron,head,edge",
                               "--target-density", "neuron=0.2,head=0.2,edge=0.2"]}


def _discover(args: list[str], out: Path, procs: int, threads: int) -> dict:
    """One run; its sheaf.json's training record."""
    cmd = [str(BIN / "sheafprune"), *args, "--out", str(out)]
    if procs > 1:  # accelerate's --cpu launcher starts one process without an MPI hostfile; --multi_gpu falls back to gloo
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(procs), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return json.loads((out / "sheaf.json").read_text())["training"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny-llama")
    quick = ap.parse_args(argv).quick
    cores = 2  # the comparison quoted in docs/distributed.md: 2 processes x 1 thread against 1 x 2
    model, steps = ("tiny-llama", 6) if quick else ("smollm2-135m", 8)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sheafprune-scaleout-") as tmp:
        for name, gran in GRANULARITIES.items():
            args = ["discover", "--model", model, "--task", "ioi", "--steps", str(steps), "--batch-size", "16",
                    "--eval-every", str(steps), "--max-minutes", "30", *gran]
            row = {"granularity": name, "model": model, "batch": 16, "steps": steps, "machine": machine()}
            for procs, threads in ((1, cores), (cores, 1)):
                out = Path(tmp) / f"{name}-{procs}"
                training = _discover(args, out, procs, threads)
                row[f"{procs}x{threads}_step_seconds"] = training["step_seconds"]
                shutil.rmtree(out)
            row["ratio"] = round(row[f"{cores}x1_step_seconds"] / row[f"1x{cores}_step_seconds"], 2)
            rows.append(row)
            print(f"{name:12s} 1x{cores}: {row[f'1x{cores}_step_seconds']:.3f} s/step  {cores}x1: "
                  f"{row[f'{cores}x1_step_seconds']:.3f} s/step  ({cores}x1 / 1x{cores} = {row['ratio']:.2f})",
                  flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"scaleout{'_quick' if quick else ''}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
