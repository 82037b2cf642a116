"""bench.report: docs/benchmarks.md carries the numbers of the results JSON, says which benchmark has none, and is in
step with the committed results. Run as `make bench` runs it (`python -m bench.report`, from the project root:
bench/ is not an installed package); no model is loaded."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
HOST = {"cpu": "Test CPU 9000", "cores": 6, "threads": 12, "ram_gib": 31.4, "torch": "9.9.9", "gpu": None}
CMD = "sheafprune discover --model tiny-gpt2 --task ioi --steps 60"
FIXTURES = {
    "step_cost": [
        {"mode": "plain", "model": "m", "batch": 16, "seconds": 0.5, "peak_rss_mb": 1024.0, "threads": 2,
         "ratio_to_plain": 1.0, "machine": HOST},
        {"mode": "weight+edge", "model": "m", "batch": 16, "seconds": 3.655, "peak_rss_mb": 3072.0, "threads": 2,
         "plain_seconds": 0.5, "ratio_to_plain": 7.31, "machine": HOST}],
    "keep": [
        {"task": "ioi", "exit": 0, "wall_seconds": 123.4, "n_test": 100, "full_accuracy": 0.97, "export_accuracy": 0.96,
         "ratio": 0.99, "non_embedding_kept": 0.1234, "stopped": "floor", "not_kept": None, "speedup": 2.71},
        {"task": "capitals", "exit": 3, "wall_seconds": 45.6, "n_test": 36, "full_accuracy": 0.5,
         "export_accuracy": 0.25, "ratio": 0.5, "non_embedding_kept": 0.5, "stopped": "budget",
         "not_kept": "accuracy 0.250 < floor", "speedup": 1.5, "full_balanced": 0.6, "export_balanced": 0.3,
         "balanced_ratio": 0.5}],
    "export_speed": [
        {"model": "tiny-llama", "sheaf": "random, density 0.3", "density": {"weight": 0.3, "edge": 0.4},
         "batch": [64, 17], "params": 1000, "params_original": 4000, "bytes": 2_500_000, "bytes_original": 10_000_000,
         "bytes_onnx": 2_600_000, "bytes_onnx_full": 10_100_000, "torch_ms": {"full": 80.0, "export": 20.0},
         "torch_speedup": 4.0, "ort_ms": {"full": 60.0, "export": 30.0}, "ort_speedup": 2.0, "test_accuracy": 0.875,
         "files": [{"file": "model.onnx", "dtype": "int8", "bytes": 700_000, "latency_ms": 12.5, "accuracy": 0.86}]}],
    "generate": {"export": "exports/x", "model": "m", "task": "ioi", "prompt_tokens": 16, "new_tokens": 64, "reps": 5,
                 "threads": 2, "heads_kept": 21, "same_tokens_with_and_without_cache": True,
                 "seconds": {"export_cache": 0.8, "export_no_cache": 2.0, "full_hf_cache": 2.2},
                 "tokens_per_s": {"export_cache": 80.1, "export_no_cache": 32.0, "full_hf_cache": 29.1},
                 "cache_speedup": 2.5, "export_vs_full": 2.75, "machine": HOST},
    "discover": {"bench": "discover", "quick": False, "rows": [
        {"run": "ioi-joint", "command": CMD + " --target-density weight=0.2,edge=0.2", "threads": 2,
         "wall_seconds": 7.5, "peak_rss_mb": 2048, "density": {"weight": 0.2, "edge": 0.2},
         "metrics": {"full_accuracy": 0.9, "sheaf_accuracy": 0.85, "complement_accuracy": 0.5, "kl": 0.123},
         "training": {"steps": 60}},
        {"run": "ioi-recorded", "command": CMD + " --target-density weight=0.2,edge=0.2", "recipe": "discogp",
         "threads": 2, "wall_seconds": 7.5, "peak_rss_mb": 2048, "density": {"weight": 0.2, "edge": 0.2},
         "metrics": {"full_accuracy": 0.9, "sheaf_accuracy": 0.85, "complement_accuracy": 0.5, "kl": 0.1,
                     "full_balanced_accuracy": 0.8, "sheaf_balanced_accuracy": 0.6, "complement_balanced_accuracy": 0.5},
         "training": {"steps": 60}},
        {"run": "ioi-staged", "command": CMD + " --schedule staged --config bench/configs/x.yaml", "threads": 2,
         "wall_seconds": 5.0, "peak_rss_mb": 1024, "density": {"weight": 0.5},
         "metrics": {"full_accuracy": 0.9, "sheaf_accuracy": 0.6, "complement_accuracy": 0.7, "kl": 0.5},
         "training": {"steps": 30}},
        {"run": "ioi-paper", "command": CMD + " --preset discogp", "threads": 2, "wall_seconds": 5.0,
         "peak_rss_mb": 1024, "density": {"weight": 0.5}, "metrics": {"full_accuracy": 0.9, "sheaf_accuracy": 0.6,
                                                                       "complement_accuracy": 0.7, "kl": 0.5},
         "training": {"steps": 30}},
        {"run": "ioi-broken", "command": CMD, "failed": 9}]},
    "scaleout": [{"granularity": "weight+edge", "model": "m", "batch": 16, "steps": 8, "1x2_step_seconds": 6.5,
                  "2x1_step_seconds": 9.75, "ratio": 1.5, "machine": HOST}],
    "masked_forward": {"bench": "masked_forward", "quick": False, "rows": [
        {"model": "m", "mode": "edge", "batch": 64, "tokens": 1088, "seconds": 1.2345, "backward": True,
         "stack_mb": 612.5, "peak_rss_mb": 5120.0, "time_vs_hf_forward": 3.21}]},
    "fragility": {"model": "m", "task": "ioi", "split": "dev", "n": 100, "full": {"accuracy": 0.99, "ce": 0.0312},
                  "removal": [{"type": "edge", "removed": "lowest attribution", "fraction": 0.5, "accuracy": 0.61,
                               "ce": 0.9876}],
                  "writers": [{"writer": "m3", "accuracy": 0.42, "ce": 1.2346}]},
}


def _report(results: Path, out: Path, *flags: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "bench.report", "--results", str(results), "--out", str(out), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out.read_text()


def _cells(doc: str, section: str, first: str, column: str) -> list[str]:
    """The cells under `column` in the rows of a table of `section` that begin with `first` (one or more cells)."""
    body = doc.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    for block in body.split("\n\n"):
        lines = block.strip().splitlines()
        header = [c.strip() for c in lines[0].strip("|").split("|")] if lines[0].startswith("|") else []
        rows = [line for line in lines if line.startswith(f"| {first} |")]
        if column in header and rows:
            return [dict(zip(header, (c.strip() for c in row.strip("|").split("|"))))[column] for row in rows]
    raise AssertionError(f"no row {first!r} with a column {column!r} in section {section!r}")


def _cell(doc: str, section: str, first: str, column: str) -> str:
    cells = _cells(doc, section, first, column)
    assert len(cells) == 1, (first, cells)
    return cells[0]


def _write(folder: Path, names, suffix: str = "") -> Path:
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / f"{name}{suffix}.json").write_text(json.dumps(FIXTURES[name]))
    return folder


# The cells the fixtures above must give: section -> (first cell of the row, column, text).
HOST_FILES = "`step_cost.json`, `generate.json`, `scaleout.json`"
UNRECORDED = "`keep.json`, `export_speed.json`, `discover.json`, `masked_forward.json`, `fragility.json`"
EXPECTED = {
    "Machine": [(HOST_FILES, "CPU", "Test CPU 9000"), (HOST_FILES, "cores / threads", "6 / 12"),
                (HOST_FILES, "RAM", "31.4 GiB"), (UNRECORDED, "CPU", "machine not recorded")],
    "Step cost": [("weight+edge", "ratio to plain", "7.31x"), ("weight+edge", "seconds / step", "3.6550"),
                  ("weight+edge", "peak RSS (GiB)", "3.00"), ("weight+edge", "plain s / step", "0.5000"),
                  ("plain", "ratio to plain", "1.00x")],
    "Keep search per task": [
        ("`ioi`", "export accuracy", "0.960"), ("`ioi`", "non-embedding params kept", "12.3%"),
        ("`ioi`", "torch speed-up", "2.71x"), ("`ioi`", "balanced full / export (ratio)", "—"),
        ("`capitals`", "balanced full / export (ratio)", "0.600 / 0.300 (0.50x)"),
        ("`capitals`", "exit", "3 (not kept: accuracy 0.250 < floor)"), ("`capitals`", "wall (s)", "45.6")],
    "Export size and latency": [
        ("tiny-llama", "params export / full", "1,000 / 4,000 (25.0%)"),
        ("tiny-llama", "torch ms full / export (speed-up)", "80.0 / 20.0 (4.00x)"),
        ("tiny-llama", "ONNX MB export / full", "2.6 / 10.1"), ("tiny-llama", "export test accuracy", "0.875"),
        ("tiny-llama", "dtype", "int8")],
    "Generation": [("export, KV cache", "tokens/s", "80.1"), ("full model, HF cache", "seconds", "2.2000")],
    "Discovery: weight+edge and staged runs": [
        ("ioi-joint", "schedule", "joint"), ("ioi-staged", "schedule", "staged"), ("ioi-paper", "schedule", "staged"),
        ("ioi-paper", "recipe", "discogp"), ("ioi-joint", "recipe", "joint"), ("ioi-recorded", "recipe", "discogp"),
        ("ioi-recorded", "schedule", "staged"),
        ("ioi-recorded", "test accuracy full / sheaf / complement",
         "0.900 / 0.850 / 0.500 (balanced 0.800 / 0.600 / 0.500)"),
        ("ioi-staged", "recipe", "x"),
        ("ioi-joint", "test accuracy full / sheaf / complement", "0.900 / 0.850 / 0.500"),
        ("ioi-joint", "kept", "weight 20.0%, edge 20.0%"), ("ioi-broken", "kept", "failed (status 9)")],
    "Several processes on one machine": [
        ("weight+edge", "seconds / step (processes x threads)", "1x2: 6.500, 2x1: 9.750"),
        ("weight+edge", "N x 1 / 1 x N", "1.50")],
    "Masked forward": [("m", "vs HF forward", "3.21x"), ("m", "peak RSS (GiB)", "5.00")],
    "Fragility": [("edge", "CE", "0.988")],
}


def test_every_table_carries_its_results_numbers(tmp_path):
    doc = _report(_write(tmp_path / "results", FIXTURES), tmp_path / "b.md")
    assert "not measured yet" not in doc
    assert doc.splitlines()[2].startswith("Generated by `make bench` ") and "do not edit by hand" in doc.splitlines()[2]
    for section, cells in EXPECTED.items():
        for first, column, text in cells:
            assert _cell(doc, section, first, column) == text, (section, first, column)
    assert "2.75x the full model's speed" in doc
    assert "m3 (CE 1.235, accuracy 0.42)" in doc and "full model accuracy 0.99, CE 0.031" in doc


def test_a_missing_results_file_says_not_measured(tmp_path):
    results = _write(tmp_path / "results", ["keep"])
    doc = _report(results, tmp_path / "b.md")
    for name in ("step_cost", "export_speed", "generate", "discover", "masked_forward", "fragility"):
        assert f"not measured yet: run `python -m bench.{name}`" in doc
    assert "not measured yet: run `python -m bench.keep`" not in doc
    assert _cell(doc, "Keep search per task", "`ioi`", "full accuracy") == "0.970"
    # --quick reads only the _quick files: the full keep.json is not shown as a quick result
    _write(results, ["step_cost"], "_quick")
    quick = _report(results, tmp_path / "q.md", "--quick")
    assert "not measured yet: run `python -m bench.keep --quick`" in quick
    assert _cell(quick, "Step cost", "weight+edge", "ratio to plain") == "7.31x"
    assert "`ioi`" not in quick


# The figure of each row that a reader looks for first, per results file: (first cell, column, value).
KEY_FIGURES = {
    "step_cost": lambda d: [(r["mode"], "ratio to plain", f"{r['ratio_to_plain']:.2f}x") for r in d],
    "keep": lambda d: [(f"`{r['task']}`", "export accuracy", f"{r['export_accuracy']:.3f}") for r in d]
    + [(f"`{r['task']}`", "torch speed-up", f"{r['speedup']:.2f}x") for r in d],
    "export_speed": lambda d: [(r["model"], "params export / full", f"{r['params']:,} / {r['params_original']:,} "
                                f"({r['params'] / r['params_original']:.1%})") for r in d],
    "generate": lambda d: [("export, KV cache", "tokens/s", f"{d['tokens_per_s']['export_cache']:.1f}"),
                           ("full model, HF cache", "tokens/s", f"{d['tokens_per_s']['full_hf_cache']:.1f}")],
    "discover": lambda d: [(r["run"], "wall (s)", f"{r['wall_seconds']:.1f}") for r in d["rows"] if "failed" not in r],
    "masked_forward": lambda d: [(f"{r['model']} | {r['batch']} | {r['tokens']} | {r['mode']}", "vs HF forward",
                                  f"{r['time_vs_hf_forward']:.2f}x") for r in d["rows"]],
    "fragility": lambda d: [(f"{r['type']} | {r['removed']} | {r['fraction']:.3g}", "CE", f"{r['ce']:.3f}")
                            for r in d["removal"]],
    "scaleout": lambda d: [(r["granularity"], "N x 1 / 1 x N", f"{r['ratio']:.2f}") for r in d],
}
TITLES = {"step_cost": "Step cost", "keep": "Keep search per task", "export_speed": "Export size and latency",
          "generate": "Generation", "discover": "Discovery: weight+edge and staged runs",
          "masked_forward": "Masked forward", "fragility": "Fragility", "scaleout": "Several processes on one machine"}


def test_the_committed_results_are_all_in_the_committed_document(tmp_path):
    committed = sorted(p.stem for p in RESULTS.glob("*.json") if not p.stem.endswith("_quick"))
    assert {"step_cost", "keep", "generate"} <= set(committed), committed
    doc = _report(RESULTS, tmp_path / "b.md")
    for name in committed:
        data = json.loads((RESULTS / f"{name}.json").read_text())
        assert f"not measured yet: run `python -m bench.{name}`" not in doc
        for first, column, value in KEY_FIGURES[name](data):
            assert value in _cells(doc, TITLES[name], first, column), (name, first, column, value)
    assert "machine not recorded" not in doc
    stale = "docs/benchmarks.md is not the report of bench/results: run python -m bench.report"
    assert (ROOT / "docs" / "benchmarks.md").read_text() == doc, stale


def test_machine_reads_this_machine():
    code = "import json; from bench.machine import machine; print(json.dumps(machine()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout)
    assert m["threads"] == os.cpu_count() and 1 <= m["cores"] <= m["threads"]
    assert m["cpu"] and m["cpu"] != "unknown" and m["ram_gib"] > 0 and m["torch"][0].isdigit()
