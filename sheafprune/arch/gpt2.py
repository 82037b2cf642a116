"""GPT-2's parameters seen per head: fused Conv1D `c_attn` (D, 3D) split into q/k/v, learned positions."""

from __future__ import annotations

from torch import Tensor, nn

from .base import ArchSpec, ArchView, AttnParams, MlpParams, ParamFn


class GPT2View(ArchView):
    hf_names = {"embed": "transformer.wte.weight", "pos": "transformer.wpe.weight",
                "attn_norm": "transformer.h.{}.ln_1", "mlp_norm": "transformer.h.{}.ln_2", "norm": "transformer.ln_f",
                "head": "lm_head.weight"}
    fingerprint_fields = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
                          "activation_function", "layer_norm_epsilon", "scale_attn_weights",
                          "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "tie_word_embeddings")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        cfg = model.config
        if getattr(cfg, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention is not a causal LM we can prune")
        h = model.transformer.h
        d, n = cfg.n_embd, cfg.n_head
        self.spec = ArchSpec(
            family="gpt2", n_layers=cfg.n_layer, n_heads=n, n_kv_heads=n, d_model=d, d_head=d // n,
            d_mlp=h[0].mlp.c_fc.weight.shape[1], vocab_size=cfg.vocab_size, norm="layernorm",
            norm_eps=cfg.layer_norm_epsilon, act=cfg.activation_function, gated=False,
            positional="learned", attn_scale=float(h[0].attn.scaling),
        )
        # scale_attn_by_inverse_layer_idx makes the scale per layer; we keep one spec-wide scale.
        if any(float(b.attn.scaling) != self.spec.attn_scale for b in h):
            raise ValueError("GPT-2 with per-layer attention scaling (scale_attn_by_inverse_layer_idx) is unsupported")

    def _p(self, layer: int) -> str:
        return f"transformer.h.{layer}."

    def maskable(self) -> dict[str, nn.Parameter]:
        names = ("attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias",
                 "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")
        params = dict(self.model.named_parameters())
        return {self._p(l) + n: params[self._p(l) + n] for l in range(self.spec.n_layers) for n in names}

    def attn(self, layer: int, w: ParamFn) -> AttnParams:
        s, p = self.spec, self._p(layer)
        d, n, hd = s.d_model, s.n_heads, s.d_head
        w_qkv = w(p + "attn.c_attn.weight")  # (D, 3D), Conv1D stores (in, out)
        b_qkv = w(p + "attn.c_attn.bias")  # (3D,)

        def heads(i: int) -> tuple[Tensor, Tensor]:
            wi = w_qkv[:, i * d:(i + 1) * d].reshape(d, n, hd).permute(1, 0, 2)  # (H, D, hd)
            bi = b_qkv[i * d:(i + 1) * d].reshape(n, hd)  # (H, hd)
            return wi, bi

        (wq, bq), (wk, bk), (wv, bv) = heads(0), heads(1), heads(2)
        wo = w(p + "attn.c_proj.weight").reshape(n, hd, d)  # (H, hd, D)
        return AttnParams(wq, bq, wk, bk, wv, bv, wo, w(p + "attn.c_proj.bias"))

    def mlp(self, layer: int, w: ParamFn) -> MlpParams:
        p = self._p(layer)
        return MlpParams(w_in=w(p + "mlp.c_fc.weight"), b_in=w(p + "mlp.c_fc.bias"), w_gate=None, b_gate=None,
                         w_out=w(p + "mlp.c_proj.weight"), b_out=w(p + "mlp.c_proj.bias"))

    def embed(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        t = self.model.transformer
        return t.wte(input_ids) + t.wpe(position_ids)  # (B, T, D)

    def norm_module(self, site: str, layer: int) -> nn.Module:
        if site == "final":
            return self.model.transformer.ln_f
        block = self.model.transformer.h[layer]
        return block.ln_1 if site == "attn" else block.ln_2
