"""Loading a causal LM by name: registry names, local HF folders and hub ids all give the same ready pair.

`load_model(name)` returns `(model, tokenizer)`: fp32 by default, eval mode, weights frozen, a pad
token set and left padding. `model.name_or_path` is the name as the user gave it (the registry name
for registry models; it is not written by save_pretrained). Bad input raises `UserError` with one
line saying what to do.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sheafprune.errors import UserError
from sheafprune.models.cache import cache_dir
from sheafprune.models.family import SUPPORTED_FAMILIES, fingerprint, model_family
from sheafprune.models.hf import load_folder, load_hub
from sheafprune.models.smollm2 import load_smollm2
from sheafprune.models.tiny import load_tiny_gpt2, load_tiny_llama, tiny_model
from sheafprune.models.tokenizer import gpt2_tokenizer

__all__ = ["MODELS", "SUPPORTED_FAMILIES", "ModelInfo", "cache_dir", "fingerprint", "gpt2_tokenizer",
           "list_models", "load_model", "model_family", "tiny_model"]

# The registry. Each loader's docstring summary line is its description in `sheafprune models`.
MODELS: dict[str, Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]]] = {
    "smollm2-135m": load_smollm2,
    "tiny-gpt2": load_tiny_gpt2,
    "tiny-llama": load_tiny_llama,
}

# owner/name as the hub spells repository ids; anything else that is no folder is an unknown name.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelInfo(NamedTuple):
    """One registry entry as `sheafprune models` lists it."""

    name: str
    description: str


def list_models() -> list[ModelInfo]:
    """The registry names with a one-line description each, in registry order."""
    return [ModelInfo(name, (loader.__doc__ or "").strip().splitlines()[0])
            for name, loader in MODELS.items()]


def _unknown(name: str) -> UserError:
    close = difflib.get_close_matches(name, list(MODELS), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return UserError(f"unknown model {name!r}: {hint}use one of {', '.join(MODELS)}, "
                     "a local model folder or a hub id (owner/name)")


def load_model(
    name: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `name`: a registry name (see `MODELS`), a local HF model folder, or a hub id.

    A registry name wins over a folder of the same name; a folder over a hub id. Only the families
    in `SUPPORTED_FAMILIES` load; for folders this is checked from config.json before any weight is
    read. Hub ids work where the hub (or the local HF cache) has them.
    """
    name = os.fspath(name)
    if name in MODELS:
        model, tokenizer = MODELS[name]()
        return model.to(dtype), tokenizer
    path = Path(name).expanduser()
    if path.exists():
        return load_folder(path, dtype=dtype, name=name)
    if _HUB_ID.match(name):
        return load_hub(name, dtype=dtype)
    if name.startswith((".", "/", "~")) or "/" in name or "\\" in name:
        raise UserError(f"no such model folder: {name!r}; pass an existing folder, a registry name "
                        f"({', '.join(MODELS)}) or a hub id (owner/name)")
    raise _unknown(name)
