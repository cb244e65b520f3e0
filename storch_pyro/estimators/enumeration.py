"""Estimators that sum exactly over (part of) a finite support: Enumerate, SumAndSample."""

import torch
from torch.distributions import Distribution

from storch_pyro.errors import UnsupportedDistributionError
from storch_pyro.estimators.base import Draw, Estimator, Site


def _enumerable(fn: Distribution) -> bool:
    return bool(getattr(fn, "has_enumerate_support", False))


def _support_size(fn: Distribution) -> int:
    return fn.enumerate_support(expand=False).shape[0]


class Enumerate(Estimator):
    """Exact expectation over a finite support:

    .. math:: \\mathbb{E}_{q_\\theta}[f] = \\sum_{z} q_\\theta(z) f(z),\\qquad
        \\nabla = \\sum_z \\big(\\nabla q_\\theta(z)\\, f(z) + q_\\theta(z)\\,\\nabla f(z)\\big).

    The value is the whole support (unexpanded, as Pyro's parallel enumeration gives it) on
    a sample dim left of all plates; the loss weights each value by :math:`q(z)`, so the
    gradient is exact (zero variance) and of any order. Mix it freely with sampled sites.
    A cost that depends on a site enumerated inside a plate must be in that plate (a sum
    of per-index expectations); outside it, the joint support is exponential in the plate
    size and StorchELBO raises an error. Needs ``fn.has_enumerate_support`` (Bernoulli,
    Categorical, OneHotCategorical, ...; not ``.to_event`` distributions). The sums follow
    Pyro's parallel enumeration (Obermeyer et al. 2019, "Tensor Variable Elimination for
    Plated Factor Graphs").

    Along a ``pyro.markov`` chain (in a model without guide, or in a guide) the sites recycle
    their dims and the expected costs come from variable elimination, linear in the chain's
    length; in a model with a guide (ELBO mode) a site the guide lacks is summed out of the joint
    density, :math:`-\\log \\sum_z p(x, z)`, as ``TraceEnum_ELBO`` does
    (:mod:`storch_pyro.contraction`).

    Example::

        with handlers.estimator(config={"z": estimators.Enumerate()}):
            svi.step(data)
    """

    def __init__(self) -> None:
        super().__init__(1)

    @classmethod
    def supports(cls, fn: Distribution) -> bool:
        return _enumerable(fn)

    def _unsupported_reason(self, fn: Distribution) -> str:
        return " (it has no finite support to enumerate: has_enumerate_support is False)"

    def draw(self, site: Site) -> Draw:
        support = site.fn.enumerate_support(expand=False)
        size = support.shape[0]
        value = support.reshape(site.sample_shape(size) + support.shape[1:])
        return Draw(value, size=size, weights=site.log_prob(value).exp())

    def __repr__(self) -> str:
        return "Enumerate()"


class SumAndSample(Estimator):
    """Sum-and-sample (Liu et al. 2019, "Rao-Blackwellized Stochastic Gradients for
    Discrete Distributions"): sum exactly over the :math:`k-1` most probable values
    :math:`C`, sample one more from the rest, renormalized:

    .. math::

        \\mathbb{E}_q[f] = \\sum_{c \\in C} q(c) f(c) + q(\\bar C)\\,
            \\mathbb{E}_{s \\sim q(\\cdot \\mid \\bar C)}[f(s)],\\qquad
        \\hat g = \\sum_{c \\in C} \\nabla q(c) f(c) + \\nabla q(\\bar C) f(s)
            + q(\\bar C)\\, \\nabla \\log q(s \\mid \\bar C)\\, f(s).

    Unbiased; variance no higher than REINFORCE's with one sample. The value holds the
    ``k`` values on a sample dim left of all plates. ``k`` must not exceed the support
    size. Needs ``fn.has_enumerate_support``; as for :class:`Enumerate`, costs of a site in
    a plate must be in that plate. Its values depend on the values it is drawn per value
    of, so it is not contracted along ``pyro.markov``: drawn per value of an
    :class:`Enumerate` site of a contracted chain it raises; a chain of its own steps keeps
    one sample dim per step (:math:`k^T` values; use :class:`Enumerate` for long chains).

    :param int k: evaluations per site (``k - 1`` summed, one sampled).

    Example::

        z = storch.sample("z", dist.Categorical(logits=phi), estimator=estimators.SumAndSample(3))
    """

    def __init__(self, k: int) -> None:
        super().__init__(k)

    @classmethod
    def supports(cls, fn: Distribution) -> bool:
        return _enumerable(fn)

    def check(self, site: str, fn: Distribution) -> None:
        super().check(site, fn)
        size = _support_size(fn)
        if self.n_samples > size:
            raise UnsupportedDistributionError(
                f"site '{site}': SumAndSample(k={self.n_samples}) needs k at most the support "
                f"size {size}; use k <= {size}, or Enumerate() for the exact sum."
            )

    def draw(self, site: Site) -> Draw:
        fn, k = site.fn, self.n_samples
        sample_shape = site.sample_shape(k)
        support = fn.enumerate_support(expand=True)  # (K, *batch, *event)
        with torch.no_grad():
            log_probs = fn.log_prob(support)  # (K, *batch)
            summed = log_probs.topk(k - 1, dim=0).indices
            in_sum = torch.zeros_like(log_probs, dtype=torch.bool).scatter(0, summed, True)
            rest = log_probs.masked_fill(in_sum, -float("inf"))
            gumbel = -torch.log(-torch.log(torch.rand_like(rest).clamp(min=1e-30)))
            sampled = (rest + gumbel).argmax(0, keepdim=True)
        index = torch.cat([summed, sampled], 0)
        event = support.shape[1 + len(fn.batch_shape):]
        gathered = support.gather(
            0, index.reshape(index.shape + (1,) * len(event)).expand((k,) + support.shape[1:])
        )
        value = gathered.reshape(tuple(sample_shape) + tuple(support.shape[1:]))
        log_prob = site.log_prob(value)
        if k == 1:  # nothing summed: plain REINFORCE
            return Draw(value, score=log_prob)
        log_rest = fn.log_prob(support).masked_fill(in_sum, -float("inf"))
        log_rest = log_rest.logsumexp(0).reshape((1,) + (1,) * (log_prob.dim() - 1 - len(
            fn.batch_shape)) + tuple(fn.batch_shape))
        weights = torch.cat([log_prob[: k - 1].exp(), log_rest.exp().expand_as(log_prob[k - 1:])])
        score = torch.cat([torch.zeros_like(log_prob[: k - 1]), log_prob[k - 1:] - log_rest], 0)
        return Draw(value, size=k, weights=weights, score=score)

    def __repr__(self) -> str:
        return f"SumAndSample(k={self.n_samples})"
