"""Measure-valued derivatives (weak derivatives) for Normal, Bernoulli, Categorical,
OneHotCategorical and Poisson sites (Mohamed, Rosca, Figurnov & Mnih 2020, "Monte Carlo
Gradient Estimation in Machine Learning", JMLR 21(132), §6).

A weak derivative of a density :math:`p_\\theta` with respect to one parameter
:math:`\\theta_i` is a triple :math:`(c_i, p^+_i, p^-_i)` of a constant and two densities with
:math:`\\partial_{\\theta_i} p_\\theta = c_i\\,(p^+_i - p^-_i)`, so that

.. math::

    \\partial_{\\theta_i}\\,\\mathbb{E}_{p_\\theta}[f(x)]
      = c_i\\big(\\mathbb{E}_{p^+_i}[f(x)] - \\mathbb{E}_{p^-_i}[f(x)]\\big),

which needs evaluations of :math:`f` only: no derivative of :math:`f` (it may be a step
function) and no score. For a factorized :math:`p_\\theta(x) = \\prod_d p_{\\theta_d}(x_d)`
the derivative in the parameters of coordinate :math:`d` replaces :math:`x_d` alone, the other
coordinates staying at a draw :math:`x_{-d} \\sim p`:
:math:`c_d\\,\\mathbb{E}[f(x_{-d}, x^+_d) - f(x_{-d}, x^-_d)]`. The decompositions used here
(derived from the densities; the paper's table 1 lists the first two):

* **Normal** :math:`\\mathcal N(\\mu, \\sigma^2)`, mean: :math:`\\partial_\\mu \\mathcal N(x) =
  \\mathcal N(x)\\,(x - \\mu)/\\sigma^2`, whose positive and negative parts are, with
  :math:`w = |x - \\mu|/\\sigma`, :math:`\\frac{1}{\\sigma\\sqrt{2\\pi}}` times the densities of
  :math:`\\mu \\pm \\sigma W`, :math:`W \\sim \\mathrm{Weibull}(\\sqrt 2, 2)` (the Rayleigh
  density :math:`w e^{-w^2/2}`):

  .. math:: \\partial_\\mu \\mathbb{E}[f] = \\frac{1}{\\sigma\\sqrt{2\\pi}}\\,
     \\mathbb{E}_W\\big[f(\\mu + \\sigma W) - f(\\mu - \\sigma W)\\big]

  (one :math:`W` for both: a coupling). Scale: :math:`\\partial_\\sigma \\mathcal N(x) =
  \\frac1\\sigma\\big(\\frac1\\sigma m(w) - \\frac1\\sigma\\varphi(w)\\big)` with
  :math:`w = (x - \\mu)/\\sigma`, :math:`m(w) = w^2\\varphi(w)` the double-sided Maxwell density:

  .. math:: \\partial_\\sigma \\mathbb{E}[f] = \\frac1\\sigma\\,
     \\mathbb{E}\\big[f(\\mu + \\sigma M) - f(\\mu + \\sigma Z)\\big],\\qquad
     M \\sim \\text{double-sided Maxwell},\\ Z = M U,\\ U \\sim \\mathcal U(0, 1),

  coupled as the paper suggests (:math:`MU \\sim \\mathcal N(0, 1)`). The site's own draw is
  :math:`x = \\mu + \\sigma M U`, so :math:`f(\\mu + \\sigma Z)` is the loss's own evaluation:
  3 extra evaluations per coordinate for :math:`(\\mu, \\sigma)`, 2 for :math:`\\mu` alone, 1
  for :math:`\\sigma` alone.
* **Bernoulli** :math:`p`: :math:`\\partial_p \\mathbb{E}[f] = f(1) - f(0)`
  (:math:`c = 1`, :math:`p^\\pm = \\delta_1, \\delta_0`); one extra evaluation per coordinate,
  at the flipped value, since the draw is one of the two: :math:`(1 - 2x)(f(1 - x) - f(x))`.
* **Categorical** with logits :math:`\\theta` (:math:`K` categories, :math:`p =
  \\mathrm{softmax}\\,\\theta`): :math:`\\partial_{\\theta_i} p = p_i(\\delta_i - p)`, so
  :math:`c_i = p_i`, :math:`p^+_i = \\delta_i`, :math:`p^-_i = p` and

  .. math:: \\partial_{\\theta_i} \\mathbb{E}[f] = p_i\\big(f(i) - \\mathbb{E}_p[f]\\big),
     \\qquad \\mathbb{E}_p[f] = \\textstyle\\sum_j p_j f(j),

  where the negative part's expectation is computed exactly from the :math:`K` evaluations
  :math:`f(j)` already made (a Rao-Blackwellization of sampling :math:`p^-`; the estimates then
  sum to zero over :math:`i`, as the logits' gradient must). :math:`K - 1` extra evaluations
  per latent: the draw and its :math:`K - 1` cyclic shifts :math:`(x + j) \\bmod K`.
* **Poisson** :math:`\\lambda`: :math:`\\partial_\\lambda \\mathrm{Po}(n; \\lambda) =
  \\mathrm{Po}(n - 1; \\lambda) - \\mathrm{Po}(n; \\lambda)`, so
  :math:`\\partial_\\lambda \\mathbb{E}[f(N)] = \\mathbb{E}[f(N + 1) - f(N)]`, coupled on the
  draw :math:`N`: one extra evaluation per coordinate.
"""

