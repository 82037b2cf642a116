"""The trained parameters and their pieces, unit by unit: gates (logits -> masks), the attribution init's ranking,
the projection onto a density target, the target ramp and nsgd's gradient normalization."""

from __future__ import annotations

import pytest
import torch

from sheafprune.discovery.gates import GATES, logistic_noise

NOISY = [name for name, g in GATES.items() if g.noisy]


@pytest.mark.parametrize("gate", NOISY)
def test_gate_keep_probability_and_gradients(gate):
    fn = GATES[gate]
    logits = torch.tensor([-2.0, -0.5, 0.0, 0.7, 2.0]).repeat(20000, 1).requires_grad_(True)  # (n, 5)
    noise = logistic_noise(logits.shape, seed=(0,))
    m = fn.sample(logits, noise, 1.0, 1.0)
    kept = (m > 0).float().mean(0)
    p = fn.p_keep(logits[0].detach())
    err = (kept - p).abs().max().item()
    # 20000 draws: the binomial standard error is <= 0.0036, so 0.015 is > 4 sigma
    assert err < 0.015, f"{gate}: empirical P(keep) {kept.tolist()} vs expected {p.tolist()} (max err {err:.4f})"
    m.sum().backward()
    assert logits.grad.abs().sum(0).min() > 0, f"{gate}: some logits get no gradient: {logits.grad.abs().sum(0)}"


@pytest.mark.parametrize("gate", NOISY)
@pytest.mark.parametrize("scale", [0.5, 0.1])
def test_noise_scale_sharpens_the_gate_toward_the_test_time_mask(gate, scale):
    fn = GATES[gate]
    logits = torch.tensor([-2.0, -0.3, 0.2, 0.7, 2.0]).repeat(20000, 1)
    noise = logistic_noise(logits.shape, seed=(0,))
    kept = (fn.sample(logits, noise, 1.0, scale) > 0).float().mean(0)
    p = fn.p_keep(logits[0], scale)
    err = (kept - p).abs().max().item()
    assert err < 0.015, f"{gate} s={scale}: empirical P(keep) {kept.tolist()} vs expected {p.tolist()} ({err:.4f})"
    if gate == "concrete":  # far from 0 the sharpened gate is (almost) the deterministic mask logit > 0
        ends = kept[[0, 4]].tolist()
        assert ends[0] < 0.02 * (scale / 0.1) and ends[1] > 1 - 0.02 * (scale / 0.1), f"s={scale}: {ends}"


def test_concrete_forward_is_hard():
    logits = torch.randn(1000)
    m = GATES["concrete"].sample(logits, logistic_noise(logits.shape, seed=(1,)), 0.01,
                                 1.0)
    assert set(m.unique().tolist()) <= {0.0, 1.0}


def test_concrete_sample_is_its_formula_computed_in_place():
    """keep = 1[l + s*L > 0] and d/dl sigmoid((l + s*L) / tau), computed in the noise's buffer: checked against
    the same formula written out with autograd."""
    logits = torch.randn(5000, requires_grad=True)
    noise, scale, tau = logistic_noise(logits.shape, seed=(3, 7)), 0.4, 0.3
    x = logits.detach() + scale * noise
    ref = x.clone().requires_grad_(True)
    m = GATES["concrete"].sample(logits, noise, tau, scale)
    assert torch.equal(m, (x > 0).float())
    w = torch.randn(5000)
    (m * w).sum().backward()
    torch.sigmoid(ref / tau).mul(w).sum().backward()
    diff = (logits.grad - ref.grad).abs().max().item()
    print(f"straight-through gradient vs autograd's: max diff {diff:.2e}")
    assert diff < 1e-5


def test_noise_depends_on_its_seed_only():
    a, b = logistic_noise((300, 7), seed=(5, 1)), logistic_noise((300, 7), seed=(5, 1))
    assert torch.equal(a, b)
    assert not torch.equal(a, logistic_noise((300, 7), seed=(5, 2)))
    assert not torch.equal(a, logistic_noise((300, 7), seed=(6, 1)))
    u = torch.sigmoid(logistic_noise((200_000,), seed=(0,)))  # Logistic(0, 1): sigmoid of it is uniform
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float((u < 0.1).float().mean()) - 0.1) < 0.005


