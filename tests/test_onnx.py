"""ONNX export against torch with onnxruntime: a compacted GPT-2 directly, and a Llama (GQA) export folder with
--format all. Dynamic axes are checked on a second, smaller batch inside export_onnx."""

from __future__ import annotations

import json

import pytest
import torch

from sheafprune.arch import view_of
from sheafprune.compact import compact
from sheafprune.exporter import export
from sheafprune.exporter.onnx import ONNX_TOLERANCE, onnx_logits, write_onnx
from sheafprune.masked import mask_shapes, masked_forward
from sheafprune.models import fingerprint, load_model, tiny_model
from sheafprune.sheaf import Sheaf

pytest.importorskip("onnxruntime")


def test_compacted_gpt2_onnx_vs_torch(tmp_path):
    view = view_of(tiny_model("gpt2", n_layer=3))
    g = torch.Generator().manual_seed(3)
    masks = {k: (torch.rand(s, generator=g) < 0.5).float() for k, s in mask_shapes(view, ["edge"]).items()}
    model = compact(view, masks).to_model()
    ids = torch.randint(0, 50257, (2, 6), generator=g)  # (B, T)
    am = torch.ones_like(ids)
    am[1, :2] = 0
    write_onnx(model, tmp_path / "m.onnx", input_ids=ids, attention_mask=am)
    # Another batch size and length than the export example: the axes are dynamic.
    ids2 = torch.randint(0, 50257, (3, 11), generator=g)
    am2 = torch.ones_like(ids2)
    am2[0, :4] = 0
    got = onnx_logits(tmp_path / "m.onnx", input_ids=ids2, attention_mask=am2)
    with torch.no_grad():
        want = model(input_ids=ids2, attention_mask=am2).logits
        sheaf = masked_forward(view, ids2, attention_mask=am2, masks=masks)
    real = am2.bool()
    diff = (got - want)[real].abs().max().item()
    assert diff <= ONNX_TOLERANCE, f"onnxruntime vs torch: max abs diff {diff:.3g}"
    diff = (got - sheaf)[real].abs().max().item()
    assert diff <= ONNX_TOLERANCE, f"onnxruntime vs masked sheaf: max abs diff {diff:.3g}"


def test_llama_export_all_formats(tmp_path):
    model, tok = load_model("tiny-llama")
    g = torch.Generator().manual_seed(5)
    logits = {k: torch.rand(s, generator=g) - 0.4 for k, s in mask_shapes(view_of(model), ["head", "edge"]).items()}
    sheaf = Sheaf(logits, {"model": {"name": "tiny-llama", "fingerprint": fingerprint(model)}, "task": "ioi",
                           "granularity": ["head", "edge"], "config": {"seed": 0, "n_items": 40}})
    info = export(sheaf, out=tmp_path / "e", formats=["all"], model=model, tokenizer=tok)
    assert (tmp_path / "e" / "model.onnx").is_file() and (tmp_path / "e" / "model.safetensors").is_file()
    assert info["max_abs_diff_onnx"] <= ONNX_TOLERANCE, info
    assert json.loads((tmp_path / "e" / "sheaf.json").read_text())["export"]["bytes_onnx"] == info["bytes_onnx"]


def test_model_without_attention_keeps_the_attention_mask_input(tmp_path):
    """Only MLPs left (Llama: no learned positions either): the ONNX model still takes attention_mask."""
    view = view_of(tiny_model("llama"))
    masks = {f"head/{l}": torch.zeros(view.spec.n_heads) for l in range(view.spec.n_layers)}
    model = compact(view, masks).to_model()
    assert not any(layer.n_heads for layer in model.layers)
    ids = torch.randint(0, 50257, (2, 5))
    write_onnx(model, tmp_path / "m.onnx", input_ids=ids, attention_mask=torch.ones_like(ids))
    got = onnx_logits(tmp_path / "m.onnx", input_ids=ids, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    diff = (got - want).abs().max().item()
    assert diff <= ONNX_TOLERANCE, f"onnxruntime vs torch: max abs diff {diff:.3g}"
