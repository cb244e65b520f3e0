"""Learned control variates: REBAR, RELAX (discrete sites) and LAX (continuous sites).

All three have the form

.. math::

    \\hat g = \\big[f(b) - c(\\tilde z)\\big]\\nabla_\\theta \\log p_\\theta(b)
        + \\nabla_\\theta c(z) - \\nabla_\\theta c(\\tilde z),

with :math:`z` a reparameterized relaxed sample, :math:`b = H(z)` the discrete value and
:math:`\\tilde z \\sim p(z \\mid b)` (see :mod:`~storch_pyro.estimators.relaxed_sampling`).
It is unbiased for any control variate :math:`c` continuous in :math:`z`:
:math:`\\mathbb{E}_b[\\mathbb{E}_{\\tilde z|b}[c(\\tilde z)]\\nabla\\log p(b)]
+ \\mathbb{E}[\\nabla c(\\tilde z)] = \\nabla\\mathbb{E}_z[c(z)] = \\mathbb{E}[\\nabla c(z)]`.
REBAR (Tucker et al. 2017) takes :math:`c = \\eta f(\\sigma_\\lambda(\\cdot))`, RELAX
(Grathwohl et al. 2018, "Backpropagation through the Void") a network :math:`c_\\phi`, and
LAX, for a reparameterizable continuous :math:`z` (:math:`b = z`, no conditional sample),
:math:`\\hat g = [f(z) - c_\\phi(z)]\\nabla\\log p(z) + \\nabla c_\\phi(z)`.

**Training.** :math:`\\eta`, :math:`\\lambda` and :math:`\\phi` minimize the variance of
:math:`\\hat g`, by :math:`\\partial_\\phi \\mathbb{E}[\\hat g^2] =
\\mathbb{E}[2\\hat g\\,\\partial_\\phi \\hat g]` (the mean does not depend on them). Inside
``SVI(model, guide, optim, loss=StorchELBO()).step(...)``, ``StorchELBO.loss_and_grads``
leaves on the model/guide parameters the estimator's gradient :math:`\\hat g`, and on the
control-variate parameters the gradient of :math:`\\sum \\hat g^2`, where :math:`\\hat g` is
the gradient w.r.t. the site's distribution parameters (the logits of a discrete site, the
``arg_constraints`` tensors such as ``loc`` and ``scale`` of a continuous one) — one
``torch.autograd.grad(..., create_graph=True)`` per step. The parameters live in Pyro's param
store, so ``SVI``'s optimizer updates them and they checkpoint with the store:
``storch_pyro.rebar.<site>.eta`` and ``.temperature`` (:math:`\\lambda`, constrained
positive), ``storch_pyro.relax.<site>.eta`` / ``.temperature`` and the network
``storch_pyro.relax.<site>`` (``pyro.module``), ``storch_pyro.lax.<site>``.
``differentiable_loss`` gives the same gradients (``loss_and_grads`` is its backward): one
torch optimizer over it trains the model, the guide and the control variates. Higher-order
gradients are not promised.
"""

from dataclasses import dataclass, field
from functools import partial
from typing import Any, List, Optional, Tuple

import pyro
import torch
import torch.nn.functional as F
from torch.distributions import Distribution, constraints

from storch_pyro.errors import StorchError, UnsupportedDistributionError
from storch_pyro.estimators.base import (
    Downstream,
    Draw,
    Estimator,
    Site,
    Terms,
    VarianceTerm,
    innermost_distribution,
)
from storch_pyro.estimators.relaxation import discrete_base
from storch_pyro.estimators.relaxed_sampling import (
    gumbel_conditional,
    gumbel_sample,
    logistic_conditional,
    logistic_sample,
    open_uniform,
    relaxed_log_prob,
)


@dataclass
class _Draw:
    """What a draw leaves for the control terms."""

    site: str
    z: torch.Tensor
    z_tilde: Optional[torch.Tensor]
    targets: List[torch.Tensor]
    eta: Any = None
    params: List[torch.Tensor] = field(default_factory=list)
    score: Optional[torch.Tensor] = None