def test_reported_expected_density_of_a_large_mask_is_estimated_closely():
    """A large tensor's P(keep) sum comes from 4096 fixed entries (a few % off for one tensor); a mask type's
    expected density, the reported figure, sums many such tensors, whose errors average out."""
    from sheafprune.discovery.masks import _p_keep_sum

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(576, 1536, generator=g) * 2 - 3 for _ in range(24)]
    exact = sum(float(torch.sigmoid(t / 0.5).sum()) for t in tensors)
    est = sum(float(_p_keep_sum(GATES["concrete"], t, 0.5)) for t in tensors)
    n = sum(t.numel() for t in tensors)
    print(f"expected density: exact {exact / n:.5f}, from samples {est / n:.5f}")
    assert abs(est - exact) < 0.02 * exact
    small = torch.randn(100, 50)
    assert torch.equal(_p_keep_sum(GATES["concrete"], small, 1.0), torch.sigmoid(small).sum())


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_sigmoid_gate_is_the_concrete_keep_probability_with_its_exact_gradient(scale):
    """The noise-free gate's mask is the concrete gate's P(keep) at the same scale, and autograd's gradient matches
    finite differences; MaskLogits draws no noise for it, so two calls give the same masks."""
    fn = GATES["sigmoid"]
    logits = torch.linspace(-3, 3, 13, dtype=torch.float64, requires_grad=True)
    m = fn.sample(logits, None, 0.01, scale)
    diff = (m - GATES["concrete"].p_keep(logits.detach(), scale)).abs().max().item()
    assert diff < 1e-12, f"sigmoid mask vs concrete P(keep): max diff {diff:.2e}"
    assert torch.autograd.gradcheck(lambda x: fn.sample(x, None, 0.01, scale), (logits,))
    from sheafprune.discovery.masks import MaskLogits

    params = MaskLogits({"edge/0/q": (3, 4)}, init_mean=0.5, init_std=1.0, seed=0)
    draws = [params(trained=("edge",), gate="sigmoid", taus={"edge": 1.0}, noise_seed=s, noise_scale=scale)[0]
             for s in (1, 2)]
    assert torch.equal(draws[0]["edge/0/q"], draws[1]["edge/0/q"]), "the sigmoid gate's masks depend on the noise seed"


def test_soft_mask_never_holds_subnormal_floats():
    """At a low temperature sigmoid(logit / s) underflows to subnormals, which CPU arithmetic handles ~100x slower:
    the soft mask is 0 there instead, and equal to the sigmoid (and its gradient) everywhere else."""
    from sheafprune.discovery.gates import SOFT_FLOOR, soft_mask

    logits = torch.linspace(-4, 4, 801, requires_grad=True)
    m = soft_mask(logits, 0.02)
    tiny = torch.finfo(torch.float32).tiny  # the smallest normal float32
    assert not ((m > 0) & (m < tiny)).any(), "a subnormal mask value"
    plain = torch.sigmoid(logits.detach() / 0.02)
    assert ((plain > 0) & (plain < tiny)).any(), "the test would prove nothing: no subnormal to remove"
    above = plain >= SOFT_FLOOR
    assert torch.equal(m.detach()[above], plain[above]) and (m.detach()[~above] == 0).all()
    m.sum().backward()
    assert not ((logits.grad.abs() > 0) & (logits.grad.abs() < tiny)).any(), "a subnormal gradient"


