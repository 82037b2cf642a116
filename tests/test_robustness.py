"""Bad input ends in one `error: ...` line (exit 2), no traceback and nothing written; a full or unwritable disk
leaves no partial files; nothing is unpickled and no foreign code is run.

Most cases run the CLI in-process (`main(argv)`, the same code the entry point runs, ~4 s cheaper per case);
a few run the installed `sheafprune` to prove the exit code and stderr of the real process.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import SHEAFPRUNE, copy_sheaf, edit_json, random_sheaf, refused
from safetensors.torch import save_file

from sheafprune.cli.main import main
from sheafprune.errors import UserError
from sheafprune.models import load_model
from sheafprune.sheaf import load_sheaf, save_sheaf

PACKAGE = Path(__file__).resolve().parents[1]
ITEM = '{"prompt": "When Mary and John went out, John gave a drink to", "good": " Mary", "bad": " John"}'


# --- the real process ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, match", [
    (["discover", "--model", "no-such-model", "--task", "ioi"], r"unknown model 'no-such-model'.*use one of"),
    (["export", "x", "--format", "zip", "--out", "o"], r"invalid choice: 'zip'.*--help"),
])
def test_installed_command_exit_code_and_one_line(argv, match, tmp_path):
    proc = subprocess.run([str(SHEAFPRUNE), *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(match, lines[0]), proc.stderr
    assert list(tmp_path.iterdir()) == []


# --- models ----------------------------------------------------------------------------------------------------
def test_bad_models(capsys, work, export_dir):
    discover = ["discover", "--task", "ioi", "--steps", "1", "--out", work / "o"]
    refused(capsys, [*discover, "--model", "tiny-gtp2"], match=r"unknown model 'tiny-gtp2': did you mean 'tiny-gpt2'",
            root=work)
    (work / "notamodel").mkdir()
    (work / "notamodel" / "weights.txt").write_text("hello")
    refused(capsys, [*discover, "--model", work / "notamodel"], match=r"not a model folder \(it has no config\.json\)",
            root=work)
    (work / "bert").mkdir()
    (work / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    refused(capsys, [*discover, "--model", work / "bert"], match=r"is a 'bert' model; sheafprune supports the "
            r"families gpt2, llama", root=work)
    refused(capsys, [*discover, "--model", work / "bert" / "config.json"], match=r"is a file, not a model folder",
            root=work)
    # An export folder is a model folder of its own kind: say what it is and what to pass instead.
    refused(capsys, [*discover, "--model", export_dir], match=r"is a sheafprune export.*'tiny-gpt2'", root=work)


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


# --- tasks -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, match", [
    (None, r"task file not found: .*items\.jsonl"),
    ("", r"task file .*items\.jsonl is empty; put one JSON object a line"),
    (f"{ITEM}\nnot json\n", r"items\.jsonl:2: not valid JSON"),
    (f"{ITEM}\n{ITEM}\n" + '{"prompt": "The capital of France is", "good": " Paris"}\n',
     r"items\.jsonl:3: missing field 'bad'"),
    ('{"text": "hello"}\n', r"items\.jsonl:1: has neither 'good'/'bad' nor 'answer'"),
])
def test_bad_jsonl_task(capsys, work, content, match):
    path = work / "items.jsonl"
    if content is not None:
        path.write_text(content)
    refused(capsys, ["discover", "--model", "tiny-gpt2", "--task", f"jsonl:{path}", "--out", work / "o"],
            match=match, root=work)


@pytest.mark.parametrize("task, match", [
    ("nope", r"unknown task 'nope'.*valid tasks are ioi, capitals"),
    ("items.jsonl", r"for your own items file write jsonl:items\.jsonl"),
    ("blimp/anaphor_gender_agreemnt", r"unknown BLiMP paradigm .*did you mean blimp/anaphor_gender_agreement"),
    ("blimp", r"blimp needs a paradigm"),
])
def test_unknown_tasks(capsys, work, task, match):
    refused(capsys, ["discover", "--model", "tiny-gpt2", "--task", task, "--out", work / "o"], match=match, root=work)


def test_candidates_that_tokenize_to_nothing(capsys, work, gpt2):
    """A tokenizer without byte fallback drops characters it does not know; such a candidate is named by line."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<eos>", *"abcdefghijklmnopqrstuvwxyzMJ ,."])}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no unk token: unknown characters vanish
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    folder = work / "smallvocab"
    gpt2[0].save_pretrained(folder)
    tok.save_pretrained(folder)
    items = work / "items.jsonl"
    items.write_text(f"{ITEM}\n" + '{"prompt": "Mary and John went to the", "good": "\u4e2d\u6587", "bad": " shop"}\n')
    refused(capsys, ["discover", "--model", folder, "--task", f"jsonl:{items}", "--out", work / "o"],
            match=r"items\.jsonl:2: ' 中文' tokenizes to nothing; give text the tokenizer can encode", root=work,
            progress=True)


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


