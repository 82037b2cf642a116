"""The masked forward against independent computations: HF's own forward (all masks on, or HF weights edited
by hand) and a slow per-reader reference built from HF's modules. Every failure prints the max difference."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from sheafprune.arch import view_of
from sheafprune.graph import Graph
from sheafprune.masked import _head_outputs, default_position_ids, mask_shapes, masked_forward
from sheafprune.models import tiny_model

TOL = 1e-5
MODELS = {
    "gpt2": lambda: tiny_model("gpt2"),
    "llama-gqa": lambda: tiny_model("llama", num_hidden_layers=3),
    "llama-bias-mha": lambda: tiny_model("llama", attention_bias=True, mlp_bias=True, num_key_value_heads=4),
}


def _inputs(pad: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50257, (3, 9), generator=g)
    am = torch.ones_like(ids)
    if pad:
        am[1, :3] = 0
        am[2, :6] = 0
    return ids, am


def _max_diff(a, b, am):
    keep = am.bool()  # pad positions are garbage in both; compare real tokens only
    return (a - b)[keep].abs().max().item()


def _hf_logits(model, ids, am):
    return model(input_ids=ids, attention_mask=am, position_ids=default_position_ids(am)).logits


@pytest.fixture(params=list(MODELS))
def model(request):
    return MODELS[request.param]()


@pytest.mark.parametrize("pad", [False, True])
def test_all_ones_reproduce_hf(model, pad):
    ids, am = _inputs(pad)
    view = view_of(model)
    ref = _hf_logits(model, ids, am)
    ones = {k: torch.ones(s) for k, s in mask_shapes(view, ("weight", "neuron", "head", "edge")).items()}
    for masks in (None, ones):
        out = masked_forward(view, ids, attention_mask=am, masks=masks)
        d = _max_diff(out, ref, am)
        assert d <= TOL, f"masked forward vs HF ({'no masks' if masks is None else 'all-ones'}): max diff {d:.3g}"


def test_default_positions_match_hf_without_padding(model):
    ids, am = _inputs(False)
    d = _max_diff(masked_forward(view_of(model), ids), model(input_ids=ids).logits, am)
    assert d <= TOL, f"max diff {d:.3g}"


def test_left_padding_equals_unpadded(model):
    ids, am = _inputs(True)
    view = view_of(model)
    padded = masked_forward(view, ids, attention_mask=am)
    alone = masked_forward(view, ids[2:, 6:])  # row 2 without its 6 pad tokens
    d = (padded[2, 6:] - alone[0]).abs().max().item()
    assert d <= TOL, f"left-padded row vs the same row unpadded: max diff {d:.3g}"


def test_weight_masks_equal_edited_hf_weights(model):
    ids, am = _inputs(True)
    view = view_of(model)
    g = torch.Generator().manual_seed(1)
    masks = {"w/" + n: (torch.rand(p.shape, generator=g) > 0.3).float() for n, p in view.maskable().items()}
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in masks.items():
            ref_model.get_parameter(name[2:]).mul_(m)
    d = _max_diff(masked_forward(view, ids, attention_mask=am, masks=masks), _hf_logits(ref_model, ids, am), am)
    assert d <= TOL, f"weight masks vs HF with masked weights: max diff {d:.3g}"


def _out_proj(model, layer):
    if model.config.model_type == "gpt2":
        return model.transformer.h[layer].mlp.c_proj, model.transformer.h[layer].attn.c_proj
    block = model.model.layers[layer]
    return block.mlp.down_proj, block.self_attn.o_proj


def test_neuron_and_head_masks_equal_hand_ablation(model):
    ids, am = _inputs(True)
    view = view_of(model)
    spec = view.spec
    masks = {"neuron/0": torch.ones(spec.d_mlp), "head/1": torch.ones(spec.n_heads)}
    masks["neuron/0"][[0, 5, 17]] = 0
    masks["head/1"][[0, 2]] = 0
    ref_model = copy.deepcopy(model)
    down, _ = _out_proj(ref_model, 0)
    _, o_proj = _out_proj(ref_model, 1)
    hd = spec.d_head
    gpt2 = model.config.model_type == "gpt2"
    with torch.no_grad():
        for i in (0, 5, 17):  # a neuron's only way out is its output-weight row
            (down.weight[i] if gpt2 else down.weight[:, i]).zero_()
        for h in (0, 2):  # a head's way out is its W_O rows, plus its share of the output bias
            (o_proj.weight[h * hd:(h + 1) * hd] if gpt2 else o_proj.weight[:, h * hd:(h + 1) * hd]).zero_()
        if o_proj.bias is not None:
            o_proj.bias.mul_(1 - 2 / spec.n_heads)
    d = _max_diff(masked_forward(view, ids, attention_mask=am, masks=masks), _hf_logits(ref_model, ids, am), am)
    assert d <= TOL, f"neuron/head masks vs hand-ablated HF weights: max diff {d:.3g}"


def _reference_edges(model, ids, am, masks):
    """Slow per-reader forward from HF's own modules: q/k/v computed by the full projection then sliced."""
    cfg, gpt2 = model.config, model.config.model_type == "gpt2"
    view = view_of(model)
    spec = view.spec
    h_n, hd, group = spec.n_heads, spec.d_head, spec.n_heads // spec.n_kv_heads
    pos = default_position_ids(am)
    t = ids.shape[1]
    allowed = torch.ones(t, t).tril().bool()[None] & am.bool()[:, None, :]  # (B, T, T)
    if gpt2:
        tr = model.transformer
        writers = [tr.wte(ids) + tr.wpe(pos)]
        blocks = tr.h
    else:
        writers = [model.model.embed_tokens(ids)]
        blocks = model.model.layers
        cos, sin = model.model.rotary_emb(writers[0], pos)

    def read(key, col):
        m = masks[key]
        m = m if m.dim() == 1 else m[:, col]
        return sum(m[w] * writers[w] for w in range(m.shape[0]))

    for l, blk in enumerate(blocks):
        ln1 = blk.ln_1 if gpt2 else blk.input_layernorm
        ln2 = blk.ln_2 if gpt2 else blk.post_attention_layernorm
        heads = []
        for h in range(h_n):
            g = h // group
            if gpt2:
                q = blk.attn.c_attn(ln1(read(f"edge/{l}/q", h)))[..., h * hd:(h + 1) * hd]
                k = blk.attn.c_attn(ln1(read(f"edge/{l}/k", g)))[..., cfg.n_embd + g * hd:cfg.n_embd + (g + 1) * hd]
                v = blk.attn.c_attn(ln1(read(f"edge/{l}/v", g)))[..., 2 * cfg.n_embd + g * hd:2 * cfg.n_embd + (g + 1) * hd]
                o = blk.attn.c_proj
            else:
                a = blk.self_attn
                q = a.q_proj(ln1(read(f"edge/{l}/q", h)))[..., h * hd:(h + 1) * hd]
                k = a.k_proj(ln1(read(f"edge/{l}/k", g)))[..., g * hd:(g + 1) * hd]
                v = a.v_proj(ln1(read(f"edge/{l}/v", g)))[..., g * hd:(g + 1) * hd]
                q, k = apply_rotary_pos_emb(q[:, None], k[:, None], cos, sin)
                q, k = q[:, 0], k[:, 0]
                o = a.o_proj
            att = (q @ k.transpose(-1, -2)) * spec.attn_scale
            att = att.masked_fill(~allowed, torch.finfo(att.dtype).min).softmax(-1)
            z = torch.zeros(*q.shape[:2], h_n * hd)
            z[..., h * hd:(h + 1) * hd] = att @ v
            out = o(z)  # z_h @ W_O[h] + the whole output bias
            if o.bias is not None:
                out = out - o.bias * (1 - 1 / h_n)
            heads.append(out)
        writers += heads
        writers.append(blk.mlp(ln2(read(f"edge/{l}/mlp", 0))))
    final = read("edge/out", 0)
    return model.lm_head(model.transformer.ln_f(final) if gpt2 else model.model.norm(final))


