"""The same discovery on CUDA and on the CPU (`-m gpu`; skipped where no CUDA device is visible).

Both runs are `sheafprune discover` subprocesses with the same seed and options; the CPU run hides the GPU
(CUDA_VISIBLE_DEVICES=""). Mask noise is drawn on the CPU in both, so the runs differ only by the float order of
the device's kernels, which Adam magnifies on near-zero gradients (as between one and two processes): the logits
must agree as conftest.assert_same_sheaf_logits says, and the test accuracies to one item.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_same_sheaf_logits
from safetensors.torch import load_file

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")]
SHEAFPRUNE = Path(sys.executable).parent / "sheafprune"


def _discover(out: Path, *, cuda: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, **({} if cuda else {"CUDA_VISIBLE_DEVICES": ""})}
    return subprocess.run([str(SHEAFPRUNE), "discover", "--model", "tiny-llama", "--task", "ioi", "--n-items", "80",
                           "--steps", "8", "--batch-size", "8", "--granularity", "weight,edge",
                           "--target-density", "weight=0.3,edge=0.3", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)


def test_cuda_discovery_equals_cpu(tmp_path):
    runs = {}
    for name, cuda in (("cpu", False), ("cuda", True)):
        r = _discover(tmp_path / name, cuda=cuda)
        assert r.returncode == 0, r.stderr[-2000:]
        runs[name] = (load_file(str(tmp_path / name / "masks.safetensors")),
                      json.loads((tmp_path / name / "sheaf.json").read_text()))
    (a, meta_a), (b, meta_b) = runs["cpu"], runs["cuda"]
    assert_same_sheaf_logits(a, b, f"CUDA ({torch.cuda.get_device_name(0)}) vs CPU")
    ma, mb = meta_a["metrics"], meta_b["metrics"]
    for key in ("full_accuracy", "sheaf_accuracy", "complement_accuracy"):
        assert abs(ma[key] - mb[key]) <= 1.0 / ma["n"] + 1e-9, f"{key}: CPU {ma[key]} vs CUDA {mb[key]}"
