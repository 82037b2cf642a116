"""--vocab task, --dtype and --quantize int8 in process, on tiny models: a task-vocabulary model equals its
full-vocabulary self on kept ids (tied and untied head), reads the mean embedding row for any other input id and gives
every other id the lowest float, in torch and in ONNX; the options' bad values and combinations on the command line.
Loading these exports where sheafprune cannot be imported is tested in test_export.py."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_sheaf, refused, tree

from sheafprune.cli.main import main
from sheafprune.errors import UserError
from sheafprune.exporter import export, load
from sheafprune.exporter.hf import held_out_batch
from sheafprune.exporter.onnx import ONNX_TOLERANCE, onnx_logits
from sheafprune.exporter.quantize import int8_warning
from sheafprune.models import gpt2_tokenizer, load_model, tiny_model
from sheafprune.sheaf import save_sheaf

FOREIGN = 30000  # an id no IOI item uses


def _full_and_task(model, tok, tmp_path, name):
    sheaf = make_sheaf(model, name, ("head", "neuron", "edge"), density=0.7)
    export(sheaf, out=tmp_path / "full", model=model, tokenizer=tok)
    info = export(sheaf, out=tmp_path / "task", model=model, tokenizer=tok, vocab="task", formats=["all"])
    ids, mask = held_out_batch(sheaf, tok)
    return load(tmp_path / "full"), load(tmp_path / "task"), info, ids, mask


@pytest.mark.parametrize("tied", [True, False])
def test_task_vocabulary_equals_full_on_kept_ids(tmp_path, tied):
    model = tiny_model("llama", tie_word_embeddings=tied)
    full, task, info, ids, mask = _full_and_task(model, gpt2_tokenizer(), tmp_path, f"tiny-llama-tied-{tied}")
    keep = torch.tensor(task.config.vocab_keep)
    assert task.config.tie_head == tied and (task.lm_head is None) == tied
    assert task.embed.weight.shape[0] == len(keep) + 1 == info["vocab_kept"] + 1 < 1000, task.embed.weight.shape
    assert info["params"] < 0.2 * info["params_original"], info
    with torch.no_grad():
        want, got = full(input_ids=ids, attention_mask=mask).logits, task(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    diff = (got[..., keep] - want[..., keep])[real].abs().max().item()
    print(f"tied={tied}: --vocab task vs full on {len(keep)} kept ids, {int(real.sum())} tokens: max abs diff {diff:.3g}")
    assert diff <= 1e-5 and info["max_abs_diff_vocab"] <= 1e-5, (diff, info["max_abs_diff_vocab"])
    others = torch.ones(got.shape[-1], dtype=torch.bool)
    others[keep] = False
    assert (got[..., others] == torch.finfo(torch.float32).min).all()


def test_foreign_input_id_reads_the_mean_row(tmp_path):
    """A foreign id gives what the full-vocabulary model gives with that id's embedding row set to the mean row."""
    model, tok = load_model("tiny-gpt2")
    full, task, _, ids, mask = _full_and_task(model, tok, tmp_path, "tiny-gpt2")
    assert FOREIGN not in task.config.vocab_keep
    with torch.no_grad():
        full.embed.weight[FOREIGN] = full.embed.weight.double().mean(0).float()
        assert torch.allclose(task.embed.weight[-1], full.embed.weight[FOREIGN], atol=1e-7)
    ids = ids.clone()
    ids[:, -3] = FOREIGN  # a real position in every row (left padding)
    keep = torch.tensor(task.config.vocab_keep)
    with torch.no_grad():
        want, got = full(input_ids=ids, attention_mask=mask).logits, task(input_ids=ids, attention_mask=mask).logits
    diff = (got[..., keep] - want[..., keep])[mask.bool()].abs().max().item()
    print(f"foreign input id {FOREIGN} vs the mean row fed to the full model: max abs diff {diff:.3g}")
    assert diff <= 1e-5, f"max abs diff {diff:.3g}"