@pytest.mark.parametrize("density", [1.0, 0.7, 0.3, 0.05])
def test_edge_masks_equal_per_reader_reference(model, density):
    ids, am = _inputs(True)
    view = view_of(model)
    g = torch.Generator().manual_seed(int(density * 100))
    masks = {k: (torch.rand(s, generator=g) < density).float() for k, s in view.graph.edge_shapes().items()}
    with torch.no_grad():
        ref = _reference_edges(model, ids, am, masks)
        out = masked_forward(view, ids, attention_mask=am, masks=masks)
    d = _max_diff(out, ref, am)
    assert d <= TOL, f"edge masks at density {density}: max diff {d:.3g} vs per-reader reference"


def test_edge_to_output_matches_hf_hook():
    """Pruning m0 -> out equals HF's forward with m0's output subtracted right before the final norm."""
    model = tiny_model("gpt2")
    ids, am = _inputs(True)
    view = view_of(model)
    captured = {}
    h1 = model.transformer.h[0].mlp.register_forward_hook(lambda m, i, o: captured.__setitem__("m0", o))
    h2 = model.transformer.ln_f.register_forward_pre_hook(lambda m, args: (args[0] - captured["m0"],))
    try:
        ref = _hf_logits(model, ids, am)
    finally:
        h1.remove(), h2.remove()
    masks = {k: torch.ones(s) for k, s in view.graph.edge_shapes().items()}
    masks["edge/out"][view.graph.writers().index("m0")] = 0
    d = _max_diff(masked_forward(view, ids, attention_mask=am, masks=masks), ref, am)
    assert d <= TOL, f"m0->out pruned vs HF hook: max diff {d:.3g}"


