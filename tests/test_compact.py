"""The compacted model against the masked forward (and against HF when nothing is pruned), on hand-built and
random masks. Every failure prints the max difference; every hand-built case also checks that the unit it
targets really went (a compaction that keeps everything would pass the equality trivially)."""

from __future__ import annotations

import pytest
import torch

from sheafprune.arch import view_of
from sheafprune.compact import compact
from sheafprune.masked import default_position_ids, mask_shapes, masked_forward
from sheafprune.models import tiny_model

TOL = 1e-5
MODELS = {
    "gpt2": lambda: tiny_model("gpt2", n_layer=3),
    "llama-gqa": lambda: tiny_model("llama", num_hidden_layers=3),
    "llama-bias": lambda: tiny_model("llama", num_hidden_layers=3, attention_bias=True, mlp_bias=True),
}


@pytest.fixture(scope="module", params=list(MODELS))
def view(request):
    return view_of(MODELS[request.param]())


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50257, (3, 9), generator=g)  # (B, T)
    am = torch.ones_like(ids)
    am[1, :3] = 0  # left padding
    am[2, :6] = 0
    return ids, am


def _check(view, masks):
    """Compact, compare with the masked forward on real tokens, return the Compacted."""
    ids, am = _inputs()
    c = compact(view, masks)
    with torch.no_grad():
        ref = masked_forward(view, ids, attention_mask=am, masks=masks)  # (B, T, V)
        got = c.to_model()(input_ids=ids, attention_mask=am).logits
    diff = (got - ref)[am.bool()].abs().max().item()
    assert diff <= TOL, f"compacted vs masked: max abs diff {diff:.3g} > {TOL}"
    return c


def _ones(view, granularity=("weight", "neuron", "head", "edge")):
    return {k: torch.ones(s) for k, s in mask_shapes(view, list(granularity)).items()}


def _layer(c, l):
    return next(x for x in c.config["layers"] if x["layer"] == l)


def test_no_masks_equals_hf(view):
    ids, am = _inputs()
    c = compact(view, {})
    with torch.no_grad():
        ref = view.model(input_ids=ids, attention_mask=am, position_ids=default_position_ids(am)).logits
        got = c.to_model()(input_ids=ids, attention_mask=am).logits
    diff = (got - ref)[am.bool()].abs().max().item()
    assert diff <= TOL, f"compacted (no masks) vs HF: max abs diff {diff:.3g}"
    assert c.stats["params"] == c.stats["params_original"], c.stats


def test_all_ones_equals_masked(view):
    c = _check(view, _ones(view))
    s = view.spec
    assert c.stats["heads_kept"] == s.n_layers * s.n_heads and c.stats["neurons_kept"] == s.n_layers * s.d_mlp


def test_whole_layer_removed(view):
    masks = _ones(view, ("head", "neuron", "edge"))
    masks["head/1"].zero_()
    masks["neuron/1"].zero_()
    c = _check(view, masks)
    assert [x["layer"] for x in c.config["layers"]] == [0, 2], c.config["layers"]
    assert c.stats["layers_removed"] == pytest.approx(1 / 3)


def test_head_with_value_path_pruned(view):
    """Every v-input edge of KV head 0 in layer 1 pruned: its query heads output a constant, folded away."""
    s = view.spec
    masks = _ones(view, ("edge",))
    masks["edge/1/v"][:, 0] = 0
    c = _check(view, masks)
    group = s.n_heads // s.n_kv_heads
    assert _layer(c, 1)["heads"] == list(range(group, s.n_heads)), _layer(c, 1)
    assert 0 not in _layer(c, 1)["kv_heads"]
    if view.model.config.model_type == "gpt2" or view.model.config.attention_bias:
        # the constant (value bias and output-bias share) reaches later readers as a folded input
        assert "q" in _layer(c, 2)["const"] and "mlp" in _layer(c, 1)["const"], _layer(c, 2)


def test_head_with_value_weights_pruned(view):
    """The same through weight masks: the value weights of KV head 0 of layer 0 all zero."""
    s = view.spec
    masks = _ones(view, ("weight",))
    key = next(k for k in masks if ".0." in k and ("c_attn.weight" in k or "v_proj.weight" in k))
    if "c_attn" in key:  # (D, 3D): the v block starts at 2D
        masks[key][:, 2 * s.d_model:2 * s.d_model + s.d_head] = 0
    else:  # (KV*hd, D)
        masks[key][: s.d_head] = 0
    c = _check(view, masks)
    assert 0 not in _layer(c, 0)["kv_heads"], _layer(c, 0)


def test_neuron_with_input_weights_pruned(view):
    """Neurons 0..4 of layer 0 lose every input weight: constant act(bias) (folded into b_out) or dead."""
    s = view.spec
    masks = _ones(view, ("weight",))
    for k in masks:
        if ".0." in k and any(n in k for n in ("c_fc.weight", "up_proj.weight", "gate_proj.weight")):
            if "c_fc" in k:  # (D, I)
                masks[k][:, :5] = 0
            else:  # (I, D)
                masks[k][:5] = 0
    c = _check(view, masks)
    assert _layer(c, 0)["neurons"] == list(range(5, s.d_mlp)), _layer(c, 0)["neurons"][:8]


def test_kv_group_kept_for_one_query_head(view):
    s = view.spec
    group = s.n_heads // s.n_kv_heads
    masks = _ones(view, ("head",))
    masks["head/0"][:] = 0
    masks["head/0"][group - 1] = 1  # the last head of KV group 0 only
    masks["head/0"][group] = 1  # and the first of group 1
    c = _check(view, masks)
    spec = _layer(c, 0)
    assert spec["heads"] == [group - 1, group], spec
    assert spec["kv_heads"] == [0, 1] and spec["kv_of_q"] == [0, 1], spec  # one query head per KV head


def test_only_input_to_output_edge(view):
    masks = {k: torch.zeros(v.shape) for k, v in _ones(view, ("edge",)).items()}
    masks["edge/out"][0] = 1
    c = _check(view, masks)
    assert c.config["layers"] == [] and c.config["out_reads"] == ["in"], c.config
    assert c.stats["layers_removed"] == 1.0


@pytest.mark.parametrize("granularity", [("edge",), ("weight", "edge"), ("neuron", "head", "edge")])
@pytest.mark.parametrize("density", [0.9, 0.6, 0.3, 0.1])
def test_random_masks(view, granularity, density):
    g = torch.Generator().manual_seed(int(density * 100) + len(granularity))
    masks = {}
    for k, shape in mask_shapes(view, list(granularity)).items():
        # Weight masks stay denser so that the edges, not the weights, decide what survives.
        keep = density ** 0.25 if k.startswith("w/") else density
        masks[k] = (torch.rand(shape, generator=g) < keep).float()
    c = _check(view, masks)
    if density <= 0.6:
        assert c.stats["params"] < c.stats["params_original"], c.stats
