"""`from_pretrained` for local folders and hub ids, turned into ready models and one-line errors."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import constants as hub_constants
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel,
                          PreTrainedTokenizerBase)

from sheafprune.errors import UserError
from sheafprune.models.family import check_family

Loaded = tuple[PreTrainedModel, PreTrainedTokenizerBase]


def prepare(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, name: str) -> Loaded:
    """Put a freshly loaded pair into the state every caller expects.

    Eval mode and frozen weights (sheafprune trains masks, never weights); a pad token (eos when the
    tokenizer has none) and left padding, so a batch's last position is every prompt's last token.
    `name` is what the user asked for; it is kept as `model.name_or_path` and
    `model.config.name_or_path` (which save_pretrained does not write) so sheaf.json can record
    which model a sheaf belongs to.
    """
    model.eval()
    model.requires_grad_(False)
    model.name_or_path = model.config.name_or_path = name
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer of {name!r} has neither a pad nor an eos token; "
                            "set one in its tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_folder(path: Path, *, dtype: torch.dtype, name: str) -> Loaded:
    """Load a model folder written by save_pretrained; the family is checked before any weight is read."""
    if not path.is_dir():
        raise UserError(f"{str(path)!r} is a file, not a model folder; pass the folder that holds "
                        "config.json, or a registry name (see `sheafprune models`)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{str(path)!r} is not a model folder (it has no config.json); pass a folder "
                        "written by save_pretrained, or a registry name (see `sheafprune models`)")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise UserError(f"{str(config_file)!r} is not a valid JSON config ({_first_line(error)}); "
                        "re-save the model with save_pretrained") from None
    if model_type == "sheaf" and (path / "sheaf.json").is_file():
        made_for = _made_for(path / "sheaf.json")
        raise UserError(f"{str(path)!r} is a sheafprune export (a pruned model), not a model to prune; pass the "
                        f"model it was made from{made_for}, or load the export with sheafprune.exporter.load")
    check_family(model_type, source=f"folder {str(path)!r}")
    try:
        # safetensors only: reading a pytorch_model.bin means unpickling it, which can run code.
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load the weights in {str(path)!r} ({_first_line(error)}); sheafprune reads "
                        "only model.safetensors: re-save the model with save_pretrained") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as error:
        raise UserError(f"cannot load a tokenizer from {str(path)!r} ({_first_line(error)}); "
                        "save the tokenizer into the folder too (tokenizer.save_pretrained)") from None
    return prepare(model, tokenizer, name=name)


def _made_for(sheaf_json: Path) -> str:
    """" (NAME)" from an export's sheaf.json, or "" when it cannot be read."""
    try:
        name = json.loads(sheaf_json.read_text(encoding="utf-8"))["model"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return f" ({name!r})" if isinstance(name, str) else ""


def _hub_resolvable() -> bool:
    """Whether the hub's host name resolves. Unreachable, huggingface_hub retries for ~23 s with a
    log line per try; an unresolvable name is known in milliseconds. Behind a proxy the local
    resolver proves nothing, so we trust the network."""
    if hub_constants.HF_HUB_OFFLINE:
        return False
    if any(key in os.environ for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return True
    try:
        socket.getaddrinfo(urlparse(hub_constants.ENDPOINT).hostname, 443)
    except OSError:
        return False
    return True


def load_hub(repo_id: str, *, dtype: torch.dtype) -> Loaded:
    """Load `owner/name` from the hub, or from the local HF cache when the hub cannot be reached."""
    offline = not _hub_resolvable()
    try:
        config = AutoConfig.from_pretrained(repo_id, local_files_only=offline)
        check_family(config.model_type, source=f"hub model {repo_id!r}")
        model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, local_files_only=offline,
                                                     use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(repo_id, local_files_only=offline)
    except (OSError, ValueError) as error:
        if offline:
            raise UserError(f"cannot load {repo_id!r}: it is no local folder, the Hugging Face hub is "
                            "not reachable (offline) and it is not in the local HF cache; pass a local "
                            "model folder or a registry name (see `sheafprune models`)") from None
        raise UserError(f"cannot load {repo_id!r} from the Hugging Face hub ({_first_line(error)}); "
                        "check the id, or pass a local model folder or a registry name") from None
    return prepare(model, tokenizer, name=repo_id)
