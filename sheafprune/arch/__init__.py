"""Architecture views by family name (`ARCHS`, the one registry of supported families: models/family.py and
compact.py read it), and `view_of(model)` to pick one."""

from __future__ import annotations

from torch import nn

from ..errors import UserError
from .base import ArchSpec, ArchView, AttnParams, MlpParams, rotate_half
from .gpt2 import GPT2View
from .llama import LlamaView

ARCHS: dict[str, type[ArchView]] = {"gpt2": GPT2View, "llama": LlamaView}


def view_of(model: nn.Module) -> ArchView:
    family = getattr(model.config, "model_type", None)
    if family not in ARCHS:
        raise UserError(f"unsupported architecture {family!r}; supported families: {', '.join(ARCHS)}")
    return ARCHS[family](model)


__all__ = ["ARCHS", "ArchSpec", "ArchView", "AttnParams", "MlpParams", "view_of", "rotate_half"]