# --- options ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, match", [
    (["--target-density", "weight=0,edge=0.1"], r"target density weight=0.0 is outside \(0, 1\]"),
    (["--target-density", "edge=1.5"], r"target density edge=1.5 is outside \(0, 1\]"),
    (["--target-density", "edge=-0.1"], r"outside \(0, 1\]"),
    (["--target-density", "edge=nan"], r"outside \(0, 1\]"),
    (["--target-density", "edge"], r"bad --target-density 'edge'; write it as weight=0.03,edge=0.03"),
    (["--steps", "-3"], r"--steps must be a positive integer, got -3"),
    (["--steps", "0"], r"--steps must be a positive integer"),
    (["--batch-size", "0"], r"--batch-size must be a positive integer, got 0"),
    (["--lr", "0"], r"--lr must be positive"),
    (["--lr", "nan"], r"--lr must be"),
    (["--n-items", "0"], r"n must be a positive number of items|--n-items must be"),
    (["--granularity", "weight,layer"], r"unknown granularity layer; use any of weight,neuron,head,edge"),
    (["--granularity", ","], r"unknown granularity \(empty\)"),
    (["--gate", "relu"], r"invalid choice: 'relu'"),
    (["--steps", "many"], r"invalid int value: 'many'"),
])
def test_option_values_out_of_range(capsys, work, extra, match):
    refused(capsys, ["discover", "--model", "tiny-gpt2", "--task", "ioi", "--out", work / "o", *extra],
            match=match, root=work)


def test_config_file_problems(capsys, work):
    base = ["discover", "--model", "tiny-gpt2", "--out", work / "o", "--config"]
    refused(capsys, [*base, work / "missing.yaml"], match=r"config file .*missing\.yaml does not exist", root=work)
    (work / "bad.yaml").write_text("steps: [1,\n")
    refused(capsys, [*base, work / "bad.yaml"], match=r"is not valid YAML", root=work)
    (work / "typo.yaml").write_text("stepz: 3\n")
    refused(capsys, [*base, work / "typo.yaml"], match=r"unknown config key\(s\) stepz; known: ", root=work)
    (work / "neg.yaml").write_text("checkpoint_every: -1\n")
    refused(capsys, [*base, work / "neg.yaml"], match=r"--checkpoint-every must be a positive integer", root=work)
    (work / "type.yaml").write_text("steps: lots\n")
    refused(capsys, [*base, work / "type.yaml"], match=r"steps", root=work)
    for text, match in [("lr_final: 0.5\n", r"lr_final must be a number in \[0, lr=0.1\]"),
                        ("ramp: quadratic\n", r"unknown ramp 'quadratic'; use one of linear, cubic"),
                        ("control: pid\n", r"unknown control 'pid'; use one of kept, project")]:
        (work / "opt.yaml").write_text(text)
        refused(capsys, [*base, work / "opt.yaml"], match=match, root=work)
    (work / "shard.yaml").write_text("shard_masks: maybe\n")
    refused(capsys, [*base, work / "shard.yaml"], match=r"shard_masks must be true or false, got 'maybe'", root=work)


def test_bad_export_format_and_eval_options(capsys, work, sheaf_dir):
    refused(capsys, ["export", sheaf_dir, "--format", "gguf", "--out", work / "o"], match=r"invalid choice: 'gguf'",
            root=work)
    from sheafprune.exporter import export

    with pytest.raises(UserError, match=r"unknown export format gguf; use one of safetensors\|onnx\|all"):
        export(load_sheaf(sheaf_dir), out=work / "o", formats=["gguf"])
    refused(capsys, ["eval", sheaf_dir, "--limit", "0"], match=r"--limit must be a positive number", root=work)
    refused(capsys, ["eval", sheaf_dir, "--batch-size", "0"], match=r"--batch-size must be positive", root=work)
    refused(capsys, ["eval", sheaf_dir, "--out", "/dev/null/report.json"],
            match=r"cannot write to /dev/null/report\.json: /dev/null is not a folder; choose a writable --out", root=work)
    refused(capsys, ["eval", sheaf_dir, "--out", work], match=r"is a folder; give the JSON file to write", root=work)


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


# --- security --------------------------------------------------------------------------------------------------
def _sources() -> list[Path]:
    return sorted([*(PACKAGE / "sheafprune").rglob("*.py"), *(PACKAGE / "cli").rglob("*.py")])


@pytest.mark.parametrize("pattern", [r"\btorch\.load\b", r"\bpickle\b", r"\bdill\b", r"\bjoblib\b",
                                     r"weights_only\s*=\s*False", r"\bnp\.load\b|\bnumpy\.load\b",
                                     r"allow_pickle", r"yaml\.load\(|yaml\.unsafe_load|yaml\.full_load"])
def test_nothing_is_unpickled(pattern):
    hits = [f"{p.relative_to(PACKAGE)}:{i}: {line.strip()}" for p in _sources()
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(pattern, line)]
    assert not hits, "\n".join(hits)


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
