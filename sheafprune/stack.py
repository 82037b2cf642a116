"""The writer stack of the edge view: each writer's output (the embedding, every head, every MLP) is kept as a row of
one buffer, and each reader reads its own masked sum of the rows written before it, one matmul per reader group.
Memory: n_writers * B * T * D floats (SmolLM2, 301 writers, B=64, T=12: 0.5 GB fp32), kept once. `Stream` is what
the masked forward sees: the stack where edges are masked, and always the plain residual sum. The stack's rows may be
held in a lower precision than the writers compute in (bf16 training passes, masked.py).

The edge masks' gradient is autograd's dL/dmask, or (`secant`) flip_effects' loss change of flipping each edge.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .blas import add_outer, small_by_wide


class _Stack:
    """Writer outputs as rows of one buffer S (n_writers, B*T*D), and their gradient as rows of G.

    Readers read S with one large matmul each (mask^T @ S) instead of one thin matmul per writer chunk,
    and no per-layer torch.cat copy is kept for backward (that would be O(layers^2) memory). In backward
    every read adds its writer gradient into G in place (mask @ grad); a writer's own backward node runs
    only after all reads that depend on it (autograd's topological order) and hands its rows of G to the
    writer. Rows of S never change once written, which is why backward may use S directly. G is not zero-filled
    (a pass over the whole buffer): rows [0, g_rows) hold what reads added, the first read to reach a row
    writes it instead of adding to it, and rows that no read reached are zeroed when their writer takes them.
    """

    def __init__(self, n_writers: int, dtype: Optional[torch.dtype] = None):
        self.n_writers = n_writers
        self.dtype = dtype  # of S and G; None: the first writer's
        self.S: Optional[Tensor] = None
        self.G: Optional[Tensor] = None
        self.g_rows = 0  # rows of G that reads have written; the rest hold no gradient yet
        self.last: list[tuple[Tensor, Tensor]] = []  # last-position reads' (mask, grad), added in grad_rows
        self.rows = 0
        self._stats: Optional[tuple[Tensor, Tensor]] = None  # row_stats, once per pass

    def row_stats(self, d: int) -> tuple[Tensor, Tensor]:
        """Squared norm and mean over D of every writer output at every position, (n_writers, B*T) each; computed
        once, in backward (when every row is written), for all the secant taps of the pass."""
        if self._stats is None:
            rows = self.S.view(self.S.shape[0], -1, d)
            self._stats = ((rows * rows).sum(-1), rows.mean(-1))
        return self._stats

    def add_grad(self, mask: Tensor, grad: Tensor) -> None:
        """G[:W] += mask @ grad for a read of the first W rows; mask (W, R), grad (R, N)."""
        G = self._grad_buffer()
        w, done = mask.shape[0], min(self.g_rows, mask.shape[0])
        if done:
            add_outer(G[:done], mask[:done], grad, accumulate=True)
        if w > done:
            add_outer(G[done:w], mask[done:], grad, accumulate=False)
            self.g_rows = w

    def _grad_buffer(self) -> Tensor:
        if self.G is None:
            self.G = self.S.new_empty(self.S.shape)  # uninitialized: see the class docstring
        return self.G

    def grad_rows(self, start: int, stop: int) -> Tensor:
        """A writer's rows of G, once every read of them has added to it."""
        G = self._grad_buffer()
        if stop > self.g_rows:  # rows no read reached: zero gradient (reads still to come end before `start`)
            G[max(start, self.g_rows):stop].zero_()
            if start <= self.g_rows:
                self.g_rows = stop
        for mask, grad in self.last:  # mask (W, R), grad (R, B, D): each writer's rows take their share once
            if start < mask.shape[0]:
                rows = G[start:stop].view(stop - start, grad.shape[1], -1, grad.shape[2])  # (n, B, T, D)
                rows[:min(stop, mask.shape[0]) - start, :, -1] += torch.tensordot(mask[start:stop], grad, dims=1)
        return G[start:stop]


class _Write(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chunk: Tensor, stack: _Stack) -> Tensor:  # chunk (n, B, T, D) -> a token ()
        n = chunk.shape[0]
        if stack.S is None:
            stack.S = chunk.new_empty(stack.n_writers, chunk[0].numel(), dtype=stack.dtype or chunk.dtype)
        stack.S[stack.rows:stack.rows + n] = chunk.reshape(n, -1)
        ctx.stack, ctx.rows, ctx.shape = stack, (stack.rows, stack.rows + n), chunk.shape
        stack.rows += n
        return chunk.new_zeros(())  # only links the reads to this writer in the autograd graph

    @staticmethod
    def backward(ctx, _unused: Tensor):
        return ctx.stack.grad_rows(*ctx.rows).reshape(ctx.shape), None


class _Read(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mask: Tensor, stack: _Stack, *tokens: Tensor) -> Tensor:  # mask (W, R) -> (R, B*T*D)
        w = mask.shape[0]
        ctx.stack, ctx.w = stack, w
        ctx.save_for_backward(mask)
        with torch.autocast(mask.device.type, enabled=False):  # in S's dtype, which the mask has (Stream.read)
            return small_by_wide(mask.t(), stack.S[:w])

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        S = ctx.stack.S[:ctx.w]  # (W, N)
        grad_mask = S @ grad.t() if ctx.needs_input_grad[0] else None  # (W, R)
        ctx.stack.add_grad(mask, grad)  # G[:W] += mask @ grad
        zeros = [torch.zeros((), dtype=grad.dtype, device=grad.device) for _ in ctx.needs_input_grad[2:]]
        return (grad_mask, None, *zeros)


class _ReadLast(torch.autograd.Function):
    """_Read at the last position only: mask (W, R) -> (R, B*D), for the final norm of a next-token task, whose
    head reads only that position. Its writer gradient touches one position of G's rows, so it is kept until
    each writer takes its rows (_Stack.grad_rows) instead of being added over the whole buffer."""

    @staticmethod
    def forward(ctx, mask: Tensor, stack: _Stack, shape: torch.Size, *tokens: Tensor) -> Tensor:
        w, (b, t, d) = mask.shape[0], shape
        last = stack.S[:w].view(w, b, t, d)[:, :, -1].reshape(w, b * d)  # a copy: (W, B*D)
        ctx.stack, ctx.last, ctx.bd = stack, last, (b, d)
        ctx.save_for_backward(mask)
        with torch.autocast(mask.device.type, enabled=False):
            return mask.t() @ last

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        grad_mask = ctx.last @ grad.t() if ctx.needs_input_grad[0] else None  # (W, R)
        ctx.stack.last.append((mask, grad.reshape(grad.shape[0], *ctx.bd)))
        zeros = [torch.zeros((), dtype=grad.dtype, device=grad.device) for _ in ctx.needs_input_grad[3:]]
        return (grad_mask, None, None, *zeros)


def flip_effects(g: Tensor, x: Tensor, o: Tensor, mask: Tensor, gamma: Tensor, eps: float, *, centered: bool,
                 o_stats: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """Secant gradient of a group of R readers' edge mask (W, R) through the readers' norm.

    g (R, N, D): gradient of the loss w.r.t. the normed inputs y_r = norm(x_r); x (R, N, D): the readers' inputs
    (masked sums of writers); o (W, N, D): the writers' outputs; gamma (D,): the norm's scale. For each edge w -> r
    the input after flipping the edge is x_r - o_w if kept (mask 1), x_r + o_w if not (mask 0); the flip's effect
    on the loss is taken exactly through the norm and to first order after it:
        delta[w, r] = sum over positions of g_r . (norm(x_r +- o_w) - norm(x_r)).
    Returned as L(mask 1) - L(mask 0), i.e. -delta for a kept edge and +delta for a removed one, which is what the
    straight-through gradient dL/dmask estimates to first order at the current mask. The plain gradient misses
    what a zero-ablated edge does to its reader's scale: a writer that dominates its reader's input (SmolLM2's m11
    writes activations of ~2e4 into one dimension) has dL/dmask ~ 0 at mask 1, because the norm undoes a scaling of
    the dominant part, yet removing it changes the reader's input completely.
    Every term is a dot product over D, so the cost is that of the plain gradient's matmul, a few times over.
    `centered`: LayerNorm (subtracts the mean; its bias cancels in the difference); else RMSNorm. `o_stats`: the
    writers' squared norms and means per position, (W, N) each, if already known (_Stack.row_stats)."""
    d, r = x.shape[-1], x.shape[0]
    gg = g * gamma  # (R, N, D)
    s = (1.0 - 2.0 * mask).t()[:, :, None]  # (R, W, 1): -1 removes a kept edge, +1 adds a removed one
    go, xo = torch.einsum("rnd,wnd->rwn", torch.cat([gg, x]), o).split(r)  # one pass over o for both
    o2, mo = o_stats if o_stats is not None else ((o * o).sum(-1), o.mean(-1))  # (W, N) each
    gx, x2 = (gg * x).sum(-1), (x * x).sum(-1)  # (R, N) each
    x2_new = x2[:, None] + 2 * s * xo + o2[None]  # (R, W, N)
    if centered:
        sg, mx = gg.sum(-1), x.mean(-1)  # (R, N) each
        m_new = mx[:, None] + s * mo[None]
        before = (gx - mx * sg) / (x2 / d - mx * mx + eps).clamp_min(eps).sqrt()
        after = (gx[:, None] + s * go - m_new * sg[:, None]) / (x2_new / d - m_new * m_new + eps).clamp_min(eps).sqrt()
    else:
        before = gx / (x2 / d + eps).sqrt()
        after = (gx[:, None] + s * go) / (x2_new / d + eps).clamp_min(eps).sqrt()
    delta = (after - before[:, None]).sum(-1)  # (R, W)
    return (s[..., 0] * delta).t()  # (W, R)


class _SecantTap(torch.autograd.Function):
    """Identity on the normed inputs y (R, B, T, D) of one group of readers; in backward it hands their edge mask
    the secant gradient of `flip_effects` (the mask is read with its own gradient detached, see Stream.read_normed)."""

    @staticmethod
    def forward(ctx, y: Tensor, mask: Tensor, x: Tensor, stack: "_Stack", gamma: Tensor, eps: float,
                centered: bool) -> Tensor:
        ctx.save_for_backward(mask, x, gamma)
        ctx.stack, ctx.eps, ctx.centered = stack, eps, centered
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: Tensor):
        mask, x, gamma = ctx.saved_tensors
        w, r, d = mask.shape[0], mask.shape[1], x.shape[-1]
        grad_mask = None
        if ctx.needs_input_grad[1]:
            o = ctx.stack.S[:w].reshape(w, -1, d)
            sq, mean = ctx.stack.row_stats(d)
            grad_mask = flip_effects(grad.reshape(r, -1, d), x.reshape(r, -1, d), o, mask, gamma, ctx.eps,
                                     centered=ctx.centered, o_stats=(sq[:w], mean[:w])).to(mask.dtype)
        return grad, grad_mask, None, None, None, None, None


class Stream:
    """The residual stream: writer outputs in a _Stack when edges are masked, and always their plain sum."""

    def __init__(self, *, n_writers: int, keep_chunks: bool, dtype: Optional[torch.dtype] = None):
        self.stack = _Stack(n_writers, dtype) if keep_chunks else None
        self.tokens: list[Tensor] = []
        self.shape: Optional[torch.Size] = None  # (B, T, D)
        self.total: Optional[Tensor] = None  # (B, T, D)

    def add(self, chunk: Tensor) -> None:  # chunk (n, B, T, D)
        self.shape = chunk.shape[1:]
        if self.stack is not None:
            self.tokens.append(_Write.apply(chunk, self.stack))
        s = chunk.sum(0)
        self.total = s if self.total is None else self.total + s

    def read(self, mask: Optional[Tensor], *, last: bool = False) -> Tensor:
        """mask (W, R) -> (R, B, T, D); mask (W,) -> (B, T, D); None -> the plain sum, as (1, B, T, D).
        `last`: the last position only (T = 1 in those shapes)."""
        if mask is None:
            return (self.total[:, -1:] if last else self.total).unsqueeze(0)
        single = mask.dim() == 1
        m = (mask.unsqueeze(1) if single else mask).to(self.stack.S.dtype)  # (W, R)
        assert m.shape[0] == self.stack.rows, f"edge mask has {m.shape[0]} writer rows, stream has {self.stack.rows}"
        b, t, d = self.shape
        if last:
            out = _ReadLast.apply(m, self.stack, self.shape, *self.tokens).reshape(m.shape[1], b, 1, d)
        else:
            out = _Read.apply(m, self.stack, *self.tokens).reshape(m.shape[1], b, t, d)  # (R, B, T, D)
        return out[0] if single else out

    def read_normed(self, mask: Optional[Tensor], norm: torch.nn.Module, *, secant: bool) -> Tensor:
        """norm(read(mask)); with `secant`, the mask's gradient is flip_effects' secant instead of dL/dmask."""
        if mask is None or not secant or not mask.requires_grad:
            return apply_norm(norm, self.read(mask))
        x = self.read(mask.detach())
        single = mask.dim() == 1
        m = (mask.unsqueeze(1) if single else mask).to(self.stack.S.dtype)
        xs = x.unsqueeze(0) if single else x
        y = _SecantTap.apply(apply_norm(norm, xs), m, xs.detach(), self.stack, norm.weight.detach(), norm_eps(norm),
                             isinstance(norm, torch.nn.LayerNorm))
        return y[0] if single else y


def norm_eps(norm: torch.nn.Module) -> float:
    eps = getattr(norm, "eps", None)
    return float(eps if eps is not None else norm.variance_epsilon)  # LayerNorm: eps; HF RMSNorms: variance_epsilon


def apply_norm(norm: torch.nn.Module, x: Tensor) -> Tensor:
    """norm(x) in fp32 or wider: HF's RMSNorms compute in fp32 whatever the input, which in an fp64 forward (the
    export's exactness check) put fp32 rounding into the reference; here fp64 stays fp64. Otherwise the same ops
    as HF's (fp32: bitwise HF's result). LayerNorm computes in its input's dtype already."""
    if isinstance(norm, torch.nn.LayerNorm):
        return norm(x)
    h = wide(x)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm_eps(norm))
    return norm.weight * h.to(x.dtype)


def wide(x: Tensor) -> Tensor:
    """x in fp32 if it is in a narrower float (bf16 under autocast); fp32 and fp64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
