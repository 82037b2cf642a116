"""A neutral, per-head view of one transformer family's parameters.

The masked forward (masked.py), the compactor and the exported model all speak this view, so they never
care whether a weight came from GPT-2's fused Conv1D or Llama's separate Linear layers. A view reads the
HF module's own parameters (no copies): `attn(layer, w)` and `mlp(layer, w)` take a function `w(name)`
that returns the (possibly weight-masked) parameter of that HF name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..graph import Graph
from ..stack import apply_norm

ParamFn = Callable[[str], Tensor]


@dataclass(frozen=True)
class ArchSpec:
    """Everything shape- and function-related that a forward pass needs, beyond the weights."""

    family: str  # "gpt2" | "llama"
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    vocab_size: int
    norm: str  # "layernorm" | "rmsnorm"
    norm_eps: float
    act: str  # an ACT2FN name: "gelu_new", "silu", ...
    gated: bool  # MLP is act(gate(x)) * up(x)
    positional: str  # "learned" | "rope"
    attn_scale: float

    def graph(self) -> Graph:
        return Graph(self.n_layers, self.n_heads, self.n_kv_heads)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AttnParams:
    """One layer's attention, split per head. Biases are None where the model has none."""

    wq: Tensor  # (H, D, hd)
    bq: Optional[Tensor]  # (H, hd)
    wk: Tensor  # (KV, D, hd)
    bk: Optional[Tensor]  # (KV, hd)
    wv: Tensor  # (KV, D, hd)
    bv: Optional[Tensor]  # (KV, hd)
    wo: Tensor  # (H, hd, D)
    bo: Optional[Tensor]  # (D,)


@dataclass
class MlpParams:
    """One layer's MLP: out = act(x @ w_gate + b_gate) * (x @ w_in + b_in) @ w_out + b_out (gated),
    or act(x @ w_in + b_in) @ w_out + b_out."""

    w_in: Tensor  # (D, I)
    b_in: Optional[Tensor]  # (I,)
    w_gate: Optional[Tensor]  # (D, I)
    b_gate: Optional[Tensor]  # (I,)
    w_out: Tensor  # (I, D)
    b_out: Optional[Tensor]  # (D,)


class ArchView:
    """Base of the per-family views; subclasses fill in the family-specific parts.

    A family is one subclass, registered in arch.ARCHS under its config.model_type; the class also names what the
    per-head view does not expose (`hf_names`) and what identifies its weights' meaning (`fingerprint_fields`).
    """

    spec: ArchSpec
    # HF names of the embeddings, norms and unembedding ("{}" is the layer): what compaction copies as they are.
    hf_names: dict[str, Optional[str]]
    # The config fields that change what the weights compute (models.fingerprint hashes them). Bookkeeping (dtype,
    # token ids, dropout, use_cache, transformers_version, _name_or_path) is left out so that a save/load round trip
    # or a cosmetic config edit keeps the fingerprint; naming fields per family keeps it stable when a new
    # transformers release adds an unrelated config key.
    fingerprint_fields: tuple[str, ...]

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def graph(self) -> Graph:
        return self.spec.graph()

    def maskable(self) -> dict[str, nn.Parameter]:
        """HF parameter name -> parameter, for every attention/MLP weight and bias (the `weight` masks)."""
        raise NotImplementedError

    def attn(self, layer: int, w: ParamFn) -> AttnParams:
        raise NotImplementedError

    def mlp(self, layer: int, w: ParamFn) -> MlpParams:
        raise NotImplementedError

    def embed(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        """(B, T) -> (B, T, D): the `in` writer."""
        raise NotImplementedError

    def norm_module(self, site: str, layer: int) -> nn.Module:
        """The pre-`site` ("attn" | "mlp") norm of `layer`, or the "final" norm (layer ignored): a LayerNorm or
        an RMSNorm with `.weight` (and LayerNorm's `.bias`), over the last dim."""
        raise NotImplementedError

    def norm(self, site: str, layer: int, x: Tensor) -> Tensor:
        """The pre-`site` ("attn" | "mlp" | "final") norm of `layer`, over the last dim of x (..., D)."""
        return apply_norm(self.norm_module(site, layer), x)

    def head(self, y: Tensor) -> Tensor:
        """(B, T, D) normed -> (B, T, V): the LM head."""
        return self.model.lm_head(y)

    def rotary(self) -> Optional[nn.Module]:
        """The HF rotary embedding module (with `inv_freq`, `attention_scaling`, `rope_type`) of rotary families."""
        return None

    def rope(self, x: Tensor, position_ids: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """(cos, sin), each (B, T, hd), for rotary families; None otherwise."""
        return None

    def act(self, x: Tensor) -> Tensor:
        from transformers.activations import ACT2FN

        return ACT2FN[self.spec.act](x)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
