"""Importance-weighted REINFORCE without replacement, over sequences."""

from torch.distributions import Distribution

from storch_pyro.estimators.base import Estimator


class ImportanceWeightedSet(Estimator):
    """REINFORCE without replacement with priority-sampling importance weights (Kool, van
    Hoof & Welling 2019, "Stochastic Beams and Where to Find Them", section 4.2; 2020,
    section 4), for a :func:`~storch_pyro.handlers.sequence`: the ``k`` sequences ``S`` of
    largest perturbed log-probability (stochastic beam search) and the threshold ``kappa``,
    the ``(k+1)``-th largest, give :math:`q(s) = P(G_s > \\kappa) = 1 - e^{-p(s)/e^{\\kappa}}`
    and

    .. math::

        \\hat g = \\sum_{s \\in S} \\frac{w_s}{W}\\, \\nabla\\log p(s)\\,
            \\big(f(s) - B\\big),\\qquad w_s = \\frac{p(s)}{q(s)},\\quad
            W = \\sum_{s\\in S} w_s,\\quad B = \\sum_{s \\in S} \\frac{w_s}{W} f(s).

    **Normalized** (default): biased but consistent (the bias vanishes as ``k`` grows; with
    ``k`` the number of sequences it is the exact gradient); lower variance.
    ``normalized=False``: weights :math:`w_s` without baseline, unbiased (the value
    :math:`\\sum_s w_s f(s)` is unbiased for :math:`\\mathbb E[f]`). For single sites use
    :class:`UnorderedSet` (unbiased, built-in baseline).

    :param int n_samples: the beam size ``k``.
    :param bool normalized: divide the weights by their sum (and subtract the weighted mean
        as a baseline).

    Example::

        with handlers.sequence("y", estimator=estimators.ImportanceWeightedSet(4)) as seq:
            ...
    """

    def __init__(self, n_samples: int = 2, normalized: bool = True) -> None:
        super().__init__(n_samples)
        self.normalized = bool(normalized)

    @classmethod
    def supports(cls, fn: Distribution) -> bool:
        return False  # a sequence estimator: handlers.sequence(..., estimator=...)

    def _unsupported_reason(self, fn: Distribution) -> str:
        return " (it estimates over a whole sequence: give it to handlers.sequence(...))"

    def __repr__(self) -> str:
        return f"ImportanceWeightedSet(n_samples={self.n_samples}, normalized={self.normalized})"
