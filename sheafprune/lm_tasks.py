"""Our tasks as lm-eval tasks: each name becomes a task YAML plus a JSON-lines data file, written into one
include folder with absolute paths, so lm-eval (Python API or the plain `lm_eval` CLI with --include_path)
scores them offline.

Names and what they become (lm-eval task name in brackets):
- `blimp_<paradigm>`, lm-eval's own BLiMP name: all 1000 pairs of the vendored copy in file order, scored
  by lm-eval's own BLiMP template (read from the installed lm-eval) [sheafprune_blimp_<paradigm>];
- `blimp/<paradigm>`: the same scoring on the test split of our task [sheafprune_blimp_<paradigm>_test];
- `ioi`, `capitals`, `jsonl:PATH`: multiple choice over the candidates on the test split, each candidate
  scored by lm-eval's log-likelihood of the whole continuation [sheafprune_<name>_test].
Test splits are cut as discovery cuts them (`splits` passes a sheaf's seed and item count), so a sheaf is
judged on items it never trained on. Any other name is left to lm-eval's own task index.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from sheafprune.tasks import Item, is_task_spec, load_task
from sheafprune.tasks import blimp

PREFIX = "sheafprune_"
BLIMP_BUILTIN = "blimp_"  # lm-eval's names: blimp_<paradigm>
# Keys of lm-eval's BLiMP template that name its hub dataset; everything else (prompt, choices, target,
# metric) is kept as lm-eval ships it.
_TEMPLATE_SOURCE_KEYS = ("dataset_path", "dataset_name", "validation_split", "test_split", "training_split")
_ACC = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]


@dataclass(frozen=True)
class LmTask:
    """One requested name and the lm-eval task it runs as."""

    requested: str  # as the user wrote it
    lm_name: str  # the lm-eval task name
    source: str  # "generated" (our YAML, offline) or "lm-eval" (lm-eval's own index)
    n_docs: int | None = None  # documents written (generated tasks)
    split: str | None = None  # "test" or "all" (generated tasks)


def is_ours(name: str) -> bool:
    """Whether `name` is a task this module generates (else it is left to lm-eval)."""
    if is_task_spec(name):
        return True
    return name.startswith(BLIMP_BUILTIN) and name[len(BLIMP_BUILTIN):] in blimp.paradigms()


def blimp_template() -> dict[str, Any]:
    """lm-eval's BLiMP task template (`lm_eval/tasks/blimp/_template_yaml`), minus its dataset source."""
    import lm_eval

    text = resources.files(lm_eval).joinpath("tasks", "blimp", "_template_yaml").read_text(encoding="utf-8")
    return {k: v for k, v in yaml.safe_load(text).items() if k not in _TEMPLATE_SOURCE_KEYS}


def _slug(name: str) -> str:
    if name.startswith("jsonl:"):
        path = Path(name[len("jsonl:"):]).expanduser().resolve()
        stem = re.sub(r"\W+", "_", path.stem).strip("_").lower() or "items"
        return f"jsonl_{stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:6]}"
    return re.sub(r"\W+", "_", name).strip("_")


def _docs(name: str, *, seed: int, n: int | None) -> tuple[list[dict[str, Any]], str, bool]:
    """(documents, split, whole-sentence?) for one of our names."""
    if name.startswith(BLIMP_BUILTIN):
        rows = blimp.read_paradigm(name[len(BLIMP_BUILTIN):])
        return [{"sentence_good": r["sentence_good"], "sentence_bad": r["sentence_bad"]} for r in rows], "all", True
    task = load_task(name, seed=seed, n=n)
    if task.kind == "sentence":  # whole-sentence pairs, scored as lm-eval scores BLiMP
        return [{"sentence_good": it.candidates[0], "sentence_bad": it.candidates[1]} for it in task.items("test")], \
            "test", True
    # Next-word tasks (ioi, capitals, jsonl, and one-prefix BLiMP paradigms) are scored on the same test items and
    # the same next-word choice as the sheaf was trained on, so `blimp/<p>` means one thing in every report;
    # lm-eval's own whole-sentence benchmark is `blimp_<p>`.
    items: list[Item] = task.items("test")
    return [{"prompt": it.prompt, "choices": list(it.candidates), "target": it.target} for it in items], "test", False


def _config(lm_name: str, data: Path, *, sentence: bool, cache: Path) -> dict[str, Any]:
    source = {
        "task": lm_name,
        "dataset_path": "json",
        # An absolute path: lm-eval resolves relative data paths against the current folder. The datasets
        # cache lives in the include folder too, so nothing is written under HF_HOME.
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}, "cache_dir": str(cache.resolve())},
        "test_split": "test",
    }
    if sentence:
        return {**blimp_template(), **source}
    return {
        **source,
        "output_type": "multiple_choice",
        "doc_to_text": "prompt",
        "doc_to_choice": "choices",
        "doc_to_target": "target",
        # Our candidates carry their own leading space (" Mary"); lm-eval's default delimiter would add another.
        "target_delimiter": "",
        "num_fewshot": 0,
        "metric_list": _ACC,
        "metadata": {"version": 1.0},
    }


def write_task(name: str, folder: Path, *, seed: int = 0, n: int | None = None) -> LmTask:
    """Write `<lm name>.yaml` and `<lm name>.jsonl` for one of our names into `folder`."""
    lm_name = PREFIX + (name if name.startswith(BLIMP_BUILTIN) else _slug(name) + "_test")
    docs, split, sentence = _docs(name, seed=seed, n=n)
    data = folder / f"{lm_name}.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    config = _config(lm_name, data, sentence=sentence, cache=folder / ".datasets-cache")
    (folder / f"{lm_name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True),
                                            encoding="utf-8")
    return LmTask(requested=name, lm_name=lm_name, source="generated", n_docs=len(docs), split=split)


def write_tasks(names: list[str], folder: Path, *, splits: Mapping[str, tuple[int, int | None]] | None = None
                ) -> list[LmTask]:
    """Write every one of our names into `folder`; `splits` maps a name to its (seed, n), default (0, None)."""
    folder.mkdir(parents=True, exist_ok=True)
    splits = splits or {}
    return [write_task(name, folder, seed=splits.get(name, (0, None))[0], n=splits.get(name, (0, None))[1])
            for name in names]
