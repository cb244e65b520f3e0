"""The unordered set estimator: k samples without replacement, with a built-in baseline."""

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.distributions import Distribution

from storch_pyro.errors import UnsupportedDistributionError
from storch_pyro.estimators._unordered_set_math import gumbel_top_k, unordered_set_weights
from storch_pyro.estimators.base import Downstream, Draw, Estimator, Site, Terms
from storch_pyro.estimators.relaxation import discrete_base


class _Draw(NamedTuple):
    kind: str
    indices: torch.Tensor  # [*batch, k] the sampled categories, in Gumbel-top-k order
    weights: torch.Tensor  # [*batch, k] w_i = p(s_i) R(S, s_i), detached
    baseline_weights: torch.Tensor  # [*batch, k, k] of the built-in baseline, detached


class UnorderedSet(Estimator):
    """The unordered set estimator (Kool, van Hoof & Welling 2020, "Estimating Gradients for
    Discrete Random Variables by Sampling without Replacement", ICLR), for ``Categorical``,
    ``OneHotCategorical`` and ``Bernoulli`` (two classes) sites. It draws a set
    :math:`S` of ``k`` distinct categories without replacement (Gumbel-top-k) and uses

    .. math::

        \\hat{\\mathbb E}[f] = \\sum_{s \\in S} w_s f(s),\\qquad
        \\hat g = \\sum_{s \\in S} w_s \\nabla\\log p(s)\\,\\big(f(s) - B_s\\big),\\qquad
        w_s = p(s)\\,\\frac{p^{D \\setminus s}(S \\setminus s)}{p^D(S)},

    with the built-in baseline :math:`B_s = \\sum_{s' \\in S} p(s') R^{D\\setminus s}(S,
    s') f(s')` (:math:`R^{D\\setminus s}(S, s) = 1`): given that :math:`s` was drawn first,
    :math:`B_s` is an unbiased estimate of :math:`\\mathbb E_p[f]`, so the baseline term
    vanishes in expectation. :math:`p^D(S)` is the probability of drawing the set in any
    order, computed in log space (exactly for ``k <= 12``, by the paper's integral
    representation with a trapezoid rule above); see
    :mod:`storch_pyro.estimators._unordered_set_math`. Unbiased to first order; the
    weights are treated as constants, so higher derivatives are not those of the
    objective. With ``k = 1`` it is REINFORCE without a baseline; with ``k`` equal to the
    number of categories it is the exact sum. It takes no other baseline.

    The value holds the ``k`` categories on a sample dim left of all plates (indices for
    ``Categorical``, one-hot vectors for ``OneHotCategorical``, 0/1 for ``Bernoulli``).
    ``k`` must not exceed the number of categories, and every category that can be drawn
    among the ``k`` must have positive probability. As for :class:`SumAndSample`, a cost
    outside a plate must not depend on a site inside it (the weights vary along the plate).

    :param int n_samples: the set size ``k``.
    :param str method: ``"auto"``, ``"exact"`` or ``"quadrature"`` for the set
        probabilities.

    Example::

        z = storch.sample("z", dist.Categorical(logits=phi),
                          estimator=estimators.UnorderedSet(n_samples=4))
    """

    def __init__(self, n_samples: int = 2, method: str = "auto") -> None:
        super().__init__(n_samples)
        if method not in ("auto", "exact", "quadrature"):
            raise ValueError(
                f"UnorderedSet: method must be 'auto', 'exact' or 'quadrature', got {method!r}"
            )
        self.method = method

    @classmethod
    def supports(cls, fn: Distribution) -> bool:
        found = discrete_base(fn)
        if found is None:
            return False
        return len(fn.event_shape) == (1 if found[0] == "onehot" else 0)

    def _unsupported_reason(self, fn: Distribution) -> str:
        return (
            " (it needs a Categorical, OneHotCategorical or Bernoulli without .to_event: "
            "sets are drawn per batch element)"
        )

    def check(self, site: str, fn: Distribution) -> None:
        super().check(site, fn)
        size = self._log_probs(fn)[1].shape[-1]
        if self.n_samples > size:
            raise UnsupportedDistributionError(
                f"site '{site}': UnorderedSet(n_samples={self.n_samples}) draws without "
                f"replacement from only {size} categories; use n_samples <= {size} (with "
                f"n_samples = {size} it is the exact sum), or Enumerate()."
            )

    @staticmethod
    def _log_probs(fn: Distribution) -> Tuple[str, torch.Tensor]:
        """Normalized log-probabilities ``[*batch, n]`` (unmasked), with their kind."""
        kind, logits = discrete_base(fn)
        if kind == "bernoulli":
            logits = torch.stack([-F.softplus(logits), -F.softplus(-logits)], -1)
        return kind, torch.log_softmax(logits, -1)

    def draw(self, site: Site) -> Draw:
        fn, k = site.fn, self.n_samples
        sample_shape = site.sample_shape(k)
        kind, log_p = self._log_probs(fn)
        with torch.no_grad():
            indices, _ = gumbel_top_k(log_p, k)
            weights, baseline_weights = unordered_set_weights(
                log_p, indices, method=self.method
            )
        batch = log_p.shape[:-1]
        shape = tuple(sample_shape) + tuple(batch) if sample_shape else tuple(batch)
        value = indices.movedim(-1, 0).reshape(shape)
        if kind == "onehot":
            value = F.one_hot(value, log_p.shape[-1]).to(log_p.dtype)
        elif kind == "bernoulli":
            value = value.to(log_p.dtype)
        return Draw(value, size=k, weights=weights.movedim(-1, 0).reshape(shape),
                    score=site.log_prob(value), builtin_baseline=True,
                    state=_Draw(kind, indices, weights, baseline_weights))

    def surrogate(self, draw: Draw, downstream: Downstream) -> Optional[Terms]:
        """:math:`-\\sum_{s} w_s (\\log p(s) - \\bot\\log p(s))\\, B_s`: the baseline part of
        :math:`\\hat g` (the score part comes from the weighted, boxed costs)."""
        if self.n_samples == 1:
            return None
        state, sample_dim = draw.state, downstream.site.sample_dim
        _, log_p = self._log_probs(downstream.site.fn)
        log_p_set = log_p.gather(-1, state.indices)  # [*batch, k]
        cost = downstream.cost.movedim(sample_dim, -1)  # [..., *batch, k]
        baseline = (state.baseline_weights * cost[..., None, :]).sum(-1)
        term = -(state.weights * (log_p_set - log_p_set.detach()) * baseline).sum(-1)
        return Terms(control=term.unsqueeze(sample_dim))

    def __repr__(self) -> str:
        method = "" if self.method == "auto" else f", method={self.method!r}"
        return f"UnorderedSet(n_samples={self.n_samples}{method})"

