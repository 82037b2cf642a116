"""`evaluate`: one verb that judges an export folder, a sheaf folder or a whole model with lm-eval, and a
sheaf by its own metrics (full / sheaf / complement accuracy and KL on its task's test split).

lm-eval does the scoring (its Python API, `simple_evaluate`): export and model folders load through its
HF model class exactly as the plain `lm_eval --model hf` command loads them, so both give the same numbers;
a sheaf folder runs through the masked forward under the sheaf's deterministic masks (`MaskedHFLM`); a
registry name runs the loaded model. Our own tasks become task YAMLs in a temporary include folder
(lm_tasks.py) and never touch the network.
"""

from __future__ import annotations

import datetime
import difflib
import importlib.metadata
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch

from .arch import view_of
from .errors import UserError
from .io import check_writable_parent, read_json, write_json
from .lm_tasks import BLIMP_BUILTIN, LmTask, is_ours, write_tasks
from .masked import masked_forward, sheaf_shapes
from .models import MODELS, SUPPORTED_FAMILIES, fingerprint, load_model
from .sheaf import Sheaf, check_sheaf_matches, load_sheaf, versions
from .tasks import load_task

FORMAT = "sheafprune.eval/1"
DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class Target:
    """What is evaluated: kind "export" | "sheaf" | "model"; `folder` is set for folders lm-eval loads itself."""

    kind: str
    name: str
    folder: Optional[Path] = None
    sheaf: Optional[Sheaf] = None  # the sheaf behind a sheaf or export folder (None: export without sheaf/)
    meta: Optional[dict] = None  # sheaf.json of the folder


def resolve_target(path_or_name: str | os.PathLike) -> Target:
    """Tell an export folder, a sheaf folder, a model folder and a model name apart (models are not loaded)."""
    name = os.fspath(path_or_name)
    path = Path(name).expanduser()
    if name in MODELS or not path.is_dir():  # a registry name wins over a folder, as in load_model
        return Target(kind="model", name=name)
    if (path / "masks.safetensors").exists():
        sheaf = load_sheaf(path)
        return Target(kind="sheaf", name=name, folder=path, sheaf=sheaf, meta=sheaf.meta)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is neither a sheaf folder (masks.safetensors), an export folder nor a model "
                        "folder (config.json); pass one of those or a model name")
    meta = read_json(path / "sheaf.json", what="export") if (path / "sheaf.json").exists() else None
    if meta is None or "export" not in meta:
        return Target(kind="model", name=name, folder=path)
    sheaf = load_sheaf(path / "sheaf") if (path / "sheaf").is_dir() else None
    return Target(kind="export", name=name, folder=path, sheaf=sheaf, meta=meta)


def check_export_code(folder: Path) -> None:
    """lm-eval loads an export with trust_remote_code, i.e. it runs the folder's Python. Allow that only for the
    modeling file this sheafprune ships, byte for byte, named by the auto_map it writes; refuse anything else."""
    from .exporter import hf, modeling_sheaf

    config = read_json(folder / "config.json", what="export")
    if config.get("auto_map") != hf.AUTO_MAP:
        raise UserError(f"{folder}/config.json has auto_map {config.get('auto_map')!r}, not sheafprune's "
                        f"{hf.AUTO_MAP!r}; its code is not ours and is not run: re-export the sheaf with this sheafprune")
    ours = Path(modeling_sheaf.__file__).read_bytes()
    theirs = folder / "modeling_sheaf.py"
    if not theirs.is_file() or theirs.read_bytes() != ours:
        raise UserError(f"{theirs} is missing or is not the one this sheafprune ships, and lm-eval would run it; "
                        "re-export the sheaf with this sheafprune (`sheafprune export SHEAF_DIR --out DIR`)")


