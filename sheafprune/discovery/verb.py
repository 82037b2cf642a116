"""`discover`: the verb that learns a sheaf. Loads the model and task, then either searches for the smallest sheaf
that keeps the task (no density targets: search.py) or trains the mask logits to the given targets (loop.py),
measures the result on the test split, and returns (and optionally writes) the Sheaf."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ..arch import view_of
from ..config import DiscoverConfig
from ..errors import UserError
from ..io import check_out_dir
from ..masked import mask_shapes
from ..models import fingerprint, load_model
from ..sheaf import Sheaf, save_sheaf, versions
from ..tasks import held_out_size, hold_out, load_task
from .loop import Trainer
from .objective import sheaf_metrics
from . import search, select
from .search import KeepSearch, median_step_seconds
from .shard import footprint, mask_logits_for


def work_dir_for(out: Optional[Path]) -> Path:
    """Where checkpoints and the live metrics.jsonl go: a hidden sibling of the output folder."""
    if out is None:
        return Path(tempfile.mkdtemp(prefix="sheafprune-run-"))
    out = Path(out)
    return out.parent / f".{out.name}.run"


def discover(cfg: DiscoverConfig, *, out: Optional[Path] = None, resume: bool = False, overwrite: bool = False,
             progress: bool = True, accelerator=None) -> Sheaf:
    """Learn a sheaf for `cfg.task` on `cfg.model`; write it to `out` (atomically) if given."""
    from accelerate import Accelerator

    started = time.perf_counter()
    if resume and cfg.searches:
        raise UserError("--resume continues a run with --target-density; the keep search is short: run it again")

    # cpu=True on a machine without CUDA makes a torchrun-style launch (WORLD_SIZE > 1) a gloo process group.
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    work_dir = _prepare_work_dir(cfg, acc, out=out, resume=resume, overwrite=overwrite)

    model, tokenizer = load_model(cfg.model)
    model_fingerprint = fingerprint(model)  # before shard_masks replaces the maskable weights by row shards
    view = view_of(model)
    # Built before the model moves to its device: under shard_masks it keeps only this rank's rows of the weights.
    params = mask_logits_for(cfg, view, mask_shapes(view, cfg.granularity), acc)
    model.to(acc.device)
    params.to(acc.device)
    task = load_task(cfg.task, tokenizer, seed=cfg.seed, n=cfg.n_items)
    task = hold_out(task, held_out_size(task, search.SELECT_ITEMS if cfg.searches else select.SELECT_ITEMS))
    for split in ("train", "dev", "test"):
        if not task.items(split):
            raise UserError(f"task {cfg.task!r} has no {split} items; give it more items (--n-items or a bigger file)")

    if cfg.searches:
        sheaf = _search(cfg, view=view, tokenizer=tokenizer, task=task, acc=acc, work_dir=work_dir, started=started,
                        progress=progress, model_fingerprint=model_fingerprint)
    else:
        sheaf = _train(cfg, view=view, tokenizer=tokenizer, task=task, params=params, acc=acc, work_dir=work_dir,
                       started=started, progress=progress, resume=resume, out=out,
                       model_fingerprint=model_fingerprint)
    _finish(sheaf, acc=acc, out=out, work_dir=work_dir, overwrite=overwrite)
    return sheaf


def _prepare_work_dir(cfg: DiscoverConfig, acc, *, out: Optional[Path], resume: bool, overwrite: bool) -> Path:
    """Check the output folder, the batch size and --resume; a fresh run starts from an empty work folder."""
    if out is not None:
        check_out_dir(Path(out), overwrite=overwrite)
    if cfg.batch_size % acc.num_processes:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the {acc.num_processes} processes")
    work_dir = work_dir_for(out)
    has_ckpt = any(work_dir.glob("ckpt-*.json"))
    if resume and not has_ckpt:
        raise UserError(f"--resume: no checkpoint in {work_dir}; run without --resume to start afresh")
    if not resume and acc.is_main_process and work_dir.exists():
        shutil.rmtree(work_dir)  # a fresh run never mixes with an old one's checkpoints
    acc.wait_for_everyone()
    return work_dir


def _train(cfg: DiscoverConfig, *, view, tokenizer, task, params, acc, work_dir: Path, started: float,
           progress: bool, resume: bool, out: Optional[Path], model_fingerprint: str) -> Sheaf:
    """Training to the density targets (loop.py) and its test metrics, as a Sheaf."""
    from accelerate.utils import gather_object

    if cfg.precision == "bf16" and acc.device.type == "cpu" and not native_bf16() and acc.is_main_process:
        print("warning: --precision bf16 on a CPU without bf16 instructions (AMX or AVX512-BF16) is emulated and "
              "likely slower than fp32", file=sys.stderr)
    trainer = Trainer(cfg=cfg, view=view, tokenizer=tokenizer, task=task, params=params, accelerator=acc,
                      work_dir=work_dir, progress=progress, started=started)
    if resume:
        trainer.resume()
    else:
        trainer.init_logits()
    log = None
    if acc.is_main_process:
        work_dir.mkdir(parents=True, exist_ok=True)
        live = work_dir / "metrics.jsonl"
        live.write_text("")  # on resume the restored curve is rewritten, dropping rows after the checkpoint
        log = write_jsonl(live)
        for row in trainer.curve:
            log(row)
    try:
        trainer.run(log=log)
    except BaseException:
        if out is None and acc.is_main_process:
            shutil.rmtree(work_dir, ignore_errors=True)  # an in-memory run cannot be resumed: leave nothing behind
        raise

    final = trainer.final_logits()  # copied once: SmolLM2's weight logits alone are ~0.4 GB
    with torch.no_grad():
        mine = params.local(final)
        for key, p in params.named_logits().items():
            p.copy_(mine[key])
    metrics = trainer.select.evaluate("test", tuple(cfg.granularity))
    best = trainer.select.best
    sheaf = Sheaf(logits=final, curve=trainer.curve, meta={
        "format": "sheafprune.sheaf/1",
        "model": {"name": cfg.model, "fingerprint": model_fingerprint, "family": view.spec.family},
        "task": task.name,
        "granularity": list(cfg.granularity),
        "density": {},
        "metrics": metrics,
        # seconds: training steps and dev evaluations (all runs of a resumed discovery); wall_seconds: this process,
        # from loading the model to the test metrics (what --max-minutes bounds, with the training of earlier runs)
        "training": {"steps": trainer.step, "seconds": round(trainer.elapsed, 1),
                     "step_seconds": median_step_seconds(trainer.step_times, trainer.step_cycle),
                     "wall_seconds": round(time.perf_counter() - started, 1), "processes": acc.num_processes,
                     "precision": cfg.precision,  # of the training passes; evaluations are fp32
                     "best_step": None if best is None else best["step"],
                     # what the kept sheaf was judged on: dev, or dev + the select items held out of train
                     "best_judged": None if best is None else best.get("judged"),
                     # elements each rank holds at the end (list index = rank); shard_masks divides them by N
                     "per_rank": gather_object([footprint(params, trainer.optimizer, view)]),
                     "task_notes": task.notes},
        "config": cfg.to_dict(),
        "versions": versions(),
    })
    sheaf.meta["density"] = sheaf.density()
    return sheaf


def _finish(sheaf: Sheaf, *, acc, out: Optional[Path], work_dir: Path, overwrite: bool) -> None:
    """Write the sheaf (main process) and drop the run's work folder."""
    if out is not None and acc.is_main_process:
        save_sheaf(sheaf, Path(out), overwrite=overwrite)
    if acc.is_main_process:
        shutil.rmtree(work_dir, ignore_errors=True)
    acc.wait_for_everyone()


