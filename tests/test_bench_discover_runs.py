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
    assert list(runs["full"]) == ["ioi-joint", "anaphor-joint", "capitals-joint", "sentence-joint", "ioi-staged"]
    assert list(runs["quick"]) == ["tiny-joint", "tiny-staged"]
    assert runs["full"]["ioi-joint"] == ["--model", "smollm2-135m", "--task", "ioi", *JOINT]
    assert runs["full"]["ioi-staged"] == ["--model", "smollm2-135m", "--task", "ioi", "--preset", "discogp",
                                          "--steps", "75", "--batch-size", "16", "--eval-every", "5",
                                          "--max-minutes", "30"]
    assert runs["quick"]["tiny-joint"] == ["--model", "tiny-gpt2", "--task", "ioi", "--steps", "60", "--batch-size",
                                           "16", "--target-density", "weight=0.2,edge=0.2"]


def test_a_runs_own_options_come_after_its_option_set():
    """So an option given again (e.g. --steps) wins, as on the command line."""
    code = ("import json\nfrom bench.discover import run_argv\n"
            "print(json.dumps(run_argv('r', {'task': 'ioi', 'base': 'joint', 'options': {'steps': 7, 'seed': 3}}, 'm',"
            " {'joint': {'steps': 150, 'batch-size': 16}})))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == ["--model", "m", "--task", "ioi", "--steps", "150", "--batch-size", "16",
                                       "--steps", "7", "--seed", "3"]