import math
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from pyro.distributions import MaskedDistribution
from pyro.distributions.torch_distribution import ExpandedDistribution
from torch.distributions import (
    Bernoulli,
    Categorical,
    Distribution,
    Independent,
    Normal,
    OneHotCategorical,
    Poisson,
)

from storch_pyro.errors import StorchError
from storch_pyro.estimators.base import Downstream, Draw, Estimator, Site, Terms

_FAMILIES = (Normal, Bernoulli, Categorical, OneHotCategorical, Poisson)
_WRAPPERS = (Independent, MaskedDistribution, ExpandedDistribution)


def _base(fn: Distribution) -> Distribution:
    """The distribution under ``.to_event``, ``.expand`` and ``.mask`` wrappers (and no
    others: a ``TransformedDistribution`` such as ``LogNormal`` is not its base Normal)."""
    while isinstance(fn, _WRAPPERS):
        fn = fn.base_dist
    return fn


class _Layout(NamedTuple):
    """How a site's values are arranged: ``kind``; ``latent_event`` the event dims ``.to_event``
    reinterpreted (the coordinates perturbed one at a time; ``C`` of them, flattened); the
    parameters that need a gradient, each broadcast to ``batch + latent_event`` (``+ (K,)``
    for the categoricals' logits); ``n_types`` extra evaluations per coordinate."""

    kind: str
    latent_event: Tuple[int, ...]
    params: List[Tuple[str, torch.Tensor]]
    n_types: int
    n_categories: int


