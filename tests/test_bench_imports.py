"""Every benchmark module imports and has a main(): `make bench` runs them all, so one broken import stops the rest.
Run as `python -m` runs them, from the project root (bench/ is not an installed package)."""

import subprocess
import sys
from pathlib import Path

BENCHES = ["step_cost", "masked_forward", "export_speed", "generate", "keep", "fragility", "discover", "verdict", "report", "run"]
CHECK = "import importlib, sys\nfor n in sys.argv[1:]:\n    assert callable(importlib.import_module(f'bench.{n}').main), n\n"


def test_every_bench_module_imports():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", CHECK, *BENCHES], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
