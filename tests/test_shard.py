"""Sharded training (`--shard-masks`, discovery/shard.py): the row rule and the exact distributed threshold in one process,
every ShardedMaskLogits piece against MaskLogits in two gloo processes, and whole runs: sharded over two processes
= one process, with each rank holding half of the weight-mask state; an interrupted sharded run resumes, sharded or
not, to the uninterrupted result."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sheafprune.config import resolve_config
from sheafprune.discovery import discover
from sheafprune.discovery.shard import kth_smallest, shard_rows
from sheafprune.sheaf import load_sheaf

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shard_rows_follow_tensor_split(world):
    for n in (0, 1, 2, 3, 7, 64, 65):
        expect = [len(p) for p in torch.arange(n).tensor_split(world)]
        rows = [shard_rows(n, world, r) for r in range(world)]
        assert [b - a for a, b in rows] == expect, (n, world, rows)
        assert rows[0][0] == 0 and rows[-1][1] == n and all(rows[i][1] == rows[i + 1][0] for i in range(world - 1))


def test_kth_smallest_from_counts_equals_kthvalue():
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(500, generator=g) * 3, torch.tensor([0.0, -0.0, 0.0, 1.5, 1.5, 1.5, -7.25]),
                        torch.randint(-3, 4, (100,), generator=g).float(), torch.tensor([float("inf"), -1e-30, 1e30])])
    parts = values[torch.randperm(values.numel(), generator=g)].tensor_split(3)  # three "ranks"

    def count_le(t):
        return sum(int((p <= t).sum()) for p in parts)

    for k in (1, 2, 50, 300, 301, 302, values.numel() - 1, values.numel()):
        v = kth_smallest(k, count_le)
        assert v == float(values.kthvalue(k).values), (k, v, float(values.kthvalue(k).values))


def _run(args, timeout=300):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=ENV)


def test_sharded_pieces_equal_unsharded_in_two_processes():
    """Init, sampled masks, density, gradients (through the autograd gather), AdamW state gathered and sliced, kept
    fraction, exact and sampled projection: bitwise (or to float rounding) the one-process values."""
    r = _run([BIN / "torchrun", "--nproc_per_node", "2", ROOT / "tests" / "shard_worker.py"])
    assert r.returncode == 0 and "all equal" in r.stdout, (r.stdout + r.stderr)[-4000:]


def test_one_process_shard_masks_runs_the_sharded_code_with_one_shard():
    base = dict(model="tiny-gpt2", task="ioi", n_items=80, steps=8, batch_size=8, eval_every=4,
                target_density="weight=0.3,edge=0.3")
    a = discover(resolve_config(overrides=base), progress=False)
    b = discover(resolve_config(overrides={**base, "shard_masks": True}), progress=False)
    assert all(torch.equal(a.logits[k], b.logits[k]) for k in a.logits)
    assert a.meta["model"]["fingerprint"] == b.meta["model"]["fingerprint"]
    counts = [{k: v for k, v in m.meta["training"]["per_rank"][0].items() if not k.startswith("peak")} for m in (a, b)]
    assert counts[0] == counts[1], counts


INTERRUPT = """
import signal, sys
from sheafprune.cli.main import main
from sheafprune.discovery.loop import Trainer
original = Trainer.train_step
def interrupt_at_3(self):
    if self.step == 3:
        signal.raise_signal(signal.SIGINT)  # a real Ctrl-C on every rank: step 4 finishes, then a checkpoint
    return original(self)
Trainer.train_step = interrupt_at_3
sys.exit(main(sys.argv[1:]))
"""


def _differ(a: dict, b: dict) -> tuple[float, int]:
    return (max((a[k] - b[k]).abs().max().item() for k in a),
            sum(int(((a[k] > 0) != (b[k] > 0)).sum()) for k in a))


def test_sharded_two_processes_equal_one_process_and_resume(tmp_path):
    """tiny-llama, weight+edge masks (the exact distributed top-k at every step)."""
    (tmp_path / "opts.yaml").write_text("checkpoint_every: 2\n")
    args = ["discover", "--model", "tiny-llama", "--task", "ioi", "--n-items", "80", "--steps", "6", "--batch-size", "8",
            "--target-density", "weight=0.3,edge=0.3", "--config", tmp_path / "opts.yaml"]
    one = discover(resolve_config(yaml_path=tmp_path / "opts.yaml", overrides=dict(
        model="tiny-llama", task="ioi", n_items=80, steps=6, batch_size=8, target_density="weight=0.3,edge=0.3")), progress=False)
    launch = [BIN / "accelerate", "launch", "--config_file", ROOT / "configs" / "accelerate-shard2.yaml"]

    two = _run([*launch, BIN / "sheafprune", *args, "--shard-masks", "--out", tmp_path / "two"])
    assert two.returncode == 0, two.stderr[-3000:]
    b = load_file(str(tmp_path / "two" / "masks.safetensors"))
    d, flips = _differ(one.logits, b)
    # As for data parallelism (test_discover): gradients summed in another order, so ~1e-5, not bitwise.
    assert d < 1e-3 and flips == 0, f"sharded two-process vs one-process logits: max diff {d:.3g}, {flips} flips"
    meta = load_sheaf(tmp_path / "two").meta["training"]
    full, ranks = one.meta["training"]["per_rank"][0], meta["per_rank"]
    assert meta["processes"] == 2 and len(ranks) == 2, meta
    for what in ("weight_logits", "model_weights"):  # row shards: the two halves make the whole
        assert sum(r[what] for r in ranks) == full[what] and max(r[what] for r in ranks) <= 0.55 * full[what], ranks
    for r in ranks:  # nsgd's momentum and the gradient follow the logits
        assert r["optimizer"] == r["logits"] and r["grads"] == r["logits"] < 0.55 * full["logits"], ranks

    (tmp_path / "interrupt.py").write_text(INTERRUPT)
    cut = _run([*launch, tmp_path / "interrupt.py", *args, "--shard-masks", "--out", tmp_path / "cut"])
    assert cut.returncode != 0 and not (tmp_path / "cut").exists(), cut.stderr[-3000:]
    ckpt = tmp_path / ".cut.run" / "ckpt-00000004.safetensors"
    assert ckpt.is_file(), f"no checkpoint of step 4: {sorted(os.listdir(tmp_path / '.cut.run'))}\n{cut.stderr[-3000:]}"
    saved = load_file(str(ckpt))  # the unsharded format: full logits and AdamW moments
    assert all(saved[f"logits/{k}"].shape == v.shape for k, v in one.logits.items())
    shutil.copytree(tmp_path / ".cut.run", tmp_path / ".cut2.run")

    resumed = _run([*launch, BIN / "sheafprune", *args, "--shard-masks", "--resume", "--out", tmp_path / "cut"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    d, flips = _differ(one.logits, load_file(str(tmp_path / "cut" / "masks.safetensors")))
    assert d < 1e-3 and flips == 0, f"resumed sharded run vs uninterrupted: max diff {d:.3g}, {flips} flips"

    # The sharded checkpoint resumes in one unsharded process too.
    unsharded = discover(resolve_config(yaml_path=tmp_path / "opts.yaml", overrides=dict(
        model="tiny-llama", task="ioi", n_items=80, steps=6, batch_size=8, target_density="weight=0.3,edge=0.3")), out=tmp_path / "cut2", resume=True, progress=False)
    d, flips = _differ(one.logits, unsharded.logits)
    assert d < 1e-3 and flips == 0, f"sharded checkpoint resumed unsharded vs uninterrupted: {d:.3g}, {flips} flips"
