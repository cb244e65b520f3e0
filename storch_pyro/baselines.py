"""Baselines (control variates) for score-function terms.

A baseline :math:`b` for a site :math:`z` turns its score-function term into
:math:`(D_z - b)\\nabla \\log q(z)`, where :math:`D_z` is the site's *downstream cost* (the
sum of the costs its score term multiplies). It stays unbiased as long as :math:`b` does not
depend on the sample :math:`z` itself. In the surrogate loss it enters in the form of Mao et
al. (2019, "A Baseline for Any Order Gradient Estimation in Stochastic Computation Graphs"),

.. math:: (1 - \\boxdot(l_z))\\,\\boxdot\\Big(\\sum_{w \\prec z} l_w\\Big)\\, \\bot(b),

which has value zero, reduces the variance of first-order gradients and of higher orders.
A baseline whose value requires grad (:class:`Learned`, Pyro's ``nn_baseline`` and
``baseline_value``) is trained by squared error to the detached downstream cost, through a
term of value zero, so the loss value is unchanged.

**Two sign conventions.** The baselines of this module (:class:`MovingAverage`,
:class:`LeaveOneOut`, :class:`Learned`, your own :class:`Baseline`) are baselines of the
downstream *cost* :math:`D_z` (something to minimize: :math:`\\log q - \\log p`, plus the
costs of ``add_cost``), so a :class:`Learned` network learns :math:`\\mathbb{E}[D_z]`. Pyro's
annotations ``infer={"baseline": {...}}`` (``nn_baseline``, ``baseline_value``,
``use_decaying_avg_baseline``) keep ``TraceGraph_ELBO``'s meaning: baselines of the
downstream *ELBO* term :math:`\\log p - \\log q = -D_z` (in a model without guide: minus the
costs, e.g. the reward-to-go), fitted and stored as ``TraceGraph_ELBO`` does, so a network
or average trained under one loss continues under the other; StorchELBO uses
:math:`b = -b^{\\text{pyro}}` internally.
"""

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import pyro
import torch
from pyro.ops.provenance import detach_provenance

from storch_pyro.errors import StorchError
from storch_pyro.param_state import param_store_state
from storch_pyro.state import record


@dataclass
class BaselineContext:
    """What a baseline may look at: never the site's own sample.

    :ivar site: the site's name.
    :ivar sample_dim: the (negative) dim of the site's own samples, or ``None`` if it has one.
    :ivar n_samples: samples drawn at the site.
    :ivar args: positional arguments of the model/guide the site lives in.
    :ivar kwargs: keyword arguments of the model/guide.

    Example (in :meth:`Baseline.__call__`: one value per data point of the model's argument)::

        def __call__(self, ctx, downstream_cost):
            data = ctx.args[0]
            return self.net(data).squeeze(-1)
    """

    site: str
    sample_dim: Optional[int]
    n_samples: int
    args: Tuple[Any, ...] = ()
    kwargs: Dict[str, Any] = field(default_factory=dict)


class Baseline:
    """Base class: a control variate subtracted from a site's downstream cost.

    Example (a constant baseline)::

        class Constant(Baseline):
            def __init__(self, value):
                self.value = value

            def __call__(self, ctx, downstream_cost):
                return torch.full_like(downstream_cost, self.value)

        with handlers.baseline(config={"z": Constant(-1.0)}):
            svi.step(data)
    """

    def check(self, site: str, n_samples: int) -> None:
        """Raises a :class:`~storch_pyro.errors.StorchError` if unusable at this site."""

    def __call__(self, ctx: BaselineContext, downstream_cost: torch.Tensor) -> torch.Tensor:
        """Returns :math:`b`, broadcastable to ``downstream_cost`` (the detached
        :math:`D_z`, shaped like the site's batch shape): a baseline of the *cost*
        (:math:`\\log q - \\log p` plus added costs), of the opposite sign to Pyro's
        ``nn_baseline`` / ``baseline_value``, which are baselines of
        :math:`\\log p - \\log q`. Stateful baselines update their state here, *after*
        computing :math:`b`, so :math:`b` never depends on this sample."""
        raise NotImplementedError


