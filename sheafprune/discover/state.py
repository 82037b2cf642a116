"""Training checkpoints: written atomically (temp name + rename), the two newest kept, and a corrupt newest
one falls back to the previous. Tensors go to safetensors, everything else to JSON: nothing is pickled."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import UserError

KEEP = 2
_REQUIRED = {"step", "optimizer", "config", "curve", "elapsed"}  # what Trainer.resume reads from the JSON


def _flatten_optimizer(state: dict) -> tuple[dict[str, Tensor], dict]:
    tensors, rest = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, s in state["state"].items():
        rest["state"][str(idx)] = {}
        for name, v in s.items():
            if isinstance(v, Tensor):
                tensors[f"opt/{idx}/{name}"] = v.detach().cpu().contiguous()
            else:
                rest["state"][str(idx)][name] = v
    return tensors, rest


def _unflatten_optimizer(tensors: dict[str, Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {int(i): dict(v) for i, v in rest["state"].items()}
    for key, v in tensors.items():
        if key.startswith("opt/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(work_dir: Path, *, step: int, tensors: dict[str, Tensor], optimizer_state: dict,
                    info: dict[str, Any]) -> Path:
    """Write ckpt-{step}.safetensors then ckpt-{step}.json (the JSON is the commit marker)."""
    opt_tensors, opt_rest = _flatten_optimizer(optimizer_state)
    all_tensors = {**{k: v.detach().cpu().contiguous() for k, v in tensors.items()}, **opt_tensors}
    base = work_dir / f"ckpt-{step:08d}"
    tmps = [base.with_name(base.name + ".safetensors.tmp"), base.with_name(base.name + ".json.tmp")]
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        save_file(all_tensors, str(tmps[0]))
        os.replace(tmps[0], base.with_suffix(".safetensors"))
        tmps[1].write_text(json.dumps({**info, "step": step, "optimizer": opt_rest}))
        os.replace(tmps[1], base.with_suffix(".json"))
    except OSError as e:  # disk full, folder gone: the older checkpoints stay valid
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write a checkpoint to {work_dir}: {e.strerror}; free some space and run again with "
                        "--resume (the previous checkpoint is kept)") from None
    for old in sorted(work_dir.glob("ckpt-*.json"))[:-KEEP]:
        old.unlink(missing_ok=True)
        old.with_suffix(".safetensors").unlink(missing_ok=True)
    return base


def load_latest(work_dir: Path) -> Optional[tuple[dict[str, Tensor], dict, dict]]:
    """(tensors, optimizer state, info) of the newest readable checkpoint, or None if there is none."""
    for meta in sorted(work_dir.glob("ckpt-*.json"), reverse=True):
        try:
            info = json.loads(meta.read_text())
            tensors = load_file(str(meta.with_suffix(".safetensors")))
            if not isinstance(info, dict) or not _REQUIRED <= set(info) or info["step"] != int(meta.stem[5:]):
                raise ValueError(f"{meta} lacks {sorted(_REQUIRED)} or names another step")
            opt = _unflatten_optimizer(tensors, info.pop("optimizer"))
        except (OSError, json.JSONDecodeError, SafetensorError, ValueError, KeyError, TypeError, AttributeError):
            continue  # corrupt or half-written: try the previous one
        if not all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point()):
            continue  # NaN/inf logits or optimizer moments: no good state to resume from
        return {k: v for k, v in tensors.items() if not k.startswith("opt/")}, opt, info
    return None