def test_attribution_init_ranks_logits_by_score():
    from sheafprune.discovery.masks import MaskLogits

    shapes = {"w/a": (50, 40), "w/b": (30,), "edge/0/q": (3, 4)}
    params = MaskLogits(shapes, init_mean=1.0, init_std=0.01, seed=0)
    g = torch.Generator().manual_seed(1)
    scores = {k: torch.rand(s, generator=g) * (10.0 if k == "w/b" else 1.0) for k, s in shapes.items()}
    params.init_from_scores(scores, center=1.0, spread=2.0, seed=0)
    logits = params.named_logits()
    s = torch.cat([scores["w/a"].flatten(), scores["w/b"]])
    l = torch.cat([logits["w/a"].detach().flatten(), logits["w/b"].detach()])
    order = s.argsort()
    worst = (l[order][:-1] - l[order][1:]).max().item()  # rank order, up to the 1e-3 tie-breaking jitter
    assert worst < 5e-3, f"logits not increasing with the score (worst inversion {worst:.3g})"
    assert -1.01 < l.min() and l.max() < 3.01, (l.min(), l.max())  # center +- spread
    assert (logits["w/b"] > 2.0).float().mean() > 0.6, "a tensor with 10x the scores should get most top ranks"
    e = logits["edge/0/q"].detach().flatten()  # ranked within its own type: spans the whole range alone
    assert e.max() > 2.5 and e.min() < -0.5, e


def test_rank_within_tensor_ranks_and_normalizes_each_tensor_on_its_own():
    """With scores 1000x smaller in one matrix, ranking over the type puts all of it at the bottom; ranking within
    each tensor spreads both over the whole range. nsgd's RMS is then taken per tensor too."""
    from sheafprune.discovery.masks import MaskLogits
    from sheafprune.discovery.step import normalize_grads

    shapes = {"w/q": (30, 20), "w/v": (30, 20)}
    g = torch.Generator().manual_seed(0)
    scores = {"w/q": torch.rand(shapes["w/q"], generator=g) * 1e-3, "w/v": torch.rand(shapes["w/v"], generator=g)}
    spans = {}
    for within in ("type", "tensor"):
        params = MaskLogits(shapes, init_mean=1.0, init_std=0.0, seed=0)
        params.init_from_scores(scores, center=1.0, spread=1.0, seed=0, within=within)
        spans[within] = {k: (round(float(v.min()), 2), round(float(v.mean()), 2), round(float(v.max()), 2))
                         for k, v in {k: v.detach() for k, v in params.named_logits().items()}.items()}
    assert spans["type"]["w/q"][2] < 1.0 < spans["type"]["w/v"][1], spans  # q below v's median: removed first
    assert all(lo < 0.05 and abs(mean - 1) < 0.05 and hi > 1.95 for lo, mean, hi in spans["tensor"].values()), spans
    logits = {k: torch.zeros(s, requires_grad=True) for k, s in shapes.items()}
    for k, p in logits.items():
        p.grad = scores[k].clone()
    normalize_grads(logits, within="tensor")
    rms = {k: float(p.grad.square().mean().sqrt()) for k, p in logits.items()}
    assert all(abs(r - 1.0) < 1e-6 for r in rms.values()), rms


def test_projection_holds_the_target_exactly():
    from sheafprune.discovery.masks import MaskLogits

    shapes = {"w/a": (40, 25), "w/b": (77,), "edge/0/q": (5, 4), "edge/out": (9,)}
    params = MaskLogits(shapes, init_mean=0.5, init_std=1.0, seed=0)
    before = {k: v.detach().clone() for k, v in params.named_logits().items()}
    shifts = params.project({"weight": 0.1, "edge": 0.9})
    kept = params.kept(("weight", "edge"))
    assert kept["weight"] == int(0.1 * 1077) / 1077, kept
    assert "edge" not in shifts and all(torch.equal(before[k], params.named_logits()[k]) for k in ("edge/0/q", "edge/out"))
    d = {k: (before[k] - params.named_logits()[k]).detach() for k in ("w/a", "w/b")}
    assert all(torch.allclose(x, x.flatten()[0].expand_as(x)) for x in d.values()), "the shift is not uniform"


def test_exact_projection_raises_a_type_kept_below_its_target_and_sampling_lands_close():
    from sheafprune.discovery.masks import MaskLogits

    shapes = {"w/a": (300, 200), "w/b": (777,), "edge/0/q": (5, 4)}
    params = MaskLogits(shapes, init_mean=-2.0, init_std=1.0, seed=0)  # ~2% kept
    shifts = params.project({"weight": 0.25, "edge": 0.5}, exact=True)
    kept = params.kept(("weight", "edge"))
    assert shifts["weight"] < 0 and kept == {"weight": int(0.25 * 60777) / 60777, "edge": 0.5}, (shifts, kept)
    params.project({"weight": 0.05}, exact=True, sample=5000, seed=3)  # threshold from 5000 of 60777 entries
    d = params.kept(("weight",))["weight"]
    assert abs(d - 0.05) < 0.01, f"sampled projection kept {d:.4f}, target 0.05"


