"""Sharded training (`shard_masks`): sheafprune's own ZeRO-3 / FSDP-style sharding for models whose masks do not
fit one device.

Why not Accelerate's FSDP plugin: the masked forward (masked.py) is one functional pass that reads every weight by
name and never calls a module's forward, and FSDP all-gathers a module's weights in that module's pre-forward hook,
so under FSDP the forward would read empty shards. Instead, with N processes:

- every weight-mask logits tensor `w/<name>` lives on each rank only as its contiguous dim-0 row shard (`shard_rows`:
  torch.tensor_split's rule), and so do its gradient and its optimizer state (nsgd's momentum; AdamW's two moments in the staged preset):
  the model-sized tensors of a weight-masked run shrink to 1/N per rank. The frozen weight `<name>` it gates is replaced in the model by the same
  rows (for every maskable weight, also when weights are not masked), so a rank holds 1/N of the attention and MLP
  weights too. Embeddings, unembedding and norms stay replicated, and so do the small masks (neuron, head, edge).
- for a forward, each rank computes `W_shard * mask_shard` and all-gathers the full masked weight per tensor
  (`RowShards.gather`; masked.py reads it under the key `masked/<name>`). The gather is autograd-aware: its backward
  reduce-scatters the full weight's gradient and divides by N, so each rank gets the gradient of the global-batch
  mean loss with respect to its own rows, the same gradient data parallelism averages (these logits' gradients are
  therefore not all-reduced again in the training step).
- the sampled masks equal the one-process run's: each rank draws the full logistic noise of a tensor from the step's
  seed and the tensor's index, as one process does, and keeps its rows; the initial logits and the attribution
  init's jitter likewise (drawn in the one-process order).
- everything that reads all logits works on the shards with all-reduced sums: the kept fraction, the expected
  density in the loss, the exact top-k threshold of the projection (a bisection over float32's order on all-reduced
  counts: the same value kthvalue gives, without gathering the logits), its sampled variant and the attribution
  init's quantiles (the same global entries, each sent by the rank that holds it).
- checkpoints keep the unsharded format: logits, best logits and optimizer state are gathered and the main process
  writes them; resume slices them. So a sharded run resumes an unsharded run's checkpoint and vice versa, with any
  number of processes.

Not sharded (the honest limits): the gathered full masked weights of the sheaf and of its complement are live for the
whole step (autograd keeps them for the backward; FSDP would free and re-gather them per layer), so a rank's peak
still holds ~2x the maskable weights plus the activations; the embeddings/unembedding; the small masks. With one
process the same code runs with a single shard (nothing is saved; useful to test the code path).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..arch import ArchView
from ..graph import mask_type, masked_weight_key, weight_key
from .masks import MaskLogits
from .schedule import INIT_MEAN, INIT_STD

SHARDED_TYPES = ("weight",)  # the model-sized mask type; the others are small and stay replicated


def shard_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rows [start, stop) of rank `rank` when n rows are split over `world` ranks: torch.tensor_split's rule
    (the first n % world ranks get one row more; a rank may get none when n < world)."""
    q, r = divmod(n, world)
    start = rank * q + min(rank, r)
    return start, start + q + (1 if rank < r else 0)