class MovingAverage(Baseline):
    """Exponential moving average of past downstream costs (e.g. Mnih & Gregor 2014, §3.3).

    .. math:: b_t = \\beta\\, b_{t-1} + (1-\\beta)\\, \\overline{D}_{t-1},

    where :math:`\\overline{D}` is the mean downstream cost of the site over its batch and
    sample dims. It is updated *after* use, so :math:`b_t` only depends on earlier steps and
    the estimator stays unbiased. The first step uses :math:`b = 0` and sets the average to
    the first cost. The state lives in Pyro's param store under
    ``"storch_pyro.baseline.<site>.moving_average"``, so it is saved and loaded with
    ``pyro.get_param_store().save/load``. Only gradient computations
    (``loss_and_grads``, ``differentiable_loss``) update it, once per step after the surrogate
    is built (:mod:`storch_pyro.state`): the particles of a step all use the average of the
    steps before, and their mean cost updates it.

    :param float decay: :math:`\\beta \\in [0, 1)`.

    Example::

        estimators.ScoreFunction(baseline=baselines.MovingAverage(0.9))
    """

    def __init__(self, decay: float = 0.9) -> None:
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"MovingAverage: decay must be in [0, 1), got {decay!r}")
        self.decay = float(decay)

    @staticmethod
    def param_name(site: str) -> str:
        """The param-store name of the average kept for ``site``."""
        return f"storch_pyro.baseline.{site}.moving_average"

    def __call__(self, ctx: BaselineContext, downstream_cost: torch.Tensor) -> torch.Tensor:
        name = self.param_name(ctx.site)
        state = param_store_state(name)
        mean_cost = downstream_cost.detach().mean()
        record(name, mean_cost, self.update)  # committed after the surrogate is built
        if state is None:
            return torch.zeros_like(mean_cost)
        return state.detach().clone()

    def update(self, state: Optional[torch.Tensor], mean_cost: torch.Tensor) -> torch.Tensor:
        """:math:`b_{t+1} = \\beta b_t + (1 - \\beta) \\overline{D}_t` (the first
        cost where there is no average yet)."""
        if state is None:
            return mean_cost.clone()
        return self.decay * state + (1.0 - self.decay) * mean_cost

    def __repr__(self) -> str:
        return f"MovingAverage(decay={self.decay})"


class LeaveOneOut(Baseline):
    """Leave-one-out baseline of REINFORCE with k samples (RLOO; Kool, van Hoof & Welling
    2019, "Buy 4 REINFORCE samples, get a baseline for free!").

    .. math:: b_i = \\frac{1}{k-1} \\sum_{j \\ne i} D_j,

    so the estimator is :math:`\\frac{1}{k-1}\\sum_i (D_i - \\bar D)\\nabla\\log q(z_i)`.
    Needs ``n_samples >= 2`` at the site.

    Example::

        estimators.ScoreFunction(n_samples=8, baseline=baselines.LeaveOneOut())
    """

    def check(self, site: str, n_samples: int) -> None:
        if n_samples < 2:
            raise StorchError(
                f"site '{site}': LeaveOneOut needs at least 2 samples at the site, got "
                f"n_samples={n_samples}. Use ScoreFunction(n_samples=k, "
                f"baseline=LeaveOneOut()) with k >= 2, or a MovingAverage baseline."
            )

    def __call__(self, ctx: BaselineContext, downstream_cost: torch.Tensor) -> torch.Tensor:
        self.check(ctx.site, ctx.n_samples)
        cost = downstream_cost.detach()
        total = cost.sum(ctx.sample_dim, keepdim=True)
        return (total - cost) / (ctx.n_samples - 1)

    def __repr__(self) -> str:
        return "LeaveOneOut()"


