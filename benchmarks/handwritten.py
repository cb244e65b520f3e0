"""Hand-written PyTorch surrogates of a few estimators for the discrete VAEs: the reference
that StorchELBO's speed and statistics are compared with. No Pyro anywhere.

Each returns ``(surrogate, cost)``: a scalar whose gradient is the estimate of
:math:`\\nabla \\sum_x \\mathbb{E}_q f(z)`, with :math:`f = \\log q - \\log p(x, z)` (which
depends on the parameters directly too, so the surrogate carries :math:`f` itself besides the
estimator's term), and the detached per-data-point cost averaged over the estimator's samples.
"""

from typing import Callable, Dict, Optional, Tuple

import torch

from benchmarks.models import DiscreteVAE

Surrogate = Tuple[torch.Tensor, torch.Tensor]


class HandWritten:
    """Base: ``__call__(vae, x)`` gives ``(surrogate, cost)``; state lives on the instance."""

    #: which model kinds (``DiscreteVAE.kind``) the estimator handles; empty: all.
    kinds: Tuple[str, ...] = ()

    def check(self, vae: DiscreteVAE) -> None:
        if self.kinds and vae.kind not in self.kinds:
            raise ValueError(
                f"{type(self).__name__} handles {'/'.join(self.kinds)} latents only, "
                f"not the {vae.kind} VAE"
            )

    def __call__(self, vae: DiscreteVAE, x: torch.Tensor) -> Surrogate:
        raise NotImplementedError

    def state(self) -> Optional[torch.Tensor]:
        return None

    def set_state(self, state: Optional[torch.Tensor]) -> None:
        pass


class ScoreFunctionMovingAverage(HandWritten):
    """:math:`(f(z) - b)\\nabla\\log q(z)`, :math:`b` an EMA (decay 0.9) of the batch-mean
    cost, 0 on the first step and updated after use (as ``baselines.MovingAverage``)."""

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self.baseline: Optional[torch.Tensor] = None

    def __call__(self, vae, x):
        q = vae.q(x)
        z = q.sample()
        log_q = q.log_prob(z)
        cost = log_q - vae.log_joint(x, z)
        detached = cost.detach()
        signal = detached if self.baseline is None else detached - self.baseline
        mean = detached.mean()
        self.baseline = mean if self.baseline is None else (
            self.decay * self.baseline + (1 - self.decay) * mean
        )
        return (cost + log_q * signal).sum(), detached

    def state(self):
        return None if self.baseline is None else self.baseline.clone()

    def set_state(self, state):
        self.baseline = state


class LeaveOneOut(HandWritten):
    """RLOO (Kool et al. 2019) with ``k`` samples:
    :math:`\\frac1k\\sum_i (f(z_i) - \\frac{1}{k-1}\\sum_{j\\ne i} f(z_j))\\nabla\\log q(z_i)`."""

    def __init__(self, k: int = 2) -> None:
        self.k = k

    def __call__(self, vae, x):
        q = vae.q(x)
        z = q.sample((self.k,))
        log_q = q.log_prob(z)
        cost = log_q - vae.log_joint(x, z)
        detached = cost.detach()
        baseline = (detached.sum(0, keepdim=True) - detached) / (self.k - 1)
        return (cost + log_q * (detached - baseline)).mean(0).sum(), detached.mean(0)


class _Antithetic(HandWritten):
    """Shared part of ARM and DisARM for Bernoulli latents with encoder logits :math:`\\phi`:
    one uniform :math:`u` per coordinate, two binary vectors, and a term
    :math:`\\sum_d \\hat g_d\\,(\\phi_d - \\bot\\phi_d)` beside the mean of the two costs."""

    kinds = ("binary",)

    def __call__(self, vae, x):
        logits = vae.encoder(x)
        q = torch.distributions.Independent(torch.distributions.Bernoulli(logits=logits), 1)
        detached = logits.detach()
        u = torch.rand_like(detached)
        first, second = self.pair(detached, u)
        z = torch.stack([first, second]).to(logits.dtype)
        cost = q.log_prob(z) - vae.log_joint(x, z)
        difference = (cost[0] - cost[1]).detach().unsqueeze(-1)
        gradient = difference * self.coefficient(detached, u, first, second)
        term = (gradient * (logits - detached)).sum(-1)
        return (cost.mean(0) + term).sum(), cost.detach().mean(0)

    def pair(self, logits, u):
        raise NotImplementedError

    def coefficient(self, logits, u, first, second):
        raise NotImplementedError


class ARM(_Antithetic):
    """ARM (Yin & Zhou 2019): :math:`b_1 = 1[u > \\sigma(-\\phi)]`,
    :math:`b_2 = 1[u < \\sigma(\\phi)]`, :math:`\\hat g = (f(b_1) - f(b_2))(u - \\tfrac12)`."""

    def pair(self, logits, u):
        return u > torch.sigmoid(-logits), u < torch.sigmoid(logits)

    def coefficient(self, logits, u, first, second):
        return u - 0.5


class DisARM(_Antithetic):
    """DisARM (Dong, Mnih & Tucker 2020): :math:`b = 1[u < \\sigma(\\phi)]`,
    :math:`\\tilde b = 1[1 - u < \\sigma(\\phi)]`, :math:`\\hat g = \\tfrac12 (f(b) - f(\\tilde
    b)) (-1)^{\\tilde b} 1[b \\ne \\tilde b]\\, \\sigma(|\\phi|)`."""

    def pair(self, logits, u):
        return u < torch.sigmoid(logits), 1 - u < torch.sigmoid(logits)

    def coefficient(self, logits, u, first, second):
        sign = 1.0 - 2.0 * second.to(logits.dtype)
        return 0.5 * sign * (first != second).to(logits.dtype) * torch.sigmoid(logits.abs())


#: ``torch:<name>`` on the command line.
HAND_WRITTEN: Dict[str, Callable[[], HandWritten]] = {
    "sf-ma": ScoreFunctionMovingAverage,
    "rloo": lambda: LeaveOneOut(2),
    "rloo4": lambda: LeaveOneOut(4),
    "arm": ARM,
    "disarm": DisARM,
}
