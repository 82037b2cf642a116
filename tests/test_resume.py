"""Interrupting discovery anywhere (SIGKILL, SIGINT, a KeyboardInterrupt at each stage of a step) and resuming
gives the very sheaf an uninterrupted run gives; checkpoints fall back past a corrupt newest one; a NaN loss stops
the run with one clear line and keeps the last good checkpoint; killing an export leaves no folder or a whole
one."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SHEAFPRUNE
from safetensors.torch import load_file

import sheafprune.discovery.attribution as attribution
import sheafprune.discovery.objective as objective
import sheafprune.discovery.state as ckpt
import sheafprune.discovery.step as step_module
from sheafprune.cli.main import main
from sheafprune.config import resolve_config
from sheafprune.discovery import discover, work_dir_for
from sheafprune.discovery.attribution import INIT_BATCHES
from sheafprune.discovery.data import RankData
from sheafprune.discovery.masks import MaskLogits
from sheafprune.discovery.step import COMPLEMENT_EVERY
from sheafprune.errors import UserError

# Small but not trivial: masks move (lr 0.5), the target is met early so the best-sheaf tracking is exercised,
# checkpoints and dev evaluations come every other step, and a run takes ~1 s. Edge masks only: weight masks would
# double the cost and add nothing to what resuming must restore (logits, optimizer, best, curve).
CONFIG = dict(model="tiny-gpt2", task="ioi", n_items=20, steps=5, batch_size=2, eval_every=2, checkpoint_every=2,
              lr=0.5, granularity=["edge"], target_density={"edge": 0.9}, early_stop=False, seed=3)


def masks_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "masks.safetensors"))


def assert_same_sheaf(got: Path, want: Path) -> None:
    a, b = masks_of(got), masks_of(want)
    assert a.keys() == b.keys()
    diff = {k: float((a[k] - b[k]).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not diff, f"mask logits differ from the uninterrupted run: {diff}"
    ma, mb = (json.loads((f / "sheaf.json").read_text()) for f in (got, want))
    assert ma["training"]["steps"] == mb["training"]["steps"] and ma["density"] == mb["density"], (ma, mb)
    assert ma["training"]["best_step"] == mb["training"]["best_step"]
    rows = lambda f: [{k: v for k, v in json.loads(r).items() if k != "time"}  # noqa: E731
                      for r in (f / "metrics.jsonl").read_text().splitlines()]
    assert rows(got) == rows(want), "training curves differ"


@pytest.fixture(scope="module")
def cfg():
    return resolve_config(overrides=CONFIG)


@pytest.fixture(scope="module")
def reference(cfg, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "sheaf"
    discover(cfg, out=out, progress=False)
    density = json.loads((out / "sheaf.json").read_text())["density"]
    assert all(0 < d < 1 for d in density.values()), f"masks did not move, the comparison would be trivial: {density}"
    return out


def _init_calls(cfg) -> int:
    """Loss evaluations before step 0: one per batch of an attribution init."""
    return INIT_BATCHES if cfg.recipe_settings.init == "attribution" else 0


def _interrupt_once(monkeypatch, owner, name: str, *, at_call: int, before: bool = True) -> None:
    """Send this process SIGINT (Ctrl-C) on call number `at_call` of owner.name, before or after the real call. A
    signal, not `raise KeyboardInterrupt`: the trainer may defer Ctrl-C to the end of the step. `owner` may also be a
    dict, `name` one of its keys."""
    real = owner[name] if isinstance(owner, dict) else getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call and before:
            signal.raise_signal(signal.SIGINT)
        result = real(*args, **kwargs)
        if calls["n"] == at_call and not before:
            signal.raise_signal(signal.SIGINT)
        return result

    if isinstance(owner, dict):
        monkeypatch.setitem(owner, name, wrapper)
    else:
        monkeypatch.setattr(owner, name, wrapper)


# Where Ctrl-C lands: (what is patched, call number, before/after the real call). Steps are 0-based; step 3 is the
# fourth optimizer step, evaluated and checkpointed at its end. Ctrl-C in a forward pass is the next test.
POINTS = {
    "between the optimizer step and the projection of a training step": (MaskLogits, "project", 5, False),
    "dev evaluation after step 4": (RankData, "split_scores", 2, True),
    "writing the checkpoint of step 4": (ckpt, "save_file", 2, False),
}


# Every point resumes exactly because the training loop defers Ctrl-C to the end of the step.
@pytest.mark.parametrize("point", list(POINTS))
def test_ctrl_c_anywhere_then_resume_gives_the_same_sheaf(point, cfg, reference, tmp_path, monkeypatch):
    owner, name, at_call, before = POINTS[point]
    out = tmp_path / "sheaf"
    with monkeypatch.context() as m:
        _interrupt_once(m, owner, name, at_call=at_call, before=before)
        with pytest.raises(KeyboardInterrupt):
            discover(cfg, out=out, progress=False)
    assert not out.exists() and any(work_dir_for(out).glob("ckpt-*.json"))
    discover(cfg, out=out, resume=True, progress=False)
    assert_same_sheaf(out, reference)
    assert not work_dir_for(out).exists(), "the run folder is removed once the sheaf is written"


def test_corrupt_newest_checkpoint_falls_back_and_resume_still_matches(cfg, reference, tmp_path, monkeypatch):
    out = tmp_path / "sheaf"
    with monkeypatch.context() as m:
        # Ctrl-C in the forward of step 4 (0-based): the step finishes and is checkpointed as step 5, next to step 4.
        # An attribution init calls the loss INIT_BATCHES times before step 0.
        _interrupt_once(m, objective.FAITH_LOSSES, cfg.recipe_settings.faith_loss, at_call=5 + _init_calls(cfg))
        with pytest.raises(KeyboardInterrupt):
            discover(cfg, out=out, progress=False)
    work = work_dir_for(out)
    assert sorted(p.name for p in work.glob("ckpt-*.json")) == ["ckpt-00000004.json", "ckpt-00000005.json"]
    newest = work / "ckpt-00000005.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    assert ckpt.load_latest(work)[2]["step"] == 4
    discover(cfg, out=out, resume=True, progress=False)
    assert_same_sheaf(out, reference)


def test_checkpoint_fallback_and_full_disk(tmp_path, monkeypatch):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    info = {"config": {}, "curve": [], "elapsed": 0.0}
    for step in (2, 4):
        ckpt.save_checkpoint(tmp_path, step=step, tensors={"x": torch.full((3,), float(step))},
                             optimizer_state=opt.state_dict(), info=info)
    assert ckpt.load_latest(tmp_path)[2]["step"] == 4
    damage = {
        "truncated tensors": lambda: (tmp_path / "ckpt-00000004.safetensors").write_bytes(b"\x08\x00"),
        "no tensors (killed between the two files)": lambda: (tmp_path / "ckpt-00000004.safetensors").unlink(),
        "JSON cut short": lambda: (tmp_path / "ckpt-00000004.json").write_text('{"step": 4, "opt'),
        "JSON without its keys": lambda: (tmp_path / "ckpt-00000004.json").write_text('{"step": 4}'),
        "JSON of another step": lambda: (tmp_path / "ckpt-00000004.json").write_text(
            (tmp_path / "ckpt-00000002.json").read_text()),
    }
    good = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for what, spoil in damage.items():
        spoil()
        found = ckpt.load_latest(tmp_path)
        assert found is not None and found[2]["step"] == 2 and float(found[0]["x"][0]) == 2.0, what
        for name, data in good.items():
            (tmp_path / name).write_bytes(data)

    def full(tensors, filename, **kw):
        Path(filename).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(UserError, match=r"cannot write a checkpoint to .*: No space left on device; free some space "
                                         r"and run again with --resume"):
        ckpt.save_checkpoint(tmp_path, step=6, tensors={"x": torch.zeros(3)}, optimizer_state=opt.state_dict(),
                             info=info)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(good), "partial files left"
    assert ckpt.load_latest(tmp_path)[2]["step"] == 4


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(cfg, tmp_path, monkeypatch, capsys):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({k: v for k, v in CONFIG.items()}))
    real, calls = step_module.task_scores, {"n": 0}

    # one call per batch of the attribution init, then per step the sheaf's and, every COMPLEMENT_EVERY-th step,
    # the complement's: the first call of step 4 (0-based) comes after these
    before = _init_calls(resolve_config(overrides=CONFIG)) + sum(1 + (s % COMPLEMENT_EVERY == 0) for s in range(4))

    def nan_at_step_4(*args, **kwargs):
        calls["n"] += 1
        scores = real(*args, **kwargs)
        return scores * float("nan") if calls["n"] == before + 1 else scores

    monkeypatch.setattr(step_module, "task_scores", nan_at_step_4)
    monkeypatch.setattr(attribution, "task_scores", nan_at_step_4)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sheaf"
    capsys.readouterr()
    rc = main(["discover", "--config", "c.yaml", "--out", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: loss became nan at step 4; the last good checkpoint is in "
                               f"{work_dir_for(out)} (try a lower --lr)"), lines[0]
    assert not out.exists()
    found = ckpt.load_latest(work_dir_for(out))
    assert found is not None and found[2]["step"] == 4
    assert all(torch.isfinite(v).all() for v in found[0].values())


# --- real processes: SIGKILL and SIGINT ------------------------------------------------------------------------
def _start(folder: Path, *extra: str) -> subprocess.Popen:
    (folder / "c.yaml").write_text(yaml.safe_dump(CONFIG))
    return subprocess.Popen([str(SHEAFPRUNE), "discover", "--config", "c.yaml", "--out", "sheaf", *extra],
                            cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _signal_when(procs: dict[str, subprocess.Popen], markers: dict[str, tuple[Path, int]], timeout: float = 120) -> None:
    """Send each process its signal as soon as its marker file appears, watching all of them at once."""
    deadline = time.monotonic() + timeout
    pending = dict(markers)
    while pending:
        for name, (marker, sig) in list(pending.items()):
            if marker.exists():
                procs[name].send_signal(sig)
                del pending[name]
            else:
                assert procs[name].poll() is None, f"finished before {marker} appeared: {procs[name].communicate()}"
        assert time.monotonic() < deadline, f"no {sorted(pending)} markers after {timeout} s"
        time.sleep(0.01)


def test_killed_discovery_resumes_to_the_same_sheaf(reference, tmp_path, monkeypatch):
    """SIGKILL and SIGINT right after the step-2 checkpoint, mid-step; both runs go side by side (two processes) to
    save wall time, watched together: waiting for one run while the other went on (and for the step-4 checkpoint of
    this 5-step run) sometimes let a loaded machine finish the other run before its signal."""
    runs = {"kill": (tmp_path / "kill", signal.SIGKILL, ".sheaf.run/ckpt-00000002.json"),
            "int": (tmp_path / "int", signal.SIGINT, ".sheaf.run/ckpt-00000002.json")}
    procs = {}
    for name, (folder, _, _) in runs.items():
        folder.mkdir()
        procs[name] = _start(folder)
    _signal_when(procs, {name: (folder / marker, sig) for name, (folder, sig, marker) in runs.items()})
    for name, (folder, sig, _) in runs.items():
        _, err = procs[name].communicate(timeout=120)
        if sig == signal.SIGINT:
            assert procs[name].returncode == 130 and err.rstrip().endswith("interrupted"), err[-500:]
            assert "Traceback" not in err
        else:
            assert procs[name].returncode == -signal.SIGKILL
        assert not (folder / "sheaf").exists()
    for name, (folder, _, _) in runs.items():  # `--resume` in the CLI is this call (in-process: 4 s less a run)
        discover(resolve_config(overrides=CONFIG), out=folder / "sheaf", resume=True, progress=False)
        assert_same_sheaf(folder / "sheaf", reference)
        assert sorted(p.name for p in folder.iterdir()) == ["c.yaml", "sheaf"], "leftovers"


def test_resume_through_the_cli(tmp_path, monkeypatch, capsys):
    """`--resume` without a checkpoint, and with a checkpoint made with other options, is refused in one line."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(CONFIG))
    assert main(["discover", "--config", "c.yaml", "--out", "sheaf", "--resume"]) == 2
    assert capsys.readouterr().err.startswith("error: --resume: no checkpoint in .sheaf.run; run without --resume")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    ckpt.save_checkpoint(tmp_path / ".sheaf.run", step=2, tensors={}, optimizer_state=opt.state_dict(),
                         info={"config": {**resolve_config(overrides=CONFIG).to_dict(), "lr": 0.01}, "curve": [],
                               "elapsed": 0.0})
    assert main(["discover", "--config", "c.yaml", "--out", "sheaf", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "error: --resume: the checkpoint in .sheaf.run was made with different options (lr)" in err, err
    assert not (tmp_path / "sheaf").exists()


def test_killed_export_leaves_no_folder_or_a_whole_one(reference, tmp_path):
    """SIGKILL and SIGINT the moment the export's temporary folder appears (files are being written)."""
    from sheafprune.exporter import load

    procs = {}
    for sig in (signal.SIGKILL, signal.SIGINT):
        folder = tmp_path / sig.name
        folder.mkdir()
        procs[sig] = (folder, subprocess.Popen([str(SHEAFPRUNE), "export", str(reference), "--out", "exp"], cwd=folder,
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    waiting, deadline = dict(procs), time.monotonic() + 120
    while waiting and time.monotonic() < deadline:  # both at once: the writing phase lasts well under a second
        for sig, (folder, proc) in list(waiting.items()):
            if list(folder.glob(".exp.tmp-*/*")) or proc.poll() is not None:
                proc.send_signal(sig)
                del waiting[sig]
        time.sleep(0.002)
    for sig, (folder, proc) in procs.items():
        _, err = proc.communicate(timeout=120)
        exp = folder / "exp"
        if exp.exists():  # it finished before the signal landed: then it must be whole
            assert load(exp) is not None and (exp / "sheaf" / "masks.safetensors").exists()
        if sig == signal.SIGINT:
            assert proc.returncode in (0, 130) and "Traceback" not in err, err[-2000:]
            assert [p.name for p in folder.iterdir() if p.name != "exp"] == [], "SIGINT leaves no temporary folder"
        else:  # SIGKILL cannot clean up: what is left is a hidden temporary folder, never a half `exp`
            assert all(p.name.startswith(".exp.tmp-") for p in folder.iterdir() if p.name != "exp")


@pytest.mark.parametrize("step", ["save_sheaf", "model_card"])
def test_interrupted_export_writes_nothing(step, reference, tmp_path, monkeypatch, capsys):
    """Ctrl-C in the middle of writing (model files done, sheaf/ or README.md not yet): no folder, no temp folder."""
    from sheafprune.exporter import hf

    def interrupted(*args, **kwargs):
        assert list(tmp_path.glob(".exp.tmp-*/model.safetensors")), "not yet writing"
        raise KeyboardInterrupt

    monkeypatch.setattr(hf, step, interrupted)
    assert main(["export", str(reference), "--out", str(tmp_path / "exp")]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    assert list(tmp_path.iterdir()) == []
