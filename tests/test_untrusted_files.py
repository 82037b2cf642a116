"""Files from elsewhere are data, never code: nothing is unpickled, no modeling code shipped in a folder is run, and
no path written in a folder's JSON is read.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import copy_sheaf, edit_json, random_sheaf, refused

from sheafprune.cli.main import main
from sheafprune.errors import UserError
from sheafprune.models import load_model
from sheafprune.sheaf import load_sheaf, save_sheaf

PACKAGE = Path(__file__).resolve().parents[1]


# --- pickles ---------------------------------------------------------------------------------------------------
def test_model_folder_weights_are_read_from_safetensors_only(work, gpt2):
    """A folder whose weights are a pickle (pytorch_model.bin) is refused, not unpickled."""
    model, tok = gpt2
    folder = work / "pickled"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    state = load_model(str(folder))[0].state_dict()
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"cannot load the weights .*safetensors"):
        load_model(str(folder))


def _sources() -> list[Path]:
    return sorted([*(PACKAGE / "sheafprune").rglob("*.py"), *(PACKAGE / "cli").rglob("*.py")])


@pytest.mark.parametrize("pattern", [r"\btorch\.load\b", r"\bpickle\b", r"\bdill\b", r"\bjoblib\b",
                                     r"weights_only\s*=\s*False", r"\bnp\.load\b|\bnumpy\.load\b",
                                     r"allow_pickle", r"yaml\.load\(|yaml\.unsafe_load|yaml\.full_load"])
def test_nothing_is_unpickled(pattern):
    hits = [f"{p.relative_to(PACKAGE)}:{i}: {line.strip()}" for p in _sources()
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(pattern, line)]
    assert not hits, "\n".join(hits)


# --- code shipped in folders ----------------------------------------------------------------------------------
def test_remote_code_is_trusted_only_for_our_own_modeling_file():
    """A call passes trust_remote_code (other than False) only where an export folder is handed to lm-eval, after
    the check that its code is byte for byte the modeling file this sheafprune ships (tested below)."""
    hits = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg == "trust_remote_code" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                        hits.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert [h.split(":")[0] for h in hits] == ["sheafprune/evaluation.py"], hits


def test_loading_an_export_runs_none_of_its_code(export_dir, tmp_path):
    """`sheafprune.exporter.load` uses the packaged class: a hostile modeling_sheaf.py in the folder is never run."""
    from sheafprune.exporter import load

    folder = copy_sheaf(export_dir, tmp_path / "hostile")
    marker = tmp_path / "ran"
    (folder / "modeling_sheaf.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\nraise SystemExit(9)\n")
    model = load(folder)
    assert model(input_ids=torch.tensor([[464, 3797]])).logits.shape == (1, 2, 50257)
    assert not marker.exists()


def test_eval_refuses_an_export_whose_code_is_not_ours(capsys, export_dir, tmp_path):
    folder = copy_sheaf(export_dir, tmp_path / "hostile")
    marker = tmp_path / "ran"
    src = (folder / "modeling_sheaf.py").read_text()
    (folder / "modeling_sheaf.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n" + src)
    refused(capsys, ["eval", folder, "--tasks", "ioi", "--limit", "2"],
            match=r"modeling_sheaf\.py .*is not the one this sheafprune ships.*re-export", root=tmp_path)
    assert not marker.exists()
    folder = copy_sheaf(export_dir, tmp_path / "redirected")
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    edit_json(folder / "config.json", auto_map={"AutoConfig": "evil.C", "AutoModelForCausalLM": "evil.M"})
    refused(capsys, ["eval", folder, "--tasks", "ioi", "--limit", "2"], match=r"auto_map", root=tmp_path)
    assert not marker.exists()


# --- paths inside sheaf and export folders ---------------------------------------------------------------------
NAMES = ["Mary", "John", "Anna", "Paul", "Kate", "Mark", "Lisa", "Tom", "Sara", "Jim"]


def _items(path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"When {a} and {b} went out, {b} gave a drink to", "good": f" {a}",
                                        "bad": f" {b}"}) + "\n" for a in NAMES[:5] for b in NAMES[5:]))
    return path


def test_a_jsonl_sheaf_carries_its_items_and_never_reads_a_path_from_its_json(capsys, gpt2, work):
    """sheaf.json records where a jsonl task's items came from; the folder carries a copy, and only the copy is
    read, so the original may go and an edited path cannot make sheafprune read another file."""
    from sheafprune.exporter import load

    items = _items(work / "items.jsonl")
    sheaf = random_sheaf(gpt2[0], "tiny-gpt2")
    sheaf.meta["task"] = f"jsonl:{items.resolve()}"
    folder = save_sheaf(sheaf, work / "sheaf")
    assert (folder / "task.jsonl").read_text() == items.read_text()
    items.unlink()
    edit_json(folder / "sheaf.json", task="jsonl:/etc/passwd")
    assert load_sheaf(folder).task == f"jsonl:{folder.resolve() / 'task.jsonl'}"
    assert main(["export", str(folder), "--out", str(work / "exp")]) == 0, capsys.readouterr().err
    assert (work / "exp" / "sheaf" / "task.jsonl").is_file() and load(work / "exp") is not None
    for what, spoil in {"no copy": lambda f: (f / "task.jsonl").unlink(),
                        "a copy that links out": lambda f: ((f / "task.jsonl").unlink(),
                                                            (f / "task.jsonl").symlink_to("/etc/passwd"))}.items():
        f = copy_sheaf(folder, work / what.replace(" ", "-"))
        spoil(f)
        refused(capsys, ["export", f, "--out", work / "o"], match=r"has a jsonl task but no task\.jsonl of its own",
                root=work)


def test_eval_of_an_export_never_reads_the_task_path_in_its_json(capsys, export_dir, tmp_path):
    folder = copy_sheaf(export_dir, tmp_path / "exp")
    shutil.rmtree(folder / "sheaf")
    edit_json(folder / "sheaf.json", task="jsonl:/etc/passwd")
    refused(capsys, ["eval", folder], match=r"has no sheaf/ folder holding the items of its task jsonl:/etc/passwd; "
            r"pass --tasks jsonl:PATH", root=tmp_path)
