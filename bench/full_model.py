"""Full-model task accuracy (test split, our scoring) of a model on a set of tasks: the baseline every sheaf is
measured against.

    python -m bench.full_model                          # smollm2-135m on ioi, capitals and three BLiMP paradigms
    python -m bench.full_model --quick                  # tiny-gpt2 (chance-level; checks the plumbing)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sheafprune.arch import view_of
from sheafprune.models import load_model
from sheafprune.discovery.objective import accuracy, split_scores
from sheafprune.tasks import load_task

RESULTS = Path(__file__).parent / "results"
TASKS = ["ioi", "capitals", "blimp/anaphor_gender_agreement", "blimp/regular_plural_subject_verb_agreement_1",
         "blimp/determiner_noun_agreement_2"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    name = "tiny-gpt2" if args.quick else "smollm2-135m"
    model, tok = load_model(name)
    view = view_of(model)
    rows = []
    for spec in TASKS:
        task = load_task(spec, tok, seed=0)
        t = time.perf_counter()
        scores, target = split_scores(view, tok, task, None, split="test", batch_size=32)
        rows.append({"task": spec, "kind": task.kind, "n": int(target.numel()), "accuracy": accuracy(scores, target),
                     "seconds": round(time.perf_counter() - t, 2)})
        print(f"{name} {spec:48s} {task.kind:8s} n={rows[-1]['n']:4d} accuracy {rows[-1]['accuracy']:.3f}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"full_model{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps({"bench": "full_model", "model": name, "rows": rows}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
