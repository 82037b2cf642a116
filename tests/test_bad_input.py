"""Bad input on the command line ends in one `error: ...` line (exit 2), no traceback and nothing written: unknown
model and task names, folders that are not models, malformed task files, option values out of range and bad config
files.

Most cases run the CLI in-process (`main(argv)`, the same code the entry point runs, ~4 s cheaper per case);
a few run the installed `sheafprune` to prove the exit code and stderr of the real process.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from conftest import SHEAFPRUNE, refused

from sheafprune.errors import UserError
from sheafprune.sheaf import load_sheaf

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
    (["--recipe", "relu"], r"invalid choice: 'relu'"),
    (["--recipe", "joint"], r"--recipe joint trains toward --target-density"),
    (["--preset", "paper"], r"invalid choice: 'paper'"),
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
    for text, match in [("recipe: margin\n", r"unknown recipe 'margin'; use one of joint, discogp"),
                        ("faith_loss: kl\n", r"unknown config key\(s\) faith_loss; known: "),
                        ("control: project\n", r"unknown config key\(s\) control; known: ")]:
        (work / "opt.yaml").write_text(text)
        refused(capsys, [*base, work / "opt.yaml"], match=match, root=work)
    (work / "preset.yaml").write_text("preset: paper\n")
    refused(capsys, [*base, work / "preset.yaml"], match=r"unknown preset 'paper'; use one of default, discogp", root=work)
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
