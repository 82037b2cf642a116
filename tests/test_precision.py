"""bf16 training passes (`--precision bf16`, discovery/step.py): how close a bf16 pass of the masked forward is to the
fp32 one, in scores and in the mask gradients that training follows. Every check prints its difference. (Close per
pass is not the same trajectory: on SmolLM2/IOI with the joint recipe a bf16 run lost the sheaf fp32 keeps.)"""

from __future__ import annotations

import pytest
import torch

from sheafprune.arch import view_of
from sheafprune.config import resolve_config
from sheafprune.errors import UserError
from sheafprune.masked import mask_shapes, masked_forward
from sheafprune.models import tiny_model

MODELS = {
    "gpt2": lambda: tiny_model("gpt2"),
    "llama-gqa": lambda: tiny_model("llama", num_hidden_layers=3),
}


def test_precision_option():
    assert resolve_config(overrides={"target_density": "weight=0.1"}).precision == "fp32"
    assert resolve_config(overrides={"precision": "bf16", "target_density": "weight=0.1"}).precision == "bf16"
    with pytest.raises(UserError, match="unknown precision 'fp16'"):
        resolve_config(overrides={"precision": "fp16", "target_density": "weight=0.1"})
    with pytest.raises(UserError, match="the keep search runs in fp32"):
        resolve_config(overrides={"precision": "bf16"})


def _pass(view, ids, base: dict, c: torch.Tensor, *, edge_grad: str, bf16: bool):
    """Logits and mask gradients of one training pass (weight and edge masks), fp32 or under bf16 autocast."""
    masks = {k: v.clone().requires_grad_(True) for k, v in base.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = masked_forward(view, ids, masks=masks, last_only=True, edge_grad=edge_grad)
    assert logits.dtype == torch.float32, "the LM head runs in fp32 under autocast"
    (logits.reshape(-1, logits.shape[-1]) @ c).logsumexp(0).backward()
    return logits.detach(), {k: m.grad for k, m in masks.items()}


@pytest.mark.parametrize("edge_grad", ["gradient", "secant"])
@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_pass_follows_fp32(name, edge_grad):
    """Under bf16 autocast the logits stay within a few bf16 roundings of fp32's, and every mask type's gradient
    points the same way (cosine >= 0.99 over the type): what the mask logits train on is fp32's up to rounding."""
    model = MODELS[name]()
    view = view_of(model)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, model.config.vocab_size, (4, 9), generator=g)
    base = {k: (torch.rand(s, generator=g) < 0.7).float() for k, s in mask_shapes(view, ("weight", "edge")).items()}
    c = torch.randn(model.config.vocab_size, generator=g)
    ref, ref_grads = _pass(view, ids, base, c, edge_grad=edge_grad, bf16=False)
    low, low_grads = _pass(view, ids, base, c, edge_grad=edge_grad, bf16=True)
    rel = ((low - ref).abs().max() / ref.abs().max()).item()
    cos = {}
    for t in ("w/", "edge/"):
        a = torch.cat([ref_grads[k].flatten() for k in base if k.startswith(t)])
        b = torch.cat([low_grads[k].flatten() for k in base if k.startswith(t)])
        a, b = a.double(), b.double()
        cos[t] = (a @ b / (a.norm() * b.norm())).item()
    print(f"{name}, {edge_grad}: bf16 vs fp32 logits max diff {rel:.3g} of the largest; mask-gradient cosine "
          + ", ".join(f"{t} {v:.5f}" for t, v in cos.items()))
    assert rel <= 0.05, f"bf16 logits differ from fp32 by {rel:.3g} of the largest"
    assert min(cos.values()) >= 0.99, f"bf16 mask gradients vs fp32: cosine {cos}"


@pytest.mark.parametrize("recipe", ["joint", "discogp"])
def test_bf16_discovery_runs_and_says_so(recipe, monkeypatch, capsys):
    """A whole target-mode run with --precision bf16 (both stack paths: the joint recipe's secant keeps its stack
    fp32, DiscoGP's plain gradient runs it in bf16) trains, evaluates in fp32 and records the precision it trained
    in."""
    from sheafprune.discovery import discover, verb

    monkeypatch.setattr(verb, "native_bf16", lambda: False)  # the warning a CPU without bf16 instructions gets
    cfg = resolve_config(overrides=dict(model="tiny-llama", task="ioi", n_items=80, steps=6, batch_size=8,
                                        target_density="weight=0.3,edge=0.3" if recipe == "joint" else "",
                                        granularity="weight,edge", recipe=recipe, precision="bf16"))
    sheaf = discover(cfg, progress=False)
    assert sheaf.meta["training"]["precision"] == "bf16" and sheaf.meta["config"]["precision"] == "bf16"
    assert all(torch.isfinite(v).all() for v in sheaf.logits.values())
    assert 0.0 <= sheaf.meta["metrics"]["sheaf_accuracy"] <= 1.0
    assert capsys.readouterr().err.count("warning: --precision bf16 on a CPU without bf16 instructions") == 1


@pytest.mark.parametrize("name", list(MODELS))
def test_fp64_forward_is_fp64(name):
    """The masked forward of an fp64 model (the export's exactness check falls back to it) stays fp64 throughout and
    equals the fp32 forward to fp32 rounding."""
    model = MODELS[name]()
    view = view_of(model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=g)
    base = {k: (torch.rand(s, generator=g) < 0.7).float() for k, s in mask_shapes(view, ("head", "edge")).items()}
    ref = masked_forward(view, ids, masks=base)
    view64 = view_of(model.double())
    out = masked_forward(view64, ids, masks={k: v.double() for k, v in base.items()})
    d = (out - ref.double()).abs().max().item()
    print(f"{name}: fp64 vs fp32 masked forward, max diff {d:.3g}")
    assert out.dtype == torch.float64 and d <= 1e-4 * ref.abs().max().item()


@pytest.mark.parametrize("name", list(MODELS))
def test_fp64_compaction_is_exact(name):
    """In fp64 the compacted model equals the masked sheaf to fp64 rounding (the export's exactness check falls back
    to this comparison): nothing on either side may compute in fp32, as HF's RMSNorm does whatever its input. A
    sheaf of heads, neurons and edges under mean ablation, whose constants fold into biases."""
    from sheafprune.compact import compact
    from sheafprune.masked import mean_shapes

    view64 = view_of(MODELS[name]().double())
    g = torch.Generator().manual_seed(5)
    masks = {k: (torch.rand(s, generator=g) < 0.6).double()
             for k, s in mask_shapes(view64, ("neuron", "head", "edge")).items()}
    masks.update({k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in mean_shapes(view64).items()})
    slim = compact(view64, masks, dtype=torch.float64).to_model()
    ids = torch.randint(0, view64.model.config.vocab_size, (3, 9), generator=g)
    with torch.no_grad():
        ref = masked_forward(view64, ids, masks=masks)
        got = slim(input_ids=ids).logits
    d = (got - ref).abs().max().item()
    print(f"{name}: fp64 compacted vs masked, max diff {d:.3g}")
    assert got.dtype == torch.float64 and d <= 1e-10 * max(ref.abs().max().item(), 1.0), d