def own_task(target: Target) -> Optional[str]:
    """The task of a sheaf or export folder. Read from the sheaf itself where there is one: a jsonl task then
    reads the items copied into the folder, never a path that sheaf.json names."""
    if target.sheaf is not None:
        return target.sheaf.task
    if not target.meta or target.meta["task"].startswith("jsonl:"):
        return None  # a model, or an export without sheaf/ (and so without the jsonl task's items)
    return target.meta["task"]


def _split_params(task: Optional[str], meta: Optional[dict]) -> dict[str, tuple[int, Optional[int]]]:
    """The sheaf's task is cut into splits with discovery's seed and item count, so its test split is held out."""
    if not meta or task is None:
        return {}
    cfg = meta.get("config", {})
    return {task: (int(cfg.get("seed", 0)), cfg.get("n_items"))}


def _hub_reachable() -> bool:
    from .models.hf import _hub_resolvable  # one notion of "the hub is reachable" for models and datasets

    return _hub_resolvable()


def _check_builtin(names: list[str], manager: Any) -> None:
    """Every lm-eval task name exists and its dataset loads; else one UserError, before any model is loaded."""
    for name in names:
        if name not in manager.all_tasks:
            ours = ["ioi", "capitals", "blimp/<paradigm>", "blimp_<paradigm>", "jsonl:PATH"]
            close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UserError(f"unknown task {name!r}: {hint}use one of ours ({', '.join(ours)}) or an lm-eval "
                            "task name (`lm_eval ls tasks` lists them)")
    from huggingface_hub import constants

    # Offline by choice (HF_HUB_OFFLINE): datasets reads its cache and fails fast. Unreachable by accident:
    # datasets would retry for ~25 s before failing, so say so now.
    if not constants.HF_HUB_OFFLINE and not _hub_reachable():
        raise UserError(f"lm-eval task {names[0]!r} needs its dataset from the Hugging Face hub, which cannot be "
                        "reached; run where it can, or set HF_HUB_OFFLINE=1 to use a copy in your HF cache")
    try:
        manager.load(names)
    except (OSError, ValueError) as e:  # ConnectionError and DatasetNotFoundError are OSErrors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot load the dataset of lm-eval task(s) {', '.join(names)} ({first}); "
                        "it must be reachable on the hub or in your HF cache") from None


def prepare_tasks(names: list[str], folder: Path, *, target: Target) -> tuple[list[LmTask], Any]:
    """Write our tasks into `folder` and check lm-eval's; returns the task list and an lm-eval TaskManager."""
    from lm_eval.tasks import TaskManager

    ours = [n for n in names if is_ours(n)]
    builtin = [n for n in names if not is_ours(n)]
    generated = {t.requested: t for t in write_tasks(ours, folder, splits=_split_params(own_task(target), target.meta))}
    # Indexing lm-eval's ~15k built-in tasks takes ~10 s; our tasks alone need only our folder.
    manager = TaskManager(include_path=str(folder), include_defaults=bool(builtin))
    if builtin:
        _check_builtin(builtin, manager)
    return [generated.get(n) or LmTask(requested=n, lm_name=n, source="lm-eval") for n in names], manager


def _require_lm_eval() -> None:
    try:
        importlib.metadata.version("lm-eval")
    except importlib.metadata.PackageNotFoundError:
        raise UserError("`sheafprune eval` needs lm-eval: pip install 'sheafprune[eval]'") from None


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def masked_lm(model: Any, tokenizer: Any, masks: dict[str, torch.Tensor], *, batch_size: int) -> Any:
    """lm-eval's HF model with every forward replaced by the masked forward under fixed `masks`.

    lm-eval calls `_model_call(input_ids)` with no attention mask (it pads on the right and reads only real
    positions), so the masked forward sees exactly what `model(input_ids)` would.
    """
    from lm_eval.models.huggingface import HFLM

    view = view_of(model)
    device_masks = {k: v.to(model.device) for k, v in masks.items()}

    class MaskedHFLM(HFLM):
        def _model_call(self, inps: torch.Tensor, attn_mask: Any = None, labels: Any = None) -> torch.Tensor:
            assert attn_mask is None and labels is None, "the masked forward serves causal LMs only"
            with torch.no_grad():
                return masked_forward(view, inps, masks=device_masks)  # (B, T, V)

        def _model_generate(self, *args: Any, **kwargs: Any) -> Any:
            # model.generate would run the unmasked HF model: refuse rather than report the full model.
            raise UserError("generation tasks cannot run on a sheaf folder; export it (`sheafprune export`) "
                            "and evaluate the export folder")

    return MaskedHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _load_checked(sheaf: Sheaf) -> tuple[Any, Any]:
    """The model a sheaf was made for, refused if its fingerprint or mask shapes differ."""
    model, tokenizer = load_model(sheaf.model_name)
    model.to(_device())
    check_sheaf_matches(sheaf, expected_shapes=sheaf_shapes(view_of(model), sheaf.granularity),
                        fingerprint=fingerprint(model))
    return model, tokenizer


