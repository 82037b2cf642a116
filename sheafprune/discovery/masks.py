"""The only trained parameters: one logit per mask entry. The frozen model is never part of this module, so
data-parallel training all-reduces just the logits' gradients and every rank holds identical masks.

Density: in the joint schedule every step ends with a projection (`project`): each targeted type's logits are shifted
uniformly so the deterministic sheaf (logit > 0) keeps exactly the density the ramp sets (top-k by logit). The
staged preset instead weighs an expected-density loss by DiscoGP's sparsity schedule (schedule.paper_lambda).
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Collection, Mapping, Optional

import torch
from torch import Tensor, nn

from ..graph import mask_type
from .gates import GATES, deterministic, logistic_noise


class MaskLogits(nn.Module):
    def __init__(self, shapes: Mapping[str, tuple[int, ...]], *, init_mean: float, init_std: float, seed: int):
        super().__init__()
        self.keys = list(shapes)
        self.shapes = {k: tuple(s) for k, s in shapes.items()}  # of the whole masks
        g = torch.Generator().manual_seed(seed)
        self.logits = nn.ParameterList(
            [nn.Parameter(torch.randn(shapes[k], generator=g) * init_std + init_mean) for k in self.keys])

    def named_logits(self) -> dict[str, Tensor]:
        return dict(zip(self.keys, self.logits))

    def forward(self, *, trained: tuple[str, ...], gate: str, taus: Mapping[str, float], noise_seed: int,
                noise_scale: float = 1.0, frozen_masks: Optional[Mapping[str, Tensor]] = None,
                density_grad: Optional[Collection[str]] = None, complement: bool = True
                ) -> tuple[dict, Optional[dict], dict]:
        """Sample masks for one step. Returns (masks, complement masks or None without `complement`, expected
        density per trained type).

        The expected density carries a gradient only for the types in `density_grad` (all trained types where
        None): the others are only reported, and their P(keep) would otherwise be kept for a backward that never
        comes (a model-sized tensor for weight masks).

        The noise depends only on `noise_seed`, so every rank (and a resumed run) draws the same masks.
        Types not in `trained` use `frozen_masks` (their deterministic masks) in both the sheaf and the
        complement: only trained types are flipped (DiscoGP's released code flips both).
        """
        fn = GATES[gate]
        masks, comp, kept, count = {}, {}, {}, {}
        # numpy draws without the GIL: two masks' noise at a time, into buffers allocated here (a buffer allocated in
        # a worker thread comes from that thread's own malloc arena: +0.5 GiB peak for SmolLM2's weight masks)
        draw = [(i, torch.empty(self.shapes[k])) for i, k in enumerate(self.keys) if mask_type(k) in trained
                and fn.noisy]
        with ThreadPoolExecutor(2) as pool:
            noises = pool.map(lambda d: logistic_noise(d[1].shape, seed=(noise_seed, d[0]), out=d[1]), draw)
            del draw  # each buffer lives only until its mask takes it (sharded: until its rows are copied)
            for key, logit in zip(self.keys, self.logits):
                t = mask_type(key)
                if t not in trained:
                    if frozen_masks is not None:
                        masks[key] = comp[key] = frozen_masks[key]
                    continue
                noise = self._noise(key, next(noises)).to(logit.device, logit.dtype) if fn.noisy else None
                m = fn.sample(logit, noise, taus[t], noise_scale)
                masks[key] = m
                if complement:
                    comp[key] = 1.0 - m
                if torch.is_grad_enabled() and (density_grad is None or t in density_grad):
                    kept[t] = kept.get(t, 0.0) + fn.p_keep(logit, noise_scale).sum()
                else:  # only reported: estimated from a sample of each large tensor
                    kept[t] = kept.get(t, 0.0) + _p_keep_sum(fn, logit.detach(), noise_scale)
                count[t] = count.get(t, 0) + logit.numel()
        return (self.for_forward(masks), self.for_forward(comp) if complement else None,
                self._density(kept, count))

    def _noise(self, key: str, full: Tensor) -> Tensor:
        """This process's part of the noise `full` drawn for the whole mask `key`."""
        return full

    def _density(self, kept: Mapping[str, Tensor], count: Mapping[str, int]) -> dict[str, Tensor]:
        """Expected density per type from the summed P(keep) and the number of entries summed."""
        return {t: kept[t] / count[t] for t in kept}

    @torch.no_grad()
    def init_from_scores(self, scores: Mapping[str, Tensor], *, center: float, spread: float, seed: int,
                         within: str = "type") -> None:
        """logit = center + spread * (2q - 1), q the quantile of an entry's score among all entries of its mask type
        (`within` "type"), or of its own tensor ("tensor": one weight matrix, one reader group of edges).

        Ranks, not raw scores: attribution magnitudes differ by orders of magnitude between matrices and
        types, and the projection's uniform shift then removes entries in rank order unless training
        reorders them (Adam moves a logit by up to ~lr per step, so a spread of 1 is undone in ~20 steps).
        """
        g = torch.Generator().manual_seed(seed)
        groups: dict[str, list[str]] = {}
        for key in scores:
            groups.setdefault(rank_group(key, within), []).append(key)
        logits = self.named_logits()
        for keys in groups.values():
            local = {k: scores[k].detach().float().cpu() for k in keys}
            # Scores below 1e-3 of the mean are ties at 0: their order is float noise (a sum of canceling
            # terms), which differs with the order of summation, e.g. between one and two processes.
            floor = self._score_floor(keys, local)
            local = {k: v.masked_fill(v < floor, 0.0) for k, v in local.items()}
            total = sum(self._numel(k) for k in keys)
            sample = self._entries(keys, local, torch.randint(total, (min(total, 1_000_000),), generator=g))
            edges = torch.quantile(sample, torch.linspace(0, 1, 1001))  # empirical CDF at 0.1% resolution
            for k in keys:
                q = _cdf(local[k], edges)
                # breaks ties (e.g. all the zero scores); drawn for the whole mask, so every shard draws alike
                jitter = self._local(k, torch.randn(self.shapes[k], generator=g)) * 1e-3
                logits[k].copy_((center + spread * (2 * q - 1) + jitter).to(logits[k].device))

    @torch.no_grad()
    def project(self, targets: Mapping[str, float], *, exact: bool = False, sample: Optional[int] = None,
                seed: int = 0) -> dict[str, float]:
        """Shift each type's logits uniformly so floor(target * n) of them stay > 0; returns the shift per type.

        By default only a type kept above its target is shifted (down); `exact` also shifts a type kept below its
        target up (the joint schedule holds the kept fraction on the ramp at every step). `sample`: estimate
        the threshold from that many entries drawn with `seed` instead of all of them (the exact threshold of
        SmolLM2's 10^8 weight logits is two passes over them, kth_smallest_of; the kept fraction is then within
        ~0.02% of the target at 5%).
        """
        shifts = {}
        logits = self.named_logits()
        g = torch.Generator().manual_seed(seed)
        for t, rho in targets.items():
            keys = [k for k in self.keys if mask_type(k) == t]
            if not keys:
                continue
            sizes = [self._numel(k) for k in keys]
            total = sum(sizes)
            flat = None
            if sample is not None and sample < total:  # the same draws in every subclass: one index set per tensor
                idx = [torch.randint(n, (max(1, round(sample * n / total)),), generator=g) for n in sizes]
                flat = self._sampled(keys, logits, idx)
            n = total if flat is None else flat.numel()
            keep = int(rho * n)
            if keep >= n:
                continue
            if not exact and self._kept_counts((t,))[0][t] <= int(rho * total):
                continue
            # the (n-keep)-th smallest: exactly `keep` entries lie above it
            v = float(flat.kthvalue(n - keep).values) if flat is not None else self._kth_smallest(keys, logits, n - keep)
            del flat
            if v == 0.0:
                continue
            for k in keys:
                logits[k].sub_(v)
            shifts[t] = v
        return shifts

    # Where a subclass holds only part of each tensor (shard.py) it overrides these and _count_all_ranks.
    def _numel(self, key: str) -> int:
        """Entries of the whole mask `key`."""
        return self.named_logits()[key].numel()

    def _local(self, key: str, full: Tensor) -> Tensor:
        """This rank's part of the whole mask `key`'s tensor `full`."""
        return full

    def _score_floor(self, keys: list[str], scores: Mapping[str, Tensor]) -> float:
        """1e-3 of the mean score over all entries of the keys (init_from_scores' floor)."""
        return 1e-3 * float(torch.cat([scores[k].flatten() for k in keys]).mean())

    def _entries(self, keys: list[str], tensors: Mapping[str, Tensor], idx: Tensor) -> Tensor:
        """Entries `idx` of the concatenation of the keys' flattened tensors."""
        return torch.cat([tensors[k].detach().float().flatten().cpu() for k in keys])[idx]

    def _sampled(self, keys: list[str], logits: Mapping[str, Tensor], idx: list[Tensor]) -> Tensor:
        """The entries idx[i] of each keys[i]'s flattened logits, concatenated."""
        return torch.cat([logits[k].detach().flatten()[i.to(logits[k].device)] for k, i in zip(keys, idx)])

    def _kth_smallest(self, keys: list[str], logits: Mapping[str, Tensor], k: int) -> float:
        """The k-th smallest entry over all the keys' logits."""
        return kth_smallest_of([logits[key].detach().reshape(-1) for key in keys], k)

    @torch.no_grad()
    def _kept_counts(self, types: tuple[str, ...]) -> tuple[dict[str, int], dict[str, int]]:
        """(entries with logit > 0, entries) per mask type."""
        kept: dict[str, Tensor] = {}
        total: dict[str, int] = {}
        for key, logit in zip(self.keys, self.logits):
            t = mask_type(key)
            if t in types:
                kept[t] = kept.get(t, 0) + torch.count_nonzero(logit > 0)  # 2.4x faster than a bool sum
                total[t] = total.get(t, 0) + self._numel(key)
        return {t: int(self._count_all_ranks(t, c)) for t, c in kept.items()}, total

    def _count_all_ranks(self, mask_type_: str, count: Tensor) -> Tensor:
        """A count of this process's entries of a mask type, summed over the processes that share them."""
        return count

    @torch.no_grad()
    def kept(self, types: tuple[str, ...]) -> dict[str, float]:
        """Kept fraction of the deterministic masks (logit > 0) per mask type."""
        counts, total = self._kept_counts(types)
        return {t: counts[t] / total[t] for t in counts}

    # Hooks for sharded training (shard.ShardedMaskLogits overrides them; here every rank holds everything).
    sharded: frozenset = frozenset()  # keys whose logits are row shards (their gradients are already global means)

    def for_forward(self, masks: Optional[Mapping[str, Tensor]]) -> Optional[Mapping[str, Tensor]]:
        """The masks as masked_forward reads them."""
        return masks

    def gather_full(self, tensors: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """Full tensors from per-key tensors shaped like the logits (a collective where sharded)."""
        return tensors

    def local(self, tensors: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """This rank's part of full per-key tensors."""
        return tensors

    def gather_state(self, state: dict, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state dict with full tensors (a collective where sharded)."""
        return state

    def local_state(self, state: dict, optimizer: torch.optim.Optimizer) -> dict:
        """A full optimizer state dict cut to this rank's part."""
        return state


def deterministic_masks(params: MaskLogits, trained: tuple[str, ...] = (), *, complement: bool = False
                        ) -> dict[str, Tensor]:
    """Deterministic masks; with `complement`, the `trained` types flipped (all types where none are given)."""
    out = {}
    for key, logit in params.named_logits().items():
        m = deterministic(logit.detach())
        out[key] = 1.0 - m if complement and (not trained or mask_type(key) in trained) else m
    return out


# Up to this many entries the k-th smallest is found by kthvalue over a copy of all of them.
KTH_BY_COPY = 1 << 22


def kth_smallest_of(flats: list[Tensor], k: int) -> float:
    """The k-th smallest (1-based) entry of the 1-D tensors `flats` taken together, exactly. Beyond KTH_BY_COPY
    entries: bracketed between two quantiles of a 2^20-entry sample, 8 standard errors of the sampled quantile on
    each side, then found among the entries inside the bracket, after counting those below it: two passes and no
    copy of all of them (a copy and kthvalue over SmolLM2's 10^8 weight logits: 1.4 s and +1.6 GB peak; this: 0.4 s).
    Should the bracket miss (about once in 10^15), the copy is made after all."""
    n = sum(f.numel() for f in flats)
    if n <= KTH_BY_COPY:
        return float(torch.cat(flats).kthvalue(k).values)
    g = torch.Generator().manual_seed(k)
    sample = torch.cat([f[torch.randint(f.numel(), (max(1, (f.numel() << 20) // n),), generator=g).to(f.device)]
                        for f in flats]).sort().values
    m, q = sample.numel(), k / n
    half = 8 * (q * (1 - q) / m) ** 0.5 + 1 / m
    lo = sample[max(0, int((q - half) * m))]
    hi = sample[min(m - 1, int((q + half) * m) + 1)]
    below = int(sum(torch.count_nonzero(f < lo) for f in flats))
    inside = torch.cat([f[(f >= lo) & (f <= hi)] for f in flats])
    if below < k <= below + inside.numel():
        return float(inside.kthvalue(k - below).values)
    return float(torch.cat(flats).kthvalue(k).values)


def _p_keep_sum(fn, logit: Tensor, scale: float) -> Tensor:
    """sum of P(keep) over `logit`, estimated from 2^12 fixed random entries where it has more than 2^13: a model's
    weight masks have 10^8 entries, three passes a step for a figure that is only reported."""
    flat = logit.reshape(-1)
    if flat.numel() <= 1 << 13:
        return fn.p_keep(flat, scale).sum()
    return fn.p_keep(flat[_sample_index(flat.numel()).to(flat.device)], scale).mean() * flat.numel()


@functools.lru_cache(maxsize=None)
def _sample_index(n: int) -> Tensor:
    return torch.randint(n, (1 << 12,), generator=torch.Generator().manual_seed(n))


def rank_group(key: str, within: str) -> str:
    """The group whose entries `key`'s entries are ranked (or normalized) among: its mask type, or the tensor itself."""
    if within not in ("type", "tensor"):
        raise ValueError(f"within must be 'type' or 'tensor', got {within!r}")
    return mask_type(key) if within == "type" else key


def _cdf(x: Tensor, edges: Tensor) -> Tensor:
    """Empirical CDF given by its quantiles `edges` (n+1 sorted values at 0, 1/n, ..., 1), linear in between:
    continuous in x, so float noise in a score moves its logit by float noise, never by a whole bucket."""
    n = edges.numel() - 1
    i = torch.bucketize(x, edges).clamp_(1, n)  # edges[i-1] < x <= edges[i]
    lo, hi = edges[i - 1], edges[i]
    width = hi - lo
    frac = torch.where(width > 0, (x - lo) / width.clamp_min(1e-30), torch.ones_like(x)).clamp_(0, 1)
    return (i - 1 + frac) / n

