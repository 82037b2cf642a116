"""The export folder: compact a sheaf, prove it exact, write a slim HF folder (and ONNX), load it back.

Folder: config.json (with auto_map), model.safetensors, modeling_sheaf.py, tokenizer files, sheaf.json
(the sheaf's meta plus "export"), README.md (model card), sheaf/ (the source sheaf folder, masks
included) and, for --format onnx/all, model.onnx (with --quantize int8 also model.int8.onnx). Nothing is written
unless the compacted model matches the masked model on held-out task prompts, in fp32: a task vocabulary
(--vocab task) and a cast (--dtype) come after that gate, and their own differences are measured and recorded.
"""

from __future__ import annotations

import copy
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
from ..masked import Masks, default_position_ids, masked_forward, sheaf_shapes
from ..discovery.objective import floor_verdict
from ..sheaf import Sheaf, check_sheaf_matches, save_sheaf
from ..tasks import Task, encode, load_task
from . import modeling_sheaf
from .card import model_card
from .measure import FP32_RTOL, LogitsFn, max_logit_diff, measure_files, split_accuracy, torch_logits_fn
from .modeling_sheaf import SheafConfig, SheafForCausalLM
from .quantize import INT8_FILE, QUANTIZATIONS, quantize_int8
from .vocab import VOCABS, reduce_vocab, task_token_ids, vocab_info

TOLERANCE = 1e-5  # compacted vs masked, fp32 max abs logit difference
FORMATS = ("safetensors", "onnx", "all")
GATE_ITEMS = 64  # held-out prompts the gate compares on
AUTO_MAP = {"AutoConfig": "modeling_sheaf.SheafConfig", "AutoModelForCausalLM": "modeling_sheaf.SheafForCausalLM"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sheaf_task(sheaf: Sheaf, tokenizer: Any) -> Task:
    """The sheaf's task, split as discovery split it."""
    cfg = sheaf.meta.get("config", {})
    return load_task(sheaf.task, tokenizer, seed=int(cfg.get("seed", 0)), n=cfg.get("n_items"))


def eval_split(task: Task) -> str:
    """The split the gate and the export's measurements use: test (dev, train where a split is empty)."""
    return next((s for s in ("test", "dev", "train") if task.items(s)), "test")


def held_out_batch(sheaf: Sheaf, tokenizer: Any, task: Optional[Task] = None) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) of the sheaf's task prompts: the test split, as discovery split it."""
    task = task or sheaf_task(sheaf, tokenizer)
    batch = encode(task, task.items(eval_split(task))[:GATE_ITEMS], tokenizer)
    return batch.input_ids, batch.attention_mask


