"""Damaged, foreign or misplaced folders and unwritable output: a sheaf folder with missing, truncated or edited
files, a sheaf of another model, an export where a sheaf belongs, an output folder that exists or cannot be written,
and a disk that fills up mid-write. Each is refused with one `error: ...` line (exit 2), and no partial file is left.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import copy_sheaf, edit_json, random_sheaf, refused
from safetensors.torch import save_file

from sheafprune.errors import UserError
from sheafprune.sheaf import save_sheaf


# --- sheaf folders ---------------------------------------------------------------------------------------------
def test_damaged_sheaf_folders(capsys, work, sheaf_dir):
    def export(folder):
        return ["export", folder, "--out", work / "o"]

    refused(capsys, export(work / "missing"), match=r"sheaf folder .*missing does not exist; run `sheafprune "
            r"discover", root=work)
    s = copy_sheaf(sheaf_dir, work / "no-json")
    (s / "sheaf.json").unlink()
    refused(capsys, export(s), match=r"sheaf: .*sheaf\.json is missing", root=work)
    s = copy_sheaf(sheaf_dir, work / "no-masks")
    (s / "masks.safetensors").unlink()
    refused(capsys, export(s), match=r"masks\.safetensors is missing; the sheaf folder is incomplete", root=work)
    s = copy_sheaf(sheaf_dir, work / "truncated")
    data = (s / "masks.safetensors").read_bytes()
    (s / "masks.safetensors").write_bytes(data[: len(data) // 2])
    refused(capsys, export(s), match=r"masks\.safetensors is truncated or corrupt .*re-run discovery", root=work)
    s = copy_sheaf(sheaf_dir, work / "garbage")
    (s / "masks.safetensors").write_bytes(os.urandom(4096))
    refused(capsys, export(s), match=r"masks\.safetensors is truncated or corrupt", root=work)
    s = copy_sheaf(sheaf_dir, work / "header")  # a valid length prefix, then a header that is not JSON
    (s / "masks.safetensors").write_bytes((16).to_bytes(8, "little") + b"{not json at all" + data[24:])
    refused(capsys, export(s), match=r"masks\.safetensors is truncated or corrupt", root=work)
    s = copy_sheaf(sheaf_dir, work / "nan")
    save_file({"edge/x": torch.tensor([float("nan")])}, str(s / "masks.safetensors"))
    refused(capsys, export(s), match=r"NaN/inf logits", root=work)
    s = copy_sheaf(sheaf_dir, work / "badjson")
    (s / "sheaf.json").write_text('{"format": "sheafprune.sheaf/1", "model": ')
    refused(capsys, export(s), match=r"sheaf\.json is not valid JSON .*re-create it", root=work)
    s = copy_sheaf(sheaf_dir, work / "list")
    (s / "sheaf.json").write_text("[1, 2]")
    refused(capsys, export(s), match=r"must hold a JSON object", root=work)
    s = copy_sheaf(sheaf_dir, work / "v2")
    edit_json(s / "sheaf.json", format="sheafprune.sheaf/2")
    refused(capsys, export(s), match=r"has format 'sheafprune.sheaf/2', expected 'sheafprune.sheaf/1'", root=work)
    s = copy_sheaf(sheaf_dir, work / "nokey")
    meta = json.loads((s / "sheaf.json").read_text())
    del meta["granularity"]
    (s / "sheaf.json").write_text(json.dumps(meta))
    refused(capsys, export(s), match=r"lacks the key 'granularity'", root=work)
    s = copy_sheaf(sheaf_dir, work / "badmodel")
    edit_json(s / "sheaf.json", model="tiny-gpt2")  # a string where an object belongs
    refused(capsys, export(s), match=r"sheaf\.json: 'model' must be", root=work)


def test_sheaf_of_another_model(capsys, work, sheaf_dir):
    s = copy_sheaf(sheaf_dir, work / "claims-llama")  # made on tiny-gpt2, edited to claim tiny-llama
    edit_json(s / "sheaf.json", model__name="tiny-llama")
    refused(capsys, ["export", s, "--out", work / "o"], match=r"made for model 'tiny-llama' with fingerprint "
            r"f9fc45774519, not the loaded model .*pass the same --model", root=work)
    s = copy_sheaf(sheaf_dir, work / "other-weights")  # same name, another fingerprint
    edit_json(s / "sheaf.json", model__fingerprint="0" * 64)
    refused(capsys, ["export", s, "--out", work / "o"], match=r"with fingerprint 000000000000, not the loaded model",
            root=work)


def test_export_folder_where_a_sheaf_belongs_and_the_reverse(capsys, work, export_dir, sheaf_dir):
    refused(capsys, ["export", export_dir, "--out", work / "o"],
            match=r"is an export folder, not a sheaf folder; pass the folder `sheafprune discover` wrote", root=work)
    onnx_only = copy_sheaf(export_dir, work / "onnx-only")  # an export without model.safetensors
    (onnx_only / "model.safetensors").unlink()
    refused(capsys, ["export", onnx_only, "--out", work / "o"], match=r"is an export folder, not a sheaf folder",
            root=work)
    from sheafprune.exporter import load

    with pytest.raises(UserError, match=r"is not a sheafprune export folder with model.safetensors; run `sheafprune export"):
        load(sheaf_dir)


# --- output folders --------------------------------------------------------------------------------------------
def test_existing_output_folder_needs_overwrite(capsys, work, sheaf_dir, gpt2):
    (work / "o").mkdir()
    (work / "o" / "keep.txt").write_text("mine")
    refused(capsys, ["discover", "--model", "tiny-gpt2", "--task", "ioi", "--out", work / "o"],
            match=r"output folder .*o exists and is not empty; pass --overwrite or choose another --out", root=work)
    refused(capsys, ["export", sheaf_dir, "--out", work / "o"], match=r"exists and is not empty; pass --overwrite",
            root=work)
    (work / "file").write_text("x")
    refused(capsys, ["export", sheaf_dir, "--out", work / "file"], match=r"exists and is not a folder", root=work)
    # --overwrite replaces the folder whole; an empty folder needs no --overwrite.
    save_sheaf(random_sheaf(gpt2[0], "tiny-gpt2"), work / "o", overwrite=True)
    assert sorted(p.name for p in (work / "o").iterdir()) == ["masks.safetensors", "metrics.jsonl", "sheaf.json"]
    (work / "empty").mkdir()
    save_sheaf(random_sheaf(gpt2[0], "tiny-gpt2"), work / "empty")
    assert [p.name for p in work.iterdir() if p.name.startswith(".")] == []


def test_unwritable_output_folder(capsys, work, sheaf_dir):
    """As root, permissions do not stop us; a parent that is a file does. Refused before any work starts."""
    (work / "afile").write_text("x")
    for out in (work / "afile" / "sub" / "o", Path("/dev/null/o"), Path("/proc/self/o")):
        refused(capsys, ["discover", "--model", "tiny-gpt2", "--task", "ioi", "--steps", "1", "--out", out],
                match=r"cannot write .*; choose a writable --out|not a folder", root=work)
        refused(capsys, ["export", sheaf_dir, "--out", out], match=r"cannot write .*; choose a writable --out|"
                r"not a folder", root=work)


def test_full_disk_while_exporting_removes_partial_files(capsys, work, sheaf_dir, monkeypatch):
    from sheafprune.exporter import hf

    real = hf.save_file

    def full(tensors, filename, **kw):
        real(tensors, filename, **kw)
        Path(filename).write_bytes(b"partial")  # what a full disk leaves
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(hf, "save_file", full)
    refused(capsys, ["export", sheaf_dir, "--out", work / "o"],
            match=r"cannot write .*o: No space left on device .*nothing was written", root=work)


def test_full_disk_while_saving_a_sheaf(work, gpt2, monkeypatch):
    import sheafprune.sheaf as sheaf_mod

    def full(tensors, filename, **kw):
        Path(filename).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(sheaf_mod, "save_file", full)
    with pytest.raises(UserError, match=r"No space left on device"):
        save_sheaf(random_sheaf(gpt2[0], "tiny-gpt2"), work / "o")
    assert list(work.iterdir()) == []
