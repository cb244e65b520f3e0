"""Gumbel-Rao: the straight-through Gumbel-softmax gradient, Rao-Blackwellized over the Gumbel
noise given the discrete sample (Paulus, Maddison & Krause 2021)."""

from functools import partial

import torch
import torch.nn.functional as F
from torch.distributions.utils import clamp_probs

from storch_pyro.estimators.base import Draw, Site
from storch_pyro.estimators.relaxation import _Relaxation, _straight_through, discrete_base
from storch_pyro.estimators.relaxed_sampling import (
    gumbel_conditional,
    logistic_conditional,
    open_uniform,
)


def conditional_noise(
    kind: str, scores: torch.Tensor, hard: torch.Tensor, n: int
) -> torch.Tensor:
    """``n`` independent draws of the noise given the discrete value, stacked on a new
    leading dim: for a Bernoulli (``kind="bernoulli"``) with logits ``scores``, logistic
    :math:`L` with :math:`1[\\phi + L > 0] =` ``hard``; for a categorical with normalized
    log-probabilities ``scores``, Gumbels :math:`G` with
    :math:`\\arg\\max(\\log\\pi + G) =` ``hard`` (one-hot). Constants of the gradient
    (computed from the detached ``scores``)."""
    scores = scores.detach()
    shape = (n,) + tuple(torch.broadcast_shapes(scores.shape, hard.shape))
    v = open_uniform(shape, scores)
    if kind == "bernoulli":
        return logistic_conditional(scores, hard, v) - scores
    z_tilde = gumbel_conditional(scores, hard, v)
    # impossible categories (log pi = -inf) keep their -inf score: noise 0 there
    return torch.where(torch.isfinite(scores), z_tilde - scores, 0.0)


