"""Run by tests/test_shard.py under torchrun with 2 gloo processes: every piece of ShardedMaskLogits equals
MaskLogits on shapes whose rows split unevenly (7 and 3 rows) or leave a rank nothing (1 row). Exit 0 = all equal."""

from __future__ import annotations

import torch
import torch.distributed as dist

from sheafprune.discovery.masks import MaskLogits
from sheafprune.discovery.shard import RowShards, ShardedMaskLogits

SHAPES = {"w/a": (7, 5), "w/b": (3,), "w/c": (1, 4), "edge/0/q": (5, 4), "edge/out": (9,)}
KW = dict(init_mean=0.5, init_std=1.0, seed=0)


def same(what: str, full: dict, got: dict, tol: float = 0.0) -> None:
    for k in full:
        d = (full[k].detach() - got[k].detach()).abs().max().item() if full[k].numel() else 0.0
        assert full[k].shape == got[k].shape and d <= tol, f"{what}: {k} differs by {d:.3g} (shapes {full[k].shape}, " \
                                                           f"{got[k].shape})"


def main() -> None:
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    shards = RowShards(world, rank)
    ref, sh = MaskLogits(SHAPES, **KW), ShardedMaskLogits(SHAPES, **KW, view=None, shards=shards)
    assert sh.named_logits()["w/c"].shape[0] == (1 if rank == 0 else 0)
    same("init", ref.named_logits(), sh.gather_full(sh.named_logits()))

    # The gather's backward: each rank's rows get the mean over ranks of the ranks' gradients.
    x = torch.arange(7.0, requires_grad=True)
    mine = shards.local(x.detach()).clone().requires_grad_(True)
    (shards.gather(mine, 7) * (rank + 1)).sum().backward()
    assert torch.equal(mine.grad, torch.full_like(mine.grad, sum(range(1, world + 1)) / world)), mine.grad

    # Attribution init: the same quantiles and jitter.
    g = torch.Generator().manual_seed(1)
    scores = {k: torch.rand(s, generator=g) for k, s in SHAPES.items()}
    ref.init_from_scores(scores, center=1.0, spread=2.0, seed=3)
    sh.init_from_scores(sh.local(scores), center=1.0, spread=2.0, seed=3)
    same("init_from_scores", ref.named_logits(), sh.gather_full(sh.named_logits()), tol=1e-6)
    ref.init_from_scores(scores, center=1.0, spread=2.0, seed=3, within="tensor")
    sh.init_from_scores(sh.local(scores), center=1.0, spread=2.0, seed=3, within="tensor")
    same("init_from_scores within tensors", ref.named_logits(), sh.gather_full(sh.named_logits()), tol=1e-6)
    with torch.no_grad():  # from here on bitwise-equal logits
        for k, p in sh.named_logits().items():
            p.copy_(sh.local(ref.named_logits())[k])

    # Sampled masks, their expected density and the gradients through both.
    kw = dict(trained=("weight", "edge"), gate="concrete", taus={"weight": 0.5, "edge": 1.0}, noise_seed=7,
              noise_scale=0.5)
    m_ref, c_ref, d_ref = ref(**kw)
    m_sh, c_sh, d_sh = sh(**kw)
    same("masks", m_ref, sh.gather_full(m_sh))
    same("complement", c_ref, sh.gather_full(c_sh))
    assert all(abs(float(d_ref[t].detach()) - float(d_sh[t].detach())) < 1e-6 for t in d_ref), (d_ref, d_sh)
    coef = {k: torch.linspace(-1, 1, m.numel()).reshape(m.shape) for k, m in m_ref.items()}

    def loss(masks, dens):
        return sum((masks[k] * coef[k]).sum() for k in coef) + 10 * dens["weight"] + 3 * dens["edge"]

    loss(m_ref, d_ref).backward()
    gathered = {k: shards.gather(v, SHAPES[k][0]) if k in sh.sharded else v for k, v in m_sh.items()}  # autograd
    loss(gathered, d_sh).backward()
    same("gradients", {k: p.grad for k, p in ref.named_logits().items()},
         sh.gather_full({k: p.grad for k, p in sh.named_logits().items()}), tol=1e-6)

    # AdamW state: gathered = the unsharded optimizer's; sliced back = this rank's.
    opts = [torch.optim.AdamW(list(m.logits), lr=0.1) for m in (ref, sh)]
    with torch.no_grad():  # identical gradients, so that the states compare bitwise
        for k, p in sh.named_logits().items():
            p.grad.copy_(sh.local({k: ref.named_logits()[k].grad})[k])
    for o in opts:
        o.step()
    full_state, gathered = opts[0].state_dict(), sh.gather_state(opts[1].state_dict(), opts[1])
    local = sh.local_state(full_state, opts[1])
    for i in full_state["state"]:
        for name, v in full_state["state"][i].items():
            assert torch.equal(v, gathered["state"][i][name]), ("gather_state", i, name)
            assert torch.equal(local["state"][i][name], opts[1].state_dict()["state"][i][name]), ("local_state", i, name)
    same("after a step", ref.named_logits(), sh.gather_full(sh.named_logits()))

    # Kept fraction and the projections: exact (down, then up) and sampled, the same shifts as one process.
    assert ref.kept(("weight", "edge")) == sh.kept(("weight", "edge"))
    for targets, kw in [({"weight": 0.2, "edge": 0.5}, {}), ({"weight": 0.6}, {"exact": True}),
                        ({"weight": 0.3, "edge": 0.2}, {"exact": True, "sample": 20, "seed": 5})]:
        s_ref, s_sh = ref.project(targets, **kw), sh.project(targets, **kw)
        assert s_ref == s_sh and s_ref, (targets, kw, s_ref, s_sh)
        same(f"project {targets} {kw}", ref.named_logits(), sh.gather_full(sh.named_logits()))
        assert ref.kept(("weight", "edge")) == sh.kept(("weight", "edge"))
    if rank == 0:
        print("shard worker: all equal")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
