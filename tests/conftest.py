"""Fixtures and helpers that several test files share: random sheaves of the tiny models, the tiny-gpt2 model with a
sheaf and an export of it, and the check that the CLI refuses bad input with one `error: ...` line and writes nothing.

Test files import the helpers with `from conftest import ...`; pytest finds the fixtures on its own.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from sheafprune.arch import view_of
from sheafprune.cli.main import main
from sheafprune.masked import mask_shapes
from sheafprune.models import fingerprint, load_model
from sheafprune.sheaf import Sheaf, load_sheaf, save_sheaf

SHEAFPRUNE = Path(sys.executable).with_name("sheafprune")  # the installed command


def tree(root: Path) -> set[str]:
    """Every path under root, hidden ones included."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def refused(capsys, argv: list, *, match: str, root: Path, code: int = 2, progress: bool = False) -> str:
    """Run the CLI in-process; assert exit `code`, exactly one stderr line `error: ...` matching `match`, no
    traceback, and that nothing appeared or vanished under `root`. Returns the error line. With `progress`, progress
    bar lines (transformers' "Loading weights" for a model folder) may come before the error line."""
    capsys.readouterr()
    before = tree(root)
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors exit from inside parse_args
        rc = e.code
    out, err = capsys.readouterr()
    lines = [line for line in err.strip().splitlines() if not (progress and re.search(r"\|.*\d+/\d+ \[", line))]
    assert rc == code, f"exit {rc}, stderr:\n{err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr is not one error line:\n{err}"
    assert "Traceback" not in err + out
    assert re.search(match, lines[0]), f"{lines[0]!r} does not match {match!r}"
    assert tree(root) == before, f"written: {tree(root) - before}, removed: {before - tree(root)}"
    return lines[0]


def make_sheaf(model, name: str, granularity=("weight", "edge"), density: float = 0.7, seed: int = 0) -> Sheaf:
    """A random sheaf for `model`: each unit kept with probability `density` (weights denser, see below)."""
    g = torch.Generator().manual_seed(seed)
    logits = {}
    for k, shape in mask_shapes(view_of(model), list(granularity)).items():
        keep = density ** 0.25 if k.startswith("w/") else density  # the edges decide what survives
        logits[k] = torch.rand(shape, generator=g) - (1 - keep)  # kept iff > 0
    sheaf = Sheaf(logits, {"model": {"name": name, "fingerprint": fingerprint(model)}, "task": "ioi",
                           "granularity": list(granularity), "config": {"seed": 0, "n_items": 40},
                           "metrics": {"split": "test", "n": 4, "full_accuracy": 1.0, "sheaf_accuracy": 0.75,
                                       "complement_accuracy": 0.5}})
    sheaf.meta["density"] = sheaf.density()
    return sheaf


def random_sheaf(model, name: str, *, seed: int = 0, granularity=("weight", "edge")) -> Sheaf:
    """A random sheaf for `model` with every entry's logit uniform in [-0.2, 0.8), and no metrics."""
    g = torch.Generator().manual_seed(seed)
    logits = {k: torch.rand(s, generator=g) - 0.2 for k, s in mask_shapes(view_of(model), list(granularity)).items()}
    return Sheaf(logits, {"model": {"name": name, "fingerprint": fingerprint(model)}, "task": "ioi",
                          "granularity": list(granularity), "config": {"seed": 0, "n_items": 40}})


def copy_sheaf(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    """Set keys of a JSON file's object; `a__b=v` sets meta["a"]["b"]."""
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        *parents, last = key.split("__")
        node = meta
        for p in parents:
            node = node[p]
        node[last] = value
    path.write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def gpt2():
    return load_model("tiny-gpt2")


@pytest.fixture(scope="module")
def sheaf_dir(gpt2, tmp_path_factory) -> Path:
    """A random_sheaf of tiny-gpt2 saved as a sheaf folder."""
    return save_sheaf(random_sheaf(gpt2[0], "tiny-gpt2"), tmp_path_factory.mktemp("sheaf") / "sheaf")


@pytest.fixture(scope="module")
def export_dir(gpt2, sheaf_dir, tmp_path_factory) -> Path:
    """The export folder of sheaf_dir."""
    from sheafprune.exporter import export

    out = tmp_path_factory.mktemp("export") / "export"
    export(load_sheaf(sheaf_dir), out=out, model=gpt2[0], tokenizer=gpt2[1])
    return out


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """An empty working folder as cwd: the default --out lands here if a refusal writes anything."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def assert_same_sheaf_logits(a: dict, b: dict, what: str) -> None:
    """Mask logits of two runs that differ only in the float order of their sums (two processes, another device).
    Adam divides by sqrt(v), which magnifies float noise in near-zero gradients: logits agree to ~1e-4 after a few
    steps, not bitwise, and an entry whose gradient is ~0 may move by a few 1e-3 (measured between one and two
    processes: 1 of 73,810 entries by 4.8e-3). No entry may flip."""
    d = max((a[k] - b[k]).abs().max().item() for k in a)
    n = sum(v.numel() for v in a.values())
    off = sum(int(((a[k] - b[k]).abs() > 1e-3).sum()) for k in a)
    flips = sum(int(((a[k] > 0) != (b[k] > 0)).sum()) for k in a)
    msg = f"{what} mask logits: max diff {d:.3g}, {off} of {n} entries beyond 1e-3, {flips} flipped"
    print(msg)
    assert d < 1e-2 and off <= n // 10_000 and flips == 0, msg
