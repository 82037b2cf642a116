"""Compaction: one plan from the deterministic masks, then the kept units sliced out and the constants folded.

The plan walks the graph twice. Forward, it finds every writer whose output no longer depends on the
tokens and computes that constant (D,): a head that is head-masked (0), whose output weights are all
pruned (its bias share), or whose value path is constant (softmax weights sum to 1, so it outputs
v_const @ W_O + bias share); an MLP whose input is constant or whose every neuron is dead or constant.
Inside a kept MLP, a neuron whose input weights are all pruned outputs act(bias): folded into b_out. Under mean
ablation (`mean/` keys) a pruned head writes its mean output and a pruned neuron's hidden value is its mean: both
constants, folded the same way.
Backward, from `out`, it keeps a writer iff it is not constant and some kept reader reads it through a
kept edge; a reader is kept iff its head/MLP is. A constant writer's value is added to each kept
reader that reads it (`*_const`). KV heads are kept iff some kept query head uses them; layers with no
kept head or MLP go. Element zeros inside kept tensors stay as they are.

The result is the config and tensors of `exporter/modeling_sheaf.py`'s SheafForCausalLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from .arch import ArchView, AttnParams, MlpParams
from .errors import UserError
from .graph import EDGE_OUT, edge_key, head_key, mean_key, neuron_key, weight_key
from .masked import Masks

@dataclass
class Compacted:
    config: dict[str, Any]  # SheafConfig fields
    tensors: dict[str, Tensor]  # SheafForCausalLM state dict
    stats: dict[str, Any] = field(default_factory=dict)

    def to_model(self) -> "SheafForCausalLM":  # noqa: F821 (imported here: exporter/ imports this module)
        from .exporter.modeling_sheaf import SheafConfig, SheafForCausalLM

        model = SheafForCausalLM(SheafConfig(**self.config)).to(next(iter(self.tensors.values())).dtype)
        missing, unexpected = model.load_state_dict(self.tensors, strict=False)
        assert not missing and not unexpected, f"state dict mismatch: missing {missing}, unexpected {unexpected}"
        return model.eval()


@dataclass
class _Layer:
    """One layer under the masks: masked parameters and what the forward sweep found."""

    attn: AttnParams
    mlp: MlpParams
    head_mask: Tensor  # (H,)
    neuron_mask: Tensor  # (I,)
    head_mean: Tensor  # (H, D) what a pruned head writes (zeros without mean ablation)
    neuron_mean: Tensor  # (I,) a pruned neuron's hidden value (zeros without mean ablation)
    neurons: list[int] = field(default_factory=list)  # kept, non-constant neurons
    b_out: Optional[Tensor] = None  # (D,) MLP output bias with folded neurons


class _Plan:
    def __init__(self, view: ArchView, masks: Masks, dtype: torch.dtype):
        self.view, self.spec, self.graph, self.dtype = view, view.spec, view.graph, dtype
        s = self.spec
        self.masks = {k: v.detach().to(dtype) for k, v in masks.items()}

        def w(name: str) -> Tensor:
            p = view.model.get_parameter(name).detach().to(dtype)
            m = self.masks.get(weight_key(name))
            return p if m is None else p * m

        def ones(*shape: int) -> Tensor:
            return torch.ones(*shape, dtype=dtype)

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=dtype)

        self.layers = [_Layer(view.attn(l, w), view.mlp(l, w), self.masks.get(head_key(l), ones(s.n_heads)),
                              self.masks.get(neuron_key(l), ones(s.d_mlp)),
                              self.masks.get(mean_key(head_key(l)), zeros(s.n_heads, s.d_model)),
                              self.masks.get(mean_key(neuron_key(l)), zeros(s.d_mlp))) for l in range(s.n_layers)]
        self.const: list[Optional[Tensor]] = [None] * self.graph.n_writers()  # per writer, (D,) if constant
        self.live = [False] * self.graph.n_writers()

    def edges(self, key: str) -> Tensor:
        """The 0/1 edge mask of `key` as (W, R) (absent = all kept)."""
        shape = self.graph.edge_shapes()[key]
        m = self.masks.get(key, torch.ones(shape, dtype=self.dtype))
        return (m.reshape(shape[0], -1) > 0).to(self.dtype)

    def _norm(self, site: str, layer: int, x: Tensor) -> Tensor:
        """The model's own norm module on a constant input (in the module's dtype), back in the plan's dtype."""
        dtype = self.view.norm_module(site, layer).weight.dtype
        return self.view.norm(site, layer, x.to(dtype)).to(self.dtype)

    def const_input(self, col: Tensor) -> Optional[Tensor]:
        """A reader's input (D,) if every writer it reads (col (W,) 0/1) is constant, else None."""
        rows = col.nonzero().flatten().tolist()
        if any(self.const[r] is None for r in rows):
            return None
        return self.const_sum(col)

    def const_sum(self, col: Tensor) -> Tensor:
        """Sum of the constant writers' outputs a reader reads (its folded constant input), (D,)."""
        total = torch.zeros(self.spec.d_model, dtype=self.dtype)
        for r in col.nonzero().flatten().tolist():
            if self.const[r] is not None:
                total = total + self.const[r]
        return total

    # --- forward: constants -------------------------------------------------------------------
    def sweep_constants(self) -> None:
        s, g = self.spec, self.graph
        group = s.n_heads // s.n_kv_heads
        for l, lay in enumerate(self.layers):
            a, base = lay.attn, g.writers_before_attn(l)
            ev = self.edges(edge_key(l, "v"))
            share = a.bo / s.n_heads if a.bo is not None else torch.zeros(s.d_model, dtype=self.dtype)
            for h in range(s.n_heads):
                kv = h // group
                if lay.head_mask[h] == 0:
                    self.const[base + h] = lay.head_mean[h].clone()
                    continue
                xv = self.const_input(ev[:, kv])
                v_const = None
                if xv is not None:
                    v_const = self._norm("attn", l, xv) @ a.wv[kv] + (a.bv[kv] if a.bv is not None else 0)
                elif not a.wv[kv].any():
                    v_const = a.bv[kv] if a.bv is not None else torch.zeros(s.d_head, dtype=self.dtype)
                if not a.wo[h].any():
                    self.const[base + h] = share.clone()
                elif v_const is not None:  # softmax weights sum to 1: the head outputs its constant value
                    self.const[base + h] = v_const @ a.wo[h] + share
            self.sweep_mlp(l, lay)

    def sweep_mlp(self, l: int, lay: _Layer) -> None:
        m, view = lay.mlp, self.view
        d_mlp = m.w_out.shape[0]
        b_in = m.b_in if m.b_in is not None else torch.zeros(d_mlp, dtype=self.dtype)
        b_out = m.b_out if m.b_out is not None else torch.zeros(self.spec.d_model, dtype=self.dtype)
        pruned_value = (1 - lay.neuron_mask) * lay.neuron_mean  # (I,) hidden value of pruned neurons
        j = self.graph.writers_before_mlp(l)
        xm = self.const_input(self.edges(edge_key(l, "mlp"))[:, 0])
        if xm is not None:  # constant input: the whole MLP is a constant
            x = self._norm("mlp", l, xm)
            hidden = x @ m.w_in + b_in
            hidden = view.act(x @ m.w_gate + (m.b_gate if m.b_gate is not None else 0)) * hidden \
                if m.w_gate is not None else view.act(hidden)
            self.const[j] = (hidden * lay.neuron_mask + pruned_value) @ m.w_out + b_out
            return
        alive = (lay.neuron_mask > 0) & m.w_out.any(dim=1)  # (I,)
        input_free = ~m.w_in.any(dim=0)  # (I,)
        if m.w_gate is not None:
            b_gate = m.b_gate if m.b_gate is not None else torch.zeros(d_mlp, dtype=self.dtype)
            gate_free = ~m.w_gate.any(dim=0)
            const_value = view.act(b_gate) * b_in  # (I,) hidden value of an input-free neuron
            constant = input_free & gate_free
            # act(gate) * 0 and act(b_gate = 0) * up are zero at every position.
            dead = (input_free & (b_in == 0)) | (gate_free & (view.act(b_gate) == 0))
        else:
            const_value, constant, dead = view.act(b_in), input_free, torch.zeros(d_mlp, dtype=torch.bool)
        folded = alive & constant
        lay.b_out = b_out + (const_value * folded + pruned_value) @ m.w_out
        lay.neurons = (alive & ~constant & ~dead).nonzero().flatten().tolist()
        if not lay.neurons:
            self.const[j] = lay.b_out

    # --- backward: liveness --------------------------------------------------------------------
    def sweep_liveness(self) -> None:
        s, g = self.spec, self.graph
        read = torch.zeros(g.n_writers(), dtype=torch.bool)

        def mark(col: Tensor) -> None:
            read[: col.shape[0]] |= col > 0

        mark(self.edges(EDGE_OUT)[:, 0])
        group = s.n_heads // s.n_kv_heads
        for l in reversed(range(s.n_layers)):
            j = g.writers_before_mlp(l)
            self.live[j] = self.const[j] is None and bool(read[j])
            if self.live[j]:
                mark(self.edges(edge_key(l, "mlp"))[:, 0])
            base = g.writers_before_attn(l)
            heads = [h for h in range(s.n_heads) if self.const[base + h] is None and bool(read[base + h])]
            for h in heads:
                self.live[base + h] = True
                mark(self.edges(edge_key(l, "q"))[:, h])
            for kv in sorted({h // group for h in heads}):
                mark(self.edges(edge_key(l, "k"))[:, kv])
                mark(self.edges(edge_key(l, "v"))[:, kv])
        self.live[0] = True  # the embedding is always kept: it holds the token lookup


def compact(view: ArchView, masks: Masks, *, dtype: torch.dtype = torch.float32) -> Compacted:
    """Compact `view.model` under deterministic 0/1 `masks` (mask keys as in masked.py); tensors are stored in `dtype`.

    The plan and its folded constants are computed in float64 whatever `dtype` is: a mean-ablated sheaf folds sums of
    many head means of ~1e3 (SmolLM2), whose fp32 accumulation alone put an export 5.3e-4 away from its masked model
    (3x the masked model's own fp32 rounding)."""
    p = _Plan(view, masks, torch.float64)
    p.sweep_constants()
    p.sweep_liveness()
    return _build(view, p, dtype)


def _reads(p: _Plan, key: str, cols: list[int]) -> tuple[list[list[str]], Tensor]:
    """For kept readers `cols` of edge mask `key`: the kept writers each reads, and its constant (R, D)."""
    e, names = p.edges(key), p.graph.writers()
    lists = [[names[w] for w in e[:, c].nonzero().flatten().tolist() if p.live[w]] for c in cols]
    const = torch.stack([p.const_sum(e[:, c]) for c in cols]) if cols else torch.zeros(0, p.spec.d_model, dtype=p.dtype)
    return lists, const


def _build(view: ArchView, p: _Plan, dtype: torch.dtype) -> Compacted:
    s, g, hf = p.spec, p.graph, view.hf_names
    params = dict(view.model.named_parameters())
    t: dict[str, Tensor] = {"embed.weight": params[hf["embed"]].detach().to(p.dtype)}
    if hf["pos"]:
        t["pos.weight"] = params[hf["pos"]].detach().to(p.dtype)

    def norm(prefix: str, name: str) -> None:
        t[prefix + ".weight"] = params[name + ".weight"].detach().to(p.dtype)
        if s.norm == "layernorm":
            t[prefix + ".bias"] = params[name + ".bias"].detach().to(p.dtype)

    group = s.n_heads // s.n_kv_heads
    layers: list[dict[str, Any]] = []
    for l, lay in enumerate(p.layers):
        base = g.writers_before_attn(l)
        heads = [h for h in range(s.n_heads) if p.live[base + h]]
        kv_heads = sorted({h // group for h in heads})
        mlp_live = p.live[g.writers_before_mlp(l)]
        if not heads and not mlp_live:
            continue
        i, pre = len(layers), f"layers.{len(layers)}."
        spec: dict[str, Any] = {"layer": l, "heads": heads, "kv_heads": kv_heads,
                                "kv_of_q": [kv_heads.index(h // group) for h in heads],
                                "n_neurons": len(lay.neurons) if mlp_live else 0, "reads": {}, "const": []}
        if heads:
            norm(pre + "attn_norm", hf["attn_norm"].format(l))
            _attn_tensors(p, l, lay.attn, heads, kv_heads, pre, t, spec)
        if mlp_live:
            norm(pre + "mlp_norm", hf["mlp_norm"].format(l))
            _mlp_tensors(p, l, lay, pre, t, spec)
        layers.append(spec)
        assert i == len(layers) - 1

    out_reads, out_const = _reads(p, EDGE_OUT, [0])
    norm("norm", hf["norm"])
    if out_const.any():
        t["out_const"] = out_const[0]
    tied = params.get(hf["head"]) is None or params[hf["head"]] is params[hf["embed"]] or \
        params[hf["head"]].data_ptr() == params[hf["embed"]].data_ptr()
    if not tied:
        t["lm_head.weight"] = params[hf["head"]].detach().to(p.dtype)
    config = {
        "family": s.family, "vocab_size": s.vocab_size, "hidden_size": s.d_model, "head_dim": s.d_head,
        "norm": s.norm, "norm_eps": s.norm_eps, "hidden_act": s.act, "gated": s.gated, "positional": s.positional,
        "attn_scale": s.attn_scale,
        "max_position_embeddings": int(getattr(view.model.config, "max_position_embeddings", None)
                                       or getattr(view.model.config, "n_positions", 0)),
        "attn_bias": p.layers[0].attn.bq is not None, "mlp_bias": p.layers[0].mlp.b_in is not None,
        "tie_head": tied, "layers": layers, "out_reads": out_reads[0], "out_const": bool(out_const.any()),
        **_rope(view),
    }
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(view.model.config, k, None) is not None:
            config[k] = getattr(view.model.config, k)
    t = {k: v.to(dtype).contiguous().clone() for k, v in t.items()}
    return Compacted(config, t, _stats(view, p, layers, t))


def _attn_tensors(p: _Plan, l: int, a: AttnParams, heads: list[int], kv_heads: list[int], pre: str,
                  t: dict[str, Tensor], spec: dict[str, Any]) -> None:
    """The kept heads' attention tensors of layer `l` into `t`, what their readers read into `spec`."""
    s = p.spec
    hi, ki = torch.tensor(heads), torch.tensor(kv_heads)
    t[pre + "q_w"], t[pre + "k_w"], t[pre + "v_w"] = a.wq[hi], a.wk[ki], a.wv[ki]
    t[pre + "o_w"] = a.wo[hi]
    if a.bq is not None:
        t[pre + "q_b"], t[pre + "k_b"], t[pre + "v_b"] = a.bq[hi], a.bk[ki], a.bv[ki]
        t[pre + "o_b"] = a.bo / s.n_heads
    for site, cols in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
        spec["reads"][site], const = _reads(p, edge_key(l, site), cols)
        if const.any():
            spec["const"].append(site)
            if len(const) > 1 and bool((const == const[:1]).all()):
                # Every reader adds the same constant (no edge masks): one row, added to the shared input,
                # so the readers still read one input instead of one copy each.
                spec.setdefault("const_shared", []).append(site)
                const = const[:1]
            t[pre + f"{site}_const"] = const


def _mlp_tensors(p: _Plan, l: int, lay: _Layer, pre: str, t: dict[str, Tensor], spec: dict[str, Any]) -> None:
    """The kept neurons' MLP tensors of layer `l` into `t`, what the MLP reads into `spec`."""
    m, ni = lay.mlp, torch.tensor(lay.neurons)
    t[pre + "w_in"], t[pre + "w_out"] = m.w_in[:, ni], m.w_out[ni]
    spec["b_out"] = m.b_out is not None or bool(lay.b_out.any())
    if spec["b_out"]:
        t[pre + "b_out"] = lay.b_out
    if m.w_gate is not None:
        t[pre + "w_gate"] = m.w_gate[:, ni]
    if m.b_in is not None:
        t[pre + "b_in"] = m.b_in[ni]
    if m.b_gate is not None:
        t[pre + "b_gate"] = m.b_gate[ni]
    reads, const = _reads(p, edge_key(l, "mlp"), [0])
    spec["reads"]["mlp"] = reads[0]
    if const.any():
        spec["const"].append("mlp")
        t[pre + "mlp_const"] = const
    spec["neurons"] = lay.neurons


def _rope(view: ArchView) -> dict[str, Any]:
    if view.spec.positional != "rope":
        return {}
    rot = view.rotary()
    rope_type = getattr(rot, "rope_type", "default")
    if "dynamic" in rope_type or "longrope" in rope_type:
        raise UserError(f"rope type {rope_type!r} changes with sequence length; export supports static rope only")
    return {"rope_inv_freq": rot.inv_freq.detach().float().tolist(),
            "rope_attention_scaling": float(rot.attention_scaling)}


_WEIGHTS = ("q_w", "k_w", "v_w", "o_w", "w_in", "w_gate", "w_out", "q_b", "k_b", "v_b", "b_in", "b_gate")


def _stats(view: ArchView, p: _Plan, layers: list[dict[str, Any]], t: dict[str, Tensor]) -> dict[str, Any]:
    s = p.spec
    n_heads = sum(len(x["heads"]) for x in layers)
    n_neurons = sum(x["n_neurons"] for x in layers)
    kept = [v for k, v in t.items() if k.split(".")[-1] in _WEIGHTS]
    n_kept = sum(v.numel() for v in kept)
    return {
        "params": sum(v.numel() for v in t.values()),
        "params_original": sum(q.numel() for q in view.model.parameters()),
        "layers_kept": len(layers), "heads_kept": n_heads, "neurons_kept": n_neurons,
        "heads_removed": 1 - n_heads / (s.n_layers * s.n_heads),
        "neurons_removed": 1 - n_neurons / (s.n_layers * s.d_mlp),
        "layers_removed": 1 - len(layers) / s.n_layers,
        "zero_share": sum(int((v == 0).sum()) for v in kept) / n_kept if n_kept else 0.0,
    }
