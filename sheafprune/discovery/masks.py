"""The only trained parameters: one logit per mask entry. The frozen model is never part of this module, so
data-parallel training all-reduces just the logits' gradients and every rank holds identical masks.

Density: in the joint schedule every step ends with a projection (`project`): each targeted type's logits are shifted
uniformly so the deterministic sheaf (logit > 0) keeps exactly the density the ramp sets (top-k by logit). The
staged preset instead weighs an expected-density loss by DiscoGP's sparsity schedule (schedule.paper_lambda).
"""

from __future__ import annotations

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
        g = torch.Generator().manual_seed(noise_seed)
        fn = GATES[gate]
        masks, comp, kept, count = {}, {}, {}, {}
        for key, logit in zip(self.keys, self.logits):
            t = mask_type(key)
            if t not in trained:
                if frozen_masks is not None:
                    masks[key] = comp[key] = frozen_masks[key]
                continue
            noise = self._noise(key, logit, g) if fn.noisy else None
            if noise is not None and noise_scale != 1.0:
                noise.mul_(noise_scale)
            m = fn.sample(logit, noise, taus[t], noise_scale)
            masks[key] = m
            if complement:
                comp[key] = 1.0 - m
            with torch.set_grad_enabled(torch.is_grad_enabled() and (density_grad is None or t in density_grad)):
                p = fn.p_keep(logit, noise_scale)
            kept[t] = kept.get(t, 0.0) + p.sum()
            count[t] = count.get(t, 0) + p.numel()
        return (self.for_forward(masks), self.for_forward(comp) if complement else None,
                self._density(kept, count))

    def _noise(self, key: str, logit: Tensor, g: torch.Generator) -> Tensor:
        return logistic_noise(logit.shape, generator=g).to(logit.device)

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
        the threshold from that many entries drawn with `seed` instead of all of them (kthvalue over SmolLM2's
        134M weight logits takes ~1.7 s; the kept fraction is then within ~0.02% of the target at 5%).
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
        return float(torch.cat([logits[key].detach().flatten() for key in keys]).kthvalue(k).values)

    @torch.no_grad()
    def _kept_counts(self, types: tuple[str, ...]) -> tuple[dict[str, int], dict[str, int]]:
        """(entries with logit > 0, entries) per mask type."""
        kept: dict[str, Tensor] = {}
        total: dict[str, int] = {}
        for key, logit in zip(self.keys, self.logits):
            t = mask_type(key)
            if t in types:
                kept[t] = kept.get(t, 0) + (logit > 0).sum()
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

