"""Tiny seeded random GPT-2 and Llama models: the same name always gives the same weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from sheafprune.errors import UserError
from sheafprune.models.hf import Loaded, prepare
from sheafprune.models.tokenizer import GPT2_EOS_ID, GPT2_VOCAB_SIZE, gpt2_tokenizer

# Small enough that a forward pass takes milliseconds, with the full GPT-2 vocabulary so the real
# tokenizer works. Dropout is zero so train() and eval() compute the same function.
_GPT2_DEFAULTS: dict[str, Any] = dict(
    vocab_size=GPT2_VOCAB_SIZE, n_positions=256, n_embd=64, n_layer=2, n_head=4,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    bos_token_id=GPT2_EOS_ID, eos_token_id=GPT2_EOS_ID, pad_token_id=GPT2_EOS_ID,
)
# Shaped like SmolLM2 in miniature: GQA (4 query heads share 2 KV heads), tied embeddings, no biases.
_LLAMA_DEFAULTS: dict[str, Any] = dict(
    vocab_size=GPT2_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    rms_norm_eps=1e-5, tie_word_embeddings=True, attention_dropout=0.0,
    bos_token_id=GPT2_EOS_ID, eos_token_id=GPT2_EOS_ID, pad_token_id=GPT2_EOS_ID,
)
_BUILDERS = {
    "gpt2": (GPT2Config, GPT2LMHeadModel, _GPT2_DEFAULTS),
    "llama": (LlamaConfig, LlamaForCausalLM, _LLAMA_DEFAULTS),
}

_EMBED_STD = 0.1  # logits (final norm @ tied embedding) then have a std near 1
_NORM_NOISE = 0.1  # norm scales 1 + N(0, 0.1): a wrong or missing norm shows in the logits
_BIAS_STD = 0.05  # GPT-2's init zeroes biases; nonzero ones let tests see mishandled biases


def _draw(module: nn.Module, name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """A fresh value for parameter `name` of `module`, drawn from `gen` only."""
    noise = torch.randn(shape, generator=gen)
    if isinstance(module, nn.Embedding):
        return noise * _EMBED_STD
    if len(shape) == 1:  # norm scales are called "weight", everything else 1-D is a bias
        return 1.0 + noise * _NORM_NOISE if name == "weight" else noise * _BIAS_STD
    # 1/sqrt(fan_in) keeps activations O(1), so attention patterns are far from uniform.
    if isinstance(module, Conv1D):  # GPT-2 stores (in, out)
        return noise * shape[0] ** -0.5
    if isinstance(module, nn.Linear):  # torch stores (out, in)
        return noise * shape[1] ** -0.5
    raise AssertionError(f"no init rule for {type(module).__name__}.{name} {tuple(shape)}")


def tiny_model(family: str, *, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A small random `family` ("gpt2" | "llama") model, fp32, in eval mode with frozen weights.

    `overrides` are config fields on top of the defaults above (e.g. `num_hidden_layers=3`,
    `attention_bias=True, mlp_bias=True`). Every parameter is drawn in module order from a
    generator seeded with `seed`, so the weights depend only on (family, seed, overrides), not on
    how transformers initializes. The global RNG is left untouched. Returns the model alone; the
    tokenizer is `gpt2_tokenizer()` (as long as `vocab_size` is kept).
    """
    if family not in _BUILDERS:
        raise UserError(f"no tiny model for family {family!r}; use one of {', '.join(_BUILDERS)}")
    config_cls, model_cls, defaults = _BUILDERS[family]
    config = config_cls(**{**defaults, **overrides})
    # Building runs transformers' own init, which draws from the global RNG: fork it so callers'
    # random streams do not depend on whether a tiny model was built.
    with torch.random.fork_rng(devices=[]):
        model = model_cls(config)
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if id(param) in seen:  # a tied parameter is drawn once
                    continue
                seen.add(id(param))
                param.copy_(_draw(module, name, param.shape, gen))
    model.eval()
    model.requires_grad_(False)
    return model


def load_tiny_gpt2() -> Loaded:
    """Random GPT-2 (2 layers, 4 heads, width 64, biases) with the real GPT-2 tokenizer; for tests."""
    return prepare(tiny_model("gpt2"), gpt2_tokenizer(), name="tiny-gpt2")


def load_tiny_llama() -> Loaded:
    """Random Llama (2 layers, 4 query / 2 KV heads, width 64, tied) with the GPT-2 tokenizer; for tests."""
    return prepare(tiny_model("llama"), gpt2_tokenizer(), name="tiny-llama")