def _needs_grad(tensor: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and tensor.requires_grad


def _layout(fn: Distribution) -> _Layout:
    base = _base(fn)
    kind = type(base).__name__.lower()
    for family in _FAMILIES:
        if isinstance(base, family):
            kind = family.__name__.lower()
    onehot = kind == "onehotcategorical"
    event = tuple(fn.event_shape)
    latent_event = event[:-1] if onehot else event
    full = tuple(fn.batch_shape) + latent_event
    if kind == "normal":
        params = [(name, torch.broadcast_to(getattr(base, name), full))
                  for name in ("loc", "scale") if _needs_grad(getattr(base, name))]
        n_types = sum(2 if name == "loc" else 1 for name, _ in params)
        return _Layout(kind, latent_event, params, n_types, 0)
    if kind in ("bernoulli", "poisson"):
        # a Bernoulli given logits computes its probs from them, differentiably
        name = "probs" if kind == "bernoulli" else "rate"
        param = getattr(base, name)
        params = [(name, torch.broadcast_to(param, full))] if _needs_grad(param) else []
        return _Layout(kind, latent_event, params, len(params), 0)
    n_categories = base.logits.shape[-1]
    logits = base.logits
    params = [("logits", torch.broadcast_to(logits, full + (n_categories,)))] \
        if _needs_grad(logits) else []
    return _Layout(kind, latent_event, params, (n_categories - 1) if params else 0,
                   n_categories)


def _flat(param: torch.Tensor, fn: Distribution, layout: _Layout) -> torch.Tensor:
    """A Normal's ``param`` broadcast to ``batch + latent_event``, the event flattened."""
    full = tuple(fn.batch_shape) + layout.latent_event
    return torch.broadcast_to(param, full).reshape(tuple(fn.batch_shape) + (-1,))


class _FirstOrderOnly(torch.autograd.Function):
    """Identity whose backward refuses to build a graph (``create_graph=True``): the weak
    derivative's term is linear in the parameters, so its second derivative would be a
    silent zero."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, site: str) -> torch.Tensor:
        ctx.site = site
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if torch.is_grad_enabled():
            raise StorchError(
                f"site '{ctx.site}': MeasureValued gives first-order gradients only, and a "
                f"backward pass with create_graph=True (a second derivative, or a gradient "
                f"penalty) went through it. Use ScoreFunction, Pathwise or Enumerate at this "
                f"site for higher-order gradients."
            )
        return grad, None


class _Draw(NamedTuple):
    site: str
    layout: _Layout
    x: Optional[torch.Tensor]  # the draws (k, *rest, C) (categoricals: indices), or None


class MeasureValued(Estimator):
    """Measure-valued derivative estimator (Mohamed, Rosca, Figurnov & Mnih 2020, "Monte
    Carlo Gradient Estimation in Machine Learning", JMLR, §6), for Normal, Bernoulli,
    Categorical, OneHotCategorical and Poisson sites (plates, ``.to_event``, ``.expand``,
    ``.mask``).

    The gradient of :math:`\\mathbb{E}_{p_\\theta}[f]` in each parameter coordinate is
    :math:`c\\,(f(x^+) - f(x^-))`, a difference of evaluations of the site's downstream cost
    :math:`f` at two values coupled to the site's draw (the weak derivatives of
    :mod:`storch_pyro.estimators.measure_valued`): e.g. for a Normal,

    .. math::

        \\hat g_\\mu = \\frac{f(\\mu + \\sigma W) - f(\\mu - \\sigma W)}{\\sigma\\sqrt{2\\pi}},
        \\qquad \\hat g_\\sigma = \\frac{f(\\mu + \\sigma M) - f(\\mu + \\sigma M U)}{\\sigma},

    :math:`W \\sim \\mathrm{Weibull}(\\sqrt2, 2)`, :math:`M` double-sided Maxwell,
    :math:`U \\sim \\mathcal U(0,1)`, the draw being :math:`\\mu + \\sigma MU`. Unbiased,
    needs no derivative of :math:`f` (step functions, simulators) and has low variance in
    few dimensions.

    **Evaluations.** The site's value holds, on a sample dim left of all plates, the
    ``n_samples`` draws followed by the perturbed values (per draw, per parameter coordinate,
    per evaluation type), with sample weights :math:`1/k` and 0: the loss value counts only
    the draws, and one pass of the downstream code evaluates :math:`f` everywhere; the
    gradient enters the surrogate as a zero-valued control term
    :math:`\\sum c\\,\\bot(f(x^+) - f(x^-))(\\theta - \\bot(\\theta))`. Extra evaluations
    per draw: Normal 3 (``loc`` and ``scale``; 2 for ``loc`` alone, 1 for ``scale``),
    Bernoulli 1, Poisson 1, Categorical :math:`K - 1`, each *per coordinate of the event*
    (``.to_event`` coordinates are perturbed one at a time: :math:`D` coordinates cost
    :math:`3D` evaluations for a Normal). Only parameters that require grad are
    perturbed (none under ``torch.no_grad``, where the site draws only its samples).

    **Plates.** Each index of a vectorized plate is perturbed at the same time (one set of
    evaluations serves the whole plate), which is exact when every cost that depends on
    the site is computed per plate index, as Pyro's plates declare. A downstream cost that
    depends on the site's value but lies outside one of its plates (e.g. a sum over the
    plate's indices) would mix the indices' perturbations: ``StorchELBO`` raises for it.
    Compute it inside the plate, or make the coordinates an event (``.to_event``).

    **First order only**: the term is linear in the parameters, so its Hessian would be a
    silent zero; a backward pass with ``create_graph=True`` through it raises
    :class:`~storch_pyro.errors.StorchError`.

    Categorical sites receive index values as with :class:`ScoreFunction` (no one-hot
    requirement). Downstream sites are drawn for every evaluation; give those a
    score-function, pathwise or enumerated estimator, or their own control term, as usual.

    :param int n_samples: draws per site.

    Example::

        z = storch.sample("z", dist.Normal(mu, sigma), estimator=estimators.MeasureValued())
        storch.add_cost("step", (z > 0.5).float())   # non-differentiable: fine
    """

    @classmethod
    def supports(cls, fn: Distribution) -> bool:
        return isinstance(_base(fn), _FAMILIES)

    def _unsupported_reason(self, fn: Distribution) -> str:
        return (" (it needs a Normal, Bernoulli, Categorical, OneHotCategorical or Poisson, "
                "possibly .to_event, .expand-ed or masked)")

    def draw(self, site: Site) -> Draw:
        fn = site.fn
        layout = _layout(fn)
        size = self.n_samples * (1 + layout.n_types * math.prod(layout.latent_event))
        sample_shape = site.sample_shape(size)
        value, state = self._evaluations(site.name, fn, layout, sample_shape)
        weights = None
        if state.x is not None:  # the k draws count, the perturbed evaluations do not
            like = layout.params[0][1]
            weights = like.new_zeros((size,) + (1,) * (len(sample_shape) + len(fn.batch_shape)
                                                        - 1)).detach()
            weights[:self.n_samples] = 1.0 / self.n_samples
        return Draw(value, size=size, weights=weights, perturbs_plates=True, state=state)

    def _evaluations(self, site: str, fn: Distribution, layout, sample_shape: Tuple[int, ...]):
        """The values: ``k`` draws, then each with one coordinate replaced per parameter
        type (``sample_shape`` on the left), and the :class:`_Draw` for the terms."""
        if not layout.n_types:
            return fn.sample(sample_shape), _Draw(site, layout, None)
        base = _base(fn)
        k = self.n_samples
        rest = tuple(sample_shape[1:]) + tuple(fn.batch_shape)
        event = layout.latent_event
        n_coordinates = math.prod(event)
        flat = (k,) + rest + (n_coordinates,)
        if layout.kind == "normal":
            loc, scale = (_flat(getattr(base, name), fn, layout).detach()
                          for name in ("loc", "scale"))
            dtype, device = loc.dtype, loc.device
            # W ~ Weibull(sqrt 2, 2) by inversion; M: a random sign times a chi(3)
            w = torch.sqrt(-2.0 * torch.log1p(-torch.rand(flat, dtype=dtype, device=device)))
            m = torch.randn((3,) + flat, dtype=dtype, device=device).pow(2).sum(0).sqrt()
            m = m * (torch.randint(0, 2, flat, device=device).to(dtype) * 2.0 - 1.0)
            x = loc + scale * m * torch.rand(flat, dtype=dtype, device=device)  # M U ~ N(0, 1)
            replacements = []
            for name, _ in layout.params:
                if name == "loc":
                    replacements += [loc + scale * w, loc - scale * w]
                else:
                    replacements.append(loc + scale * m)
        else:
            sample = fn.sample((k,) + tuple(sample_shape[1:]))
            if layout.kind == "onehotcategorical":
                sample = sample.argmax(-1)
            x = sample.reshape(flat)
            if layout.kind == "bernoulli":
                replacements = [1.0 - x]
            elif layout.kind == "poisson":
                replacements = [x + 1.0]
            else:
                n = layout.n_categories
                # a category of probability zero (logit -inf) is not evaluated: its
                # log-density would be -inf, and its gradient p_i (f(i) - E f) is 0 anyway
                logits = layout.params[0][1].detach()
                possible = torch.isfinite(logits.reshape(logits.shape[:len(fn.batch_shape)]
                                                         + (n_coordinates, n)))
                possible = possible.expand(x.shape + (n,))
                replacements = []
                for j in range(1, n):
                    shifted = (x + j) % n
                    keep = possible.gather(-1, shifted.unsqueeze(-1)).squeeze(-1)
                    replacements.append(torch.where(keep, shifted, x))
        r = torch.stack(replacements)  # (T, k, *rest, C)
        eye = torch.eye(n_coordinates, dtype=torch.bool, device=x.device)
        eye = eye.reshape((1, n_coordinates) + (1,) * (1 + len(rest)) + (n_coordinates,))
        perturbed = torch.where(eye, r.unsqueeze(1), x)  # (T, C, k, *rest, C)
        value = torch.cat([x, perturbed.reshape((-1,) + rest + (n_coordinates,))], 0)
        value = value.reshape((-1,) + rest + event)
        if layout.kind == "onehotcategorical":
            value = F.one_hot(value, layout.n_categories).to(base.logits.dtype)
        return value, _Draw(site, layout, x)

    def example_value(self, fn: Distribution) -> torch.Tensor:
        return fn.sample()

    def surrogate(self, draw: Draw, downstream: Downstream) -> Optional[Terms]:
        state, fn, downstream_cost = draw.state, downstream.site.fn, downstream.cost
        layout = state.layout
        if state.x is None:
            return None
        k = self.n_samples
        x = state.x
        n_coordinates = x.shape[-1]
        rest = tuple(x.shape[1:-1])
        cost = downstream_cost.reshape((-1,) + rest)
        base_cost = cost[:k].unsqueeze(-1)  # (k, *rest, 1)
        extra = cost[k:].reshape((layout.n_types, n_coordinates, k) + rest).movedim(1, -1)
        grads = []
        if layout.kind == "normal":
            scale = _flat(_base(fn).scale, fn, layout).detach()
            t = 0
            for name, _ in layout.params:
                if name == "loc":
                    grads.append((extra[t] - extra[t + 1]) / (scale * math.sqrt(2 * math.pi)))
                    t += 2
                else:
                    grads.append((extra[t] - base_cost) / scale)
                    t += 1
        elif layout.kind == "bernoulli":
            grads.append((1.0 - 2.0 * x) * (extra[0] - base_cost))
        elif layout.kind == "poisson":
            grads.append(extra[0] - base_cost)
        else:
            n = layout.n_categories
            evaluations = torch.cat([base_cost.expand(x.shape).unsqueeze(0), extra], 0)
            categories = torch.arange(n, device=x.device).reshape((n,) + (1,) * x.dim())
            f = evaluations.gather(0, (categories - x) % n).movedim(0, -1)  # (k, *rest, C, K)
            logits = layout.params[0][1]
            probs = torch.softmax(logits.detach(), -1)
            probs = probs.reshape(probs.shape[:-1 - len(layout.latent_event)]
                                  + (n_coordinates, n))
            mean = (probs * f).sum(-1, keepdim=True)
            grads.append(probs * (f - mean))
        term = None
        for (name, param), grad in zip(layout.params, grads):
            categorical = layout.kind in ("categorical", "onehotcategorical")
            flat_shape = param.shape[:param.dim() - len(layout.latent_event)
                                     - (1 if categorical else 0)] + (n_coordinates,)
            if categorical:
                flat_shape = flat_shape + (layout.n_categories,)
            theta = _FirstOrderOnly.apply(param, state.site).reshape(flat_shape)
            difference = theta - theta.detach()
            if categorical:  # logits -inf: inf - inf; their gradient is 0
                difference = torch.where(torch.isfinite(theta.detach()), difference, 0.0)
            product = grad * difference
            product = product.sum((-2, -1) if categorical else -1)
            term = product if term is None else term + product
        return Terms(control=term.sum(0, keepdim=True) / k)

    def __repr__(self) -> str:
        return f"MeasureValued(n_samples={self.n_samples})"