class VIMCO(Baseline):
    """VIMCO's per-sample leave-one-out baseline (Mnih & Rezende 2016, "Variational
    inference for Monte Carlo objectives"), for the score-function sites of
    :class:`~storch_pyro.IWELBO`, where it is the default.

    With the K particles' log weights :math:`\\log w_k` and the bound
    :math:`\\hat L = \\log \\frac1K \\sum_j w_j`, the learning signal of particle :math:`k`
    is :math:`\\hat L - \\hat L_{-k}`, where :math:`w_k` is replaced by the geometric mean of
    the others:

    .. math:: \\hat L_{-k} = \\log \\frac1K \\Big(\\sum_{j \\ne k} w_j + \\hat w_{-k}\\Big),
        \\qquad \\hat w_{-k} = \\exp\\Big(\\frac{1}{K-1}\\sum_{j\\ne k} \\log w_j\\Big).

    :math:`\\hat L_{-k}` does not depend on :math:`z_k`, so the estimator stays unbiased
    for the gradient of the K-sample bound. It is computed in log space in O(K) memory
    (:func:`storch_pyro.iwelbo.vimco_log_baselines`). It is a baseline of the whole
    multi-sample bound, not of one site's downstream cost, so it only works under
    :class:`~storch_pyro.IWELBO`: :class:`~storch_pyro.StorchELBO` rejects it.

    Example::

        svi = SVI(model, guide, optim, loss=storch.IWELBO(num_particles=5))
        with handlers.baseline(config={"z": baselines.VIMCO()}):  # the default anyway
            svi.step(data)
    """

    def check(self, site: str, n_samples: int) -> None:
        if not _UNDER_IWELBO.get():
            raise StorchError(
                f"site '{site}': baselines.VIMCO() is a baseline of the K-particle "
                f"importance-weighted bound and needs storch_pyro.IWELBO(num_particles=K) as "
                f"the loss. Use IWELBO, or under StorchELBO a per-site baseline such as "
                f"ScoreFunction(n_samples=k, baseline=baselines.LeaveOneOut())."
            )

    def __call__(self, ctx: BaselineContext, downstream_cost: torch.Tensor) -> torch.Tensor:
        self.check(ctx.site, ctx.n_samples)
        raise StorchError(  # IWELBO computes the baseline itself and never calls this
            f"site '{ctx.site}': baselines.VIMCO() is applied by IWELBO to the log weights."
        )

    def __repr__(self) -> str:
        return "VIMCO()"


#: True while :class:`~storch_pyro.IWELBO` runs a model and guide (VIMCO is usable there).
_UNDER_IWELBO: ContextVar[bool] = ContextVar("storch_pyro_under_iwelbo", default=False)