def _folder_lm(target: Target, *, batch_size: int) -> tuple[Any, dict]:
    """Exactly what `lm_eval --model hf --model_args pretrained=DIR[,trust_remote_code=True]` builds. An
    export's remote code is our own modeling_sheaf.py; a foreign model folder's code is not trusted."""
    from lm_eval.models.huggingface import HFLM

    if target.kind == "export" and not (target.folder / "model.safetensors").is_file():
        raise UserError(f"{target.folder} holds no model.safetensors (an ONNX-only export?); lm-eval needs "
                        "it: re-export with --format safetensors or --format all")
    if target.kind == "export":
        check_export_code(target.folder)
    try:
        lm = HFLM(pretrained=str(target.folder), trust_remote_code=target.kind == "export", device=_device(),
                  batch_size=batch_size)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"lm-eval cannot load the model in {target.folder} ({first}); re-create the folder") from None
    ident = {"name": target.name, "folder": str(target.folder.resolve())}
    if lm.model.config.model_type in SUPPORTED_FAMILIES:
        ident["fingerprint"] = fingerprint(lm.model)
    return lm, ident


def make_lm(target: Target, *, batch_size: int, loaded: Optional[tuple[Any, Any]] = None) -> tuple[Any, dict]:
    """(lm-eval model, model identity). `loaded` reuses the (model, tokenizer) of a sheaf target."""
    from lm_eval.models.huggingface import HFLM

    if target.folder is not None and target.kind != "sheaf":
        return _folder_lm(target, batch_size=batch_size)
    if target.kind == "sheaf":
        model, tokenizer = loaded or _load_checked(target.sheaf)
        lm = masked_lm(model, tokenizer, target.sheaf.masks(), batch_size=batch_size)
        return lm, {"name": target.sheaf.model_name, "fingerprint": target.sheaf.fingerprint}
    model, tokenizer = load_model(target.name)
    model.to(_device())
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size), {
        "name": target.name, "fingerprint": fingerprint(model)}


def sheaf_report(sheaf: Sheaf, *, task: str, loaded: tuple[Any, Any], limit: Optional[int], batch_size: int,
                 progress: bool = True) -> dict:
    """Full / sheaf / complement accuracy, KL(sheaf || full) and accuracy kept, on `task`'s test split."""
    from .discovery.objective import sheaf_metrics

    model, tokenizer = loaded
    seed, n = _split_params(sheaf.task, sheaf.meta).get(task, (0, None))
    loaded_task = load_task(task, tokenizer, seed=seed, n=n)
    if limit is not None:
        loaded_task = replace(loaded_task, splits={**loaded_task.splits, "test": loaded_task.items("test")[:limit]})
    if progress:
        print(f"sheaf metrics: {len(loaded_task.items('test'))} test items of {task}, full model, sheaf and "
              "complement ...", file=sys.stderr, flush=True)
    metrics = sheaf_metrics(view_of(model), tokenizer, loaded_task, sheaf.masks(), sheaf.complement_masks(),
                            split="test", batch_size=batch_size, device=model.device)
    return {"task": task, **metrics, "task_notes": loaded_task.notes}