class GumbelRao(_Relaxation):
    """Gumbel-Rao (Paulus, Maddison & Krause 2021, "Rao-Blackwellizing the Straight-Through
    Gumbel-Softmax Gradient Estimator"), for Bernoulli, Categorical and OneHotCategorical
    sites (``logits=`` or ``probs=``, ``.to_event``, plates).

    The straight-through Gumbel-softmax estimator (:class:`GumbelSoftmax` with ``hard=True``)
    draws Gumbels :math:`G`, hands the downstream code :math:`D = H(\\log\\pi + G)` (the
    one-hot argmax) and backpropagates through :math:`\\mathrm{softmax}((\\log\\pi + G)/\\tau)`:

    .. math::

        \\hat g_{\\mathrm{ST}} = \\frac{\\partial f}{\\partial D}\\,
            \\frac{\\partial}{\\partial\\theta}\\,
            \\mathrm{softmax}\\big((\\log\\pi_\\theta + G)/\\tau\\big)\\Big|_{G\\ \\text{fixed}}.

    :math:`f(D)` depends on :math:`G` only through :math:`D`, so averaging the Jacobian
    over :math:`G \\mid D` keeps the expectation and lowers the variance
    (Rao-Blackwellization):

    .. math::

        \\hat g_{\\mathrm{GR}} = \\frac{\\partial f}{\\partial D}\\,\\frac{1}{n}\\sum_{j=1}^n
            \\frac{\\partial}{\\partial\\theta}\\,
            \\mathrm{softmax}\\big((\\log\\pi_\\theta + G_j)/\\tau\\big),\\qquad
            G_j \\overset{iid}{\\sim} p(G \\mid D),

    i.e. the value is :math:`D + \\bar y - \\bot(\\bar y)` with
    :math:`\\bar y = \\frac1n\\sum_j \\mathrm{softmax}((\\log\\pi + G_j)/\\tau)`. For a
    Bernoulli, :math:`G` is logistic noise :math:`L`, :math:`D = 1[\\phi + L > 0]` and
    :math:`\\bar y = \\frac1n\\sum_j\\sigma((\\phi + L_j)/\\tau)`. The conditional draws are
    the top-down Gumbels of :mod:`~storch_pyro.estimators.relaxed_sampling` (for a
    categorical, the maximum is a standard Gumbel and the others are Gumbels truncated below
    it). :math:`G_1` is the Gumbel that produced :math:`D` (it *is* a draw from
    :math:`p(G \\mid D)`), :math:`G_2, \\dots, G_n` are fresh conditional draws, so
    ``n_conditional=1`` is exactly ``GumbelSoftmax(temperature, hard=True)``, on the same
    random numbers.

    **The conditional Gumbels are detached.** :math:`p(G \\mid D)` depends on
    :math:`\\theta`, but :math:`\\hat g_{\\mathrm{GR}}` is the conditional expectation of
    :math:`\\hat g_{\\mathrm{ST}}`, whose derivative is taken with the noise held fixed; the
    draws enter only as the points where the Jacobian is averaged. Differentiating through the
    conditional sampler as well would add
    :math:`\\partial\\,\\mathrm{softmax}/\\partial G \\cdot \\partial G_j/\\partial\\theta`, a
    different estimator (the :math:`\\nabla c(\\tilde z)` term of REBAR), not the
    Rao-Blackwellization of straight-through.

    Biased like straight-through (the same mean, as a conditional expectation), with variance
    falling in :math:`n`; the paper's gain is largest at low temperature. Categorical sites
    receive one-hot values and log-densities are evaluated at the discrete :math:`D`, as for
    :class:`GumbelSoftmax`. Costs :math:`n` softmaxes per draw, one evaluation of the
    downstream code.

    :param float temperature: :math:`\\tau > 0`.
    :param int n_conditional: :math:`n \\ge 1`, conditional Gumbel draws per sample.
    :param int n_samples: values drawn per site (a sample dim of that size).

    Example::

        z = storch.sample("z", dist.OneHotCategorical(logits=logits),
                          estimator=estimators.GumbelRao(temperature=0.5, n_conditional=10))
    """

    def __init__(self, temperature: float = 1.0, n_conditional: int = 10,
                 n_samples: int = 1) -> None:
        super().__init__(n_samples)
        if callable(temperature) or not float(temperature) > 0:
            raise ValueError(
                f"GumbelRao: temperature must be a float > 0, got {temperature!r}"
            )
        if (not isinstance(n_conditional, int) or isinstance(n_conditional, bool)
                or n_conditional < 1):
            raise ValueError(
                f"GumbelRao: n_conditional must be a positive int, got {n_conditional!r}"
            )
        self.temperature = float(temperature)
        self.n_conditional = n_conditional

    def draw(self, site: Site) -> Draw:
        fn, sample_shape = site.fn, site.sample_shape(self.n_samples)
        kind, logits = discrete_base(fn)
        shape = tuple(sample_shape) + tuple(logits.shape)
        # the same uniforms as GumbelSoftmax(hard=True) (torch's relaxed rsample)
        u = clamp_probs(torch.rand(shape, dtype=logits.dtype, device=logits.device))
        if kind == "bernoulli":
            scores = logits
            noise = torch.log(u) - torch.log1p(-u)  # logistic
            hard = (logits.detach() + noise > 0).to(logits.dtype)
        else:
            scores = torch.log_softmax(logits, -1)
            noise = -torch.log(-torch.log(u))  # Gumbel
            hard = F.one_hot((scores.detach() + noise).argmax(-1), shape[-1]).to(logits.dtype)
        noise = torch.cat([noise.unsqueeze(0), conditional_noise(
            kind, scores.detach(), hard, self.n_conditional - 1)], 0)
        relax = torch.sigmoid if kind == "bernoulli" else partial(torch.softmax, dim=-1)
        soft = relax((scores + noise) / self.temperature).mean(0)
        return self._draw(_straight_through(hard, soft), kind, hard)

    def __repr__(self) -> str:
        return (f"GumbelRao(temperature={self.temperature}, n_conditional={self.n_conditional}, "
                f"n_samples={self.n_samples})")
