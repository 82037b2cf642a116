"""The keep search and the floor: mean ablation computes what it says (masked vs a hand computation, compacted vs
masked), the search returns the sheaf it judged and that sheaf holds its floor, and an export that misses the floor
says so (exit 3, a `not kept:` line, the card's first lines); where equal starting logits keep nothing smaller than
the full model, the search restarts from logits ranked by attribution."""

from __future__ import annotations

import json

import pytest
import torch

from sheafprune.arch import view_of
from sheafprune.cli.main import main
from sheafprune.compact import compact
from sheafprune.config import resolve_config
from sheafprune.discovery import discover
from sheafprune.discovery.objective import accuracy, floor_verdict, split_scores
from sheafprune.discovery import search
from sheafprune.discovery.objective import faithfulness, task_scores
from sheafprune.discovery.search import (FLOOR, INIT_LOGIT, RANKED_BATCHES, RANKED_SPREAD, SELECT_ITEMS, KeepSearch,
                                         ramp_target, temperature, top_k_masks)
from sheafprune.masked import mean_shapes, masked_forward
from sheafprune.models import load_model, tiny_model
from sheafprune.sheaf import load_sheaf, save_sheaf
from sheafprune.tasks import Task, held_out_size, hold_out, load_task

TOL = 1e-5


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50257, (3, 9), generator=g)  # (B, T)
    am = torch.ones_like(ids)
    am[1, :3] = 0  # left padding
    return ids, am


