"""bench/discover_runs.yaml gives bench.discover the `sheafprune discover` arguments of each run: every run name the
results and docs refer to, and the arguments in their order. Read in a child process from
the project root, as `python -m bench.discover` reads it (bench/ is not an installed package)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOAD = "import json\nfrom bench.discover import load_runs\nprint(json.dumps(load_runs()))\n"
JOINT = ["--granularity", "weight,edge", "--target-density", "weight=0.05,edge=0.05", "--steps", "150",
         "--batch-size", "16", "--eval-every", "5", "--max-minutes", "30"]


@pytest.fixture(scope="module")
def runs() -> dict[str, dict[str, list[str]]]:
    proc = subprocess.run([sys.executable, "-c", LOAD], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_runs_file_gives_each_run_its_arguments(runs):
    assert list(runs["full"]) == ["ioi-joint", "anaphor-joint", "capitals-joint", "sentence-joint", "ioi-sigmoid",
                                  "sentence-sigmoid", "ioi-staged"]
    assert list(runs["quick"]) == ["tiny-joint", "tiny-staged"]
    assert runs["full"]["ioi-joint"] == ["--model", "smollm2-135m", "--task", "ioi", *JOINT]
    # A run's own options come after the shared set (a repeated --steps wins).
    assert runs["full"]["ioi-sigmoid"] == ["--model", "smollm2-135m", "--task", "ioi", *JOINT, "--steps", "130",
                                           "--recipe", "sigmoid"]
    assert runs["full"]["ioi-staged"] == ["--model", "smollm2-135m", "--task", "ioi", "--preset", "discogp",
                                          "--steps", "75", "--batch-size", "16", "--eval-every", "5",
                                          "--max-minutes", "30"]
    assert runs["quick"]["tiny-joint"] == ["--model", "tiny-gpt2", "--task", "ioi", "--steps", "60", "--batch-size",
                                           "16", "--target-density", "weight=0.2,edge=0.2"]