@pytest.mark.parametrize("ties", [False, True])
def test_kth_smallest_without_a_copy_equals_kthvalue(monkeypatch, ties):
    """Beyond KTH_BY_COPY entries the k-th smallest is bracketed by a sample and found inside the bracket: the same
    value as kthvalue over all entries, at the ends too, with many ties (rounded logits) or none."""
    from sheafprune.discovery import masks

    monkeypatch.setattr(masks, "KTH_BY_COPY", 1000)
    g = torch.Generator().manual_seed(0)
    flats = [torch.randn(n, generator=g) * 3 - 1 for n in (120_000, 7, 54_321)]
    if ties:
        flats = [f.round() for f in flats]
    everything = torch.cat(flats)
    n = everything.numel()
    for k in (1, 2, 17, n // 20, n // 2, n - 5, n):
        want = float(everything.kthvalue(k).values)
        got = masks.kth_smallest_of(flats, k)
        assert got == want, f"k={k}: {got} vs kthvalue's {want}"


def test_ramp_shapes():
    from sheafprune.discovery.schedule import ramp

    lin = [ramp(s, start=1.0, end=0.1, steps=10) for s in range(12)]
    cub = [ramp(s, start=1.0, end=0.1, steps=10, shape="cubic") for s in range(12)]
    for r in (lin, cub):
        assert r[0] == 1.0 and r[10] == r[11] == pytest.approx(0.1)
        assert all(a > b for a, b in zip(r[:10], r[1:11])), r
    assert lin[5] == pytest.approx(0.55) and cub[5] == pytest.approx(0.1 + 0.9 / 8)
    assert all(c < l for c, l in zip(cub[1:10], lin[1:10])), "cubic must run below linear inside the ramp"


def test_nsgd_normalizes_gradients_by_the_rms_of_their_mask_type():
    from sheafprune.discovery.step import normalize_grads

    g = torch.Generator().manual_seed(0)
    logits = {k: torch.zeros(s, requires_grad=True) for k, s in {"w/a": (30, 20), "w/b": (50,), "edge/0/q": (4, 3)}.items()}
    scale = {"w/a": 1.0, "w/b": 100.0, "edge/0/q": 1e-4}
    for k, p in logits.items():
        p.grad = torch.randn(p.shape, generator=g) * scale[k]
    before = {k: p.grad.clone() for k, p in logits.items()}
    normalize_grads(logits)
    w = torch.cat([logits["w/a"].grad.flatten(), logits["w/b"].grad])
    assert w.square().mean().sqrt().item() == pytest.approx(1.0, rel=1e-6)
    assert logits["edge/0/q"].grad.square().mean().sqrt().item() == pytest.approx(1.0, rel=1e-6)
    ratio = (logits["w/b"].grad / before["w/b"]).unique()  # one factor per type: magnitudes keep their ratios
    assert torch.allclose(ratio, ratio[0]) and torch.allclose(logits["w/a"].grad / before["w/a"], ratio[0].expand(30, 20))


def test_gradient_sum_of_squares_matches_float64():
    """nsgd's RMS comes from float32 dot products of chunks, summed in float64: within 1e-6 of the float64 sum on 3M
    entries whose magnitudes span six orders."""
    from sheafprune.discovery.step import _sum_of_squares

    g = torch.randn(3_000_001, generator=torch.Generator().manual_seed(0)) * torch.logspace(-6, 0, 3_000_001)
    want = g.double().square().sum()
    got = _sum_of_squares(g)
    rel = float((got - want).abs() / want)
    print(f"relative difference to the float64 sum: {rel:.2e}")
    assert got.dtype == torch.float64 and rel < 1e-6, rel
