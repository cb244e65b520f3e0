"""Antithetic estimators for Bernoulli sites: ARM and DisARM."""

from typing import Optional, Tuple

import torch
from torch.distributions import Bernoulli, Distribution

from storch_pyro.estimators.base import Estimator


def bernoulli_logits(fn: Distribution) -> Optional[torch.Tensor]:
    """The logits of a (possibly wrapped: ``Independent``, expanded, masked) Bernoulli, or
    ``None`` if ``fn`` is not one."""
    base: Optional[Distribution] = fn
    while base is not None:
        if isinstance(base, Bernoulli):
            return base.logits
        base = getattr(base, "base_dist", None)
    return None


def _logit(u: torch.Tensor) -> torch.Tensor:
    return torch.log(u) - torch.log1p(-u)


class _AntitheticBernoulli(Estimator):
    """Shared part: draws ``n_samples`` pairs from one uniform each, on a sample dim of size
    ``2 * n_samples`` (first members, then second members); no score term."""

    has_score = False
    has_control_term = True

    @classmethod
    def supports(cls, fn: Distribution) -> bool:
        return bernoulli_logits(fn) is not None

    def _unsupported_reason(self, fn: Distribution) -> str:
        return " (it needs a Bernoulli, possibly .to_event or .expand-ed)"

    def sample_size(self, fn: Distribution) -> int:
        return 2 * self.n_samples

    def _pair(self, logits: torch.Tensor, u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _coefficient(self, logits, u, first, second) -> torch.Tensor:
        """The per-coordinate factor multiplying :math:`f(b_1) - f(b_2)` in the gradient."""
        raise NotImplementedError

    def draw(self, fn: Distribution, sample_shape: Tuple[int, ...]):
        shape = fn.batch_shape + fn.event_shape
        logits = torch.broadcast_to(bernoulli_logits(fn), shape).detach()
        pair_shape = (self.n_samples,) + tuple(sample_shape[1:]) + tuple(shape)
        u = torch.rand(pair_shape, dtype=logits.dtype, device=logits.device)
        first, second = self._pair(logits, u)
        value = torch.cat([first, second], dim=0).to(logits.dtype)
        return value, u

    def control_term(self, fn, state, sample_dim, downstream_cost):
        u = state
        event_dim = len(fn.event_shape)
        logits = torch.broadcast_to(bernoulli_logits(fn), fn.batch_shape + fn.event_shape)
        cost = downstream_cost.reshape(downstream_cost.shape + (1,) * event_dim)
        dim = sample_dim - event_dim
        k = self.n_samples
        difference = cost.narrow(dim, 0, k) - cost.narrow(dim, k, k)
        detached = logits.detach()
        first, second = self._pair(detached, u)
        gradient = difference * self._coefficient(detached, u, first, second)
        term = (gradient * (logits - detached)).sum(dim, keepdim=True) / k
        return term.sum(tuple(range(-event_dim, 0))) if event_dim else term


class ARM(_AntitheticBernoulli):
    """Augment-REINFORCE-merge (Yin & Zhou 2019, "ARM: Augment-REINFORCE-Merge Gradient for
    Stochastic Binary Networks"), for Bernoulli sites with logits :math:`\\phi`:

    .. math::

        u \\sim U(0,1),\\quad b_1 = 1[u > \\sigma(-\\phi)],\\quad b_2 = 1[u < \\sigma(\\phi)],
        \\qquad \\hat g_\\phi = \\big(f(b_1) - f(b_2)\\big)\\big(u - \\tfrac12\\big),

    per coordinate of a factorized (``.to_event``) Bernoulli, with :math:`f` evaluated on
    whole vectors. Unbiased. The site's value holds ``n_samples`` pairs on a sample dim of
    size ``2 * n_samples`` left of all plates; the loss averages the costs over all of them
    and the gradient over the pairs.

    Example::

        b = storch.sample("b", dist.Bernoulli(logits=phi).to_event(1), estimator=estimators.ARM())
    """

    def _pair(self, logits, u):
        noise = _logit(u)
        return noise > -logits, noise < logits

    def _coefficient(self, logits, u, first, second):
        return u - 0.5


class DisARM(_AntitheticBernoulli):
    """DisARM (Dong, Mnih & Tucker 2020, "DisARM: An Antithetic Gradient Estimator for
    Binary Latent Variables"), ARM with the augmentation integrated out:

    .. math::

        b = 1[u < \\sigma(\\phi)],\\quad \\tilde b = 1[1 - u < \\sigma(\\phi)],\\qquad
        \\hat g_\\phi = \\tfrac12\\big(f(b) - f(\\tilde b)\\big)\\,(-1)^{\\tilde b}\\,
        1[b \\ne \\tilde b]\\,\\sigma(|\\phi|),

    per coordinate of a factorized Bernoulli. Unbiased, with variance never above ARM's
    (the paper's Theorem 1). Values as for :class:`ARM`.

    Example::

        b = storch.sample("b", dist.Bernoulli(logits=phi), estimator=estimators.DisARM())
    """

    def _pair(self, logits, u):
        noise = _logit(u)
        return noise < logits, -noise < logits

    def _coefficient(self, logits, u, first, second):
        sign = 1.0 - 2.0 * second.to(logits.dtype)
        return 0.5 * sign * (first != second).to(logits.dtype) * torch.sigmoid(logits.abs())