def test_masks_are_differentiable():
    model = tiny_model("llama")
    view = view_of(model)
    ids, am = _inputs(True)
    masks = {k: torch.ones(s, requires_grad=True) for k, s in mask_shapes(view, ("weight", "neuron", "head", "edge")).items()}
    masked_forward(view, ids, attention_mask=am, masks=masks)[:, -1].logsumexp(-1).sum().backward()
    no_grad = [k for k, m in masks.items() if m.grad is None or not m.grad.abs().sum() > 0]
    assert not no_grad, f"no gradient reached: {no_grad[:5]}"


def test_graph_counts_gpt2_small_and_smollm2():
    with torch.device("meta"):
        gpt2_small = GPT2LMHeadModel(GPT2Config())
        smol = LlamaForCausalLM(LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                            num_attention_heads=9, num_key_value_heads=3, vocab_size=49152))
    v = view_of(gpt2_small)
    shapes = v.graph.edge_shapes()
    n = lambda prefix: sum(torch.Size(s).numel() for k, s in shapes.items() if k.endswith(prefix))
    assert v.graph.n_edges() == 32491
    assert (n("/q") + n("/k") + n("/v"), n("/mlp"), n("edge/out")) == (31320, 1014, 157)
    assert sum(torch.Size(s).numel() for s in mask_shapes(v, ("weight",)).values()) == 85_017_600
    g = view_of(smol).graph
    assert g.n_writers() == 301
    # per layer: 9 q-reads + 3 k-reads + 3 v-reads over W_l writers, the MLP over W_l + 9, and the output
    expected = sum(15 * (1 + 10 * l) + (1 + 10 * l + 9) for l in range(30)) + 301
    assert g.n_edges() == expected
    names = Graph(2, 4, 2).edge_names("edge/1/k")
    assert names[0] == "in->a1.kv0.k" and names[-1] == "m0->a1.kv1.k"


def test_last_only_equals_last_position(model):
    ids, am = _inputs(True)
    view = view_of(model)
    full = masked_forward(view, ids, attention_mask=am)
    last = masked_forward(view, ids, attention_mask=am, last_only=True)
    d = (full[:, -1:] - last).abs().max().item()
    assert last.shape == (3, 1, full.shape[-1]) and d <= TOL, f"last_only vs last position: max diff {d:.3g}"


def test_last_only_edge_read_equals_last_position(model):
    """With edge masks the final norm reads the stack at the last position only; its logits and every mask's
    gradient (the writers' share of it is added to the stack's gradient rows late) must equal the full read's."""
    ids, am = _inputs(True)
    view = view_of(model)
    g = torch.Generator().manual_seed(5)
    soft = {k: torch.rand(s, generator=g) for k, s in mask_shapes(view, ("neuron", "head", "edge")).items()}
    runs = []
    for last_only in (False, True):
        masks = {k: v.clone().requires_grad_() for k, v in soft.items()}
        out = masked_forward(view, ids, attention_mask=am, masks=masks, last_only=last_only)[:, -1]
        out.square().mean().backward()
        runs.append((out.detach(), masks))
    d = (runs[0][0] - runs[1][0]).abs().max().item()
    dg = max((runs[0][1][k].grad - runs[1][1][k].grad).abs().max().item() for k in soft)
    print(f"last-position edge read vs full: logits max diff {d:.3g}, mask gradients max diff {dg:.3g}")
    assert d <= TOL and dg <= 1e-4, f"logits max diff {d:.3g}, mask gradients max diff {dg:.3g}"


