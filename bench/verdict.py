"""The closing verdict of `make demo` on one export folder: full vs export accuracy on the task's test split,
non-embedding parameters kept, CPU forward speed-up over the full model (torch and onnxruntime, the task's test
prompts as one batch, both sides timed alternately), and the wall time since `--since` (a Unix time).

    python -m bench.verdict exports/smollm2-ioi --since 1700000000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.export_speed import _ort
from bench.keep import non_embedding_params


def verdict(folder: Path, *, reps: int = 5) -> dict:
    from sheafprune.arch import view_of
    from sheafprune.compact import compact
    from sheafprune.exporter import load
    from sheafprune.exporter.measure import time_interleaved
    from sheafprune.exporter.onnx import write_onnx
    from sheafprune.models import load_model
    from sheafprune.sheaf import load_sheaf
    from sheafprune.tasks import encode, load_task

    meta = json.loads((folder / "sheaf.json").read_text())
    sheaf = load_sheaf(folder / "sheaf")
    full, tok = load_model(meta["model"]["name"])
    slim = load(folder)
    task = load_task(sheaf.task, tok, seed=meta["config"]["seed"], n=meta["config"].get("n_items"))
    batch = encode(task, task.items("test"), tok)
    ids, mask, pos = batch.input_ids, batch.attention_mask, batch.position_ids
    with torch.inference_mode():
        torch_s = time_interleaved({"full": lambda: full(input_ids=ids, attention_mask=mask, position_ids=pos),
                                    "export": lambda: slim(input_ids=ids, attention_mask=mask)}, reps)
    out = {"batch": list(ids.shape), "torch_speedup": torch_s["full"] / torch_s["export"]}
    if (folder / "model.onnx").exists():
        with tempfile.TemporaryDirectory(prefix="sheafprune-verdict-") as d:
            full_onnx = Path(d) / "full.onnx"
            write_onnx(compact(view_of(full), {}).to_model(), full_onnx, input_ids=ids, attention_mask=mask)
            ort_s = time_interleaved({"full": _ort(full_onnx, ids, mask),
                                      "export": _ort(folder / "model.onnx", ids, mask)}, reps)
        out["ort_speedup"] = ort_s["full"] / ort_s["export"]
    full_ne = sum(p.numel() for n, p in full.named_parameters()
                  if not any(s in n for s in ("embed", "wte", "wpe", "lm_head")))
    out["non_embedding_kept"] = non_embedding_params(folder) / full_ne
    return {**out, "metrics": meta["metrics"], "not_kept": meta["export"].get("not_kept")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--since", type=float, help="Unix time the job started (for the wall time)")
    args = ap.parse_args(argv)
    v = verdict(args.folder)
    m = v["metrics"]
    acc = f"test accuracy: full {m['full_accuracy']:.3f}, export {m['sheaf_accuracy']:.3f} (n={m['n']})"
    if "sheaf_balanced_accuracy" in m:
        acc += f"; answer-balanced full {m['full_balanced_accuracy']:.3f}, export {m['sheaf_balanced_accuracy']:.3f}"
    speed = f"CPU forward speed-up on batch {v['batch']}: torch {v['torch_speedup']:.2f}x"
    if "ort_speedup" in v:
        speed += f", onnxruntime {v['ort_speedup']:.2f}x"
    lines = ["", "verdict: " + ("NOT KEPT: " + v["not_kept"] if v["not_kept"] else "the export keeps its task"),
             "  " + acc, f"  non-embedding parameters kept: {v['non_embedding_kept']:.1%}", "  " + speed]
    if args.since:
        lines.append(f"  wall time: {(time.time() - args.since) / 60:.1f} min")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
