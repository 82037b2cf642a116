"""`sheafprune eval`: lm-eval numbers equal the plain `lm_eval` CLI's and our own scoring's, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Before lm-eval / datasets are imported: nothing of a test run lands in the user's HF cache.
os.environ.setdefault("HF_HOME", str(Path(tempfile.gettempdir()) / "sheafprune-tests-hf"))

import pytest
import torch

from sheafprune.arch import view_of
from sheafprune.cli.main import main
from sheafprune.errors import UserError
from sheafprune.evaluation import evaluate
from sheafprune.exporter import export
from sheafprune.lm_tasks import write_tasks
from sheafprune.masked import mask_shapes, masked_forward
from sheafprune.models import fingerprint, load_model
from sheafprune.sheaf import Sheaf, load_sheaf, save_sheaf
from sheafprune.tasks import Task, encode, score
from sheafprune.tasks import blimp

PARADIGM = "regular_plural_subject_verb_agreement_1"
LIMIT = 32


def _write_sheaf(folder: Path, model_name: str, *, logits_fn, task: str = "ioi") -> Path:
    model, _ = load_model(model_name)
    shapes = mask_shapes(view_of(model), ["weight", "edge"])
    gen = torch.Generator().manual_seed(0)
    sheaf = Sheaf(logits={k: logits_fn(s, gen) for k, s in shapes.items()}, meta={
        "model": {"name": model_name, "fingerprint": fingerprint(model)},
        "task": task, "granularity": ["weight", "edge"], "config": {"seed": 0, "n_items": None}})
    return save_sheaf(sheaf, folder)


def _acc(report: dict, task: str) -> float:
    return report["results"][task]["acc,none"]


def test_eval_of_an_export_matches_plain_lm_eval_cli_and_the_sheaf(tmp_path, capsys):
    """Same export folder, same tasks: `sheafprune eval` = `lm_eval --model hf ...` = the masked sheaf folder."""
    sheaf_dir = _write_sheaf(tmp_path / "sheaf", "tiny-gpt2", logits_fn=lambda s, g: torch.randn(s, generator=g) + 0.5)
    folder = tmp_path / "export"
    export(load_sheaf(sheaf_dir), out=folder)
    tasks = [f"blimp_{PARADIGM}", "ioi"]
    out = tmp_path / "eval.json"
    args = ["eval", str(folder), "--tasks", ",".join(tasks), "--limit", str(LIMIT), "--batch-size", "8"]
    assert main([*args, "--out", str(out)]) == 0
    ours = json.loads(out.read_text())
    assert f"blimp_{PARADIGM}" in capsys.readouterr().out  # the table
    assert ours["evaluated"]["kind"] == "export" and ours["export"]["max_abs_diff"] <= 1e-5
    assert ours["sheaf_metrics"]["task"] == "ioi"  # from the export's sheaf/ subfolder

    include = tmp_path / "include"
    lm_names = [t.lm_name for t in write_tasks(tasks, include)]
    lm_eval = Path(sys.executable).with_name("lm_eval")
    cmd = [str(lm_eval), "--model", "hf", "--model_args", f"pretrained={folder},trust_remote_code=True",
           "--include_path", str(include), "--tasks", ",".join(lm_names), "--limit", str(LIMIT),
           "--batch_size", "8", "--device", "cpu", "--output_path", str(tmp_path / "lm_eval_out")]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = json.loads(next((tmp_path / "lm_eval_out").rglob("results*.json")).read_text())["results"]
    via_sheaf = evaluate(sheaf_dir, tasks=tasks, limit=LIMIT, batch_size=8, progress=False)
    for task, lm_name in zip(tasks, lm_names):
        assert _acc(ours, task) == theirs[lm_name]["acc,none"], f"{task}: {_acc(ours, task)} vs {theirs[lm_name]}"
        assert _acc(ours, task) == _acc(via_sheaf, task), f"{task}: export {_acc(ours, task)} vs sheaf folder"
        assert ours["results"][task]["sample_len"] == LIMIT


def _our_blimp_scores(model_name: str, masks: dict, n: int) -> torch.Tensor:
    """(n, 2) sentence log-probs by sheafprune's own whole-sentence scoring (tasks.score), masked forward."""
    model, tokenizer = load_model(model_name)
    items = [blimp.to_item(row, "sentence") for row in blimp.read_paradigm(PARADIGM)[:n]]
    task = Task(name=f"blimp/{PARADIGM}", kind="sentence", splits={"test": items})
    batch = encode(task, items, tokenizer)
    with torch.no_grad():
        logits = masked_forward(view_of(model), batch.input_ids, attention_mask=batch.attention_mask,
                                position_ids=batch.position_ids, masks=masks)  # (2n, T, V)
    return score(logits, batch)  # (n, 2) good, bad


