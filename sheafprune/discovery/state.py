"""The training state on disk: checkpoints of a Trainer, and resuming one from them.

Checkpoints are written atomically (temp name + rename), the two newest kept, and a corrupt newest one falls back
to the previous. Tensors go to safetensors, everything else to JSON: nothing is pickled. A checkpoint always holds
the full state (sharded logits are gathered), so a run resumes with or without shard_masks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import UserError
from .schedule import stage_at
from .step import make_optimizer

if TYPE_CHECKING:
    from .loop import Trainer

KEEP = 2
_REQUIRED = {"step", "optimizer", "config", "curve", "elapsed"}  # what resume reads from the JSON


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


def checkpoint(t: Trainer) -> None:
    """Save the trainer's state: logits, best sheaf, optimizer, curve (a collective where sharded)."""
    # Sharded logits are gathered (every rank takes part), so a checkpoint always holds the full state.
    tensors = {f"logits/{k}": v for k, v in t.params.gather_full(t.params.named_logits()).items()}
    best = t.select.best
    if best is not None:
        tensors.update({f"best/{k}": v for k, v in t.params.gather_full(best["logits"]).items()})
    opt_state = t.params.gather_state(t.optimizer.state_dict(), t.optimizer)
    if not t.acc.is_main_process:
        return
    best = None if best is None else {k: v for k, v in best.items() if k != "logits"}
    save_checkpoint(t.work_dir, step=t.step, tensors=tensors, optimizer_state=opt_state,
                    info={"config": t.cfg.to_dict(), "curve": t.curve, "best": best, "elapsed": t.elapsed})


def resume(t: Trainer) -> bool:
    """Load the newest checkpoint of the trainer's work_dir into it; False if there is none."""
    found = load_latest(t.work_dir)
    if found is None:
        return False
    tensors, opt_state, info = found
    saved = dict(info["config"])
    now = t.cfg.to_dict()
    # shard_masks may differ: a checkpoint holds the full state either way.
    differ = sorted(k for k in now if k not in ("steps", "early_stop", "max_minutes", "shard_masks")
                    and saved.get(k, False if k == "shard_masks" else None) != now[k])
    if differ:
        raise UserError(f"--resume: the checkpoint in {t.work_dir} was made with different options "
                        f"({', '.join(differ)}); use the same options or drop --resume")
    with torch.no_grad():
        mine = t.params.local({k: tensors[f"logits/{k}"] for k in t.params.keys})
        for k, p in t.params.named_logits().items():
            p.copy_(mine[k])
    t.step, t.curve, t.elapsed = int(info["step"]), list(info["curve"]), float(info["elapsed"])
    if info.get("best") is not None:
        best = t.params.local({k[5:]: v for k, v in tensors.items() if k.startswith("best/")})
        t.select.best = {**info["best"], "logits": dict(best)}
    stage, _ = stage_at(t.stages, t.step)
    t.optimizer = make_optimizer(t.cfg, t.params, stage)
    t.optimizer.load_state_dict(t.params.local_state(opt_state, t.optimizer))
    return True
