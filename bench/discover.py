"""Discovery benchmark on SmolLM2-135M: for each task, a joint weight+edge sheaf within a wall-time budget,
and DiscoGP's staged preset in the same budget. Records densities, accuracies (full / sheaf / complement on
the test split), wall time and peak memory of each run, each run in its own process.

    python -m bench.discover                       # the issue-3 runs (30 min budget each: hours in total)
    python -m bench.discover --runs ioi-joint      # one of them
    python -m bench.discover --quick               # tiny-gpt2, a minute

Results: bench/results/discover[_quick].json (one entry per run, appended as runs finish).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
BUDGET = ["--max-minutes", "30"]
JOINT = ["--granularity", "weight,edge", "--target-density", "weight=0.05,edge=0.05", "--steps", "80",
         "--batch-size", "16", *BUDGET]
RUNS = {
    "ioi-joint": ["--model", "smollm2-135m", "--task", "ioi", *JOINT],
    "anaphor-joint": ["--model", "smollm2-135m", "--task", "blimp/anaphor_gender_agreement", *JOINT],
    "capitals-joint": ["--model", "smollm2-135m", "--task", "capitals", *JOINT],
    "sentence-joint": ["--model", "smollm2-135m", "--task", "blimp/determiner_noun_agreement_2", *JOINT],
    "ioi-staged": ["--model", "smollm2-135m", "--task", "ioi", "--schedule", "staged", "--granularity",
                   "weight,edge", "--steps", "40", "--batch-size", "16", *BUDGET],
}
QUICK = {
    "tiny-joint": ["--model", "tiny-gpt2", "--task", "ioi", "--steps", "60", "--batch-size", "16",
                   "--target-density", "weight=0.2,edge=0.2"],
    "tiny-staged": ["--model", "tiny-gpt2", "--task", "ioi", "--steps", "30", "--batch-size", "16",
                    "--schedule", "staged"],
}


def run_one(name: str, args: list[str], workdir: Path) -> dict:
    out = workdir / name
    cmd = [str(Path(sys.executable).with_name("sheafprune")), "discover", *args, "--out", str(out), "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
    wall = time.perf_counter() - t0
    if status != 0:
        return {"run": name, "command": " ".join(cmd), "failed": status}
    meta = json.loads((out / "sheaf.json").read_text())
    return {"run": name, "command": "sheafprune discover " + " ".join(args), "wall_seconds": round(wall, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "density": meta["density"], "metrics": meta["metrics"],
            "training": meta["training"], "stdout": stdout.strip().splitlines()[-1:]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", help="comma-separated subset of: " + ", ".join(RUNS))
    ap.add_argument("--keep", type=Path, help="keep the sheaf folders here (default: a temporary folder)")
    args = ap.parse_args(argv)
    table = QUICK if args.quick else RUNS
    names = args.runs.split(",") if args.runs else list(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"discover{'_quick' if args.quick else ''}.json"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.keep or Path(tmp)
        for name in names:
            row = run_one(name, table[name], workdir)
            rows.append(row)
            m = row.get("metrics", {})
            print(f"{name:16s} density {row.get('density')}  acc full/sheaf/complement "
                  f"{m.get('full_accuracy', float('nan')):.3f}/{m.get('sheaf_accuracy', float('nan')):.3f}/"
                  f"{m.get('complement_accuracy', float('nan')):.3f}  {row.get('wall_seconds')} s  "
                  f"{row.get('peak_rss_mb')} MB", flush=True)
            path.write_text(json.dumps({"bench": "discover", "quick": args.quick, "rows": rows}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
