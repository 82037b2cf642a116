"""Llama-family parameters seen per head (SmolLM, TinyLlama, Llama 2/3): separate q/k/v/o Linear layers
stored (out, in), GQA, RMSNorm, rotary positions, gated SiLU MLP."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .base import ArchSpec, ArchView, AttnParams, MlpParams, ParamFn


class LlamaView(ArchView):
    hf_names = {"embed": "model.embed_tokens.weight", "pos": None, "attn_norm": "model.layers.{}.input_layernorm",
                "mlp_norm": "model.layers.{}.post_attention_layernorm", "norm": "model.norm", "head": "lm_head.weight"}
    fingerprint_fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                          "max_position_embeddings", "rms_norm_eps", "rope_parameters", "attention_bias",
                          "mlp_bias", "tie_word_embeddings", "pretraining_tp")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        cfg = model.config
        layers = model.model.layers
        n, kv = cfg.num_attention_heads, cfg.num_key_value_heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n
        self.spec = ArchSpec(
            family="llama", n_layers=cfg.num_hidden_layers, n_heads=n, n_kv_heads=kv, d_model=cfg.hidden_size,
            d_head=hd, d_mlp=cfg.intermediate_size, vocab_size=cfg.vocab_size, norm="rmsnorm",
            norm_eps=cfg.rms_norm_eps, act=cfg.hidden_act, gated=True, positional="rope",
            attn_scale=float(layers[0].self_attn.scaling),
        )
        self._has_attn_bias = layers[0].self_attn.q_proj.bias is not None
        self._has_mlp_bias = layers[0].mlp.up_proj.bias is not None

    def _p(self, layer: int) -> str:
        return f"model.layers.{layer}."

    def maskable(self) -> dict[str, nn.Parameter]:
        names = [f"self_attn.{x}_proj.weight" for x in "qkvo"] + [f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        if self._has_attn_bias:
            names += [f"self_attn.{x}_proj.bias" for x in "qkvo"]
        if self._has_mlp_bias:
            names += [f"mlp.{x}_proj.bias" for x in ("gate", "up", "down")]
        params = dict(self.model.named_parameters())
        return {self._p(l) + n: params[self._p(l) + n] for l in range(self.spec.n_layers) for n in names}

    def _bias(self, w: ParamFn, name: str, has: bool) -> Optional[Tensor]:
        return w(name) if has else None

    def attn(self, layer: int, w: ParamFn) -> AttnParams:
        s, p = self.spec, self._p(layer) + "self_attn."
        d, hd = s.d_model, s.d_head

        def proj(x: str, heads: int) -> tuple[Tensor, Optional[Tensor]]:
            wx = w(p + f"{x}_proj.weight").reshape(heads, hd, d).transpose(1, 2)  # (heads, D, hd)
            bx = self._bias(w, p + f"{x}_proj.bias", self._has_attn_bias)
            return wx, None if bx is None else bx.reshape(heads, hd)

        (wq, bq), (wk, bk), (wv, bv) = proj("q", s.n_heads), proj("k", s.n_kv_heads), proj("v", s.n_kv_heads)
        wo = w(p + "o_proj.weight").t().reshape(s.n_heads, hd, d)  # (D, H*hd) -> (H, hd, D)
        return AttnParams(wq, bq, wk, bk, wv, bv, wo, self._bias(w, p + "o_proj.bias", self._has_attn_bias))

    def mlp(self, layer: int, w: ParamFn) -> MlpParams:
        p, has = self._p(layer) + "mlp.", self._has_mlp_bias
        return MlpParams(
            w_in=w(p + "up_proj.weight").t(), b_in=self._bias(w, p + "up_proj.bias", has),  # (D, I)
            w_gate=w(p + "gate_proj.weight").t(), b_gate=self._bias(w, p + "gate_proj.bias", has),  # (D, I)
            w_out=w(p + "down_proj.weight").t(), b_out=self._bias(w, p + "down_proj.bias", has),  # (I, D)
        )

    def embed(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        return self.model.model.embed_tokens(input_ids)  # (B, T, D)

    def norm_module(self, site: str, layer: int) -> nn.Module:
        if site == "final":
            return self.model.model.norm
        block = self.model.model.layers[layer]
        return block.input_layernorm if site == "attn" else block.post_attention_layernorm

    def rotary(self) -> nn.Module:
        return self.model.model.rotary_emb

    def rope(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        return self.rotary()(x, position_ids)  # each (B, T, hd)
