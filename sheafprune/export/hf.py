"""The export folder: compact a sheaf, prove it exact, write a slim HF folder (and ONNX), load it back.

Folder: config.json (with auto_map), model.safetensors, modeling_sheaf.py, tokenizer files, sheaf.json
(the sheaf's meta plus "export"), README.md (model card), sheaf/ (the source sheaf folder, masks
included) and, for --format onnx/all, model.onnx. Nothing is written unless the compacted model matches
the masked model on held-out task prompts.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..arch import view_of
from ..compact import Compacted, compact
from ..errors import UserError
from ..io import atomic_dir, write_json
from ..masked import Masks, default_position_ids, mask_shapes, masked_forward
from ..sheaf import Sheaf, check_sheaf_matches, save_sheaf
from . import modeling_sheaf
from .card import model_card
from .modeling_sheaf import SheafConfig, SheafForCausalLM

TOLERANCE = 1e-5  # compacted vs masked, fp32 max abs logit difference
FORMATS = ("safetensors", "onnx", "all")
GATE_ITEMS = 64  # held-out prompts the gate compares on
AUTO_MAP = {"AutoConfig": "modeling_sheaf.SheafConfig", "AutoModelForCausalLM": "modeling_sheaf.SheafForCausalLM"}


def held_out_batch(sheaf: Sheaf, tokenizer: Any) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) of the sheaf's task prompts: the test split, as discovery split it."""
    from ..tasks import encode, load_task

    cfg = sheaf.meta.get("config", {})
    task = load_task(sheaf.task, tokenizer, seed=int(cfg.get("seed", 0)), n=cfg.get("n_items"))
    items = next((task.items(s) for s in ("test", "dev", "train") if task.items(s)), [])
    batch = encode(task, items[:GATE_ITEMS], tokenizer)
    return batch.input_ids, batch.attention_mask


def max_diff(view: Any, masks: Masks, model: SheafForCausalLM, input_ids: Tensor, attention_mask: Tensor) -> float:
    """max |compacted - masked| logits over real tokens (fp32)."""
    with torch.no_grad():
        ref = masked_forward(view, input_ids, attention_mask=attention_mask, masks=masks,
                             position_ids=default_position_ids(attention_mask))  # (B, T, V)
        got = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
    return float((got - ref)[attention_mask.bool()].abs().max())


def _formats(formats: Iterable[str]) -> set[str]:
    chosen = set(formats)
    bad = chosen - set(FORMATS)
    if bad or not chosen:
        raise UserError(f"unknown export format {', '.join(sorted(bad)) or '(none)'}; use one of {'|'.join(FORMATS)}")
    return {"safetensors", "onnx"} if "all" in chosen else chosen


def export(sheaf: Sheaf, *, out: Path, formats: Iterable[str] = ("safetensors",), overwrite: bool = False,
           model: Optional[torch.nn.Module] = None, tokenizer: Any = None) -> dict[str, Any]:
    """Compact `sheaf`, check it against the masked model, write the export folder; return the "export" info.

    `model`/`tokenizer` default to `load_model(sheaf.model_name)`; either way the sheaf must match the model.
    """
    from ..models import fingerprint, load_model

    fmts = _formats(formats)
    if model is None or tokenizer is None:
        model, tokenizer = load_model(sheaf.model_name)
    model = model.float().eval()
    view = view_of(model)
    check_sheaf_matches(sheaf, expected_shapes=mask_shapes(view, sheaf.granularity), fingerprint=fingerprint(model))
    masks = sheaf.masks()
    compacted = compact(view, masks)
    slim = compacted.to_model()
    ids, mask = held_out_batch(sheaf, tokenizer)
    diff = max_diff(view, masks, slim, ids, mask)
    if not diff <= TOLERANCE:
        raise UserError(f"the compacted model differs from the masked sheaf by {diff:.3g} (tolerance {TOLERANCE:g}) "
                        f"on {ids.shape[0]} held-out prompts; nothing was written. This is a bug: please report it")
    info = _info(compacted, model, diff)
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        if "safetensors" in fmts:
            save_model(slim, tmp)
            info["bytes"] = (tmp / "model.safetensors").stat().st_size
        else:  # the config still describes the graph of model.onnx
            write_json(tmp / "config.json", _config(slim.config).to_dict())
        if "onnx" in fmts:
            from .onnx import export_onnx

            info["max_abs_diff_onnx"] = export_onnx(slim, tmp / "model.onnx", input_ids=ids, attention_mask=mask)
            info["bytes_onnx"] = (tmp / "model.onnx").stat().st_size
        tokenizer.save_pretrained(str(tmp))
        save_sheaf(sheaf, tmp / "sheaf")
        write_json(tmp / "sheaf.json", {**sheaf.meta, "export": info})
        (tmp / "README.md").write_text(model_card(sheaf.meta, info, sorted(fmts)))
    return info


def _info(c: Compacted, model: torch.nn.Module, diff: float) -> dict[str, Any]:
    s = c.stats
    return {
        "params": s["params"], "params_original": s["params_original"],
        "bytes": sum(t.numel() * t.element_size() for t in c.tensors.values()),
        "bytes_original": sum(p.numel() * p.element_size() for p in model.parameters()),
        "max_abs_diff": diff, "tolerance": TOLERANCE,
        **{k: s[k] for k in ("layers_kept", "heads_kept", "neurons_kept", "heads_removed", "neurons_removed",
                             "layers_removed", "zero_share")},
    }


def _config(config: SheafConfig) -> SheafConfig:
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["SheafForCausalLM"]
    return config


def save_model(model: SheafForCausalLM, folder: Path) -> None:
    """config.json + model.safetensors + the modeling file that `auto_map` names."""
    # save_file, not save_pretrained: same files, without progress bars and generation_config.json.
    _config(model.config).save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    shutil.copyfile(modeling_sheaf.__file__, folder / "modeling_sheaf.py")


def load(path: Path) -> SheafForCausalLM:
    """Load an export folder with the packaged modeling file (no remote code); eval mode, fp32."""
    path = Path(path)
    if not (path / "model.safetensors").is_file():
        hint = " (it holds only model.onnx: run it with onnxruntime)" if (path / "model.onnx").is_file() else ""
        raise UserError(f"{path} is not a sheafprune export folder with model.safetensors{hint}; "
                        "run `sheafprune export SHEAF_DIR --out DIR` first")
    return SheafForCausalLM.from_pretrained(str(path)).eval()
