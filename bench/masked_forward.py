"""Masked-forward benchmark: time and peak memory of the edge-masked forward(+backward) vs the stock HF
forward on the same batch, and how the writer stack grows with layers and batch.

The stack holds one (B, T, D) fp32 activation per writer: n_writers * B * T * D * 4 bytes, plus one buffer
of the same size for its gradient in backward; n_writers = 1 + L * (H + 1) grows linearly with layers.
Each configuration runs in its own subprocess so peak RSS (ru_maxrss) belongs to that configuration alone.

    python -m bench.masked_forward --quick     # tiny-llama, seconds
    python -m bench.masked_forward             # smollm2-135m, batch 64 of IOI prompts
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.machine import machine

RESULTS = Path(__file__).parent / "results"


def _one(model_name: str, mode: str, batch: int, reps: int) -> dict:
    """Runs inside a child process: one measurement."""
    import torch

    from sheafprune.arch import view_of
    from sheafprune.masked import mask_shapes, masked_forward
    from sheafprune.models import load_model
    from sheafprune.tasks import encode, load_task

    model, tok = load_model(model_name)
    view = view_of(model)
    task = load_task("ioi", tok, seed=0)
    items = (task.items("train") * 4)[:batch]
    b = encode(task, items, tok)
    gran = {"hf": (), "masked": (), "edge": ("edge",), "weight+edge": ("weight", "edge")}[mode]
    masks = {k: torch.ones(s, requires_grad=True) for k, s in mask_shapes(view, gran).items()}
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        if mode == "hf":
            out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
            loss = out[:, -1].logsumexp(-1).sum()
        else:
            with torch.enable_grad():
                out = masked_forward(view, b.input_ids, attention_mask=b.attention_mask,
                                     position_ids=b.position_ids, masks=masks or None, last_only=True)
                loss = out[:, -1].logsumexp(-1).sum()
                if masks:
                    loss.backward()
        times.append(time.perf_counter() - t)
    g = view.graph
    stack_mb = g.n_writers() * b.input_ids.numel() * view.spec.d_model * 4 / 2**20
    return {"model": model_name, "mode": mode, "batch": batch, "tokens": int(b.input_ids.numel()),
            "seconds": min(times), "backward": bool(masks), "stack_mb": round(stack_mb, 1),
            "n_writers": g.n_writers(), "n_edges": g.n_edges()}


def measure(model_name: str, mode: str, batch: int, reps: int) -> dict:
    code = f"import json; from bench.masked_forward import _one; print(json.dumps(_one({model_name!r}, {mode!r}, {batch}, {reps})))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # reap it ourselves: the child's own peak RSS
    if status != 0:
        raise RuntimeError(f"{model_name} {mode} B={batch} failed (status {status})")
    row = json.loads(out.strip().splitlines()[-1])
    row["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)  # Linux reports KiB
    return row


def run(quick: bool) -> dict:
    model = "tiny-llama" if quick else "smollm2-135m"
    batches = [8, 16] if quick else [16, 64]
    rows = []
    for batch in batches:
        for mode in ("hf", "masked", "edge", "weight+edge"):
            row = measure(model, mode, batch, reps=2)
            rows.append(row)
            print(f"{model} B={batch:3d} {mode:12s} {row['seconds']:7.2f}s  peak RSS {row['peak_rss_mb']:8.1f} MB  "
                  f"stack {row['stack_mb']} MB", flush=True)
    base = {r["batch"]: r["seconds"] for r in rows if r["mode"] == "hf"}
    for r in rows:
        r["time_vs_hf_forward"] = round(r["seconds"] / base[r["batch"]], 2)
    return {"bench": "masked_forward", "quick": quick, "machine": machine(), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    result = run(args.quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"masked_forward{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
