"""The default command on the task panel: `sheafprune export --model M --task T --out DIR` with no other option, one
task at a time (each alone on the machine), then what a user gets: test accuracy of the export vs the full model,
non-embedding parameters kept, and CPU forward speed-up of the export over the stock HF model (torch, the task's
test prompts as one batch, both timed alternately in this process).

    python -m bench.keep                     # smollm2-135m, the six panel tasks (about an hour on 2 cores)
    python -m bench.keep --tasks ioi         # one of them
    python -m bench.keep --quick             # tiny-llama, two tasks (a minute)

The `jsonl:` task is written by this script from BLiMP's anaphor_number_agreement (1,000 next-word pairs).
Results: bench/results/keep[_quick].json; a markdown table is printed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import torch

from bench.machine import machine

RESULTS = Path(__file__).parent / "results"
PANEL = ["ioi", "blimp/anaphor_gender_agreement", "blimp/regular_plural_subject_verb_agreement_1",
         "blimp/determiner_noun_agreement_2", "capitals", "jsonl"]
QUICK = ["ioi", "jsonl"]
JSONL_LABEL = "jsonl (anaphor_number_agreement)"


def write_jsonl_task(path: Path) -> Path:
    """BLiMP anaphor_number_agreement as a `{"prompt", "good", "bad"}` jsonl task (CC-BY 4.0, Warstadt et al.)."""
    src = files("sheafprune.tasks") / "data" / "blimp" / "anaphor_number_agreement.jsonl.gz"
    with gzip.open(str(src), "rt") as f:
        rows = [json.loads(line) for line in f]
    path.write_text("".join(json.dumps({"prompt": r["one_prefix_prefix"], "good": " " + r["one_prefix_word_good"],
                                        "bad": " " + r["one_prefix_word_bad"]}) + "\n" for r in rows))
    return path


def forward_speedup(model_name: str, export_dir: Path, task_spec: str, n: int | None = None, repeats: int = 5) -> dict:
    """Median seconds of the full HF model and of the export on the task's test prompts (one batch)."""
    from sheafprune.exporter import load
    from sheafprune.models import load_model
    from sheafprune.tasks import encode, load_task

    full, tok = load_model(model_name)
    slim = load(export_dir)
    task = load_task(task_spec, tok, seed=0, n=n)
    batch = encode(task, task.items("test"), tok)
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    times = {"full": [], "export": []}
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first round warms up
            for name, m in (("full", full), ("export", slim)):
                t = time.perf_counter()
                m(**kw, position_ids=batch.position_ids) if name == "full" else m(**kw)
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    return {"seconds_full": round(med["full"], 4), "seconds_export": round(med["export"], 4),
            "speedup": round(med["full"] / med["export"], 2), "batch": list(batch.input_ids.shape)}


def non_embedding_params(export_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(export_dir / "model.safetensors"), "pt") as f:
        return sum(f.get_slice(k).get_shape()[0] * max(1, _numel(f.get_slice(k).get_shape()[1:]))
                   for k in f.keys() if not k.startswith(("embed.", "pos.", "lm_head.")))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def run_task(model: str, spec: str, work: Path, extra: list[str]) -> dict:
    out = work / spec.replace("/", "_").replace(":", "_")
    cmd = [str(Path(sys.executable).with_name("sheafprune")), "export", "--model", model, "--task", spec,
           "--out", str(out), "--overwrite", *extra]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode not in (0, 3):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    meta = json.loads((out / "sheaf.json").read_text())
    m, e = meta["metrics"], meta["export"]
    from sheafprune.models import load_model

    full, _ = load_model(model)
    full_ne = sum(p.numel() for n, p in full.named_parameters() if "embed" not in n and "wte" not in n
                  and "wpe" not in n and "lm_head" not in n)
    row = {"task": spec, "exit": proc.returncode, "wall_seconds": round(wall, 1), "n_test": m["n"],
           "full_accuracy": m["full_accuracy"], "export_accuracy": m["sheaf_accuracy"],
           "ratio": round(m["sheaf_accuracy"] / m["full_accuracy"], 3) if m["full_accuracy"] else None,
           "non_embedding_kept": round(non_embedding_params(out) / full_ne, 4), "params": e["params"],
           "density": meta["density"], "step_seconds": meta["training"].get("step_seconds"),
           "stopped": meta["training"].get("stopped"), "not_kept": e.get("not_kept"),
           "judged": meta["training"].get("best_judged"),
           **forward_speedup(model, out, meta["task"] if not spec.startswith("jsonl") else spec,
                             n=meta["config"].get("n_items"))}
    if "sheaf_balanced_accuracy" in m:
        row.update(full_balanced=m["full_balanced_accuracy"], export_balanced=m["sheaf_balanced_accuracy"],
                   balanced_ratio=round(m["sheaf_balanced_accuracy"] / m["full_balanced_accuracy"], 3))
    return row


def table(rows: list[dict]) -> str:
    lines = ["| task | export / full accuracy (test) | ratio | non-embedding params kept | torch speed-up | wall |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{r['export_accuracy']:.3f} / {r['full_accuracy']:.3f} (n={r['n_test']})"
        if "balanced_ratio" in r:
            acc += f"; balanced {r['export_balanced']:.3f} / {r['full_balanced']:.3f}"
        ratio = f"{r['ratio']:.2f}x" + (f" ({r['balanced_ratio']:.2f}x)" if "balanced_ratio" in r else "")
        lines.append(f"| `{r['task']}` | {acc} | {ratio} | {r['non_embedding_kept']:.1%} | {r['speedup']:.2f}x | "
                     f"{r['wall_seconds'] / 60:.1f} min |")
    return "\n".join(lines)


def _panel_order(row: dict) -> int:
    """Rows in the panel's order (a rerun of some tasks does not move them to the end)."""
    labels = [JSONL_LABEL if t == "jsonl" else t for t in PANEL]
    return labels.index(row["task"]) if row["task"] in labels else len(labels)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny-llama, two tasks")
    ap.add_argument("--tasks", help="comma-separated subset of the panel")
    args = ap.parse_args(argv)
    model = "tiny-llama" if args.quick else "smollm2-135m"
    tasks = args.tasks.split(",") if args.tasks else (QUICK if args.quick else PANEL)
    extra = ["--max-minutes", "1", "--n-items", "200"] if args.quick else []
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"keep{'_quick' if args.quick else ''}.json"
    labels = [JSONL_LABEL if t == "jsonl" else t for t in tasks]
    rows = [r for r in (json.loads(path.read_text()) if path.exists() else []) if r["task"] not in labels]
    with tempfile.TemporaryDirectory(prefix="sheafprune-keep-") as tmp:
        work = Path(tmp)
        for spec in tasks:
            task = f"jsonl:{write_jsonl_task(work / 'anaphor_number.jsonl')}" if spec == "jsonl" else spec
            row = run_task(model, task, work, extra)
            row["task"] = JSONL_LABEL if spec == "jsonl" else spec
            row["machine"] = machine()
            rows.append(row)
            rows.sort(key=_panel_order)
            print(json.dumps(row), flush=True)
            path.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