def _task_names(tasks: Optional[str | list[str]], target: Target) -> list[str]:
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    if tasks is None:
        if target.meta is None:
            raise UserError(f"{target.name!r} is a model with no task of its own; pass --tasks, e.g. "
                            "--tasks blimp_anaphor_gender_agreement,ioi")
        if own_task(target) is None:
            raise UserError(f"{target.name} has no sheaf/ folder holding the items of its task "
                            f"{target.meta['task']}; pass --tasks jsonl:PATH with your items file")
        return [own_task(target)]
    names = list(dict.fromkeys(t.strip() for t in tasks if t.strip()))
    if not names:
        raise UserError("--tasks is empty; give task names separated by commas, e.g. --tasks ioi,blimp_causative")
    return names


def _jsonable(obj: Any) -> Any:
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(obj, default=handle_non_serializable))


def _versions() -> dict[str, str]:
    out = versions()
    for pkg in ("lm-eval", "datasets"):
        out[pkg] = importlib.metadata.version(pkg)
    return out


def _report(target: Target, ident: dict, lm_tasks: list[LmTask], raw: dict, metrics: dict[str, dict], *,
            limit: Optional[int], batch_size: int, seconds: dict) -> dict:
    """Everything one evaluation produced, keyed by the task names the user asked for."""
    rename = {t.lm_name: t.requested for t in lm_tasks}
    sheaf_meta = target.meta or {}
    return _jsonable({
        "format": FORMAT,
        "evaluated": {"kind": target.kind, "path_or_name": target.name},
        "model": ident,
        "sheaf": None if not target.meta else {
            "task": sheaf_meta.get("task"), "granularity": sheaf_meta.get("granularity"),
            "density": sheaf_meta.get("density") or (target.sheaf.density() if target.sheaf else None),
            "model": sheaf_meta.get("model"),
            "metrics_at_discovery": sheaf_meta.get("metrics")},
        "export": sheaf_meta.get("export"),
        "tasks": [asdict(t) for t in lm_tasks],
        "results": {rename.get(k, k): v for k, v in raw["results"].items()},
        "sheaf_metrics": metrics.get(target.sheaf.task) if target.sheaf else None,  # the sheaf's own task
        "sheaf_metrics_by_task": metrics,
        "lm_eval": {k: raw[k] for k in ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
                                        "n-samples", "higher_is_better") if k in raw},
        "limit": limit, "batch_size": batch_size, "device": _device(),
        "seconds": seconds,
        "versions": _versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })


def evaluate(path_or_name: str | os.PathLike, *, tasks: Optional[str | list[str]] = None,
             limit: Optional[int] = None, batch_size: Optional[int] = None,
             out: Optional[str | os.PathLike] = None, progress: bool = True) -> dict:
    """Evaluate an export folder, a sheaf folder or a model (name or folder) with lm-eval, plus sheaf metrics.

    `tasks`: names (or one comma-separated string); default the sheaf's own task. `limit`: at most this many
    documents per lm-eval task and test items for the sheaf metrics. `batch_size`: default 32. Returns the report that `out` (a JSON
    file, written atomically) receives.
    """
    _require_lm_eval()
    if out is not None:  # before minutes of evaluation, not after
        if Path(out).is_dir():
            raise UserError(f"--out {out} is a folder; give the JSON file to write, e.g. {Path(out) / 'eval.json'}")
        check_writable_parent(Path(out))
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be a positive number of documents, got {limit}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    from lm_eval import simple_evaluate

    target = resolve_target(path_or_name)
    names = _task_names(tasks, target)
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="sheafprune-eval-") as tmp:
        lm_tasks, manager = prepare_tasks(names, Path(tmp), target=target)  # bad names fail before any loading
        loaded = _load_checked(target.sheaf) if target.sheaf is not None else None
        lm, ident = make_lm(target, batch_size=batch_size, loaded=loaded)
        start = time.perf_counter()
        raw = simple_evaluate(model=lm, tasks=[t.lm_name for t in lm_tasks], task_manager=manager, limit=limit,
                              log_samples=False)
        seconds["lm_eval"] = round(time.perf_counter() - start, 2)
    metrics: dict[str, dict] = {}
    if target.sheaf is not None:
        start = time.perf_counter()
        # The sheaf's own task, then every other task of ours asked for (blimp_<p> is lm-eval's benchmark, not ours).
        own = [target.sheaf.task] + [n for n in names if is_ours(n) and not n.startswith(BLIMP_BUILTIN)]
        for task in dict.fromkeys(own):
            metrics[task] = sheaf_report(target.sheaf, task=task, loaded=loaded, limit=limit,
                                         batch_size=batch_size, progress=progress)
        seconds["sheaf_metrics"] = round(time.perf_counter() - start, 2)
    report = _report(target, ident, lm_tasks, raw, metrics, limit=limit, batch_size=batch_size, seconds=seconds)
    if out is not None:
        _write(Path(out), report)
    return report


