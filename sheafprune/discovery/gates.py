"""Gates turn mask logits into masks: a stochastic, differentiable sample while training, a hard 0/1
decision (keep iff logit > 0) at test time. Each gate is one small function pair, swappable by name.

- concrete: DiscoGP's binary-concrete gate with a straight-through estimator. Forward is hard,
  keep = 1[logit + s*L > 0] with L ~ Logistic(0, 1), so P(keep) = sigmoid(logit / s); backward uses
  d/dlogit sigmoid((logit + s*L) / tau).
- sigmoid: no noise; the mask is the concrete gate's P(keep) itself, sigmoid(logit / s), with its exact
  gradient. An entry is faded out over several steps instead of dropped at random, so the loss sees what
  losing it costs before it is gone (SmolLM2 breaks on IOI once a random 7% of its weights or edges is
  dropped, which is what a concrete sample at logit 1 does to 27% of them).

s is the noise scale (the sigmoid gate's temperature): 1 is DiscoGP's gate; as s -> 0 the sample becomes
the test-time mask (logit > 0). The joint schedule anneals it (schedule.py) so the masks trained on converge
to the sheaf that is evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

_EPS = 1e-6


def logistic_noise(shape: torch.Size, *, seed: Sequence[int], out: Optional[Tensor] = None) -> Tensor:
    """Logistic(0, 1) noise drawn by numpy's PCG64 from `seed` (a sequence of ints: the step's seed and the mask's
    index), float32 at 24-bit resolution like torch.rand; into `out` (a contiguous float32 CPU tensor) if given.
    numpy fills without the GIL, so two masks draw in two threads (MaskLogits.forward); torch's CPU generator draws
    one number at a time under a lock: SmolLM2's 10^8 weight-mask entries took 0.55 s a step that way, 0.19 s on
    two threads this way."""
    u = torch.empty(shape) if out is None else out
    gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(v) for v in seed])))
    gen.random(out=u.numpy().reshape(-1), dtype=np.float32)
    return torch.logit_(u, eps=_EPS)  # log(u) - log(1 - u) of u clamped to [eps, 1 - eps], in place, one pass


class _StraightThrough(torch.autograd.Function):
    """Forward 1[x > 0] for x = logits + s * noise; backward d/dlogits sigmoid(x / tau). x is computed in the
    noise's buffer and is the one tensor saved; backward works in it too: for the ~10^8 entries of a model's weight
    masks, one fresh buffer each way instead of four (a fresh buffer also costs its page faults)."""

    @staticmethod
    def forward(ctx, logits: Tensor, noise: Tensor, scale: float, tau: float) -> Tensor:
        x = torch.add(logits.detach(), noise, alpha=scale, out=noise)  # noise is consumed
        ctx.save_for_backward(x)
        ctx.tau = tau
        return torch.gt(x, 0, out=torch.empty_like(x))  # 0./1. in the logits' dtype, one pass

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors  # overwritten below: a second backward through this step fails on its version
        s = x.mul_(1.0 / ctx.tau).sigmoid_()
        return torch.ops.aten.sigmoid_backward(grad, s).mul_(1.0 / ctx.tau), None, None, None


def concrete_sample(logits: Tensor, noise: Tensor, tau: float, scale: float) -> Tensor:
    """The concrete gate's hard sample with unscaled logistic `noise` (overwritten: it becomes logits + s * noise)."""
    return _StraightThrough.apply(logits, noise, scale, tau)


def concrete_p_keep(logits: Tensor, scale: float = 1.0) -> Tensor:
    return torch.sigmoid(logits / scale)


# Below this a soft mask is 0. sigmoid(logit / s) at a low temperature reaches subnormal floats (sigmoid(-100) =
# 4e-44 in fp32), and CPU arithmetic on subnormals is ~100x slower: a SmolLM2 weight+edge step went from 7 s to
# 21 s once s fell to 0.02, and a matmul with such a mask from 0.05 s to 6 s.
SOFT_FLOOR = 2.0 ** -60


def soft_mask(logits: Tensor, scale: float) -> Tensor:
    """sigmoid(logits / scale), with values below SOFT_FLOOR set to exactly 0 (no subnormal ever enters a product;
    their gradient, below 1e-18, is dropped too)."""
    m = torch.sigmoid(logits / scale)
    return m * (m >= SOFT_FLOOR)


def sigmoid_sample(logits: Tensor, noise: Optional[Tensor], tau: float, scale: float) -> Tensor:
    # noise and tau are unused: the mask is deterministic and its gradient exact
    return soft_mask(logits, scale)


@dataclass(frozen=True)
class Gate:
    # (logits, logistic noise L or None (consumed), straight-through tau, s) -> mask
    sample: Callable[[Tensor, Optional[Tensor], float, float], Tensor]
    p_keep: Callable[..., Tensor]  # (logits, s) -> P(keep) per entry under noise scale s (sigmoid: the mask)
    noisy: bool = True  # False: sample takes no noise (none is drawn: weight masks have ~10^8 entries)


GATES: dict[str, Gate] = {
    "concrete": Gate(concrete_sample, concrete_p_keep),
    "sigmoid": Gate(sigmoid_sample, concrete_p_keep, noisy=False),
}


def deterministic(logits: Tensor) -> Tensor:
    """The test-time mask of every gate: keep iff logit > 0."""
    return (logits > 0).to(logits.dtype)
