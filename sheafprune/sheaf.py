"""The Sheaf artifact: mask logits plus what they were learned for, saved as a folder and validated on load.

Folder layout: `sheaf.json` (identity, densities, metrics, resolved config,
versions), `masks.safetensors` (mask logits, keyed as in graph.py, and under `mean/` the values pruned units write
under mean ablation), `metrics.jsonl` (training curve).
The sheaf's deterministic masks keep a unit iff its logit > 0.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .errors import UserError
from .graph import MASK_TYPES, is_mean_key, mask_type, mean_of
from .io import atomic_dir, read_json, write_json

FORMAT = "sheafprune.sheaf/1"
TASK_FILE = "task.jsonl"  # a jsonl:PATH task's items, copied in: a folder never points at files outside itself


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("sheafprune", "torch", "transformers", "accelerate", "safetensors"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


@dataclass
class Sheaf:
    logits: dict[str, Tensor]  # mask key -> logits
    meta: dict[str, Any] = field(default_factory=dict)  # the content of sheaf.json
    curve: list[dict[str, Any]] = field(default_factory=list)  # training curve, one row per step (metrics.jsonl)
    folder: Optional[Path] = None  # the folder it was loaded from (where a jsonl task's items are read)
    means: dict[str, Tensor] = field(default_factory=dict)  # mean/<type>/<l> -> what pruned units write (or empty)

    @property
    def model_name(self) -> str:
        return self.meta["model"]["name"]

    @property
    def fingerprint(self) -> str:
        return self.meta["model"]["fingerprint"]

    @property
    def task(self) -> str:
        """The task spec to load. For a loaded sheaf a jsonl task reads the copy inside its folder, never the
        path sheaf.json records (which names where the items came from and may point anywhere)."""
        spec = self.meta["task"]
        if spec.startswith("jsonl:") and self.folder is not None:
            return f"jsonl:{self.folder / TASK_FILE}"
        return spec

    @property
    def granularity(self) -> list[str]:
        return list(self.meta["granularity"])

    def masks(self) -> dict[str, Tensor]:
        """The deterministic sheaf (keep iff logit > 0), with the mean-ablation values the masked forward reads."""
        return {**{k: (v > 0).float() for k, v in self.logits.items()}, **self.means}

    def complement_masks(self) -> dict[str, Tensor]:
        """Everything the sheaf pruned (only the trained mask types are flipped); pruned units still write their means."""
        return {**{k: (v <= 0).float() for k, v in self.logits.items()}, **self.means}

    def density(self) -> dict[str, float]:
        return density_of({k: (v > 0).float() for k, v in self.logits.items()})


def density_of(masks: dict[str, Tensor]) -> dict[str, float]:
    """Kept fraction per mask type (over all entries of that type)."""
    kept: dict[str, float] = {}
    total: dict[str, int] = {}
    for k, m in masks.items():
        t = mask_type(k)
        kept[t] = kept.get(t, 0.0) + float(m.sum())
        total[t] = total.get(t, 0) + m.numel()
    return {t: kept[t] / total[t] for t in kept}


def save_sheaf(sheaf: Sheaf, out: Path, *, overwrite: bool = False) -> Path:
    """Write the sheaf folder atomically."""
    meta = dict(sheaf.meta)
    meta["format"] = FORMAT
    meta.setdefault("versions", versions())
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in {**sheaf.logits, **sheaf.means}.items()},
                  str(tmp / "masks.safetensors"))
        write_json(tmp / "sheaf.json", meta)
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in sheaf.curve))
        if sheaf.task.startswith("jsonl:"):
            items = Path(sheaf.task[len("jsonl:"):])
            if not items.is_file():
                raise UserError(f"the items file {items} of this sheaf's task is gone; put it back to save the sheaf")
            shutil.copyfile(items, tmp / TASK_FILE)
    return Path(out)


def load_sheaf(path: Path) -> Sheaf:
    """Read and validate a sheaf folder; every problem is a one-line UserError."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"sheaf folder {path} does not exist; run `sheafprune discover ... --out {path}` first")
    exported = any((path / name).exists() for name in ("model.safetensors", "model.onnx", "sheaf"))
    if exported and not (path / "masks.safetensors").exists():
        raise UserError(f"{path} is an export folder, not a sheaf folder; pass the folder `sheafprune discover` wrote"
                        + (f" (this export keeps its sheaf in {path / 'sheaf'})" if (path / "sheaf").is_dir() else ""))
    meta = read_json(path / "sheaf.json", what="sheaf")
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}/sheaf.json has format {meta.get('format')!r}, expected {FORMAT!r}; "
                        "re-run discovery with this version of sheafprune")
    _check_meta(meta, path / "sheaf.json")
    masks_file = path / "masks.safetensors"
    if not masks_file.exists():
        raise UserError(f"{masks_file} is missing; the sheaf folder is incomplete, re-run discovery")
    try:
        logits = load_file(str(masks_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{masks_file} is truncated or corrupt ({e}); re-run discovery") from None
    means = {k: logits.pop(k) for k in list(logits) if is_mean_key(k)}
    for k, v in {**logits, **means}.items():
        try:
            mask_type(mean_of(k) if is_mean_key(k) else k)
        except ValueError:
            raise UserError(f"{masks_file} holds an unknown tensor {k!r}; it is not a sheafprune mask file") from None
        if not torch.isfinite(v).all():
            raise UserError(f"{masks_file}: tensor {k!r} has NaN/inf logits; the file is corrupt, re-run discovery")
    folder = path.resolve()
    if meta["task"].startswith("jsonl:"):
        items = path / TASK_FILE
        if not items.is_file() or items.resolve().parent != folder:  # a symlink may not lead out of the folder
            raise UserError(f"{path} has a jsonl task but no {TASK_FILE} of its own (sheaf folders never read items "
                            f"from outside themselves); re-run discovery with this sheafprune")
    return Sheaf(logits=logits, means=means, meta=meta, curve=_read_curve(path / "metrics.jsonl"), folder=folder)


def _check_meta(meta: dict[str, Any], where: Path) -> None:
    """The keys every reader relies on, with the types it relies on: a damaged file is one UserError here,
    not a KeyError or TypeError deep inside export or eval."""
    for key in ("model", "task", "granularity"):
        if key not in meta:
            raise UserError(f"{where} lacks the key {key!r}; the file is damaged, re-run discovery")
    model = meta["model"]
    if not (isinstance(model, dict) and all(isinstance(model.get(k), str) and model[k] for k in ("name", "fingerprint"))):
        raise UserError(f"{where}: 'model' must be an object with the strings 'name' and 'fingerprint', got "
                        f"{json.dumps(model)[:80]}; the file is damaged, re-run discovery")
    if not isinstance(meta["task"], str) or not meta["task"]:
        raise UserError(f"{where}: 'task' must be a task name, got {json.dumps(meta['task'])[:80]}; re-run discovery")
    gran = meta["granularity"]
    if not (isinstance(gran, list) and gran and all(g in MASK_TYPES for g in gran)):
        raise UserError(f"{where}: 'granularity' must be a list of {', '.join(MASK_TYPES)}, got "
                        f"{json.dumps(gran)[:80]}; re-run discovery")


def _read_curve(path: Path) -> list[dict[str, Any]]:
    """The training curve; informational only, so a missing or damaged file gives what could be read."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def check_sheaf_matches(sheaf: Sheaf, *, expected_shapes: dict[str, tuple[int, ...]], fingerprint: str) -> None:
    """Refuse a sheaf made for another model: fingerprint first, then every mask's shape."""
    if sheaf.fingerprint != fingerprint:
        raise UserError(f"this sheaf was made for model {sheaf.model_name!r} with fingerprint "
                        f"{sheaf.fingerprint[:12]}, not the loaded model ({fingerprint[:12]}); pass the same --model")
    for k, v in {**sheaf.logits, **sheaf.means}.items():
        if k not in expected_shapes or tuple(v.shape) != tuple(expected_shapes[k]):
            raise UserError(f"mask {k!r} has shape {tuple(v.shape)}, the model expects "
                            f"{expected_shapes.get(k)}; the sheaf does not belong to this model")
