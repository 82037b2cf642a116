"""The masked forward pass: one functional forward over the HF model's own parameters, under any mix of
weight, neuron, head and edge masks.

Masks are a flat mapping `key -> tensor` (absent key = all ones):
    w/<hf param name>   same shape as that parameter         (weight granularity)
    neuron/{l}          (d_mlp,)  scales MLP hidden unit i    (neuron granularity)
    head/{l}            (n_heads,) scales head h's whole output, its output-bias share included, i.e. the node
    edge/...            see graph.py                          (edge granularity)
    mean/head/{l}       (n_heads, D) what a pruned head writes instead of its output (mean ablation; absent = 0)
    mean/neuron/{l}     (d_mlp,)     what a pruned neuron's hidden value becomes (mean ablation; absent = 0)
    masked/<hf name>    the already masked weight itself, read instead of the parameter and its w/ mask
                        (sharded training gathers it from the ranks' row shards, see discovery/shard.py)

With edge masks, each reader reads its own masked sum of earlier writers from the writer stack (stack.py). Without
edge masks only the running residual sum is kept.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .arch import ArchView, rotate_half
from .arch.base import AttnParams, ParamFn
from .graph import EDGE_OUT, edge_key, head_key, is_type, masked_weight_key, mean_key, neuron_key, weight_key
from .stack import Stream, apply_norm, norm_eps, wide

Masks = Mapping[str, Tensor]


def default_position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that count only real tokens, so a left-padded prompt sees the positions it would unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def _attn_bias(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, T) padding mask -> (B, 1, T, T) additive causal+padding bias. Finite minimum, not -inf, so a
    fully masked row (a pad query under left padding) gives a harmless uniform softmax instead of NaN."""
    b, t = attention_mask.shape
    causal = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]  # (B, T, T)
    bias = torch.zeros(b, 1, t, t, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def _read_qkv(stream: Stream, masks: Masks, layer: int, n_heads: int, n_kv: int, norm: torch.nn.Module,
              secant: bool) -> tuple[Tensor, Optional[Tensor]]:
    """The q, k and v reader inputs of one layer, (R, B, T, D) with R = 1 (no edge masks: all read the residual
    sum) or H + 2 KV (q heads, then k and v groups), in a single stack read; and, where the MLP's edges are masked
    too, the MLP input's part from the writers already in the stack, (B, T, D), read in the same pass (else None).
    The inputs are raw (_normed_heads norms them inside the projection), except with `secant`, whose tap needs
    each reader's normed input: there they are normed.

    One read per layer, not two: a read costs a pass over every earlier writer's output in forward and two in
    backward (SmolLM2, weight+edge: the stack's matmuls were the largest item of a step). The MLP's edges from
    its own layer's heads are added in `_heads`. The secant estimator taps each reader's whole input, so it reads
    the MLP's input separately."""
    mq, mk, mv, mm = (masks.get(edge_key(layer, s)) for s in ("q", "k", "v", "mlp"))
    read = (lambda m: stream.read_normed(m, norm, secant=True)) if secant else stream.read
    if mq is None and mk is None and mv is None:
        return read(None), None  # (1, B, T, D)
    if mq is None or mk is None or mv is None:  # some edge-masked, some not: each reader its own input
        parts = [read(m).expand(n, -1, -1, -1) for m, n in ((mq, n_heads), (mk, n_kv), (mv, n_kv))]
        return torch.cat(parts), None
    if mm is None or secant:
        return read(torch.cat([mq, mk, mv], dim=1)), None  # (H + 2 KV, B, T, D)
    x = stream.read(torch.cat([mq, mk, mv, mm[:mq.shape[0], None]], dim=1))  # (H + 2 KV + 1, B, T, D)
    # split, not slices: a slice's backward zero-fills and adds a whole (H + 2 KV + 1, B, T, D) gradient
    qkv, early = x.split([n_heads + 2 * n_kv, 1])
    return qkv, early[0]


def _linear_heads(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """x (R, B, T, D) with R in {1, n}, w (n, D, e), b (n, e) -> (n, B, T, e)."""
    r, bsz, t, d = x.shape
    y = torch.matmul(x.reshape(r, bsz * t, d), w)  # (n, B*T, e)
    if b is not None:
        y = y + b[:, None, :]
    return y.reshape(w.shape[0], bsz, t, w.shape[2])


class _RowNorm(torch.autograd.Function):
    """||x|| over the last dim, (..., D) -> (..., 1), in fp32 at least (a bf16 stack's reads; fp64 stays fp64); backward
    x * (grad / ||x||) in x's dtype, one pass. autograd's vector_norm backward takes five passes over x, and on bf16
    reads it was 5.8 ms a SmolLM2 reader group against 2.6 ms this way (0.2 s a weight+edge step)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
        ctx.save_for_backward(x, r)
        return r

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        x, r = ctx.saved_tensors
        return x * (grad / r.clamp_min(1e-30)).to(x.dtype)


def _normed_heads(x: Tensor, norm: torch.nn.Module, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """norm(x) @ w + b for x (R, B, T, D) with R in {1, n}, w (n, D, e), b (n, e) -> (n, B, T, e), as
    (x @ (gamma w) - mean(x) sum_D(gamma w)) / std(x) + beta @ w + b: the norm's weight gamma (and LayerNorm's bias
    beta) folded into w, and its per-position scale applied to the e = d_head outputs instead of the D inputs.
    The same function as norm-then-project, without the norm's elementwise passes over the (R, B, T, D) reader
    inputs, which with edge masks are one per reader (15 a layer on SmolLM2) and were a tenth of a step."""
    r, bsz, t, d = x.shape
    xf = x.reshape(r, bsz * t, d)
    wg = norm.weight.to(w.dtype)[:, None] * w  # (n, D, e), in the weights' dtype (bf16 under autocast)
    y = torch.matmul(xf, wg)  # (n, B*T, e)
    if isinstance(norm, torch.nn.LayerNorm):
        # (R, B*T, 1) each, in fp32 (a bf16 stack's reads in bf16 training passes)
        var, mean = torch.var_mean(wide(xf), dim=-1, keepdim=True, correction=0)
        y = (y - mean * wg.sum(1, keepdim=True)) * torch.rsqrt(var + norm_eps(norm))
        if norm.bias is not None:
            y = y + (norm.bias @ w)[:, None, :]
    else:  # RMSNorm
        y = y * torch.rsqrt(_RowNorm.apply(xf).square() / d + norm_eps(norm))
    if b is not None:
        y = y + b[:, None, :]
    return y.reshape(w.shape[0], bsz, t, w.shape[2])


def _apply_rope(x: Tensor, rope: Optional[tuple[Tensor, Tensor]]) -> Tensor:
    if rope is None:
        return x
    cos, sin = rope  # (B, T, hd)
    return x * cos[None] + rotate_half(x) * sin[None]  # (n, B, T, hd)


def _heads(view: ArchView, stream: Stream, masks: Masks, layer: int, w: ParamFn, *, bias: Tensor,
           rope: Optional[tuple[Tensor, Tensor]], secant: bool, taps: Optional[dict[str, Tensor]]
           ) -> tuple[Tensor, Optional[Tensor]]:
    """What the heads of `layer` write, (H, B, T, D), under their head masks (and mean ablation); and, where
    _read_qkv read the MLP's input from the earlier writers, that input with the edges from these heads added
    (B, T, D), else None."""
    spec = view.spec
    group = spec.n_heads // spec.n_kv_heads
    a = view.attn(layer, w)
    norm = view.norm_module("attn", layer)
    x, mlp_early = _read_qkv(stream, masks, layer, spec.n_heads, spec.n_kv_heads, norm, secant)  # (R, B, T, D)
    # q, k and v in one batched matmul (its backward hands x one gradient, not three to concatenate)
    w_qkv = torch.cat([a.wq, a.wk, a.wv])  # (H + 2 KV, D, hd)
    b_qkv = None if a.bq is None and a.bk is None and a.bv is None else torch.cat(
        [b if b is not None else a.wq.new_zeros(n, spec.d_head)
         for b, n in ((a.bq, spec.n_heads), (a.bk, spec.n_kv_heads), (a.bv, spec.n_kv_heads))])
    y = _linear_heads(x, w_qkv, b_qkv) if secant else _normed_heads(x, norm, w_qkv, b_qkv)  # (H + 2 KV, B, T, hd)
    qk, v = y.split([spec.n_heads + spec.n_kv_heads, spec.n_kv_heads])
    q, k = _apply_rope(qk, rope).split([spec.n_heads, spec.n_kv_heads])
    k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)  # (H, B, T, hd)
    z = _attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), bias, spec.attn_scale).transpose(0, 1)
    heads, zs, const = _head_outputs(z, a, masks.get(head_key(layer)), masks.get(mean_key(head_key(layer))), taps,
                                     head_key(layer))
    if mlp_early is not None:  # the MLP's edges from these heads: sum_h own[h] heads[h], computed from zs (hd wide)
        h, bsz, t, hd = zs.shape
        own = masks[edge_key(layer, "mlp")][-h:].to(zs.dtype)  # (H,)
        zo = (zs * own[:, None, None, None]).permute(1, 2, 0, 3).reshape(bsz * t, h * hd)
        mlp_early = mlp_early + (zo @ a.wo.reshape(h * hd, -1)).reshape(bsz, t, -1)
        if const is not None:
            mlp_early = mlp_early + own @ const
    return heads, mlp_early


def _attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> Tensor:
    """Scaled dot-product attention, (B, H, T, hd) each -> (B, H, T, hd); in fp32 on CPU under autocast: CPU flash
    attention's bf16 backward took 0.66 s a SmolLM2 step against 0.04 s in fp32."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def _head(view: ArchView, y: Tensor) -> Tensor:
    """The LM head in fp32, outside any autocast: the scores and losses need it, and autocast would cast the whole
    (V, D) unembedding at every pass (40 ms on SmolLM2 on CPU) for a matmul of a few rows."""
    if not torch.is_autocast_enabled(y.device.type):
        return view.head(y)
    with torch.autocast(y.device.type, enabled=False):
        return view.head(y.float())


def _head_outputs(z: Tensor, a: AttnParams, mask: Optional[Tensor], mean: Optional[Tensor],
                  taps: Optional[dict[str, Tensor]], key: str) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """What each head writes, (H, B, T, D), from its attention output z (H, B, T, hd): z @ wo plus its share of the
    output bias, times its head mask, plus (1 - mask) times its mean output under mean ablation (a constant).
    The mask scales z (hd wide) rather than the output (D wide), and the bias share and the mean fold into one
    constant: also returned are that scaled z (H, B, T, hd) and the constant (H, D) (None if there is none), so
    that heads[h] = zs[h] @ wo[h] + const[h]."""
    h, bsz, t, hd = z.shape
    share = None if a.bo is None else (a.bo / h).expand(h, -1)  # (H, D): each head writes its share of the bias
    if taps is not None:  # what the heads write before their masks
        taps[key] = _out_proj(z, a.wo, share)
    zs, const = z, share
    if mask is not None:
        m = mask[:, None]  # (H, 1)
        zs = z * m[..., None, None]
        const = None if share is None else share * m
        if mean is not None:
            const = (1 - m) * mean if const is None else const + (1 - m) * mean
    return _out_proj(zs, a.wo, const), zs, const


def _out_proj(z: Tensor, wo: Tensor, const: Optional[Tensor]) -> Tensor:
    """z (H, B, T, hd), wo (H, hd, D), const (H, D) or None -> z[h] @ wo[h] + const[h], (H, B, T, D)."""
    h, bsz, t, hd = z.shape
    out = torch.matmul(z.reshape(h, bsz * t, hd), wo).reshape(h, bsz, t, -1)
    return out if const is None else out + const[:, None, None, :]


def _mlp(view: ArchView, stream: Stream, masks: Masks, layer: int, w: ParamFn, *, secant: bool,
         taps: Optional[dict[str, Tensor]], x_in: Optional[Tensor]) -> Tensor:
    """What the MLP of `layer` writes, (1, B, T, D), under its neuron mask (and mean ablation). `x_in`: its input
    (B, T, D) before the norm where `_heads` made it, else None (it is read from the stream here)."""
    m = view.mlp(layer, w)
    norm, mask = view.norm_module("mlp", layer), masks.get(edge_key(layer, "mlp"))
    xm = stream.read_normed(mask, norm, secant=secant) if x_in is None else apply_norm(norm, x_in)  # ([1,] B, T, D)
    bsz, t = xm.shape[-3], xm.shape[-2]
    hidden = xm @ m.w_in + (m.b_in if m.b_in is not None else 0)  # (..., B, T, I)
    if m.w_gate is not None:
        hidden = view.act(xm @ m.w_gate + (m.b_gate if m.b_gate is not None else 0)) * hidden
    else:
        hidden = view.act(hidden)
    if taps is not None:
        taps[neuron_key(layer)] = hidden.reshape(bsz, t, -1)
    neuron_mask = masks.get(neuron_key(layer))
    if neuron_mask is not None:
        neuron_mean = masks.get(mean_key(neuron_key(layer)))
        hidden = hidden * neuron_mask if neuron_mean is None else \
            hidden * neuron_mask + (1 - neuron_mask) * neuron_mean  # (..., B, T, I)
    out = hidden @ m.w_out + (m.b_out if m.b_out is not None else 0)  # (..., B, T, D)
    return out.reshape(1, bsz, t, -1)


def masked_forward(
    view: ArchView,
    input_ids: Tensor,
    *,
    attention_mask: Optional[Tensor] = None,
    position_ids: Optional[Tensor] = None,
    masks: Optional[Masks] = None,
    last_only: bool = False,
    edge_grad: str = "gradient",
    taps: Optional[dict[str, Tensor]] = None,
) -> Tensor:
    """Logits (B, T, V) of `view.model` on `input_ids` (B, T) under `masks`; (B, 1, V) with `last_only`
    (a next-token task reads only the last position, and the unembedding is the largest matmul).
    `edge_grad`: "gradient" (autograd's dL/dmask) or "secant" for the edge masks (flip_effects).
    `taps`: a dict that receives every head's output `head/{l}` (H, B, T, D) and every MLP's hidden units
    `neuron/{l}` (B, T, I), as computed before their masks (what mean ablation averages)."""
    masks = masks or {}
    if edge_grad not in ("gradient", "secant"):
        raise ValueError(f"edge_grad must be 'gradient' or 'secant', got {edge_grad!r}")
    secant = edge_grad == "secant"
    spec = view.spec
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if position_ids is None:
        position_ids = default_position_ids(attention_mask)

    device = input_ids.device.type
    low_weights = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None

    def w(name: str) -> Tensor:
        pre = masks.get(masked_weight_key(name))
        if pre is not None:
            return pre.to(low_weights) if low_weights is not None else pre
        p = view.model.get_parameter(name)
        m = masks.get(weight_key(name))
        if m is None:
            return p
        # under autocast, cast once here rather than at every matmul that reads it (q/k/v are concatenated first)
        return (p * m).to(low_weights) if low_weights is not None else p * m

    bsz, t = input_ids.shape
    # Under autocast (bf16 training passes) the writer stack holds bf16 rows and its reads run in bf16, except for
    # the secant, whose squared norms cancel (|x_r - o_w|^2 for a writer that dominates its reader's input, SmolLM2's
    # m11: bf16's 3 digits would lose the remainder).
    low = low_weights if not secant else None
    stream = Stream(n_writers=view.graph.n_writers(), keep_chunks=any(is_type(k, "edge") for k in masks), dtype=low)
    x_in = view.embed(input_ids, position_ids)  # (B, T, D)
    stream.add(x_in.unsqueeze(0))
    bias = _attn_bias(attention_mask, x_in.dtype)  # (B, 1, T, T)
    rope = view.rope(x_in, position_ids)

    for layer in range(spec.n_layers):
        heads, mlp_early = _heads(view, stream, masks, layer, w, bias=bias, rope=rope, secant=secant, taps=taps)
        stream.add(heads)
        stream.add(_mlp(view, stream, masks, layer, w, secant=secant, taps=taps, x_in=mlp_early))

    out_mask, norm = masks.get(EDGE_OUT), view.norm_module("final", -1)
    if last_only and not secant:  # the head reads the last position only, and so does the final norm
        x = stream.read(out_mask, last=True)
        return _head(view, apply_norm(norm, wide(x)).reshape(bsz, 1, -1))  # (B, 1, V)
    final = stream.read_normed(out_mask, norm, secant=secant).reshape(bsz, t, -1)  # normed at every position: the
    # secant's tap needs them; contiguous: on a strided (B, 1, D) slice the head's matmul broadcasts its weight, 5x
    # slower on CPU
    return _head(view, final[:, -1:].contiguous() if last_only else final)  # (B, T, V) or (B, 1, V)


def mask_shapes(view: ArchView, granularity: tuple[str, ...] | list[str]) -> dict[str, tuple[int, ...]]:
    """Every mask key, with its shape, that the given granularities train on this model."""
    spec, graph = view.spec, view.graph
    shapes: dict[str, tuple[int, ...]] = {}
    if "weight" in granularity:
        shapes.update({weight_key(n): tuple(p.shape) for n, p in view.maskable().items()})
    if "neuron" in granularity:
        shapes.update({neuron_key(l): (spec.d_mlp,) for l in range(spec.n_layers)})
    if "head" in granularity:
        shapes.update(graph.head_shapes())
    if "edge" in granularity:
        shapes.update(graph.edge_shapes())
    return shapes


def mean_shapes(view: ArchView) -> dict[str, tuple[int, ...]]:
    """Every mean-ablation key, with its shape: what a pruned head or neuron writes instead of its output."""
    spec = view.spec
    return {**{mean_key(head_key(l)): (spec.n_heads, spec.d_model) for l in range(spec.n_layers)},
            **{mean_key(neuron_key(l)): (spec.d_mlp,) for l in range(spec.n_layers)}}


def sheaf_shapes(view: ArchView, granularity: tuple[str, ...] | list[str]) -> dict[str, tuple[int, ...]]:
    """Every tensor a sheaf of these granularities may hold for this model: its masks and mean-ablation values."""
    return {**mask_shapes(view, granularity), **mean_shapes(view)}
