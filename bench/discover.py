"""Discovery benchmark on SmolLM2-135M: for each task, a joint weight+edge sheaf within a wall-time budget,
and DiscoGP's staged preset in the same budget. Records densities, accuracies (full / sheaf / complement on
the test split), wall time and peak memory of each run, each run in its own process.

    python -m bench.discover                       # the weight+edge runs (30 min budget each: hours in total)
    python -m bench.discover --runs ioi-joint      # one of them
    python -m bench.discover --jobs 2              # two runs at a time, one thread each (half the wall time)
    python -m bench.discover --quick               # tiny-gpt2, a minute

With --jobs 2 each run gets one of the two cores, so it is a stricter test of a wall-time budget, not a looser one:
a run stops when its --max-minutes budget is spent, having made about half the steps it would make alone.

The runs and their options: bench/discover_runs.yaml.
Results: bench/results/discover[_quick].json (one entry per run name, written as runs finish).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from bench.machine import machine

RESULTS = Path(__file__).parent / "results"
RUNS_FILE = Path(__file__).with_name("discover_runs.yaml")
RUN_KEYS = {"task", "base", "options"}


def _flags(options: dict, where: str) -> list[str]:
    """{"steps": 100} -> ["--steps", "100"], in the mapping's order."""
    argv = []
    for key, value in options.items():
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"{RUNS_FILE.name}: run {where!r}: option {key!r} needs a string or number, got {value!r}")
        argv += [f"--{key}", str(value)]
    return argv


def run_argv(name: str, run: dict, model: str, option_sets: dict) -> list[str]:
    """The `sheafprune discover` arguments of one run of the runs file (its header says how they are built)."""
    if set(run) - RUN_KEYS or "task" not in run:
        raise ValueError(f"{RUNS_FILE.name}: run {name!r} has keys {sorted(run)}; it needs task and may have "
                         f"{', '.join(sorted(RUN_KEYS - {'task'}))}")
    if "base" in run and run["base"] not in option_sets:
        raise ValueError(f"{RUNS_FILE.name}: run {name!r} names the unknown option set {run['base']!r}")
    argv = ["--model", model, "--task", run["task"], *_flags(option_sets.get(run.get("base"), {}), name),
            *_flags(run.get("options", {}), name)]
    return argv


def load_runs(path: Path = RUNS_FILE) -> dict[str, dict[str, list[str]]]:
    """{"full": {run name: argv}, "quick": {run name: argv}} from the runs file."""
    spec = yaml.safe_load(path.read_text())
    sets = spec.get("option_sets", {})
    return {table: {name: run_argv(name, run, spec[table]["model"], sets) for name, run in spec[table]["runs"].items()}
            for table in ("full", "quick")}


def run_one(name: str, args: list[str], workdir: Path, threads: int | None = None) -> dict:
    out = workdir / name
    cmd = [str(Path(sys.executable).with_name("sheafprune")), "discover", *args, "--out", str(out), "--overwrite"]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
    wall = time.perf_counter() - t0
    if status != 0:
        return {"run": name, "command": " ".join(cmd), "failed": status}
    meta = json.loads((out / "sheaf.json").read_text())
    return {"run": name, "command": "sheafprune discover " + " ".join(args), "threads": threads or os.cpu_count(),
            "recipe": meta["config"]["recipe"], "wall_seconds": round(wall, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "density": meta["density"], "metrics": meta["metrics"],
            "training": meta["training"], "stdout": stdout.strip().splitlines()[-1:], "machine": machine()}


def main(argv: list[str] | None = None) -> int:
    runs = load_runs()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", help="comma-separated subset of: " + ", ".join(runs["full"]))
    ap.add_argument("--minutes", type=float, help="override each run's 30-minute --max-minutes budget")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time, the cores split between them")
    ap.add_argument("--keep", type=Path, help="keep the sheaf folders here (default: a temporary folder)")
    args = ap.parse_args(argv)
    table = runs["quick" if args.quick else "full"]
    if args.minutes:
        table = {n: [str(args.minutes) if i and a[i - 1] == "--max-minutes" else x for i, x in enumerate(a)]
                 for n, a in table.items()}
    names = args.runs.split(",") if args.runs else list(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"discover{'_quick' if args.quick else ''}.json"
    def report(row: dict) -> None:
        # Runs of earlier (or concurrent) invocations stay, re-read at every write; a run of the same name is
        # replaced: the full set takes hours.
        rows = json.loads(path.read_text())["rows"] if path.exists() else []
        rows = [r for r in rows if r.get("run") != row["run"]] + [row]
        m = row.get("metrics", {})
        print(f"{row['run']:16s} density {row.get('density')}  acc full/sheaf/complement "
              f"{m.get('full_accuracy', float('nan')):.3f}/{m.get('sheaf_accuracy', float('nan')):.3f}/"
              f"{m.get('complement_accuracy', float('nan')):.3f}  {row.get('wall_seconds')} s  "
              f"{row.get('peak_rss_mb')} MB  {row.get('threads')} thread(s)", flush=True)
        path.write_text(json.dumps({"bench": "discover", "quick": args.quick, "rows": rows}, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.keep or Path(tmp)
        threads = None if args.jobs == 1 else max(1, (os.cpu_count() or 2) // args.jobs)
        with ThreadPoolExecutor(args.jobs) as pool:
            for row in pool.map(lambda n: run_one(n, table[n], workdir, threads), names):
                report(row)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