def _write(out: Path, report: dict) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, report)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror}; choose a writable --out") from None


def _metric_rows(report: dict) -> list[tuple[str, str, float, Any, Any]]:
    """(task, metric, value, stderr, n) for every numeric lm-eval metric."""
    rows = []
    for task, entry in report["results"].items():
        for key, value in entry.items():
            metric, _, filt = key.partition(",")
            if not filt or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            rows.append((task, metric, float(value), entry.get(f"{metric}_stderr,{filt}"), entry.get("sample_len")))
    return rows


def format_report(report: dict) -> str:
    """The report as a terminal table: lm-eval's metrics per task, then the sheaf metrics."""
    ev, sheaf = report["evaluated"], report.get("sheaf") or {}
    base = (sheaf.get("model") or {}).get("name") or report["model"].get("name")
    lines = [f"{ev['path_or_name']} ({ev['kind']} of {base})" if ev["kind"] != "model" else ev["path_or_name"]]
    split = {t["requested"]: t["split"] or "lm-eval" for t in report["tasks"]}
    rows = _metric_rows(report)
    width = max([len("task")] + [len(r[0]) for r in rows])
    lines.append(f"{'task':<{width}}  {'docs':<7} {'metric':<8} {'value':>7} {'stderr':>7} {'n':>6}")
    for task, metric, value, stderr, n in rows:
        err = f"{stderr:7.4f}" if isinstance(stderr, (int, float)) else f"{'-':>7}"
        lines.append(f"{task:<{width}}  {split.get(task, '-'):<7} {metric:<8} {value:7.4f} {err} "
                     f"{n if n is not None else '-':>6}")
    by_task = report.get("sheaf_metrics_by_task") or {}
    if by_task:
        width = max(len(t) for t in by_task)
        lines.append(f"sheaf metrics (our scoring, test split)\n{'task':<{width}}  {'n':>5} {'full':>6} {'sheaf':>6} "
                     f"{'compl.':>6} {'kept':>7} {'KL(sheaf||full)':>15}")
        for task, m in by_task.items():
            lines.append(f"{task:<{width}}  {m['n']:>5} {m['full_accuracy']:6.3f} {m['sheaf_accuracy']:6.3f} "
                         f"{m['complement_accuracy']:6.3f} {m['accuracy_kept']:7.1%} {m['kl']:15.4f}")
            if "sheaf_balanced_accuracy" in m:  # skewed answers: a fixed order of the answer tokens scores chance here
                lines.append(f"{'  answer-balanced':<{width}}  {'':>5} {m['full_balanced_accuracy']:6.3f} "
                             f"{m['sheaf_balanced_accuracy']:6.3f} {m['complement_balanced_accuracy']:6.3f}")
    elif report.get("export"):
        lines.append("sheaf metrics: none (the export folder has no sheaf/ subfolder)")
    return "\n".join(lines)