def test_absent_edge_masks_equal_all_ones(model):
    """Absent keys mean all ones, also when only some of a layer's readers are edge-masked."""
    ids, am = _inputs(True)
    view = view_of(model)
    g = torch.Generator().manual_seed(4)
    edges = {k: torch.rand(s, generator=g) for k, s in mask_shapes(view, ("edge",)).items()}
    some = {k: v for k, v in edges.items() if k.endswith(("/q", "/mlp"))}  # no k, v or output masks
    ones = {**{k: torch.ones_like(v) for k, v in edges.items()}, **some}
    d = _max_diff(masked_forward(view, ids, attention_mask=am, masks=some),
                  masked_forward(view, ids, attention_mask=am, masks=ones), am)
    print(f"absent edge masks vs all-ones: max diff {d:.3g}")
    assert d <= TOL, f"absent edge masks vs all-ones: max diff {d:.3g}"


def test_soft_head_masks_with_means_fold_exactly(model):
    """A head mask scales the attention output before W_O, and the bias share and mean fold into a constant. What
    the heads write must equal masking their unmasked outputs (the tap) by hand; and the MLP's edges from its own
    layer's heads, computed from the scaled attention outputs, must equal the residual sum when all edges are kept."""
    ids, am = _inputs(True)
    view = view_of(model)
    spec = view.spec
    g = torch.Generator().manual_seed(3)
    z = torch.randn(spec.n_heads, 2, 5, spec.d_head, generator=g)
    mask, mean = torch.rand(spec.n_heads, generator=g), torch.randn(spec.n_heads, spec.d_model, generator=g)
    taps = {}
    heads, zs, const = _head_outputs(z, view.attn(0, view.model.get_parameter), mask, mean, taps, "head/0")
    hm = mask[:, None, None, None]
    d_unit = (heads - (taps["head/0"] * hm + (1 - hm) * mean[:, None, None, :])).abs().max().item()
    soft = {**{f"head/{l}": torch.rand(spec.n_heads, generator=g) for l in range(spec.n_layers)},
            **{f"mean/head/{l}": torch.randn(spec.n_heads, spec.d_model, generator=g) for l in range(spec.n_layers)}}
    ones = {k: torch.ones(s) for k, s in mask_shapes(view, ("edge",)).items()}
    d = _max_diff(masked_forward(view, ids, attention_mask=am, masks=soft),
                  masked_forward(view, ids, attention_mask=am, masks={**soft, **ones}), am)
    print(f"head masks folded: outputs vs by hand max diff {d_unit:.3g}; all-ones edges vs none {d:.3g}")
    assert d_unit <= TOL and d <= TOL, f"by hand {d_unit:.3g}, all-ones edges vs none {d:.3g}"