def _random_means_and_masks(view, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = view.spec
    means = {k: torch.randn(shape, generator=g) for k, shape in mean_shapes(view).items()}
    masks = {f"head/{l}": (torch.rand(s.n_heads, generator=g) > 0.5).float() for l in range(s.n_layers)}
    masks.update({f"neuron/{l}": (torch.rand(s.d_mlp, generator=g) > 0.5).float() for l in range(s.n_layers)})
    masks["head/0"] = torch.zeros(s.n_heads)  # a whole layer's heads gone: only their means remain
    return {**masks, **means}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_mean_ablation_is_the_mean_written_in_place_of_the_unit(family):
    """All units pruned under mean ablation: every head writes its mean, every MLP writes mean @ W_out + b_out, so
    the logits equal a hand computation of the residual stream from constants."""
    view = view_of(tiny_model(family, **({"n_layer": 2} if family == "gpt2" else {"num_hidden_layers": 2})))
    s = view.spec
    masks = _random_means_and_masks(view)
    masks.update({k: torch.zeros_like(v) for k, v in masks.items() if not k.startswith("mean/")})
    ids, am = _inputs()
    with torch.no_grad():
        got = masked_forward(view, ids, attention_mask=am, masks=masks)  # (B, T, V)
        x = view.embed(ids, (am.cumsum(-1) - 1).clamp(min=0))  # (B, T, D)
        for l in range(s.n_layers):
            m = view.mlp(l, lambda n: view.model.get_parameter(n))
            x = x + masks[f"mean/head/{l}"].sum(0)
            x = x + masks[f"mean/neuron/{l}"] @ m.w_out + (m.b_out if m.b_out is not None else 0)
        want = view.head(view.norm("final", -1, x))
    diff = (got - want)[am.bool()].abs().max().item()
    assert diff <= 1e-4, f"masked forward under full mean ablation vs hand computation: max abs diff {diff:.3g}"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_compacted_equals_masked_under_mean_ablation(family):
    view = view_of(tiny_model(family, **({"n_layer": 3} if family == "gpt2" else {"num_hidden_layers": 3})))
    masks = _random_means_and_masks(view, seed=1)
    ids, am = _inputs()
    c = compact(view, masks)
    with torch.no_grad():
        ref = masked_forward(view, ids, attention_mask=am, masks=masks)
        got = c.to_model()(input_ids=ids, attention_mask=am).logits
    diff = (got - ref)[am.bool()].abs().max().item()
    assert c.stats["heads_kept"] < view.spec.n_layers * view.spec.n_heads, "nothing was removed"
    assert diff <= TOL, f"compacted vs masked under mean ablation: max abs diff {diff:.3g} > {TOL}"


def test_schedule_and_top_k():
    assert ramp_target(0) == 1.0 and ramp_target(10_000) == FLOOR
    assert temperature(1.0) == pytest.approx(1.0) and temperature(FLOOR) < 0.1
    logits = {"neuron/0": torch.tensor([3.0, -1.0, 2.0, 0.5]), "neuron/1": torch.tensor([1.0, 4.0, -2.0, 0.0]),
              "head/0": torch.tensor([0.1, 0.2])}
    m = top_k_masks(logits, {"neuron": 0.5, "head": 0.5})
    assert m["neuron/0"].tolist() == [1, 0, 1, 0] and m["neuron/1"].tolist() == [1, 1, 0, 0]
    assert m["head/0"].tolist() == [0, 1]


def test_floor_verdict():
    ok = {"split": "test", "n": 100, "full_accuracy": 0.9, "sheaf_accuracy": 0.86}
    assert floor_verdict(ok, 0.95) is None
    assert "accuracy 0.800 < 0.95 x full 0.900" in floor_verdict({**ok, "sheaf_accuracy": 0.8}, 0.95)
    skewed = {**ok, "full_balanced_accuracy": 0.9, "sheaf_balanced_accuracy": 0.5}
    assert "answer-balanced" in floor_verdict(skewed, 0.95)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    cfg = resolve_config(overrides=dict(model="tiny-llama", task="ioi", n_items=200, steps=60, batch_size=8,
                                        eval_every=5))
    out = tmp_path_factory.mktemp("search") / "sheaf"
    return cfg, discover(cfg, out=out, progress=False), out


def test_keep_search_returns_the_sheaf_it_judged_and_it_holds(searched):
    """Re-scoring the judged items with the saved sheaf gives the judged accuracy exactly, and it holds the floor."""
    cfg, sheaf, out = searched
    assert not cfg.target_density and sheaf.meta["training"]["mode"] == "keep"
    assert sheaf.means and all(k.startswith("mean/") for k in sheaf.means)
    judged = sheaf.meta["training"]["best_judged"]
    assert judged["accuracy"] >= cfg.keep * judged["full_accuracy"], judged
    loaded = load_sheaf(out)
    assert loaded.means.keys() == sheaf.means.keys()
    model, tok = load_model("tiny-llama")
    task = load_task("ioi", tok, seed=cfg.seed, n=cfg.n_items)
    task = hold_out(task, held_out_size(task, SELECT_ITEMS))
    judge = Task(task.name, task.kind, {"judge": task.items("dev") + task.items("select")})
    scores, target = split_scores(view_of(model), tok, judge, loaded.masks(), split="judge")
    assert accuracy(scores, target) == pytest.approx(judged["accuracy"]), "the saved sheaf is not the judged one"
    kept = {t: float(torch.cat([(v > 0).float() for k, v in loaded.logits.items() if k.startswith(t)]).mean())
            for t in ("neuron", "head")}
    assert kept == pytest.approx(judged["density"], abs=1e-5)  # rounded to 5 digits in sheaf.json
    if judged["size"] < 1:  # the equal-logit pass kept something smaller: no restart
        assert sheaf.meta["training"]["passes"] == ["equal"]
        assert {row["init"] for row in sheaf.curve} == {"equal"}


def _keep_search(**overrides):
    from accelerate import Accelerator

    cfg = resolve_config(overrides=dict(model="tiny-llama", task="ioi", n_items=200, batch_size=8, **overrides))
    model, tok = load_model("tiny-llama")
    task = load_task("ioi", tok, seed=cfg.seed, n=cfg.n_items)
    task = hold_out(task, held_out_size(task, SELECT_ITEMS))
    return KeepSearch(cfg=cfg, view=view_of(model), tokenizer=tok, task=task, accelerator=Accelerator(cpu=True),
                      started=0.0, progress=False)


def test_ranked_restart_orders_units_by_attribution():
    """The restart's logits follow |dCE/dmask| at the full model (recomputed here), per type, over
    INIT_LOGIT +- RANKED_SPREAD; and mean-ablating the top-ranked head alone costs more CE than the bottom one."""
    ks = _keep_search()
    ones = {k: torch.ones_like(v, requires_grad=True) for k, v in ks.logits.items()}
    batches = [ks._batch(b)[0] for b in range(RANKED_BATCHES)]
    loss = sum(faithfulness(task_scores(ks.view, b, ks.forward_masks(ones)), b.target) for b in batches)
    loss.backward()
    ks.multipliers["head"] = 5.0
    ks.rank_by_attribution()
    assert ks.multipliers == {"neuron": 0.0, "head": 0.0}, "the restart keeps the first pass's multipliers"
    for t in ("neuron", "head"):
        keys = [k for k in ks.logits if k.startswith(t + "/")]
        grad = torch.cat([ones[k].grad.abs().flatten() for k in keys])
        logit = torch.cat([ks.logits[k].detach().flatten() for k in keys])
        assert logit.min() == pytest.approx(INIT_LOGIT - RANKED_SPREAD)
        assert logit.max() == pytest.approx(INIT_LOGIT + RANKED_SPREAD)
        order = grad.argsort()
        # Sorted by the recomputed attribution, the logits rise, except between near-equal scores (summation order)
        flipped = (logit[order].diff() <= 0) & (grad[order].diff() > 1e-5 * grad.max())
        assert not flipped.any(), f"{t} logits do not follow the attribution order at {flipped.nonzero().flatten()}"
    keys = [k for k in ks.logits if k.startswith("head/")]
    flat = torch.cat([ks.logits[k].detach().flatten() for k in keys])
    n_per = ks.logits[keys[0]].numel()

    def ce_without(i):
        masks = {k: torch.ones_like(v) for k, v in ks.logits.items()}
        masks[keys[i // n_per]].view(-1)[i % n_per] = 0.0
        with torch.no_grad():
            return sum(float(faithfulness(task_scores(ks.view, b, ks.forward_masks(masks)), b.target)) for b in batches)

    base = float(loss.detach())
    top, bottom = abs(ce_without(int(flat.argmax())) - base), abs(ce_without(int(flat.argmin())) - base)
    print(f"CE change removing the top-ranked head {top:.3g}, the bottom-ranked {bottom:.3g}")
    assert top > bottom


def test_ranked_restart_when_equal_logits_keep_nothing(monkeypatch, tmp_path):
    """A search whose equal-logit pass holds nothing smaller runs a ranked pass, returns its sheaf and says so."""
    restarted = []
    rank = KeepSearch.rank_by_attribution
    monkeypatch.setattr(KeepSearch, "rank_by_attribution", lambda self: (restarted.append(1), rank(self)))
    holds = search.Judgement.holds
    monkeypatch.setattr(search.Judgement, "holds", lambda self, keep: bool(restarted) and holds(self, keep))
    cfg = resolve_config(overrides=dict(model="tiny-llama", task="ioi", n_items=200, steps=60, batch_size=8,
                                        eval_every=5, keep=0.8))  # a random tiny model: a floor it can hold
    sheaf = discover(cfg, out=tmp_path / "sheaf", progress=False)
    training = sheaf.meta["training"]
    assert training["passes"] == ["equal", "ranked"] and restarted == [1]
    inits = [row["init"] for row in sheaf.curve]
    assert inits[0] == "equal" and inits[-1] == "ranked" and inits == sorted(inits), inits
    assert not any(row["judged"]["holds"] for row in sheaf.curve if row["init"] == "equal" and "judged" in row)
    assert training["best_judged"]["size"] < 1, "the ranked pass kept nothing smaller on tiny-llama"


def test_export_that_misses_the_floor_exits_3_and_says_so(searched, tmp_path, capsys):
    """A sheaf whose test metrics miss the floor is written, but the command exits 3 with a `not kept:` line and
    the model card warns first."""
    _, sheaf, _ = searched
    folder = save_sheaf(sheaf, tmp_path / "sheaf")
    meta = json.loads(folder.joinpath("sheaf.json").read_text())
    meta["metrics"] = {**meta["metrics"], "full_accuracy": 1.0, "sheaf_accuracy": 0.5}  # a sheaf that lost its task
    folder.joinpath("sheaf.json").write_text(json.dumps(meta))
    rc = main(["export", str(folder), "--out", str(tmp_path / "lost")])
    out = capsys.readouterr().out
    assert rc == 3, out
    line = next(x for x in out.splitlines() if x.startswith("not kept:"))
    assert "accuracy 0.500 < 0.95 x full 1.000" in line, line
    card = (tmp_path / "lost" / "README.md").read_text().split("---")[2].strip().splitlines()
    assert card[0].startswith("> **Warning: this model does not keep its task.**"), card[:3]
    assert json.loads((tmp_path / "lost" / "sheaf.json").read_text())["export"]["not_kept"]

