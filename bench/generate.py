"""Generation benchmark: greedy tokens/s for 64 new tokens from a task prompt, on CPU, of an export with its KV cache,
the same export without it, and the full HF model the export came from, with HF's cache.

The prompt is the first held-out prompt of the export's task (batch of one, as the export's sheaf.json split it); every
run generates exactly 64 tokens (min_new_tokens), and the three are timed alternately in one process. The export's
two runs must give the same tokens. Prints tokens/s and writes JSON to bench/results/.

    python -m bench.generate                        # exports/smollm2-ioi (`make demo` writes it) vs smollm2-135m
    python -m bench.generate exports/OTHER          # any export folder: sheaf.json names its model and task
    python -m bench.generate --quick                # tiny-llama, a random sheaf exported to a temporary folder
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.export_speed import random_sheaf
from bench.machine import machine
from sheafprune.exporter.measure import time_interleaved

RESULTS = Path(__file__).parent / "results"
NEW_TOKENS = 64
RUNS = {"export_cache": "export, KV cache", "export_no_cache": "export, no cache",
        "full_hf_cache": "full model, HF cache"}


def bench_folder(folder: Path, *, reps: int) -> dict[str, Any]:
    from sheafprune.exporter import load
    from sheafprune.exporter.hf import held_out_batch
    from sheafprune.models import load_model
    from sheafprune.sheaf import load_sheaf

    sheaf = load_sheaf(folder / "sheaf")
    full, tok = load_model(sheaf.model_name)
    slim = load(folder)
    ids, mask = held_out_batch(sheaf, tok)
    prompt = ids[:1, mask[0].bool()]  # (1, T): the first held-out prompt, its left padding dropped
    kw = {"attention_mask": torch.ones_like(prompt), "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS,
          "do_sample": False, "pad_token_id": tok.pad_token_id}
    runs = {"export_cache": lambda: slim.generate(prompt, use_cache=True, **kw),
            "export_no_cache": lambda: slim.generate(prompt, use_cache=False, **kw),
            "full_hf_cache": lambda: full.generate(prompt, use_cache=True, **kw)}
    with torch.inference_mode():
        same = torch.equal(runs["export_cache"](), runs["export_no_cache"]())
        seconds = time_interleaved(runs, reps)
    return {
        "export": str(folder), "model": sheaf.model_name, "task": sheaf.task, "prompt_tokens": prompt.shape[1],
        "new_tokens": NEW_TOKENS, "reps": reps, "threads": torch.get_num_threads(),
        "heads_kept": sum(layer.n_heads for layer in slim.layers), "same_tokens_with_and_without_cache": same,
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "tokens_per_s": {k: round(NEW_TOKENS / v, 1) for k, v in seconds.items()},
        "cache_speedup": round(seconds["export_no_cache"] / seconds["export_cache"], 2),
        "export_vs_full": round(seconds["full_hf_cache"] / seconds["export_cache"], 2),
        "machine": machine(),
    }


def _report(r: dict[str, Any]) -> str:
    lines = [f"{r['export']} ({r['model']}, task {r['task']}; {r['heads_kept']} heads kept): "
             f"{r['prompt_tokens']}-token prompt, {r['new_tokens']} new tokens, median of {r['reps']}, "
             f"{r['threads']} threads"]
    lines += [f"  {label:22s} {r['tokens_per_s'][k]:8.1f} tokens/s" for k, label in RUNS.items()]
    lines.append(f"  the cache makes the export {r['cache_speedup']:.2f}x faster; with it, the export runs "
                 f"{r['export_vs_full']:.2f}x the full model's speed")
    lines.append("  export tokens with and without the cache: " +
                 ("the same" if r["same_tokens_with_and_without_cache"] else "DIFFERENT (a cache bug)"))
    return "\n".join(lines)


def _quick_export(folder: Path) -> Path:
    from sheafprune.exporter import export
    from sheafprune.models import load_model

    model, tok = load_model("tiny-llama")
    export(random_sheaf(model, "tiny-llama", density=0.8, granularity=("head", "neuron", "edge")), out=folder,
           model=model, tokenizer=tok)
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", type=Path, default=Path("exports/smollm2-ioi"),
                    help="an export folder with model.safetensors (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="tiny-llama, a random sheaf exported to a temporary folder")
    ap.add_argument("--reps", type=int, help="timed runs of each (default 5; --quick 3)")
    args = ap.parse_args(argv)
    reps = args.reps or (3 if args.quick else 5)
    if args.quick:
        with tempfile.TemporaryDirectory(prefix="sheafprune-bench-") as d:
            result = bench_folder(_quick_export(Path(d) / "tiny-llama-ioi"), reps=reps)
    elif not (args.folder / "model.safetensors").is_file():
        print(f"bench.generate: no export with model.safetensors at {args.folder}; run `make demo` first or pass "
              "an export folder", file=sys.stderr)
        return 2
    else:
        result = bench_folder(args.folder, reps=reps)
    print(_report(result), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"generate{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {out}")
    return 0 if result["same_tokens_with_and_without_cache"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