def _distribution_parameters(fn: Distribution) -> List[torch.Tensor]:
    """The tensors of ``fn``'s ``arg_constraints`` that it holds and that require grad."""
    base = innermost_distribution(fn)
    found = []
    for name in getattr(base, "arg_constraints", {}):
        value = vars(base).get(name)
        if isinstance(value, torch.Tensor) and value.requires_grad:
            found.append(value)
    return found


def _leaf(param: torch.Tensor) -> torch.Tensor:
    """The unconstrained leaf behind a ``pyro.param`` value."""
    unconstrained = getattr(param, "unconstrained", None)
    return unconstrained() if unconstrained is not None else param


def _check_output(site: str, module: torch.nn.Module, out: Any, z: torch.Tensor,
                  expected: torch.Size) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.shape != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise StorchError(
            f"site '{site}': the control variate {type(module).__name__} returned {got} for "
            f"samples of shape {tuple(z.shape)}; it must return one value per sample and batch "
            f"element, shape {tuple(expected)} (the site's sample dims and plates; sum over "
            f"event dims, squeeze a trailing dim of size 1)."
        )
    return out


class _Network:
    """A user's control-variate network :math:`c_\\phi`, registered with ``pyro.module``."""

    def __init__(self, module: torch.nn.Module, with_context: bool, name: Optional[str],
                 owner: str) -> None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(
                f"{owner}: control_variate must be a torch.nn.Module, got {type(module).__name__}"
            )
        self.module = module
        self.with_context = with_context
        self.name = name

    def __call__(self, prefix: str, site: Site, z: torch.Tensor,
                 expected: torch.Size, state: _Draw) -> torch.Tensor:
        # update_module_params: after pyro.get_param_store().load the network must compute
        # with (and train) the loaded tensors, not its own initial ones (checkpoint/resume)
        module = pyro.module(
            self.name or f"{prefix}.{site.name}", self.module, update_module_params=True
        )
        known = {id(p) for p in state.params}
        state.params.extend(
            p for p in module.parameters() if p.requires_grad and id(p) not in known
        )
        if self.with_context:
            args = tuple(_detached(a) for a in site.args)
            kwargs = {k: _detached(v) for k, v in site.kwargs.items()}
            out = module(z, *args, **kwargs)
        else:
            out = module(z)
        return _check_output(site.name, self.module, out, z, expected)


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _sum_to_shape(term: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sums ``term`` over the dims where ``shape`` has size 1 (the site's plates)."""
    dims = [d for d in range(-len(shape), 0) if shape[d] == 1 and term.shape[d] != 1]
    return term.sum(dims, keepdim=True) if dims else term


def _mean_over_samples(term: torch.Tensor, k: int, has_sample_dim: bool) -> torch.Tensor:
    """Averages over the site's own sample dim (the leftmost dim of its batch shape)."""
    if not has_sample_dim:
        return term
    return term.sum(0, keepdim=True) / k


class _RelaxedDiscrete(Estimator):
    """Shared part of REBAR and RELAX: the relaxed draw, the three evaluations and the
    control terms. With relaxed evaluations (REBAR, or RELAX with ``rebar_term``) the site's
    value holds, on a sample dim of size ``3 * n_samples``, the hard samples :math:`b`, then
    :math:`\\sigma_\\lambda(z)`, then :math:`\\sigma_\\lambda(\\tilde z)`, with sample
    weights :math:`1/k, 0, 0`: the loss value counts only :math:`f(b)`, and one pass of the
    downstream code evaluates :math:`f` at all three."""

    _prefix = ""

    def __init__(self, n_samples: int, temperature: float, eta: float, learn: bool,
                 relaxed_evaluations: bool) -> None:
        super().__init__(n_samples)
        if not float(temperature) > 0:
            raise ValueError(f"{type(self).__name__}: temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.eta = float(eta)
        self.learn = bool(learn)
        self.relaxed_evaluations = relaxed_evaluations

    @classmethod
    def supports(cls, fn: Distribution) -> bool:
        return discrete_base(fn) is not None

    def _unsupported_reason(self, fn: Distribution) -> str:
        return " (it needs a Bernoulli, Categorical or OneHotCategorical)"

    def _eta_and_temperature(self, site: str, like: torch.Tensor):
        if not self.learn:
            return self.eta, self.temperature, []
        eta = pyro.param(f"{self._prefix}.{site}.eta",
                         lambda: torch.tensor(self.eta, dtype=like.dtype, device=like.device))
        temperature = pyro.param(
            f"{self._prefix}.{site}.temperature",
            lambda: torch.tensor(self.temperature, dtype=like.dtype, device=like.device),
            constraint=constraints.positive,
        )
        return eta, temperature, [_leaf(eta), _leaf(temperature)]

    def draw(self, draw_site: Site) -> Draw:
        fn, site, k = draw_site.fn, draw_site.name, self.n_samples
        size = 3 * k if self.relaxed_evaluations else k
        sample_shape = draw_site.sample_shape(size)
        kind, logits = discrete_base(fn)
        shape = ((k,) + tuple(sample_shape[1:]) if sample_shape else ()) + tuple(logits.shape)
        u, v = open_uniform(shape, logits), open_uniform(shape, logits)
        if kind == "bernoulli":
            z = logistic_sample(logits, u)
            hard = (z > 0).to(logits.dtype)
            z_tilde = logistic_conditional(logits, hard, v)
        else:
            log_probs = torch.log_softmax(logits, -1)
            z = gumbel_sample(log_probs, u)
            index = z.argmax(-1)
            hard = F.one_hot(index, logits.shape[-1]).to(logits.dtype)
            z_tilde = gumbel_conditional(log_probs, hard, v)
        targets = [t for t in [innermost_distribution(fn).logits] if t.requires_grad]
        state = _Draw(site, z, z_tilde, targets)
        if not self.relaxed_evaluations:
            value = index if kind == "categorical" else hard
            state.score = draw_site.log_prob(value)
            return Draw(value, size=k, score=state.score, state=state)
        state.eta, temperature, state.params = self._eta_and_temperature(site, logits)
        if kind == "bernoulli":
            soft, soft_tilde = torch.sigmoid(z / temperature), torch.sigmoid(z_tilde / temperature)
        else:
            soft = torch.softmax(z / temperature, -1)
            soft_tilde = torch.softmax(z_tilde / temperature, -1)
        value = torch.cat([hard, soft, soft_tilde], 0)
        log_prob = relaxed_log_prob(fn, value)
        weights = log_prob.new_zeros((3 * k,) + (1,) * (log_prob.dim() - 1))
        weights[:k] = 1.0 / k  # the loss value counts only f(b)
        state.score = log_prob[:k]
        score = torch.cat([state.score, torch.zeros_like(log_prob[k:])], 0)
        return Draw(value, size=size, weights=weights, score=score,
                    log_density=partial(self._relaxed_log_prob, site), state=state)

    def example_value(self, fn: Distribution) -> torch.Tensor:
        kind, logits = discrete_base(fn)
        if kind != "categorical" or not self.relaxed_evaluations:
            return fn.sample()
        return F.one_hot(fn.sample(), logits.shape[-1]).to(logits.dtype)

    def _relaxed_log_prob(self, site: str, fn: Distribution, value: torch.Tensor) -> torch.Tensor:
        if discrete_base(fn) is None:
            raise StorchError(
                f"site '{site}': {type(self).__name__} evaluates its log-densities at "
                f"relaxed values, which needs a Bernoulli, Categorical or OneHotCategorical in "
                f"the model and guide alike, got {type(fn).__name__}. Use the same family in "
                f"both, or RELAX without rebar_term."
            )
        return relaxed_log_prob(fn, value)

    def _network_terms(self, site: Site, state: _Draw
                       ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """:math:`c_\\phi(\\tilde z)` and :math:`c_\\phi(z) - c_\\phi(\\tilde z)`, or Nones."""
        return None, None

    def surrogate(self, draw: Draw, downstream: Downstream) -> Terms:
        k = self.n_samples
        state = draw.state
        score = state.score
        has_sample_dim = downstream.site.sample_dim is not None
        c_tilde, shared = self._network_terms(downstream.site, state)
        if self.relaxed_evaluations:
            live_total = downstream.live_total
            relaxed_total = live_total[k:2 * k] - live_total[2 * k:]
            rebar = state.eta * downstream.live_cost[2 * k:]
            c_tilde = rebar if c_tilde is None else c_tilde + rebar
            shared_rebar = state.eta * relaxed_total
            if shared is not None:  # per-index network terms: sum them over the plates
                shared = _sum_to_shape(shared, shared_rebar.shape) + shared_rebar
            else:
                shared = shared_rebar
        per_index = _mean_over_samples(-c_tilde * (score - score.detach()), k, has_sample_dim)
        shared = _mean_over_samples(shared - shared.detach(), k, has_sample_dim)
        return Terms(per_index, shared, VarianceTerm(state.targets, state.params))


class REBAR(_RelaxedDiscrete):
    """REBAR (Tucker, Mnih, Maddison, Lawson & Sohl-Dickstein 2017, "REBAR: Low-variance,
    unbiased gradient estimates for discrete latent variable models"), for Bernoulli,
    Categorical and OneHotCategorical sites (``logits=`` or ``probs=``, ``.to_event``,
    plates):

    .. math::

        \\hat g = \\big[f(b) - \\eta f(\\sigma_\\lambda(\\tilde z))\\big]\\nabla\\log p(b)
            + \\eta\\nabla f(\\sigma_\\lambda(z)) - \\eta\\nabla f(\\sigma_\\lambda(\\tilde z)),

    with :math:`z` the logistic (Bernoulli) or Gumbel (categorical) relaxed sample,
    :math:`b = H(z)`, :math:`\\tilde z \\sim p(z \\mid b)`, and
    :math:`\\sigma_\\lambda(z) = \\sigma(z/\\lambda)` or :math:`\\mathrm{softmax}(z/\\lambda)`.
    Unbiased for any :math:`\\eta, \\lambda`.

    **What f is.** :math:`f` is the site's downstream cost: every cost computed after the
    site, as credit assignment gives it. The site's value holds ``n_samples`` triples
    :math:`(b, \\sigma_\\lambda(z), \\sigma_\\lambda(\\tilde z))` on a sample dim of size
    ``3 * n_samples``, so the downstream code runs once on all three (Categorical sites get
    **one-hot** values: write ``z @ table``, not ``table[z]``); the loss value counts only
    :math:`b`. In ELBO mode :math:`f(\\sigma_\\lambda(z))` is the ELBO term at the relaxed
    value as in the paper's VAEs: the decoder sees :math:`\\sigma_\\lambda(z)`, and
    :math:`\\log q` and :math:`\\log p` of the site are the continuous
    :math:`\\sum_i y_i\\log\\pi_i` (:func:`relaxed_sampling.relaxed_log_prob`), equal to
    the usual log-probability at :math:`b`. Later stochastic sites are drawn for each of the
    three values; their score terms enter :math:`\\nabla f` through magic boxes, but an
    estimator with its own control term (ARM, REBAR, ...) downstream of a REBAR site would
    miss its share of :math:`\\nabla f(\\sigma_\\lambda(z))`: give such sites a
    score-function or pathwise estimator.

    **Training.** With ``learn=True``, :math:`\\eta` (``storch_pyro.rebar.<site>.eta``) and
    :math:`\\lambda` (``storch_pyro.rebar.<site>.temperature``) are ``pyro.param`` s trained
    by ``SVI`` on the variance of the gradient w.r.t. the site's logits (module docstring).

    :param float temperature: initial :math:`\\lambda > 0`.
    :param float eta: initial :math:`\\eta`.
    :param bool learn: train :math:`\\eta, \\lambda` (else they stay fixed).
    :param int n_samples: triples per site.

    Example (the papers' toy, :math:`f(b) = (b - 0.499)^2`)::

        def toy(phi):
            b = storch.sample("b", dist.Bernoulli(logits=phi), estimator=estimators.REBAR())
            storch.add_cost("f", (b - 0.499) ** 2)

        phi = pyro.param("phi", torch.zeros(()))
        svi = SVI(lambda: toy(pyro.param("phi")), None,
                  pyro.optim.Adam({"lr": 1e-2}), loss=StorchELBO())
        svi.step()   # phi gets the REBAR gradient; eta, temperature the variance gradient
    """

    _prefix = "storch_pyro.rebar"

    def __init__(self, temperature: float = 0.5, eta: float = 1.0, learn: bool = True,
                 n_samples: int = 1) -> None:
        super().__init__(n_samples, temperature, eta, learn, relaxed_evaluations=True)

    def __repr__(self) -> str:
        return (f"REBAR(temperature={self.temperature}, eta={self.eta}, learn={self.learn}, "
                f"n_samples={self.n_samples})")


class RELAX(_RelaxedDiscrete):
    """RELAX (Grathwohl, Choi, Wu, Roeder & Duvenaud 2018, "Backpropagation through the
    Void: Optimizing control variates for black-box gradient estimation"), for Bernoulli,
    Categorical and OneHotCategorical sites:

    .. math::

        \\hat g = \\big[f(b) - c(\\tilde z)\\big]\\nabla\\log p(b) + \\nabla c(z)
            - \\nabla c(\\tilde z),\\qquad c = c_\\phi\\ \\big(+\\ \\eta f(\\sigma_\\lambda(\\cdot))
            \\text{ with } \\texttt{rebar\\_term}\\big),

    unbiased for any :math:`c_\\phi`. :math:`f` may be a black box: without ``rebar_term``
    the downstream code sees only the hard sample :math:`b` (a Categorical site its usual
    index value), evaluated once per sample; the paper's discrete experiments use
    ``rebar_term=True`` (:math:`c = \\eta f(\\sigma_\\lambda(\\cdot)) + c_\\phi`, values and
    log-densities as for :class:`REBAR`).

    **The control variate** :math:`c_\\phi` is a ``torch.nn.Module`` called as
    ``control_variate(z)`` (or ``control_variate(z, *args, **kwargs)`` with
    ``with_context=True``, ``args``/``kwargs`` the detached arguments of the model or guide
    the site lives in, e.g. the data :math:`x` of an encoder). ``z`` is the relaxed sample
    in logit space (:math:`z` and :math:`\\tilde z` above): for a Bernoulli the site's value
    shape, for a categorical the value shape plus a trailing dim of ``K`` scores
    :math:`\\log\\pi_i + G_i`; its left dims are the site's samples (``n_samples > 1``) and
    plates. It must return one value per sample and batch element: shape ``z.shape`` without
    the event dims (and without the ``K`` dim). It is registered with ``pyro.module`` as
    ``name`` (default ``storch_pyro.relax.<site>``) and trained by ``SVI`` on the variance of
    the gradient (module docstring), like :math:`\\eta`, :math:`\\lambda`
    (``storch_pyro.relax.<site>.eta``, ``.temperature``) with ``rebar_term``.

    :param torch.nn.Module control_variate: :math:`c_\\phi`.
    :param bool rebar_term: add :math:`\\eta f(\\sigma_\\lambda(\\cdot))` to :math:`c_\\phi`.
    :param float temperature: initial :math:`\\lambda` (with ``rebar_term``).
    :param float eta: initial :math:`\\eta` (with ``rebar_term``).
    :param bool learn: train :math:`\\eta, \\lambda` (the network is trained whenever its
        parameters require grad).
    :param bool with_context: also pass the model/guide arguments to the network.
    :param str name: the ``pyro.module`` name.
    :param int n_samples: samples per site.

    Example (a factorized Bernoulli of 3 coordinates; :math:`c_\\phi` maps
    ``(..., 3) -> (...)``)::

        class ControlVariate(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.mlp = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(),
                                               torch.nn.Linear(16, 1))

            def forward(self, z):
                return self.mlp(z).squeeze(-1)

        b = storch.sample("b", dist.Bernoulli(logits=phi).to_event(1),
                          estimator=estimators.RELAX(ControlVariate()))
        storch.add_cost("f", black_box(b))   # f sees only the hard b
    """

    _prefix = "storch_pyro.relax"

    def __init__(self, control_variate: torch.nn.Module, rebar_term: bool = False,
                 temperature: float = 0.5, eta: float = 1.0, learn: bool = True,
                 with_context: bool = False, name: Optional[str] = None,
                 n_samples: int = 1) -> None:
        super().__init__(n_samples, temperature, eta, learn, relaxed_evaluations=rebar_term)
        self.network = _Network(control_variate, with_context, name, "RELAX")

    def _network_terms(self, site: Site, state: _Draw):
        expected = state.score.shape
        c_z = self.network(self._prefix, site, state.z, expected, state)
        c_tilde = self.network(self._prefix, site, state.z_tilde, expected, state)
        difference = c_z - c_tilde
        return c_tilde, difference

    def __repr__(self) -> str:
        return (f"RELAX({type(self.network.module).__name__}, "
                f"rebar_term={self.relaxed_evaluations}, n_samples={self.n_samples})")


class LAX(Estimator):
    """LAX (Grathwohl et al. 2018, "Backpropagation through the Void"), for
    reparameterizable continuous sites (``fn.has_rsample``) whose downstream cost :math:`f`
    is a black box:

    .. math::

        \\hat g = \\big[f(z) - c_\\phi(z)\\big]\\nabla\\log p(z) + \\nabla c_\\phi(z),
        \\qquad z = g(\\epsilon, \\theta),

    unbiased for any :math:`c_\\phi` differentiable in :math:`z`. The downstream code sees
    :math:`z` detached (no gradient through :math:`f`); the gradient flows through the score
    term and through :math:`c_\\phi(z)`. The control variate is a ``torch.nn.Module`` called
    as ``control_variate(z)`` (or ``control_variate(z, *args, **kwargs)`` with
    ``with_context=True``), ``z`` with the site's value shape (sample dims and plates on the
    left, event dims on the right), returning one value per sample and batch element (shape
    ``z.shape`` without the event dims). It is registered with ``pyro.module`` as ``name``
    (default ``storch_pyro.lax.<site>``) and trained by ``SVI`` on the variance of the
    gradient w.r.t. the site's distribution parameters (``loc``, ``scale``, ...).

    :param torch.nn.Module control_variate: :math:`c_\\phi`.
    :param bool with_context: also pass the model/guide arguments to the network.
    :param str name: the ``pyro.module`` name.
    :param int n_samples: samples per site.

    Example (``ControlVariate`` as for :class:`RELAX`, with 2 inputs)::

        x = storch.sample("x", dist.Normal(mu, 1.0).to_event(1),
                          estimator=estimators.LAX(ControlVariate()))
        storch.add_cost("reward", black_box(x))   # no gradient through black_box needed
    """

    def __init__(self, control_variate: torch.nn.Module, with_context: bool = False,
                 name: Optional[str] = None, n_samples: int = 1) -> None:
        super().__init__(n_samples)
        self.network = _Network(control_variate, with_context, name, "LAX")

    @classmethod
    def supports(cls, fn: Distribution) -> bool:
        return bool(fn.has_rsample) and discrete_base(fn) is None

    def _unsupported_reason(self, fn: Distribution) -> str:
        return " (it needs a reparameterizable continuous distribution: has_rsample)"

    def check(self, site: str, fn: Distribution) -> None:
        if not self.supports(fn) and discrete_base(fn) is not None:
            raise UnsupportedDistributionError(
                f"site '{site}': estimator LAX cannot handle the discrete {type(fn).__name__}: "
                f"LAX needs a reparameterizable continuous distribution. For discrete sites use "
                f"RELAX (the same control variate with a conditional relaxed sample) or REBAR."
            )
        super().check(site, fn)

    def draw(self, site: Site) -> Draw:
        z = site.fn.rsample(site.sample_shape(self.n_samples))
        value = z.detach()
        score = site.log_prob(value)
        state = _Draw(site.name, z, None, _distribution_parameters(site.fn), score=score)
        return Draw(value, size=self.n_samples, score=score, state=state)

    def surrogate(self, draw: Draw, downstream: Downstream) -> Terms:
        state = draw.state
        score = state.score
        c = self.network("storch_pyro.lax", downstream.site, state.z, score.shape, state)
        has_sample_dim = downstream.site.sample_dim is not None
        per_index = _mean_over_samples(-c * (score - score.detach()), self.n_samples,
                                       has_sample_dim)
        pathwise = c - c.detach()
        shared = _mean_over_samples(pathwise, self.n_samples, has_sample_dim)
        return Terms(per_index, shared, VarianceTerm(state.targets, state.params))

    def __repr__(self) -> str:
        return f"LAX({type(self.network.module).__name__}, n_samples={self.n_samples})"
