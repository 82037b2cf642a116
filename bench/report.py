"""The benchmark report: one markdown document written entirely from bench/results/*.json (`make bench`'s last step).

Every number in it is read from a results file (or is the ratio of two numbers read there); a benchmark without a
results file gets a line naming the command that measures it.

    python -m bench.report              # bench/results/<name>.json        -> docs/benchmarks.md
    python -m bench.report --quick      # bench/results/<name>_quick.json  -> bench/results/benchmarks_quick.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
QUICK_DOC = RESULTS / "benchmarks_quick.md"
GENERATE_RUNS = {"export_cache": "export, KV cache", "export_no_cache": "export, no cache",
                 "full_hf_cache": "full model, HF cache"}


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join("—" if v is None else str(v) for v in row) + " |" for row in rows])


def _num(value: float | None, fmt: str, unit: str = "") -> str | None:
    return None if value is None else format(value, fmt) + unit


def _gib(mb: float | None) -> str | None:
    return None if mb is None else f"{mb / 1024:.2f}"


def _density(density: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1%}" for k, v in density.items())


def _rows(data: Any) -> list[dict]:
    """The per-run rows of a results file: the file itself when it is a list, else its "rows" (or none)."""
    return data if isinstance(data, list) else data.get("rows", [])


def _machines(data: Any) -> list[dict | None]:
    """The distinct machines a results file records, top level or per row; None stands for a row without one."""
    top = data.get("machine") if isinstance(data, dict) else None
    found = [top] if top else ([r.get("machine") for r in _rows(data)] or [None])
    return [json.loads(k) for k in dict.fromkeys(json.dumps(m, sort_keys=True) for m in found)]


def machine_table(files: dict[str, Any]) -> str:
    """One row per distinct machine, naming the results files measured on it."""
    on: dict[str, list[str]] = {}
    for file, data in files.items():
        for m in _machines(data):
            on.setdefault(json.dumps(m, sort_keys=True), []).append(f"`{file}`")
    rows = []
    for key, names in on.items():
        m = json.loads(key)
        if m is None:
            rows.append([", ".join(names), "machine not recorded", "", "", "", ""])
        else:
            rows.append([", ".join(names), m.get("cpu"), f"{m.get('cores')} / {m.get('threads')}",
                         _num(m.get("ram_gib"), "g", " GiB"), m.get("torch"), m.get("gpu") or "none"])
    return _table(["results", "CPU", "cores / threads", "RAM", "torch", "GPU"], rows)


def step_cost_table(rows: list[dict]) -> str:
    """One training step of each mode on the same batch, and its ratio to a plain forward+backward (the plain steps
    timed just before and after it, where recorded: "plain s / step")."""
    return _table(["mode", "precision", "model", "batch", "seconds / step", "plain s / step", "ratio to plain",
                   "peak RSS (GiB)", "torch threads"],
                  [[r["mode"], r.get("precision", "fp32"), r["model"], r["batch"], f"{r['seconds']:.4f}",
                    _num(r.get("plain_seconds"), ".4f"), f"{r['ratio_to_plain']:.2f}x", _gib(r.get("peak_rss_mb")),
                    r.get("threads")] for r in rows])


def keep_table(rows: list[dict]) -> str:
    """`sheafprune export` with default options, one task at a time: the export against the full model."""
    out = []
    for r in rows:
        balanced = (f"{r['full_balanced']:.3f} / {r['export_balanced']:.3f} ({r['balanced_ratio']:.2f}x)"
                    if "balanced_ratio" in r else None)
        exit_code = f"{r['exit']}" + (f" (not kept: {r['not_kept']})" if r.get("not_kept") else "")
        out.append([f"`{r['task']}`", r["n_test"], f"{r['full_accuracy']:.3f}", f"{r['export_accuracy']:.3f}",
                    _num(r.get("ratio"), ".2f", "x"), balanced,
                    f"{r['non_embedding_kept']:.1%}", f"{r['speedup']:.2f}x", r.get("stopped"),
                    f"{r['wall_seconds']:.1f}", exit_code])
    return _table(["task", "test n", "full accuracy", "export accuracy", "ratio", "balanced full / export (ratio)",
                   "non-embedding params kept", "torch speed-up", "stopped", "wall (s)", "exit"], out)


def export_table(rows: list[dict]) -> str:
    """The export of a sheaf against the full model: parameters, bytes, and latency of the same batch."""
    main = [[r["model"], r["sheaf"], _density(r["density"]),
             f"{r['params']:,} / {r['params_original']:,} ({r['params'] / r['params_original']:.1%})",
             f"{r['bytes'] / 1e6:.1f} / {r['bytes_original'] / 1e6:.1f}",
             f"{r['bytes_onnx'] / 1e6:.1f} / {r['bytes_onnx_full'] / 1e6:.1f}",
             f"{r['torch_ms']['full']:.1f} / {r['torch_ms']['export']:.1f} ({r['torch_speedup']:.2f}x)",
             f"{r['ort_ms']['full']:.1f} / {r['ort_ms']['export']:.1f} ({r['ort_speedup']:.2f}x)",
             "x".join(map(str, r["batch"])), _num(r.get("test_accuracy"), ".3f")] for r in rows]
    text = _table(["model", "sheaf", "kept", "params export / full", "safetensors MB export / full",
                   "ONNX MB export / full", "torch ms full / export (speed-up)",
                   "onnxruntime ms full / export (speed-up)", "batch", "export test accuracy"], main)
    files = [[r["model"], f"`{f['file']}`", f["dtype"], f"{f['bytes'] / 1e6:.1f}", f"{f['latency_ms']:.1f}",
              _num(f.get("accuracy"), ".3f")] for r in rows for f in r.get("files", [])]
    if files:
        text += "\n\nEach file the export wrote:\n\n" + _table(["model", "file", "dtype", "MB", "latency ms",
                                                                  "test accuracy"], files)
    return text


def generate_table(d: dict) -> str:
    """Greedy generation of the export (with and without its KV cache) against the full model."""
    same = "the same" if d["same_tokens_with_and_without_cache"] else "DIFFERENT"
    head = (f"`{d['export']}` ({d['model']}, task {d['task']}; {d['heads_kept']} heads kept): "
            f"{d['prompt_tokens']}-token prompt, {d['new_tokens']} new tokens, median of {d['reps']}, "
            f"{d['threads']} torch threads. Export tokens with and without the cache: {same}.")
    rows = [[GENERATE_RUNS.get(k, k), f"{s:.4f}", f"{d['tokens_per_s'][k]:.1f}"] for k, s in d["seconds"].items()]
    tail = (f"The cache makes the export {d['cache_speedup']:.2f}x faster; with it, the export runs "
            f"{d['export_vs_full']:.2f}x the full model's speed.")
    return "\n\n".join([head, _table(["run", "seconds", "tokens/s"], rows), tail])


def _flag(command: str, name: str) -> str | None:
    words = command.split()
    return words[words.index(name) + 1] if name in words[:-1] else None


def discover_table(d: dict) -> str:
    """Each discovery run: what it kept and the test accuracy of the full model, the sheaf and its complement."""
    out = []
    for r in d["rows"]:
        cmd = r.get("command", "")
        # the recipe the run recorded from its sheaf.json; else the one a flag or DiscoGP's preset names (the default
        # otherwise), or the YAML file a run read its options from; results recorded before the recipes name a
        # --schedule
        config = _flag(cmd, "--config")
        recipe = (r.get("recipe") or _flag(cmd, "--recipe") or {"discogp": "discogp"}.get(_flag(cmd, "--preset") or "")
                  or (Path(config).stem if config else None) or "joint")
        schedule = "staged" if recipe == "discogp" or _flag(cmd, "--schedule") == "staged" else "joint"
        head = [r["run"], _flag(cmd, "--model"), _flag(cmd, "--task"), schedule, recipe]
        if "failed" in r:
            out.append(head + [f"failed (status {r['failed']})"] + [None] * 6)
            continue
        m, t = r["metrics"], r.get("training", {})
        acc = " / ".join(f"{m[f'{w}_accuracy']:.3f}" for w in ("full", "sheaf", "complement"))
        if "sheaf_balanced_accuracy" in m:  # skewed answers: the balanced accuracy is the one the floor also needs
            acc += " (balanced " + " / ".join(f"{m[f'{w}_balanced_accuracy']:.3f}"
                                              for w in ("full", "sheaf", "complement")) + ")"
        out.append(head + [_density(r["density"]), acc,
                           _num(m.get("kl"), ".3f"), t.get("steps"), f"{r['wall_seconds']:.1f}",
                           _gib(r.get("peak_rss_mb")), r.get("threads")])
    return _table(["run", "model", "task", "schedule", "recipe", "kept", "test accuracy full / sheaf / complement",
                   "KL", "steps", "wall (s)", "peak RSS (GiB)", "threads"], out)


def scaleout_table(rows: list[dict]) -> str:
    """Data parallelism on one machine: N processes x 1 thread against 1 process x N threads, the same global
    batch, by the median seconds per step each run recorded (ratio above 1: the single process is faster)."""
    out = []
    for r in rows:
        runs = {k[:-len("_step_seconds")]: v for k, v in r.items() if k.endswith("_step_seconds")}
        out.append([r["granularity"], r["model"], r["batch"], r["steps"],
                    ", ".join(f"{k}: {v:.3f}" for k, v in runs.items()), f"{r['ratio']:.2f}"])
    return _table(["granularity", "model", "global batch", "steps", "seconds / step (processes x threads)",
                   "N x 1 / 1 x N"], out)


def masked_forward_table(d: dict) -> str:
    """The masked forward(+backward) against the stock HF forward of the same batch."""
    return _table(["model", "batch", "tokens", "mode", "backward", "seconds", "vs HF forward", "writer stack (MB)",
                   "peak RSS (GiB)"],
                  [[r["model"], r["batch"], r["tokens"], r["mode"], "yes" if r["backward"] else "no",
                    f"{r['seconds']:.4f}", f"{r['time_vs_hf_forward']:.2f}x", r["stack_mb"], _gib(r["peak_rss_mb"])]
                   for r in d["rows"]])


def fragility_table(d: dict) -> str:
    """Accuracy and CE once a fraction of one mask type is removed, at random or lowest-ranked first."""
    head = (f"{d['model']} on {d['task']} ({d['split']}, n={d['n']}): full model accuracy "
            f"{d['full']['accuracy']:.2f}, CE {d['full']['ce']:.3f}.")
    table = _table(["mask type", "removed", "fraction removed", "accuracy", "CE"],
                   [[r["type"], r["removed"], f"{r['fraction']:.3g}", f"{r['accuracy']:.2f}", f"{r['ce']:.3f}"]
                    for r in d["removal"]])
    writers = ", ".join(f"{w['writer']} (CE {w['ce']:.3f}, accuracy {w['accuracy']:.2f})" for w in d["writers"][:5])
    return "\n\n".join([head, table, f"Every outgoing edge of one writer removed, highest CE first: {writers}."])


SECTIONS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("step_cost", "Step cost", step_cost_table),
    ("keep", "Keep search per task", keep_table),
    ("export_speed", "Export size and latency", export_table),
    ("generate", "Generation", generate_table),
    ("discover", "Discovery: weight+edge and staged runs", discover_table),
    ("scaleout", "Several processes on one machine", scaleout_table),
    ("masked_forward", "Masked forward", masked_forward_table),
    ("fragility", "Fragility", fragility_table),
]


def render(results: Path = RESULTS, *, quick: bool = False) -> str:
    """The whole document from the results files in `results` (the `_quick` ones with `quick`)."""
    suffix, flag, make = ("_quick", " --quick", "make bench-quick") if quick else ("", "", "make bench")
    files = {}
    for name, _, _ in SECTIONS:
        path = results / f"{name}{suffix}.json"
        if path.is_file():
            files[path.name] = json.loads(path.read_text())
    parts = [f"# Benchmarks{' (tiny models)' if quick else ''}",
             f"Generated by `{make}` from bench/results/*{suffix}.json (`python -m bench.report{flag}`); "
             "do not edit by hand: rerun the benchmark, then the report.",
             "## Machine", machine_table(files) if files else f"not measured yet: run `{make}`"]
    for name, title, table in SECTIONS:
        file = f"{name}{suffix}.json"
        parts.append(f"## {title}")
        if file not in files:
            parts.append(f"not measured yet: run `python -m bench.{name}{flag}`")
            continue
        parts += [f"{table.__doc__} From `bench/results/{file}` (`python -m bench.{name}{flag}`).",
                  table(files[file])]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the *_quick results (tiny models)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of results JSON (default: %(default)s)")
    ap.add_argument("--out", type=Path, help=f"the document (default: {DOC.relative_to(ROOT)}; --quick: "
                                             f"{QUICK_DOC.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    out = args.out or (QUICK_DOC if args.quick else DOC)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(args.results, quick=args.quick))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