def _logits(view: Any, masks: Masks, model: SheafForCausalLM, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(masked sheaf, compacted) logits, each (B, T, V), on real tokens only (N, V)."""
    with torch.no_grad():
        ref = masked_forward(view, ids, attention_mask=mask, masks=masks, position_ids=default_position_ids(mask))
        got = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    return ref[real], got[real]


def check_exact(view: Any, masks: Masks, model: SheafForCausalLM, input_ids: Tensor,
                attention_mask: Tensor) -> dict[str, float]:
    """Compare the compacted model with the masked sheaf; raise UserError if they differ.

    The gate is max |logit difference| <= TOLERANCE in fp32. On a deep model fp32 rounding alone can
    exceed that (SmolLM2, logits up to ~30: the masked model itself is 2.5e-5 away from its fp64 self),
    so when fp32 fails, both are recomputed in fp64: the compaction passes only if it is exact there
    (<= TOLERANCE) and its fp32 difference is what fp32 arithmetic explains (within_fp32_rounding).
    """
    ref, got = _logits(view, masks, model, input_ids, attention_mask)
    d32 = float((got - ref).abs().max())
    result = {"max_abs_diff": d32}
    if d32 <= TOLERANCE:
        return result
    view64 = view_of(copy.deepcopy(view.model).double())
    masks64 = {k: v.double() for k, v in masks.items()}
    # Compacted again in fp64: folded constants (mean ablation sums many large head means) carry fp32 rounding of
    # their own, which says nothing about whether the compaction is exact.
    slim64 = compact(view64, masks64, dtype=torch.float64).to_model()
    ref64, got64 = _logits(view64, masks64, slim64, input_ids, attention_mask)
    result["max_abs_diff_fp64"] = d64 = float((got64 - ref64).abs().max())
    result["fp32_rounding"] = noise = float((ref.double() - ref64).abs().max())
    result["logit_scale"] = scale = float(ref64.abs().max())
    if d64 <= TOLERANCE and within_fp32_rounding(d32, noise=noise, scale=scale):
        return result
    raise UserError(f"the compacted model differs from the masked sheaf by {d32:.3g} (tolerance {TOLERANCE:g}; "
                    f"{d64:.3g} in fp64, fp32 rounding {noise:.3g}) on {input_ids.shape[0]} held-out prompts; "
                    "nothing was written. This is a bug: please report it")


def within_fp32_rounding(d32: float, *, noise: float, scale: float) -> bool:
    """Whether an fp32 difference between two computations that agree in fp64 is rounding: within twice the masked
    model's own fp32 error (`noise`, against fp64), or within FP32_RTOL of the largest logit (`scale`). The two
    sum in different orders (folded constants, merged reads), so their rounding differs: a SmolLM2 anaphor sheaf,
    exact in fp64, was 1.3e-3 from its masked model in fp32 where the masked model was 2.2e-4 from fp64. A storage
    dtype below fp32 (fp16: 5e-4 relative per weight, bf16: 4e-3) is still caught."""
    return d32 <= max(2 * noise, FP32_RTOL * scale)


def resolve_formats(formats: Iterable[str] | str, *, dtype: str = "float32", quantize: Optional[str] = None,
                    vocab: str = "full") -> set[str]:
    """The files to write, {"safetensors", "onnx"} or one of them; every bad option is one UserError, before any
    work. --quantize int8 adds onnx: the int8 model is quantized from model.onnx and measured against it."""
    chosen = {formats} if isinstance(formats, str) else set(formats)
    bad = chosen - set(FORMATS)
    if bad or not chosen:
        raise UserError(f"unknown export format {', '.join(sorted(bad)) or '(none)'}; use one of {'|'.join(FORMATS)}")
    for name, value, allowed in (("dtype", dtype, DTYPES), ("quantize", quantize, (None, *QUANTIZATIONS)),
                                 ("vocab", vocab, VOCABS)):
        if value not in allowed:
            raise UserError(f"unknown --{name} {value!r}; use one of {'|'.join(a for a in allowed if a)}")
    fmts = {"safetensors", "onnx"} if "all" in chosen else chosen
    if dtype != "float32" and "safetensors" not in fmts:
        raise UserError(f"--dtype {dtype} casts model.safetensors, which --format onnx does not write (ONNX stays "
                        "fp32); use --format all")
    return fmts | ({"onnx"} if quantize else set())


def export(sheaf: Sheaf, *, out: Path, formats: Iterable[str] | str = ("safetensors",), overwrite: bool = False,
           model: Optional[torch.nn.Module] = None, tokenizer: Any = None, keep: Optional[float] = None,
           dtype: str = "float32", quantize: Optional[str] = None, vocab: str = "full") -> dict[str, Any]:
    """Compact `sheaf`, check it against the masked model, write the export folder; return the "export" info.

    `model`/`tokenizer` default to `load_model(sheaf.model_name)`; either way the sheaf must match the model.
    `keep` (default: the sheaf's own config, else 0.95): the floor its test metrics are checked against; a sheaf that
    misses it is still written, with info["not_kept"] set and the model card saying so first.
    `dtype` (float32|bfloat16|float16): model.safetensors' dtype, cast after the fp32 gate. `quantize` ("int8"):
    also model.int8.onnx. `vocab` ("full"|"task"): keep embedding/head rows of the task's tokens only (vocab.py).
    Every written file is measured (info["files"]: bytes, latency, test accuracy).
    """
    from ..models import fingerprint, load_model

    fmts = resolve_formats(formats, dtype=dtype, quantize=quantize, vocab=vocab)
    if model is None or tokenizer is None:
        model, tokenizer = load_model(sheaf.model_name)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise UserError("export compares logits in fp32; load the model in float32 (the sheaf was made on it)")
    model.eval()
    view = view_of(model)
    check_sheaf_matches(sheaf, expected_shapes=sheaf_shapes(view, sheaf.granularity), fingerprint=fingerprint(model))
    task = sheaf_task(sheaf, tokenizer)
    ids, mask = held_out_batch(sheaf, tokenizer, task)
    slim, info = _compact_checked(view, model, sheaf, task, tokenizer, ids, mask, vocab=vocab)
    info["keep"] = keep if keep is not None else sheaf.meta.get("config", {}).get("keep", 0.95)
    info["not_kept"] = floor_verdict(sheaf.meta.get("metrics", {}), info["keep"])
    shipped = _cast(slim, dtype, ids, mask, info)
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        runners = _write_models(tmp, fmts, slim, shipped, quantize, ids, mask, info)
        _measure(tmp, runners, slim, task, tokenizer, ids, mask, info)
        tokenizer.save_pretrained(str(tmp))
        save_sheaf(sheaf, tmp / "sheaf")
        write_json(tmp / "sheaf.json", {**sheaf.meta, "export": info})
        meta = {**sheaf.meta, "density": sheaf.meta.get("density") or sheaf.density()}
        (tmp / "README.md").write_text(model_card(meta, info, sorted(fmts)))
    return info


def _compact_checked(view: Any, model: torch.nn.Module, sheaf: Sheaf, task: Task, tokenizer: Any, ids: Tensor,
                     mask: Tensor, *, vocab: str) -> tuple[SheafForCausalLM, dict[str, Any]]:
    """The fp32 compacted model, gated against the masked sheaf, then (vocab "task") reduced to the task's tokens
    and checked against its full-vocabulary self on the kept tokens; and the info so far."""
    masks = sheaf.masks()
    compacted = compact(view, masks)
    slim = compacted.to_model()
    gate = check_exact(view, masks, slim, ids, mask)
    if vocab == "task":
        compacted = reduce_vocab(compacted, task_token_ids(task, tokenizer, compacted.config["vocab_size"]))
        full, slim = slim, compacted.to_model()
        with torch.no_grad():
            d = gate["max_abs_diff_vocab"] = max_logit_diff(slim(input_ids=ids, attention_mask=mask).logits,
                                                            full(input_ids=ids, attention_mask=mask).logits, mask)
        if not d <= TOLERANCE:
            raise UserError(f"the task-vocabulary model differs from the full-vocabulary one by {d:.3g} on kept "
                            f"tokens (tolerance {TOLERANCE:g}); nothing was written. This is a bug: please report it")
    return slim, {**_info(compacted, model), **gate, **vocab_info(compacted)}


def _cast(slim: SheafForCausalLM, dtype: str, ids: Tensor, mask: Tensor, info: dict[str, Any]) -> SheafForCausalLM:
    """The model model.safetensors holds, in `dtype`; its max |logit diff| to the fp32 model into info."""
    info["dtype"] = dtype
    slim.config.dtype = torch.float32  # config.json says what from_pretrained loads the weights as
    if dtype == "float32":
        return slim
    cast = copy.deepcopy(slim).to(DTYPES[dtype])
    cast.config.dtype = DTYPES[dtype]
    with torch.no_grad():
        info["max_abs_diff_dtype"] = max_logit_diff(slim(input_ids=ids, attention_mask=mask).logits,
                                                    cast(input_ids=ids, attention_mask=mask).logits, mask)
    return cast


def _write_models(tmp: Path, fmts: set[str], slim: SheafForCausalLM, shipped: SheafForCausalLM,
                  quantize: Optional[str], ids: Tensor, mask: Tensor,
                  info: dict[str, Any]) -> dict[str, tuple[str, LogitsFn]]:
    """Write the model files; return, per file, its dtype and a logits function that runs it."""
    runners: dict[str, tuple[str, LogitsFn]] = {}
    if "safetensors" in fmts:
        save_model(shipped, tmp)
        info["bytes"] = (tmp / "model.safetensors").stat().st_size
        runners["model.safetensors"] = (info["dtype"], torch_logits_fn(shipped))
    else:  # the config still describes the graph of model.onnx
        write_json(tmp / "config.json", _config(slim.config).to_dict())
    if "onnx" in fmts:
        from .onnx import export_onnx, ort_logits_fn

        info["max_abs_diff_onnx"] = export_onnx(slim, tmp / "model.onnx", input_ids=ids, attention_mask=mask)
        info["bytes_onnx"] = (tmp / "model.onnx").stat().st_size
        runners["model.onnx"] = ("float32", ort_logits_fn(tmp / "model.onnx"))
    if quantize == "int8":
        quantize_int8(tmp / "model.onnx", tmp / INT8_FILE)
        info["bytes_int8"] = (tmp / INT8_FILE).stat().st_size
        runners[INT8_FILE] = ("int8", ort_logits_fn(tmp / INT8_FILE))
        info["max_abs_diff_int8"] = max_logit_diff(runners["model.onnx"][1](ids, mask), runners[INT8_FILE][1](ids, mask),
                                                   mask)
    return runners


def _measure(tmp: Path, runners: dict[str, tuple[str, LogitsFn]], slim: SheafForCausalLM, task: Task,
             tokenizer: Any, ids: Tensor, mask: Tensor, info: dict[str, Any]) -> None:
    """The fp32 export's test accuracy and, per written file, bytes, latency and test accuracy, into info."""
    split = eval_split(task)
    acc = split_accuracy(torch_logits_fn(slim), task, tokenizer, split)
    info.update(test_split=split, test_n=len(task.items(split)), test_accuracy=acc, latency_batch=list(ids.shape))
    known = {"model.safetensors": acc} if info["dtype"] == "float32" else {}
    info["files"] = measure_files(tmp, runners, task=task, tokenizer=tokenizer, split=split, input_ids=ids,
                                  attention_mask=mask, known=known)
    rows = {r["file"]: r for r in info["files"]}
    if INT8_FILE in rows:
        info["int8_accuracy_loss"] = 100 * (acc - rows[INT8_FILE]["accuracy"])


def _info(c: Compacted, model: torch.nn.Module) -> dict[str, Any]:
    s = c.stats
    return {
        "params": s["params"], "params_original": s["params_original"],
        "bytes": sum(t.numel() * t.element_size() for t in c.tensors.values()),
        "bytes_original": sum(p.numel() * p.element_size() for p in model.parameters()),
        "tolerance": TOLERANCE,
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
    """Load an export folder with the packaged modeling file (no remote code); eval mode, in the dtype config.json
    records (float32 unless exported with --dtype)."""
    path = Path(path)
    if not (path / "model.safetensors").is_file():
        hint = " (it holds only model.onnx: run it with onnxruntime)" if (path / "model.onnx").is_file() else ""
        raise UserError(f"{path} is not a sheafprune export folder with model.safetensors{hint}; "
                        "run `sheafprune export SHEAF_DIR --out DIR` first")
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar is noise for a slim model
    try:
        return SheafForCausalLM.from_pretrained(str(path)).eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()
