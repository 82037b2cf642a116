"""Model loading: tiny models are reproducible, folders round-trip exactly, bad names fail in one line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from sheafprune.errors import UserError
from sheafprune.models import (MODELS, SUPPORTED_FAMILIES, cache_dir, fingerprint, gpt2_tokenizer,
                               list_models, load_model, model_family, tiny_model)
from sheafprune.models.cache import atomic_dir

TINY = {"tiny-gpt2": "gpt2", "tiny-llama": "llama"}
PROMPTS = ["When Mary and John went to the store, John gave a drink to", "Hello world"]


def max_param_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys(), f"parameter names differ: {sorted(pa.keys() ^ pb.keys())[:5]}"
    return max((pa[k] - pb[k]).abs().max().item() for k in pa)


def logits(model: torch.nn.Module, tokenizer, prompts: list[str]) -> torch.Tensor:
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits  # (B, T, vocab)


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_is_the_same_every_time_and_leaves_global_rng_alone(name: str) -> None:
    state = torch.get_rng_state()
    first, _ = load_model(name)
    second, _ = load_model(name)
    assert torch.equal(state, torch.get_rng_state()), "loading a tiny model moved the global RNG"
    diff = max_param_diff(first, second)
    assert diff == 0.0, f"{name}: two loads differ by {diff:.3g}"
    assert fingerprint(first) == fingerprint(second)
    assert model_family(first) == TINY[name] and first.name_or_path == name


@pytest.mark.parametrize("name", TINY)
def test_loaded_model_is_frozen_eval_fp32_with_left_padded_tokenizer(name: str) -> None:
    model, tokenizer = load_model(name)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert len(tokenizer) == 50257 and tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.padding_side == "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert batch.input_ids[1, 0] == tokenizer.pad_token_id and batch.attention_mask[1, 0] == 0
    assert batch.input_ids[1, -1] == 995, "padding is not on the left: last token is not ' world'"
    assert logits(model, tokenizer, PROMPTS).shape == (2, batch.input_ids.shape[1], 50257)


def test_gpt2_tokenizer_is_the_real_bpe() -> None:
    tokenizer = gpt2_tokenizer()
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256
    # Ids of the published GPT-2 vocabulary; an empty or wrong vocabulary cannot produce them.
    assert tokenizer("Hello world").input_ids == [15496, 995]
    assert tokenizer(" Mary John").input_ids == [5335, 1757]
    text = "naïve café 😀\n\n  <|endoftext|>"
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_tiny_shapes_and_nontrivial_biases_and_norms() -> None:
    gpt2, _ = load_model("tiny-gpt2")
    llama, _ = load_model("tiny-llama")
    assert (gpt2.config.n_layer, gpt2.config.n_head, gpt2.config.n_embd) == (2, 4, 64)
    attn = llama.config
    assert (attn.num_attention_heads, attn.num_key_value_heads, attn.head_dim) == (4, 2, 16)
    assert llama.lm_head.weight is llama.model.embed_tokens.weight, "tiny-llama must tie like SmolLM2"
    bias = gpt2.transformer.h[0].attn.c_attn.bias
    ln = gpt2.transformer.h[0].ln_1
    assert bias.abs().min() > 0 and ln.bias.abs().min() > 0 and (ln.weight - 1).abs().min() > 0
    assert (llama.model.layers[0].input_layernorm.weight - 1).abs().min() > 0


def test_tiny_model_overrides_and_seed() -> None:
    biased = tiny_model("llama", attention_bias=True, mlp_bias=True, num_hidden_layers=3)
    again = tiny_model("llama", attention_bias=True, mlp_bias=True, num_hidden_layers=3)
    assert max_param_diff(biased, again) == 0.0
    assert len(biased.model.layers) == 3 and biased.model.layers[2].mlp.down_proj.bias.abs().min() > 0
    other_seed = tiny_model("llama", seed=1)
    stock, _ = load_model("tiny-llama")
    assert max_param_diff(other_seed, stock) > 0.1
    with pytest.raises(UserError, match="gpt2, llama"):
        tiny_model("bert")


def test_fingerprint_changes_with_any_weight_or_architecture_field() -> None:
    model, _ = load_model("tiny-llama")
    before = fingerprint(model)
    assert len(before) == 64 and int(before, 16) >= 0
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] += 1e-6
    assert fingerprint(model) != before, "a changed weight kept the fingerprint"
    untied = tiny_model("llama", tie_word_embeddings=False)
    assert fingerprint(untied) != before
    assert fingerprint(load_model("tiny-gpt2")[0]) != before


@pytest.mark.parametrize("name", TINY)
def test_local_folder_round_trip_gives_identical_logits(name: str, tmp_path: Path) -> None:
    model, tokenizer = load_model(name)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(str(tmp_path))
    diff = (logits(model, tokenizer, PROMPTS) - logits(loaded, loaded_tok, PROMPTS)).abs().max().item()
    assert diff == 0.0, f"{name}: logits after save/load differ by {diff:.3g}"
    assert fingerprint(loaded) == fingerprint(model), "fingerprint changed across save/load"
    assert loaded.name_or_path == str(tmp_path) and loaded_tok.padding_side == "left"
    assert "name_or_path" not in json.loads((tmp_path / "config.json").read_text())


def test_dtype_is_applied() -> None:
    model, _ = load_model("tiny-gpt2", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_unknown_name_lists_registry_and_suggests() -> None:
    with pytest.raises(UserError) as caught:
        load_model("tiny-gtp2")
    message = str(caught.value)
    assert "did you mean 'tiny-gpt2'" in message and all(name in message for name in MODELS)
    assert "\n" not in message


def test_folder_without_config_json(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(UserError, match="no config.json"):
        load_model(str(tmp_path))


def test_unsupported_architecture_fails_before_reading_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError) as caught:  # no weights in the folder: the family check came first
        load_model(str(tmp_path))
    assert "'bert'" in str(caught.value) and "gpt2, llama" in str(caught.value)
    with pytest.raises(UserError, match="gpt2, llama"):
        model_family(torch.nn.Linear(1, 1))


def test_corrupt_config_and_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid JSON config"):
        load_model(str(tmp_path))
    with pytest.raises(UserError, match="no such model folder"):
        load_model(str(tmp_path / "missing" / "deeper"))


def test_unreachable_hub_id_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Offline mode makes this fast and deterministic whether or not this machine has a network.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(UserError) as caught:
        load_model("sheafprune-test/no-such-model")
    message = str(caught.value)
    assert "not reachable" in message and "local model folder" in message and "registry name" in message
    assert time.perf_counter() - start < 5, "the offline failure should not wait for network retries"


def test_registry_and_listing_agree() -> None:
    assert SUPPORTED_FAMILIES == ("gpt2", "llama")
    listed = list_models()
    assert [info.name for info in listed] == list(MODELS) == ["smollm2-135m", "tiny-gpt2", "tiny-llama"]
    assert all(info.description and "\n" not in info.description for info in listed)


def test_cache_dir_env_and_atomic_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SHEAFPRUNE_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    final = cache_dir() / "thing"
    with pytest.raises(RuntimeError), atomic_dir(final) as scratch:
        (scratch / "half").write_text("x")
        raise RuntimeError("crash mid-write")
    assert not final.exists() and list(final.parent.iterdir()) == [], "a failed write left files"
    with atomic_dir(final) as scratch:
        (scratch / "a").write_text("first")
    with atomic_dir(final) as scratch:  # a racing second writer: the first complete folder stays
        (scratch / "a").write_text("second")
    assert (final / "a").read_text() == "first" and list(final.parent.iterdir()) == [final]


@pytest.mark.slow
def test_smollm2_loads_and_prefers_the_indirect_object() -> None:
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    print(f"smollm2-135m loaded in {time.perf_counter() - start:.1f} s")
    config = model.config
    shape = (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
             config.num_key_value_heads, config.intermediate_size, config.vocab_size)
    assert shape == (30, 576, 9, 3, 1536, 49152), shape
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model_family(model) == "llama" and model.name_or_path == "smollm2-135m"
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    last = logits(model, tokenizer, PROMPTS[:1])[0, -1]  # (vocab,)
    mary, john = (tokenizer(word).input_ids for word in (" Mary", " John"))
    assert len(mary) == len(john) == 1
    margin = (last[mary[0]] - last[john[0]]).item()
    assert margin > 1.0, f"logit(' Mary') - logit(' John') = {margin:.3f}"
