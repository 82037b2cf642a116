"""`sheafprune show`: the PNG is a real image, what it draws is exactly what the logits keep (per-layer densities,
kept edges), and bad input is one `error:` line with exit 2 and nothing on disk."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
from conftest import SHEAFPRUNE, make_sheaf, refused

from sheafprune import show
from sheafprune.cli.main import main
from sheafprune.models import load_model
from sheafprune.sheaf import load_sheaf, save_sheaf
from sheafprune.show import draw_sheaf

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WEIGHT_LAYER = re.compile(r"^w/(?:transformer\.h|model\.layers)\.(\d+)\.")


def direct_densities(logits: dict) -> dict[str, dict[str, float]]:
    """Per type and layer, straight from the logits: all entries of the layer concatenated, mean of logit > 0."""
    groups: dict[tuple[str, str], list] = {}
    for k, v in logits.items():
        if k == "edge/out":
            t, layer = "edge", "out"
        elif k.startswith("w/"):
            t, layer = "weight", WEIGHT_LAYER.match(k).group(1)
        else:
            t, layer = k.split("/")[0], k.split("/")[1]
        groups.setdefault((t, layer), []).append(v.flatten())
    return {f"{t}/{layer}": int((torch.cat(vs) > 0).sum()) / sum(v.numel() for v in vs)
            for (t, layer), vs in groups.items()}


@pytest.fixture(scope="module")
def sheaf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sheaves")
    gpt2, llama = load_model("tiny-gpt2")[0], load_model("tiny-llama")[0]
    sheaves = {"gpt2": make_sheaf(gpt2, "tiny-gpt2", density=0.3),
               "llama": make_sheaf(llama, "tiny-llama", ("weight", "neuron", "head", "edge"), density=0.4, seed=1),
               "llama-weight": make_sheaf(llama, "tiny-llama", ("weight",), density=0.5)}
    return {name: save_sheaf(s, root / name) for name, s in sheaves.items()}


@pytest.mark.parametrize("name", ["gpt2", "llama", "llama-weight"])
def test_drawing_is_what_the_logits_keep(sheaf_dirs, tmp_path, name):
    sheaf = load_sheaf(sheaf_dirs[name])
    out = tmp_path / "sheaf.png"
    summary = draw_sheaf(sheaf_dirs[name], out)

    assert out.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[2] in (3, 4) and min(image.shape[:2]) >= 500, image.shape
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sheaf.png"]  # no temp file left

    drawn = {f"{t}/{layer}": d for t, per_layer in summary["layer_density"].items() for layer, d in per_layer.items()}
    direct = direct_densities(sheaf.logits)
    assert drawn.keys() == direct.keys(), (sorted(drawn), sorted(direct))
    diff = max(abs(drawn[k] - direct[k]) for k in direct)
    assert diff < 1e-12, f"per-layer densities differ from the logits' by up to {diff:.3g}"
    assert summary["density"] == pytest.approx(sheaf.density(), abs=1e-12)

    edge_logits = [v for k, v in sheaf.logits.items() if k.startswith("edge/")]
    assert summary["edges_kept"] == sum(int((v > 0).sum()) for v in edge_logits)
    assert summary["edges_total"] == sum(v.numel() for v in edge_logits)
    heads = summary["n_heads"] or 1  # unknown without edge/head masks: one attention node per layer
    assert 0 < summary["nodes_kept"] <= summary["nodes_total"] == 1 + 2 * (heads + 1)  # tiny models: 2 layers
    pruned_heads = sum(int((v <= 0).sum()) for k, v in sheaf.logits.items() if k.startswith("head/"))
    assert summary["nodes_kept"] <= summary["nodes_total"] - pruned_heads
    if name == "llama":
        assert (summary["n_heads"], summary["n_kv_heads"]) == (4, 2)  # GQA read from the k masks' shapes
    if name == "llama-weight":
        assert summary["n_heads"] is None and summary["edges_kept"] == 0 == summary["edges_total"]


def test_cli_draws_and_says_where(sheaf_dirs, tmp_path, capsys):
    out = tmp_path / "new" / "sheaf.png"  # a missing parent folder is made
    assert main(["show", str(sheaf_dirs["gpt2"]), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sheaf drawing written to {out}: kept weight "), lines
    assert " edges, " in lines[0] and out.read_bytes()[:8] == PNG_MAGIC
    out.write_bytes(b"old")
    assert main(["show", str(sheaf_dirs["gpt2"]), "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC and sorted(p.name for p in out.parent.iterdir()) == ["sheaf.png"]


def test_bad_input_is_one_error_line_and_writes_nothing(sheaf_dirs, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    sheaf = str(sheaf_dirs["gpt2"])
    not_sheaf = work / "notes"
    not_sheaf.mkdir()
    (not_sheaf / "a.txt").write_text("x")
    export = work / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"")
    (work / "afile").write_text("x")
    (work / "taken.png").write_bytes(b"mine")
    (work / "dir.png").mkdir()
    damaged = save_sheaf(load_sheaf(sheaf_dirs["gpt2"]), work / "damaged")
    logits = load_sheaf(damaged).logits
    logits["edge/1/q"] = logits["edge/1/q"][:, :3].contiguous()
    from safetensors.torch import save_file

    save_file(logits, str(damaged / "masks.safetensors"))
    cases = [
        ([work / "missing", "--out", work / "o.png"], r"sheaf folder .*missing does not exist"),
        ([not_sheaf, "--out", work / "o.png"], r"notes/sheaf.json is missing"),
        ([export, "--out", work / "o.png"], r"is an export folder, not a sheaf folder"),
        ([damaged, "--out", work / "o.png"], r"mask 'edge/1/q' has shape \(6, 3\).*damaged"),
        ([sheaf, "--out", work / "o.jpg"], r"must end in \.png"),
        ([sheaf, "--out", work / "taken.png"], r"taken\.png exists; pass --overwrite"),
        ([sheaf, "--out", work / "dir.png", "--overwrite"], r"is a folder"),
        ([sheaf, "--out", work / "afile" / "sub" / "o.png"], r"not a folder; choose a writable --out"),
        ([sheaf, "--out", Path("/proc/self/o.png")], r"cannot write .*; choose a writable --out"),
        ([sheaf], r"the following arguments are required: --out"),
    ]
    for argv, match in cases:
        refused(capsys, ["show", *argv], match=match, root=work)
    assert (work / "taken.png").read_bytes() == b"mine"

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if the `show` extra were not installed
    refused(capsys, ["show", sheaf, "--out", work / "o.png"], match=r"pip install 'sheafprune\[show\]'", root=work)
    monkeypatch.undo()

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dst)

    monkeypatch.setattr(show.os, "replace", full_disk)
    refused(capsys, ["show", sheaf, "--out", work / "new" / "deeper" / "o.png"],
            match=r"cannot write .*o\.png: No space left on device .*nothing was written", root=work)


def test_installed_command(sheaf_dirs, tmp_path):
    """The real process: exit code 2 and one stderr line, no traceback."""
    proc = subprocess.run([str(SHEAFPRUNE), "show", str(sheaf_dirs["gpt2"]), "--out", "o.gif"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --out o.gif must end in .png (show writes a PNG image)"], proc.stderr
    assert list(tmp_path.iterdir()) == []