def test_task_vocabulary_onnx_equals_torch(tmp_path):
    model, tok = load_model("tiny-gpt2")
    _, task, info, ids, mask = _full_and_task(model, tok, tmp_path, "tiny-gpt2")
    assert info["max_abs_diff_onnx"] <= ONNX_TOLERANCE, info
    ids = ids[:3, 2:].clone()  # another batch than the export's example, with a foreign id
    mask = mask[:3, 2:]
    ids[0, -1] = FOREIGN
    got = onnx_logits(tmp_path / "task" / "model.onnx", input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        want = task(input_ids=ids, attention_mask=mask).logits
    diff = (got - want)[mask.bool()].abs().max().item()
    print(f"--vocab task ONNX vs torch: max abs diff {diff:.3g}")
    assert diff <= ONNX_TOLERANCE, f"max abs diff {diff:.3g}"
    assert (got[..., FOREIGN] == torch.finfo(torch.float32).min).all()
    card = (tmp_path / "task" / "README.md").read_text()
    assert f"kept for {info['vocab_kept']:,} of 50,257 token ids" in card and "lowest float" in card, card


def test_int8_warning_line():
    info = {"test_split": "test", "test_n": 50, "test_accuracy": 0.9, "int8_accuracy_loss": 4.0,
            "files": [{"file": "model.int8.onnx", "accuracy": 0.86}]}
    assert int8_warning(info).startswith("int8 ONNX loses 4.0 points of test accuracy against the fp32 export "
                                         "(0.900 -> 0.860, n=50)")
    assert int8_warning({**info, "int8_accuracy_loss": 2.0}) is None and int8_warning({}) is None


@pytest.fixture(scope="module")
def sheaf_dir(tmp_path_factory):
    model, _ = load_model("tiny-gpt2")
    return save_sheaf(make_sheaf(model, "tiny-gpt2"), tmp_path_factory.mktemp("sheaf") / "sheaf")


@pytest.mark.parametrize("flags, match", [
    (["--dtype", "float8"], r"argument --dtype: invalid choice: 'float8'"),
    (["--vocab", "foo"], r"argument --vocab: invalid choice: 'foo'"),
    (["--quantize", "int4"], r"argument --quantize: invalid choice: 'int4'"),
    (["--dtype", "bfloat16", "--format", "onnx"], r"--dtype bfloat16 casts model.safetensors.*use --format all"),
])
def test_cli_refuses_bad_options(capsys, tmp_path, sheaf_dir, flags, match):
    refused(capsys, ["export", sheaf_dir, "--out", tmp_path / "o", *flags], match=match, root=tmp_path)


def test_library_refuses_bad_options(tmp_path):
    model, tok = load_model("tiny-gpt2")
    for kw, match in ((dict(dtype="float8"), "unknown --dtype 'float8'"), (dict(vocab="foo"), "unknown --vocab")):
        with pytest.raises(UserError, match=match):
            export(make_sheaf(model, "tiny-gpt2"), out=tmp_path / "x", model=model, tokenizer=tok, **kw)
    assert tree(tmp_path) == set()


def test_cli_quantize_with_safetensors_adds_onnx(capsys, tmp_path, sheaf_dir):
    out = tmp_path / "e"
    assert main(["export", str(sheaf_dir), "--out", str(out), "--format", "safetensors", "--quantize", "int8",
                 "--dtype", "bfloat16", "--vocab", "task"]) == 3  # the random sheaf misses the floor
    printed = capsys.readouterr().out
    assert "note: --quantize int8 writes model.onnx too" in printed, printed
    assert all((out / f).is_file() for f in ("model.safetensors", "model.onnx", "model.int8.onnx"))
    info = json.loads((out / "sheaf.json").read_text())["export"]
    assert [r["file"] for r in info["files"]] == ["model.safetensors", "model.onnx", "model.int8.onnx"], info
    assert info["dtype"] == "bfloat16" and info["vocab"] == "task", info
    b, t = info["latency_batch"]
    assert f"model.int8.onnx: {info['bytes_int8']:,} bytes" in printed and f"batch of {b} x {t} tokens" in printed
    assert ("warning: int8 ONNX loses" in printed) == (info["int8_accuracy_loss"] > 2), printed
    card = (out / "README.md").read_text()
    assert f"CPU latency (batch {b} x {t} tokens of the task's prompts)" in card, card
