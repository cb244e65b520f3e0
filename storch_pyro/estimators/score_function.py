"""The score-function (REINFORCE) estimator."""

from typing import Optional

from torch.distributions import Distribution

from storch_pyro.estimators.base import Draw, Estimator, Site


class ScoreFunction(Estimator):
    """Score-function / REINFORCE / likelihood-ratio estimator (Williams 1992).

    .. math::

        \\hat g = \\frac{1}{k} \\sum_{i=1}^k \\big(f(z_i) - b_i\\big)\\,
        \\nabla_\\theta \\log q_\\theta(z_i), \\qquad z_i \\sim q_\\theta,

    unbiased for any baseline :math:`b_i` independent of :math:`z_i` (see
    :mod:`storch_pyro.baselines`). Works for every distribution with a ``log_prob`` and for
    non-differentiable costs. The value is drawn without a gradient path (``fn.sample``).

    :param int n_samples: samples drawn at the site (``k``); needed ``>= 2`` for
        :class:`~storch_pyro.baselines.LeaveOneOut`.
    :param baseline: a :class:`~storch_pyro.baselines.Baseline` for this site.

    Example::

        z = storch.sample("z", dist.Bernoulli(logits=phi),
                          estimator=estimators.ScoreFunction(
                              n_samples=4, baseline=baselines.LeaveOneOut()))
    """

    def __init__(self, n_samples: int = 1, baseline: Optional["Baseline"] = None) -> None:  # noqa: F821
        super().__init__(n_samples)
        from storch_pyro.baselines import Baseline

        if baseline is not None and not isinstance(baseline, Baseline):
            raise TypeError(
                f"ScoreFunction: baseline must be a storch_pyro.baselines.Baseline, "
                f"got {type(baseline).__name__}"
            )
        self._baseline = baseline

    @property
    def baseline(self):
        return self._baseline

    @classmethod
    def supports(cls, fn: Distribution) -> bool:
        return True

    def draw(self, site: Site) -> Draw:
        value = site.fn.sample(site.sample_shape(self.n_samples))
        return Draw(value, size=self.n_samples, score=site.log_prob(value))

    def __repr__(self) -> str:
        return f"ScoreFunction(n_samples={self.n_samples}, baseline={self._baseline!r})"