def test_sheaf_folder_runs_through_the_masked_model(tmp_path):
    """A random sheaf of the GQA model: lm-eval's BLiMP accuracy (offline, built-in name) equals our scoring."""
    folder = _write_sheaf(tmp_path / "sheaf", "tiny-llama", logits_fn=lambda s, g: torch.randn(s, generator=g) + 0.5)
    report = evaluate(folder, tasks=[f"blimp_{PARADIGM}"], limit=LIMIT, batch_size=16, progress=False)
    scores = _our_blimp_scores("tiny-llama", load_sheaf(folder).masks(), LIMIT)
    ours = float((scores[:, 0] > scores[:, 1]).float().mean())
    full_scores = _our_blimp_scores("tiny-llama", {}, LIMIT)
    full = float((full_scores[:, 0] > full_scores[:, 1]).float().mean())
    assert ours != full, "this sheaf must score differently from the full model, or the test proves nothing"
    margin = (scores[:, 0] - scores[:, 1]).abs()  # (n,)
    near_ties = int((margin < 1e-4).sum())  # the two implementations may order these differently
    got = _acc(report, f"blimp_{PARADIGM}")
    assert abs(got - ours) <= near_ties / LIMIT, f"lm-eval {got} vs ours {ours}; smallest margin {margin.min():.2e}"
    m = report["sheaf_metrics"]
    assert m["task"] == "ioi" and m["split"] == "test" and m["n"] == LIMIT  # --limit caps the sheaf metrics too
    assert report["evaluated"]["kind"] == "sheaf" and report["sheaf"]["task"] == "ioi"


def test_all_ones_sheaf_equals_full_model(tmp_path):
    folder = _write_sheaf(tmp_path / "sheaf", "tiny-gpt2", logits_fn=lambda s, g: torch.full(s, 3.0))
    tasks = [f"blimp_{PARADIGM}", "ioi", f"blimp/{PARADIGM}"]
    via_sheaf = evaluate(folder, tasks=tasks, limit=LIMIT, batch_size=16, progress=False)
    full = evaluate("tiny-gpt2", tasks=tasks, limit=LIMIT, batch_size=16, progress=False)
    for task in tasks:
        assert _acc(via_sheaf, task) == _acc(full, task), f"{task}: {_acc(via_sheaf, task)} vs {_acc(full, task)}"
    assert via_sheaf["sheaf_metrics"]["task"] == "ioi"  # the sheaf's own task, then our other tasks asked for
    assert list(via_sheaf["sheaf_metrics_by_task"]) == ["ioi", f"blimp/{PARADIGM}"]
    for m in via_sheaf["sheaf_metrics_by_task"].values():
        assert m["sheaf_accuracy"] == m["full_accuracy"] and m["kl"] == pytest.approx(0.0, abs=1e-6), m
    assert full["sheaf_metrics"] is None and full["model"]["fingerprint"] == via_sheaf["model"]["fingerprint"]


def test_unknown_task_is_one_line_error_before_loading(capsys):
    start = time.perf_counter()
    assert main(["eval", "tiny-gpt2", "--tasks", "no_such_task_anywhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown task 'no_such_task_anywhere'") and "\n" not in err, err
    with pytest.raises(UserError, match="unknown BLiMP paradigm"):
        evaluate("tiny-gpt2", tasks="blimp/no_such_paradigm")
    with pytest.raises(UserError, match="no task of its own"):
        evaluate("tiny-gpt2")
    print(f"unknown-task checks took {time.perf_counter() - start:.1f} s")


def test_unreachable_lm_eval_dataset_is_user_error(monkeypatch):
    """An lm-eval task whose dataset is on the hub: refused at once when the hub is unreachable, or (with
    HF_HUB_OFFLINE set, as in CI) as soon as datasets finds it missing from the HF cache."""
    monkeypatch.setattr("sheafprune.evaluation._hub_reachable", lambda: False)
    with pytest.raises(UserError, match="cannot be reached|cannot load the dataset of lm-eval task"):
        evaluate("tiny-gpt2", tasks=["arc_easy"])


@pytest.mark.slow
def test_smollm2_blimp_matches_stock_lm_eval():
    """Measured with the plain lm_eval CLI: stock lm-eval scores SmolLM2-135M at 78.1% on this paradigm."""
    report = evaluate("smollm2-135m", tasks=[f"blimp_{PARADIGM}"], batch_size=32)
    assert _acc(report, f"blimp_{PARADIGM}") == pytest.approx(0.781, abs=0.005)


def test_sheaf_metrics_add_the_answer_balanced_accuracy_where_answers_are_skewed(tmp_path):
    from sheafprune.discovery.objective import sheaf_metrics, split_scores
    from sheafprune.tasks import answer_weights, load_task

    # Two-way items whose right answer is " yes" 3 times in 4.
    rows = [{"prompt": f"Item {i} is", "good": " yes" if i % 4 else " no", "bad": " no" if i % 4 else " yes"}
            for i in range(200)]
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tok = load_model("tiny-gpt2")
    view = view_of(model)
    task = load_task(f"jsonl:{path}", tok, seed=0)
    shapes = mask_shapes(view, ["edge"])
    m = sheaf_metrics(view, tok, task, {k: torch.ones(s) for k, s in shapes.items()},
                      {k: torch.zeros(s) for k, s in shapes.items()}, split="test")
    weights = torch.tensor(answer_weights(task.items("test"), measure=True))
    scores, target = split_scores(view, tok, task, None, split="test")
    right = (scores.argmax(-1) == target).float()
    expected = float((right * weights).sum() / weights.sum())
    assert m["full_balanced_accuracy"] == pytest.approx(expected, abs=1e-6), (m, expected)
    assert m["sheaf_balanced_accuracy"] == pytest.approx(expected, abs=1e-6), "the all-ones sheaf is the full model"
    assert m["full_balanced_accuracy"] != pytest.approx(m["full_accuracy"], abs=1e-3), \
        f"raw {m['full_accuracy']} = balanced {m['full_balanced_accuracy']}: this model would not test the weights"
