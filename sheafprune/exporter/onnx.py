"""ONNX export of a compacted sheaf: `model.onnx` (inputs input_ids, attention_mask; output logits; dynamic
batch and sequence), checked against torch with onnxruntime before it counts as written."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import UserError
from .measure import FP32_RTOL

ONNX_TOLERANCE = 1e-4


class _Logits(nn.Module):
    """The HF model as a plain (input_ids, attention_mask) -> logits function."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # With no attention head and no learned positions, attention_mask is unused and the exporter would
        # drop the input; the interface promises it, so use it in a way that changes no value.
        self.touch_mask = model.config.positional != "learned" and not any(layer.n_heads for layer in model.layers)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
        if self.touch_mask:
            logits = logits + 0.0 * attention_mask[..., None].to(logits.dtype)
        return logits


def write_onnx(model: nn.Module, path: Path, *, input_ids: Tensor, attention_mask: Tensor) -> None:
    """Export to one self-contained file with the TorchScript-based exporter (dynamo=False).

    The dynamo exporter is the default in torch 2.9+, but it takes minutes on a 12-layer toy model and
    far longer on SmolLM2 (every per-reader Python-level op is traced and then optimized); the legacy
    exporter takes seconds and gives the same numbers (both checked against onnxruntime here)."""
    try:
        import onnx  # noqa: F401  (say what to install before torch fails deep inside)
    except ImportError:
        raise UserError("ONNX export needs onnx and onnxruntime: pip install onnx onnxruntime") from None
    axes = {"batch": 0, "sequence": 1}
    dynamic = {name: {i: a for a, i in axes.items()} for name in ("input_ids", "attention_mask", "logits")}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about Python-level control flow: shapes are dynamic anyway
        torch.onnx.export(_Logits(model).eval(), (input_ids, attention_mask), str(path), dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes=dynamic, opset_version=18, do_constant_folding=False)


def ort_logits_fn(path: Path) -> Callable[[Tensor, Tensor], Tensor]:
    """An onnxruntime CPU runner of an exported model: (input_ids, attention_mask) -> (B, T, V) float tensor."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("checking the ONNX model needs onnxruntime: pip install onnxruntime") from None
    runner = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def logits(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        (out,) = runner.run(["logits"], {"input_ids": input_ids.long().numpy(),
                                          "attention_mask": attention_mask.long().numpy()})
        return torch.from_numpy(out)

    return logits


def onnx_logits(path: Path, *, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Run `model.onnx` with onnxruntime on CPU once; (B, T, V) float tensor."""
    return ort_logits_fn(path)(input_ids, attention_mask)


def export_onnx(model: nn.Module, path: Path, *, input_ids: Tensor, attention_mask: Tensor) -> float:
    """Write `path` and return max |onnxruntime - torch| over real tokens, on the example batch and on a
    shorter, smaller one (proves the dynamic axes). Raises UserError above ONNX_TOLERANCE or FP32_RTOL of the
    largest logit, whichever is larger."""
    write_onnx(model, path, input_ids=input_ids, attention_mask=attention_mask)
    diff, scale = 0.0, 0.0
    b, t = input_ids.shape
    checks = [(input_ids, attention_mask)]
    if b > 1 and t > 2:
        checks.append((input_ids[: b - 1, 1:], attention_mask[: b - 1, 1:]))
    run = ort_logits_fn(path)
    for ids, mask in checks:
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
        got = run(ids, mask)
        real = mask.bool()
        diff = max(diff, float((got - ref)[real].abs().max()))
        # The scale of the real logits: with a task vocabulary, the lowest float of the ids not kept is no logit.
        scale = max(scale, float(ref[real].masked_fill(ref[real] == torch.finfo(ref.dtype).min, 0).abs().max()))
    # fp32 rounding grows with the logits' size (measure.FP32_RTOL)
    tol = max(ONNX_TOLERANCE, FP32_RTOL * scale)
    if not diff <= tol:
        raise UserError(f"the ONNX model differs from the torch model by {diff:.3g} (tolerance {tol:.3g}); "
                        "nothing was written. Export --format safetensors instead and report this")
    return diff