class Learned(Baseline):
    """A learned, input-dependent baseline (NVIL; Mnih & Gregor 2014).

    :math:`b_\\psi(x)` is ``module(*args, **kwargs)`` called with the (detached) arguments of
    the model or guide the site lives in — the data :math:`x` in a VAE — or with
    ``input_fn(*args, **kwargs)`` when given. Its output must broadcast to the site's batch
    shape (plates, and sample dims if any). :math:`\\psi` is registered with ``pyro.module``
    under ``name`` (default ``"storch_pyro.baseline.<first site>"``), so ``SVI``'s optimizer
    trains it, by the gradient of :math:`\\sum (b_\\psi(x) - \\bot(D_z))^2`; after
    ``pyro.get_param_store().load`` the module computes with the loaded values (checkpoint and
    resume). It learns :math:`\\mathbb{E}[D_z \\mid x]`, the expected downstream *cost*; Pyro's
    ``nn_baseline`` annotation learns the opposite, :math:`\\mathbb{E}[\\log p - \\log q]`.

    :param torch.nn.Module module: the network :math:`b_\\psi`.
    :param callable input_fn: optional map from the model/guide arguments to the input.
    :param str name: the ``pyro.module`` name.

    Example::

        net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(),
                                  torch.nn.Linear(32, 1), torch.nn.Flatten(0))
        estimators.ScoreFunction(baseline=baselines.Learned(net))   # guide(x): b = net(x)
    """

    def __init__(
        self,
        module: torch.nn.Module,
        input_fn: Optional[Callable[..., Any]] = None,
        name: Optional[str] = None,
    ) -> None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(
                f"Learned: module must be a torch.nn.Module, got {type(module).__name__}; wrap "
                f"a function in a torch.nn.Module subclass"
            )
        self.module = module
        self.input_fn = input_fn
        self.name = name

    def __call__(self, ctx: BaselineContext, downstream_cost: torch.Tensor) -> torch.Tensor:
        if self.name is None:
            self.name = f"storch_pyro.baseline.{ctx.site}"
        # update_module_params: after pyro.get_param_store().load, the module must compute
        # with the loaded (and optimized) tensors, not its own initial ones.
        module = pyro.module(self.name, self.module, update_module_params=True)
        args = tuple(_detach(a) for a in ctx.args)
        kwargs = {k: _detach(v) for k, v in ctx.kwargs.items()}
        if self.input_fn is not None:
            return module(_detach(self.input_fn(*args, **kwargs)))
        return module(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Learned({type(self.module).__name__}, name={self.name!r})"


class _PyroAnnotation(Baseline):
    r"""Pyro's ``infer={"baseline": {...}}`` options, read, fitted and stored exactly as
    ``TraceGraph_ELBO`` does.

    **Sign.** Pyro's annotated baselines are baselines of the site's downstream *ELBO* term
    :math:`\sum (\log p - \log q) = -D_z` (for a model without guide: minus the
    downstream ``add_cost`` costs, e.g. the reward-to-go), while a storch_pyro
    :class:`Baseline` is one of the downstream cost :math:`D_z`. With Pyro's baseline

    .. math:: b^{\text{pyro}} = \bar a_{t-1} + \texttt{nn\_baseline}(
        \bot(\texttt{nn\_baseline\_input}))
        \quad (\text{or} + \texttt{baseline\_value}),

    this returns :math:`b = -b^{\text{pyro}}`, so that the score term
    :math:`(D_z - b)\nabla\log q = -(-D_z - b^{\text{pyro}})\nabla\log q` is
    TraceGraph_ELBO's, and the network (or ``baseline_value``) is fitted to Pyro's target:
    the squared error :math:`\sum (b - D_z)^2 = \sum (-D_z - b^{\text{pyro}})^2` summed
    over the site's batch elements, TraceGraph_ELBO's ``baseline_loss``. The decaying
    average :math:`\bar a_t = \beta \bar a_{t-1} + (1 - \beta)(-D_z)` (per batch element,
    starting at 0, updated after use) is kept in Pyro's sign under TraceGraph_ELBO's param
    name ``"__baseline_avg_downstream_cost_<site>"``. So a network, an average or a hand-set
    value trained or chosen under one loss means the same under the other."""

    _KEYS = {
        "use_decaying_avg_baseline",
        "baseline_beta",
        "nn_baseline",
        "nn_baseline_input",
        "baseline_value",
    }

    def __init__(self, site: str, options: Dict[str, Any]) -> None:
        unknown = set(options) - self._KEYS
        if unknown:
            raise StorchError(
                f"site '{site}': unrecognized baseline options {sorted(unknown)} in "
                f"infer={{'baseline': ...}}; use only {sorted(self._KEYS)} (as TraceGraph_ELBO)"
            )
        if options.get("nn_baseline") is not None and options.get("baseline_value") is not None:
            raise StorchError(
                f"site '{site}': cannot use baseline_value and nn_baseline simultaneously; "
                f"give one of them"
            )
        self.use_average = bool(options.get("use_decaying_avg_baseline", False))
        self.beta = float(options.get("baseline_beta", 0.90))
        self.nn_baseline = options.get("nn_baseline")
        self.nn_input = options.get("nn_baseline_input")
        self.value = options.get("baseline_value")

    @staticmethod
    def param_name(site: str) -> str:
        """TraceGraph_ELBO's param-store name of the decaying average kept for ``site``."""
        return "__baseline_avg_downstream_cost_" + site

    def update(self, state: Optional[torch.Tensor], elbo_term: torch.Tensor) -> torch.Tensor:
        """TraceGraph_ELBO's :math:`\\bar a_t = \\beta \\bar a_{t-1} + (1 - \\beta)(-D_z)`."""
        if state is None or state.shape != elbo_term.shape:
            state = torch.zeros_like(elbo_term)
        return self.beta * state + (1.0 - self.beta) * elbo_term

    def __call__(self, ctx: BaselineContext, downstream_cost: torch.Tensor) -> torch.Tensor:
        elbo_term = -downstream_cost.detach()  # Pyro's downstream cost: log p - log q
        baseline = torch.zeros((), dtype=elbo_term.dtype, device=elbo_term.device)
        if self.use_average:
            name = self.param_name(ctx.site)
            state = param_store_state(name)
            if state is None or state.shape != elbo_term.shape:
                pyro.get_param_store()[name] = torch.zeros_like(elbo_term)
                state = param_store_state(name)
            elif type(state) is not torch.Tensor:
                # TraceGraph_ELBO stores its average with its provenance: keep the value only
                pyro.get_param_store()[name] = detach_provenance(state).detach().clone()
                state = param_store_state(name)
            baseline = baseline + state.detach().clone()
            record(name, elbo_term, self.update)  # committed after the surrogate is built
        if self.nn_baseline is not None:
            baseline = baseline + self.nn_baseline(_detach(self.nn_input))
        elif self.value is not None:
            baseline = baseline + self.value
        return -baseline


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value