class RowShards:
    """This rank's place in a dim-0 row split over `world` processes, and the collectives over the split."""

    def __init__(self, world: int, rank: int):
        if world > 1 and not dist.is_initialized():
            raise RuntimeError("RowShards over several processes needs torch.distributed initialized")
        self.world, self.rank = world, rank

    def rows(self, n: int) -> tuple[int, int]:
        return shard_rows(n, self.world, self.rank)

    def local(self, full: Tensor) -> Tensor:
        """This rank's rows of a full tensor (a view)."""
        start, stop = self.rows(full.shape[0])
        return full[start:stop]

    def gather(self, shard: Tensor, n: int) -> Tensor:
        """The full (n, ...) tensor from every rank's rows; autograd-aware (see _Gather)."""
        if self.world == 1:
            return shard
        return _Gather.apply(shard, self, n)

    def total(self, x: Tensor) -> Tensor:
        """Sum of x over the ranks; autograd-aware: backward hands each rank the mean of the ranks' gradients
        (the gradient of the mean of the ranks' losses, since every rank's loss sees the same sum)."""
        if self.world == 1:
            return x
        return _Total.apply(x, self)

    def sum_(self, x: Tensor) -> Tensor:
        """In-place sum over the ranks, no autograd (counts, assembled samples)."""
        if self.world > 1:
            dist.all_reduce(x)
        return x

    def _padded(self, n: int) -> int:
        return -(-n // self.world)  # rows per rank with the short shards padded

    def _all_gather(self, shard: Tensor, n: int) -> Tensor:
        per = self._padded(n)
        src = shard.detach()
        if src.shape[0] != per:
            src = torch.cat([src, src.new_zeros((per - src.shape[0], *src.shape[1:]))])
        out = src.new_empty((per * self.world, *src.shape[1:]))
        dist.all_gather_single(out, src.contiguous())
        if per * self.world == n:
            return out
        sizes = [b - a for a, b in (shard_rows(n, self.world, r) for r in range(self.world))]
        return torch.cat([out[r * per:r * per + size] for r, size in enumerate(sizes)])

    def _reduce_scatter_mean(self, grad: Tensor) -> Tensor:
        n, per = grad.shape[0], self._padded(grad.shape[0])
        if per * self.world != n:  # pad every rank's rows to `per` so the scatter's chunks line up
            grad = torch.cat([torch.cat([grad[a:b], grad.new_zeros((per - (b - a), *grad.shape[1:]))])
                              for a, b in (shard_rows(n, self.world, r) for r in range(self.world))])
        out = grad.new_empty((per, *grad.shape[1:]))
        dist.reduce_scatter_single(out, grad.contiguous())
        start, stop = self.rows(n)
        return out[:stop - start] / self.world  # sum, then / N: what Accelerate's reduce(mean) does


class _Gather(torch.autograd.Function):
    """Forward: all-gather the row shards into the full tensor. Backward: every rank holds the gradient of its own
    loss for the full tensor; reduce-scatter gives each rank the sum over ranks for its rows, / N is the gradient
    of the mean loss (the gloo and NCCL backends both reduce-scatter)."""

    @staticmethod
    def forward(ctx, shard: Tensor, shards: RowShards, n: int) -> Tensor:
        ctx.shards = shards
        return shards._all_gather(shard, n)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.shards._reduce_scatter_mean(grad), None, None


class _Total(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, shards: RowShards) -> Tensor:
        ctx.shards = shards
        y = x.detach().clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        g = grad.clone()
        dist.all_reduce(g)
        return g / ctx.shards.world, None


def kth_smallest(k: int, count_le: Callable[[Tensor], int], device=None) -> float:
    """The k-th smallest (1-based) of a set of float32 values that may be spread over ranks, given only
    `count_le(t)`, the number of values <= t over all of them: a bisection over float32's total order (the sign-
    folded bit pattern), ~32 counts. Exactly the value kthvalue would return (up to the sign of a zero)."""
    def value(key: int) -> Tensor:
        bits = key if key >= 0 else key ^ 0x7FFFFFFF
        return torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32).to(device)[0]

    lo, hi = -0x7F800001 - 1, 0x7F800000  # just below the key of -inf; the key of +inf (count_le(+inf) = all)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_le(value(mid)) >= k:
            hi = mid
        else:
            lo = mid
    return float(value(hi))


