"""Export benchmark: how much smaller and faster the compacted sheaf is than the full model, on CPU.

Measures parameter count and bytes of the export vs the original, the share of heads/neurons/layers removed,
and inference time on the task's held-out prompts (same batch) of: the stock HF model vs the exported model
(torch), and the full model vs the export as ONNX (onnxruntime; the full model is compacted with no masks,
which reproduces it exactly, and exported the same way). Both sides of each ratio are timed alternately in
one run. Prints the ratios and writes JSON to bench/results/.

    python -m bench.export_speed --quick                 # tiny models, random sheaves (~a minute)
    python -m bench.export_speed                         # smollm2-135m, random sheaf of ~5% density
    python -m bench.export_speed --sheaf exports/sheaf   # a discovered sheaf
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from bench.machine import machine
from sheafprune.arch import view_of
from sheafprune.compact import compact
from sheafprune.exporter import export, load
from sheafprune.exporter.hf import held_out_batch
from sheafprune.exporter.measure import time_interleaved
from sheafprune.exporter.onnx import ort_logits_fn, write_onnx
from sheafprune.masked import default_position_ids, mask_shapes
from sheafprune.models import fingerprint, load_model
from sheafprune.sheaf import Sheaf, load_sheaf

RESULTS = Path(__file__).parent / "results"


def random_sheaf(model: Any, name: str, *, density: float, granularity: tuple[str, ...], seed: int = 0) -> Sheaf:
    """Every mask entry kept independently with probability `density` (a stand-in for a discovered sheaf)."""
    g = torch.Generator().manual_seed(seed)
    logits = {k: torch.rand(s, generator=g) - (1 - density) for k, s in
              mask_shapes(view_of(model), list(granularity)).items()}
    sheaf = Sheaf(logits, {"model": {"name": name, "fingerprint": fingerprint(model)}, "task": "ioi",
                           "granularity": list(granularity), "config": {"seed": seed},
                           "source": f"random, density {density}"})
    sheaf.meta["density"] = sheaf.density()
    return sheaf


def _ort(path: Path, ids: torch.Tensor, mask: torch.Tensor) -> Callable[[], Any]:
    run = ort_logits_fn(path)
    return lambda: run(ids, mask)


def bench_one(name: str, sheaf: Sheaf | None, *, density: float, reps: int, workdir: Path) -> dict[str, Any]:
    model, tok = load_model(name)
    if sheaf is None:
        sheaf = random_sheaf(model, name, density=density, granularity=("weight", "edge"))
    t = time.perf_counter()
    info = export(sheaf, out=workdir / "export", formats=["all"], model=model, tokenizer=tok)
    export_s = time.perf_counter() - t
    slim = load(workdir / "export")
    full_onnx = workdir / "full.onnx"
    ids, mask = held_out_batch(sheaf, tok)
    write_onnx(compact(view_of(model), {}).to_model(), full_onnx, input_ids=ids, attention_mask=mask)
    pos = default_position_ids(mask)
    with torch.inference_mode():
        torch_s = time_interleaved({"full": lambda: model(input_ids=ids, attention_mask=mask, position_ids=pos),
                                    "export": lambda: slim(input_ids=ids, attention_mask=mask)}, reps)
    ort_s = time_interleaved({"full": _ort(full_onnx, ids, mask),
                              "export": _ort(workdir / "export" / "model.onnx", ids, mask)}, reps)
    return {
        "model": name, "sheaf": sheaf.meta.get("source", "discovered"), "density": sheaf.density(),
        "batch": list(ids.shape), "export_seconds": round(export_s, 1), **info,
        "bytes_onnx_full": full_onnx.stat().st_size,
        "torch_ms": {k: 1e3 * v for k, v in torch_s.items()}, "torch_speedup": torch_s["full"] / torch_s["export"],
        "ort_ms": {k: 1e3 * v for k, v in ort_s.items()}, "ort_speedup": ort_s["full"] / ort_s["export"],
        "machine": machine(),
    }


def _report(r: dict[str, Any]) -> str:
    d = ", ".join(f"{k} {v:.1%}" for k, v in r["density"].items())
    return (f"{r['model']} ({r['sheaf']}; kept {d}), batch {r['batch']}:\n"
            f"  params {r['params']:,} / {r['params_original']:,} = {r['params'] / r['params_original']:.1%}; "
            f"safetensors {r['bytes'] / 1e6:.1f} MB / fp32 original {r['bytes_original'] / 1e6:.1f} MB = "
            f"{r['bytes'] / r['bytes_original']:.1%}; onnx {r['bytes_onnx'] / 1e6:.1f} MB / "
            f"{r['bytes_onnx_full'] / 1e6:.1f} MB\n"
            f"  removed: heads {r['heads_removed']:.1%}, neurons {r['neurons_removed']:.1%}, layers "
            f"{r['layers_removed']:.1%}; zeros inside kept tensors {r['zero_share']:.1%}\n"
            f"  torch: full {r['torch_ms']['full']:.1f} ms, export {r['torch_ms']['export']:.1f} ms -> "
            f"{r['torch_speedup']:.2f}x; onnxruntime: full {r['ort_ms']['full']:.1f} ms, export "
            f"{r['ort_ms']['export']:.1f} ms -> {r['ort_speedup']:.2f}x; max diff {r['max_abs_diff']:.2g} "
            f"(onnx {r['max_abs_diff_onnx']:.2g}); export took {r['export_seconds']} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny models only")
    ap.add_argument("--sheaf", type=Path, help="a discovered sheaf folder (default: a random sheaf)")
    ap.add_argument("--density", type=float, help="density of the random sheaf (default 0.05; --quick 0.3)")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args(argv)
    sheaf = load_sheaf(args.sheaf) if args.sheaf else None
    if sheaf is not None:
        names = [sheaf.model_name]
    else:
        names = ["tiny-gpt2", "tiny-llama"] if args.quick else ["smollm2-135m"]
    density = args.density or (0.3 if args.quick else 0.05)
    reps = args.reps or (20 if args.quick else 10)
    results = []
    for name in names:
        with tempfile.TemporaryDirectory(prefix="sheafprune-bench-") as d:
            results.append(bench_one(name, sheaf, density=density, reps=reps, workdir=Path(d)))
        print(_report(results[-1]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"export_speed{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