def test_edge_mask_gradients_equal_reference(model):
    """The stack read has a hand-written backward; its mask and activation gradients must equal autograd's
    through the plain per-reader reference."""
    ids, am = _inputs(True)
    view = view_of(model)
    g = torch.Generator().manual_seed(3)
    base = {k: (torch.rand(s, generator=g) < 0.6).float() for k, s in view.graph.edge_shapes().items()}
    grads = []
    for fn in (lambda m: masked_forward(view, ids, attention_mask=am, masks=m), lambda m: _reference_edges(model, ids, am, m)):
        masks = {k: v.clone().requires_grad_(True) for k, v in base.items()}
        out = fn(masks)
        (out[am.bool()].logsumexp(-1).sum()).backward()
        grads.append({k: m.grad for k, m in masks.items()})
    d = max((grads[0][k] - grads[1][k]).abs().max().item() for k in base)
    scale = max(grads[1][k].abs().max().item() for k in base)
    assert d <= 1e-4 * max(scale, 1.0), f"edge-mask gradients vs reference: max diff {d:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_flip_effects_equal_explicit_norm(norm):
    """flip_effects' dot-product form equals g . (norm(x -+ o_w) - norm(x)) computed with the norm module itself,
    including writers far larger than the rest of the input (the case the plain gradient gets wrong)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from sheafprune.stack import flip_effects, norm_eps

    torch.manual_seed(0)
    d, r, w, n = 8, 3, 5, 4
    mod = LlamaRMSNorm(d, eps=1e-6) if norm == "rmsnorm" else torch.nn.LayerNorm(d)
    with torch.no_grad():
        mod.weight.uniform_(0.5, 1.5)
    o = torch.randn(w, n, d) * torch.tensor([1.0, 100.0, 0.1, 3.0, 1.0])[:, None, None]
    mask = (torch.rand(w, r) > 0.4).float()
    x = torch.einsum("wr,wnd->rnd", mask, o)
    g = torch.randn(r, n, d)
    got = flip_effects(g, x, o, mask, mod.weight.detach(), norm_eps(mod), centered=norm == "layernorm")
    ref = torch.zeros(w, r)
    with torch.no_grad():
        for i in range(w):
            for j in range(r):
                s = 1 - 2 * mask[i, j]
                ref[i, j] = s * (g[j] * (mod(x[j] + s * o[i]) - mod(x[j]))).sum()
    diff = (got - ref).abs().max().item()
    # 1e-3: |x -+ o|^2 is formed as |x|^2 -+ 2 x.o + |o|^2, which cancels in fp32 when one writer is 100x the rest
    assert diff <= 1e-3 * ref.abs().max().item(), f"flip_effects vs explicit norm: max diff {diff:.3g}"


def test_secant_edge_grad(model):
    """edge_grad="secant" changes only the edge masks' gradients: same logits, same weight-mask gradients, and for
    the output reader (linear after its norm, so the secant is exact) L(mask 1) - L(mask 0) of each edge."""
    ids, am = _inputs(True)
    view = view_of(model)
    g = torch.Generator().manual_seed(5)
    shapes = mask_shapes(view, ("weight", "edge"))
    base = {k: (torch.rand(s, generator=g) < 0.7).float() for k, s in shapes.items()}
    c = torch.randn(model.config.vocab_size, generator=g)

    def loss(logits):
        return (logits[am.bool()] @ c).sum()

    runs = {}
    for mode in ("gradient", "secant"):
        masks = {k: v.clone().requires_grad_(True) for k, v in base.items()}
        logits = masked_forward(view, ids, attention_mask=am, masks=masks, edge_grad=mode)
        loss(logits).backward()
        runs[mode] = (logits.detach(), {k: m.grad for k, m in masks.items()})
    # The same sums in another order (the gradient mode reads an MLP's input in its layer's q/k/v pass): equal to
    # float rounding.
    d = (runs["gradient"][0] - runs["secant"][0]).abs().max().item()
    scale = runs["gradient"][0].abs().max().item()
    assert d <= 1e-5 * scale, f"logits differ between edge_grad modes: max diff {d:.3g} (scale {scale:.3g})"
    wkeys = [k for k in base if k.startswith("w/")]
    dw = max((runs["gradient"][1][k] - runs["secant"][1][k]).abs().max().item() for k in wkeys)
    sw = max(runs["gradient"][1][k].abs().max().item() for k in wkeys)
    assert dw <= 1e-4 * sw, f"weight-mask gradients differ between edge_grad modes: max diff {dw:.3g} (scale {sw:.3g})"
    print(f"edge_grad modes: logits max diff {d:.3g}, weight-mask gradients max diff {dw:.3g}")
    with torch.no_grad():
        now = loss(masked_forward(view, ids, attention_mask=am, masks=base))
        flips = []
        for i in range(base["edge/out"].numel()):
            flipped = base["edge/out"].clone()
            flipped[i] = 1 - flipped[i]
            after = loss(masked_forward(view, ids, attention_mask=am, masks={**base, "edge/out": flipped}))
            flips.append(float(now - after) if base["edge/out"][i] == 1 else float(after - now))
    ref = torch.tensor(flips)
    got = runs["secant"][1]["edge/out"]
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-3 * max(ref.abs().max().item(), 1.0), f"secant vs exact flips of edge/out: max diff {diff:.3g}"
    inner = [k for k in base if k.startswith("edge/") and k != "edge/out"]
    assert all(torch.isfinite(runs["secant"][1][k]).all() for k in inner)
    assert any((runs["secant"][1][k] - runs["gradient"][1][k]).abs().max() > 1e-6 for k in inner)