class ShardedMaskLogits(MaskLogits):
    """MaskLogits whose weight-mask logits (and the frozen weights they gate) are row-sharded over the processes.

    Same interface as MaskLogits; every method that reads logits takes part in collectives, so all ranks must call
    the same methods in the same order (the training loop does). The model's maskable weights are replaced by
    their row shards here, in place: build this before moving the model to its device (`view` None: only the
    logits are sharded).
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], *, init_mean: float, init_std: float, seed: int,
                 view: Optional[ArchView], shards: RowShards):
        super().__init__(shapes, init_mean=init_mean, init_std=init_std, seed=seed)
        self.shards, self.view = shards, view
        self.sharded = frozenset(k for k in self.keys if mask_type(k) in SHARDED_TYPES)
        # The full init was drawn above in the one-process order; keep this rank's rows of it.
        self.logits = nn.ParameterList([nn.Parameter(self._local(k, p.detach()).clone())
                                        for k, p in zip(self.keys, self.logits)])
        self.weight_rows: dict[str, int] = {}  # maskable weight name -> its full number of rows
        for name, p in (view.maskable() if view is not None else {}).items():
            module_name, _, attr = name.rpartition(".")
            self.weight_rows[name] = p.shape[0]
            setattr(view.model.get_submodule(module_name), attr,
                    nn.Parameter(shards.local(p.detach()).clone(), requires_grad=False))

    def _local(self, key: str, full: Tensor) -> Tensor:
        return self.shards.local(full) if key in self.sharded else full

    # --- the hooks the training loop calls (identities in MaskLogits) ----------------------------------------------
    def for_forward(self, masks: Optional[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Masks as masked_forward reads them: each maskable weight's full masked weight, gathered from the
        ranks' `W_shard * mask_shard` (or `W_shard` without a weight mask) under `masked/<name>`."""
        out = dict(masks or {})
        for name, n in self.weight_rows.items():
            w = self.view.model.get_parameter(name)
            m = out.pop(weight_key(name), None)
            out[masked_weight_key(name)] = self.shards.gather(w if m is None else w * m, n)
        return out

    @torch.no_grad()
    def gather_full(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: self.shards.gather(v.detach(), self.shapes[k][0]) if k in self.sharded else v
                for k, v in tensors.items()}

    def local(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: self._local(k, v).clone() if k in self.sharded else v for k, v in tensors.items()}

    def _state_keys(self, optimizer: torch.optim.Optimizer) -> list[str]:
        key_of = {id(p): k for k, p in self.named_logits().items()}
        return [key_of[id(p)] for group in optimizer.param_groups for p in group["params"]]

    @torch.no_grad()
    def gather_state(self, state: dict, optimizer: torch.optim.Optimizer) -> dict:
        keys = self._state_keys(optimizer)
        out = {**state, "state": dict(state["state"])}
        for i, s in state["state"].items():
            if keys[i] in self.sharded:
                n = self.shapes[keys[i]][0]
                out["state"][i] = {name: self.shards.gather(v, n) if isinstance(v, Tensor) and v.dim() else v
                                   for name, v in s.items()}
        return out

    def local_state(self, state: dict, optimizer: torch.optim.Optimizer) -> dict:
        keys = self._state_keys(optimizer)
        out = {**state, "state": dict(state["state"])}
        for i, s in state["state"].items():
            if keys[i] in self.sharded:
                out["state"][i] = {name: self.shards.local(v).clone() if isinstance(v, Tensor) and v.dim() else v
                                   for name, v in s.items()}
        return out

    # --- MaskLogits' methods, on shards ---------------------------------------------------------------------
    def _noise(self, key: str, full: Tensor) -> Tensor:
        """MaskLogits.forward's noise: drawn for the whole mask as one process draws it, cut to this rank's rows (a
        copy: the rows alone stay)."""
        return self._local(key, full).clone() if key in self.sharded else full

    def _density(self, kept: Mapping[str, Tensor], count: Mapping[str, int]) -> dict[str, Tensor]:
        """A sharded type's P(keep) summed over the ranks (autograd-aware), over all its entries."""
        out = {}
        for t in kept:
            if t in SHARDED_TYPES:  # all keys of a trained type were summed
                out[t] = self.shards.total(kept[t]) / sum(_numel(s) for k, s in self.shapes.items()
                                                           if mask_type(k) == t)
            else:
                out[t] = kept[t] / count[t]
        return out

    def _count_all_ranks(self, mask_type_: str, count: Tensor) -> Tensor:
        return self.shards.sum_(count) if mask_type_ in SHARDED_TYPES else count

    def _entries(self, keys: list[str], tensors: Mapping[str, Tensor], idx: Tensor) -> Tensor:
        """Entries `idx` of the concatenation of the keys' full flattened tensors (given as this rank's rows): each
        rank fills in those it holds, and a sum over ranks assembles them (exact: the others add zeros)."""
        out = torch.zeros(idx.numel(), dtype=torch.float32)
        offset, sharded = 0, False
        for k in keys:
            x = tensors[k].detach().float().flatten().cpu()
            numel = _numel(self.shapes[k])
            lo = offset
            if k in self.sharded:
                start, _ = self.shards.rows(self.shapes[k][0])
                lo, sharded = offset + start * (numel // max(self.shapes[k][0], 1)), True
            sel = (idx >= lo) & (idx < lo + x.numel())
            out[sel] = x[idx[sel] - lo]
            offset += numel
        return self.shards.sum_(out) if sharded else out

    # MaskLogits.init_from_scores on shards: the same global quantiles (the mean and the 1M-entry sample assembled
    # over the ranks by _entries) and the same jitter rows (_local).
    def _score_floor(self, keys: list[str], scores: Mapping[str, Tensor]) -> float:
        total = sum(_numel(self.shapes[k]) for k in keys)
        s = torch.stack([scores[k].sum() for k in keys]).sum().reshape(1)
        return 1e-3 * float((self.shards.sum_(s) if mask_type(keys[0]) in SHARDED_TYPES else s) / total)

    # MaskLogits.project on shards: the same threshold, from the same sample or, exactly, by `kth_smallest` over
    # all-reduced counts.
    def _numel(self, key: str) -> int:
        return _numel(self.shapes[key])

    def _sampled(self, keys: list[str], logits: Mapping[str, Tensor], idx: list[Tensor]) -> Tensor:
        offsets = [sum(self._numel(k) for k in keys[:i]) for i in range(len(keys))]
        return self._entries(keys, logits, torch.cat([i + off for i, off in zip(idx, offsets)]))

    def _kth_smallest(self, keys: list[str], logits: Mapping[str, Tensor], k: int) -> float:
        if mask_type(keys[0]) not in SHARDED_TYPES:
            return super()._kth_smallest(keys, logits, k)

        def count_le(x: Tensor) -> int:
            c = torch.stack([torch.count_nonzero(logits[key] <= x) for key in keys]).sum().reshape(1)
            return int(self.shards.sum_(c))

        return kth_smallest(k, count_le, device=logits[keys[0]].device)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def mask_logits_for(cfg, view, shapes: Mapping[str, tuple[int, ...]], accelerator) -> MaskLogits:
    """The run's mask logits: ShardedMaskLogits (taking the model's maskable weights' rows) under `shard_masks`,
    else plain MaskLogits. Call it before moving the model to its device."""
    kw = dict(init_mean=INIT_MEAN, init_std=INIT_STD, seed=cfg.seed)
    if not cfg.shard_masks:
        return MaskLogits(shapes, **kw)
    return ShardedMaskLogits(shapes, **kw, view=view,
                             shards=RowShards(accelerator.num_processes, accelerator.process_index))


def footprint(params: MaskLogits, optimizer: torch.optim.Optimizer, view) -> dict[str, Any]:
    """Elements this rank holds: all mask logits, the weight-mask logits alone, the logits' gradients, the optimizer
    state, and the maskable model weights (what sharding divides by N); and the process's peak memory so far (host
    RSS; on CUDA also the peak allocated by torch)."""
    import resource

    logits = params.named_logits()
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor) and v.dim()]
    out: dict[str, Any] = {
        "logits": sum(p.numel() for p in logits.values()),
        "weight_logits": sum(p.numel() for k, p in logits.items() if mask_type(k) == "weight"),
        "grads": sum(p.grad.numel() for p in logits.values() if p.grad is not None),
        "optimizer": sum(v.numel() for v in state),
        "model_weights": sum(p.numel() for p in view.maskable().values()),
        "peak_host_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB
    }
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out