def _search(cfg: DiscoverConfig, *, view, tokenizer, task, acc, work_dir: Path, started: float, progress: bool,
            model_fingerprint: str) -> Sheaf:
    """The keep search (search.py) and its test metrics, as a Sheaf."""
    if cfg.shard_masks:
        raise UserError("--shard-masks shards weight masks; the keep search trains neuron and head masks only "
                        "(give --target-density to train weight masks)")
    log = None
    if acc.is_main_process:
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / "metrics.jsonl").write_text("")
        log = write_jsonl(work_dir / "metrics.jsonl")
    result = KeepSearch(cfg=cfg, view=view, tokenizer=tokenizer, task=task, accelerator=acc, started=started,
                        progress=progress).run(log=log)
    best = result.best
    sheaf = Sheaf(logits=result.logits, means=result.means, curve=result.curve, meta={
        "format": "sheafprune.sheaf/1",
        "model": {"name": cfg.model, "fingerprint": model_fingerprint, "family": view.spec.family},
        "task": task.name, "granularity": list(cfg.granularity), "density": {},
        "training": {"mode": "keep", "steps": result.steps, "step_seconds": median_step_seconds(result.step_seconds),
                     "seconds": round(sum(result.step_seconds), 1), "processes": acc.num_processes,
                     "best_step": best.step, "stopped": result.stopped, "passes": result.passes,
                     "best_judged": {"on": result.judged_on, **best.row()}, "task_notes": task.notes},
        "config": cfg.to_dict(), "versions": versions()})
    on_device = lambda masks: {k: v.to(acc.device) for k, v in masks.items()}  # noqa: E731
    sheaf.meta["metrics"] = sheaf_metrics(view, tokenizer, task, on_device(sheaf.masks()),
                                          on_device(sheaf.complement_masks()), split="test",
                                          batch_size=max(cfg.batch_size, 32), device=acc.device)
    sheaf.meta["training"]["wall_seconds"] = round(time.perf_counter() - started, 1)
    sheaf.meta["density"] = sheaf.density()
    return sheaf


def write_jsonl(path: Path) -> Callable[[dict], None]:
    def log(row: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    return log


def native_bf16() -> bool:
    """Whether this CPU's oneDNN has bf16 kernels (AMX or AVX512-BF16)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
