"""The :class:`Estimator` interface: what a gradient estimator draws at a site and what it adds
to the surrogate loss, as typed records (:class:`Site`, :class:`Draw`, :class:`Downstream`,
:class:`Terms`)."""

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple, Type

import torch
from pyro.distributions import Independent, MaskedDistribution
from torch.distributions import Distribution

from storch_pyro.errors import StorchError, UnsupportedDistributionError


@dataclass
class Site:
    """The question :meth:`Estimator.draw` answers: a stochastic site to draw.

    :ivar name: the site's name (to name per-site parameters in the param store).
    :ivar fn: its distribution.
    :ivar sample_dim: the (negative) dim of the site's sample dim, left of all plates: where
        its values go if it draws more than one (:meth:`sample_shape`). After the draw,
        ``None`` for a site that drew one value.
    :ivar plate_nesting: ``max_plate_nesting`` of the loss (for error messages).
    :ivar args: positional arguments of the model/guide the site lives in.
    :ivar kwargs: their keyword arguments.

    Example (in :meth:`Estimator.draw`)::

        value = site.fn.sample(site.sample_shape(4))   # 4 values on the site's sample dim
        score = site.log_prob(value)                    # log q, unmasked
    """

    name: str
    fn: Distribution
    sample_dim: Optional[int] = None
    plate_nesting: Optional[int] = None
    args: Tuple[Any, ...] = ()
    kwargs: Dict[str, Any] = field(default_factory=dict)
    _check: Optional[Callable[[], None]] = field(default=None, repr=False)
    _cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = field(default=None, repr=False)

    def sample_shape(self, size: int) -> Tuple[int, ...]:
        """The ``sample_shape`` that puts ``size`` values on the site's sample dim:
        ``(size, 1, ..., 1)`` reaching :attr:`sample_dim` once prepended to ``fn``'s batch
        shape, or ``()`` for ``size == 1``."""
        if size == 1:
            return ()
        if self._check is not None:
            self._check()
        if self.sample_dim is None:
            raise StorchError(
                f"site '{self.name}': its estimator draws {size} values, but no sample dim "
                f"is available here."
            )
        room = -self.sample_dim - 1
        batch_rank = len(self.fn.batch_shape)
        if batch_rank > room:  # only leading dims of size 1 can reach that far
            raise StorchError(
                f"site '{self.name}': its batch shape {tuple(self.fn.batch_shape)} has more "
                f"dims than max_plate_nesting={self.plate_nesting} plus earlier sample dims; "
                f"squeeze its leading dims of size 1."
            )
        return (size,) + (1,) * (room - batch_rank)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """``fn``'s log-density at ``value`` without the masks of ``fn.mask(...)`` (a mask
        removes terms from the costs, never the expectation over the site). The loss reuses
        the tensor for the site's cost: an estimator whose :attr:`Draw.score` *is* this
        tensor has a plain score-function term (see :class:`Draw`)."""
        if self._cache is not None and self._cache[0] is value:
            return self._cache[1]
        fn = without_masks(self.fn)
        try:
            result = fn.log_prob(value)
        except ValueError as error:  # as poutine.trace reports it, naming the site
            raise log_prob_error(self.name, error) from error
        self._cache = (value, result)
        return result


@dataclass
class Draw:
    """The answer of :meth:`Estimator.draw`. Capabilities follow from the fields that are set.

    :ivar value: what the program receives: ``size`` values on the site's sample dim
        (:meth:`Site.sample_shape`), or one value without it.
    :ivar size: the number of values along the sample dim (``1``: no sample dim).
    :ivar weights: the values' weights along the sample dim (``-site.sample_dim`` dims), or
        ``None`` for ``1 / size`` each. Weights that require grad are differentiated (as for
        exact enumeration, where they are :math:`q(z)`).
    :ivar score: the score term :math:`l_z` (on the value's batch shape), whose magic box
        multiplies every downstream cost; ``None`` for none (pathwise, relaxed, antithetic
        estimators). Where it is the very tensor :meth:`Site.log_prob` returned for
        ``value``, the loss may cancel the direct gradient of the site's own
        :math:`\\log q(z)` cost under ``credit="data_flow"`` (mean zero, adds variance).
    :ivar density_value: where the site's log-densities (:math:`\\log q` in the guide,
        :math:`\\log p` in the model) are evaluated, if not at ``value`` (the discrete value
        a relaxed one stands for).
    :ivar log_density: ``(fn, value) -> log-density`` where the site's log-densities are
        not ``fn.log_prob`` (e.g. continuous in a relaxed value); the model's distribution
        at the site gets it too. It handles masks itself.
    :ivar builtin_baseline: the score term comes with its own baseline (in the estimator's
        terms): a baseline from :mod:`storch_pyro.baselines` given for the site is an error.
    :ivar perturbs_plates: the extra evaluations perturb every index of the site's
        vectorized plates at once (measure-valued derivatives): a cost depending on the
        site's value must then lie in all of its plates, or the loss raises.
    :ivar state: anything :meth:`Estimator.surrogate` needs later (e.g. the noise).

    Example (score function; exact enumeration)::

        Draw(value, size=k, score=site.log_prob(value))
        Draw(support, size=K, weights=site.log_prob(support).exp())
    """

    value: torch.Tensor
    size: int = 1
    weights: Optional[torch.Tensor] = None
    score: Optional[torch.Tensor] = None
    density_value: Optional[torch.Tensor] = None
    log_density: Optional[Callable[[Distribution, torch.Tensor], torch.Tensor]] = None
    builtin_baseline: bool = False
    perturbs_plates: bool = False
    state: Any = None


class Downstream:
    """The question :meth:`Estimator.surrogate` answers: the site's downstream costs
    :math:`D_z` (the costs its score term multiplies, as credit assignment gives them),
    computed when first read.

    :ivar site: the :class:`Site` (name, distribution, sample dim, program arguments).

    Example (in :meth:`Estimator.surrogate`: a leave-one-out baseline)::

        dim, cost = downstream.site.sample_dim, downstream.cost
        baseline = (cost.sum(dim, keepdim=True) - cost) / (k - 1)
    """

    def __init__(self, site: Site, cost: Callable[[], torch.Tensor],
                 live: Callable[[], Tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.site = site
        self._cost_fn = cost
        self._live_fn = live
        self._cost: Optional[torch.Tensor] = None
        self._live: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def cost(self) -> torch.Tensor:
        """:math:`D_z` detached, on the site's batch shape (its sample dim at
        ``site.sample_dim``)."""
        if self._cost is None:
            self._cost = self._cost_fn()
        return self._cost

    @property
    def live_cost(self) -> torch.Tensor:
        """:math:`D_z` NOT detached (a function of the values drawn at the site, their
        parameters, and, through magic boxes, the score terms of later sites), shaped as
        :attr:`cost`."""
        return self._live_costs()[0]

    @property
    def live_total(self) -> torch.Tensor:
        """:attr:`live_cost` summed over the site's plates (each cost counted once: dims of
        size 1 there), for pathwise terms that must not count a cost shared by the indices
        of a plate once per index; not summed over plates along which upstream sample
        weights vary (the loss weights the terms per index there)."""
        return self._live_costs()[1]

    def _live_costs(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._live is None:
            self._live = self._live_fn()
        return self._live


@dataclass
class VarianceTerm:
    r"""Control-variate parameters trained by the variance of the gradient estimate:
    each of ``params`` (leaf tensors) gets the gradient of :math:`\sum \hat g^2`, where
    :math:`\hat g` is the gradient estimate w.r.t. ``targets`` (the site's distribution
    parameters), instead of its own
    (:func:`~storch_pyro.surrogate.with_variance_gradients`).

    Example (REBAR: its temperature and scale trained for the logits' gradient)::

        VarianceTerm(targets=[logits], params=[eta, temperature])
    """

    targets: List[torch.Tensor]
    params: List[torch.Tensor]


@dataclass
class Terms:
    """The answer of :meth:`Estimator.surrogate`: zero-valued terms whose gradient is the
    estimator's gradient (besides the score term's).

    :ivar control: reduced over the site's own samples (with their weights) and event dims,
        not over plates or upstream sample dims (the loss weights and sums those); the loss
        multiplies it by the magic box of the upstream score terms.
    :ivar shared: added as it is (weighted by upstream sample weights): first-order terms
        that span the indices of the site's plates.
    :ivar variance: parameters to train by the variance of the gradient estimate.

    Example (an antithetic difference; a learned control variate)::

        Terms(control=gradient_term)
        Terms(control=score_part, shared=pathwise_part, variance=VarianceTerm(targets, params))
    """

    control: Optional[torch.Tensor] = None
    shared: Optional[torch.Tensor] = None
    variance: Optional[VarianceTerm] = None


class Estimator:
    """How one stochastic site draws its value(s) and what it adds to the surrogate loss.

    In the general form of Storchastic (van Krieken et al. 2021, arXiv:2104.00428) an
    estimator has a *proposal* (how samples are drawn), a *weighting* of the samples, a
    *multiplicative* score term :math:`l_z` and an *additive* control variate :math:`a_z`.
    :class:`~storch_pyro.StorchELBO` assembles, for costs :math:`c` and sites :math:`z`,

    .. math::

        \\sum_c w_c\\, \\boxdot\\Big(\\sum_{z \\preceq c} l_z\\Big)\\, c
        + \\sum_z (1 - \\boxdot(l_z))\\, a_z + \\sum_z t_z,
        \\qquad \\boxdot(x) = \\exp(x - \\bot(x)),

    with :math:`t_z` the zero-valued terms of :meth:`surrogate`. An estimator answers two
    questions, as Pyro's ``Reparam.apply(msg)`` does, with typed records:
    :meth:`draw` (a :class:`Site` -> a :class:`Draw`: values, sample weights, score term,
    where densities are evaluated) and, optionally, :meth:`surrogate` (the draw and its
    :class:`Downstream` costs -> :class:`Terms`). What it can do follows from the fields it
    fills: no score, no weights, no terms is plain pathwise sampling. :meth:`supports` says
    which distributions it handles (for error messages listing the estimators that would).
    One instance serves one site: a shared instance is copied per site
    (:meth:`for_site`), so per-site state never mixes.

    :param int n_samples: number of independent samples drawn at the site. With ``k > 1``
        the value gets a sample dimension of size ``k`` left of all plates, and the loss
        averages over it.

    Example: a complete new estimator, REINFORCE with the leave-one-out baseline
    (Kool et al. 2019) as a control term, :math:`\\hat g = \\frac1k \\sum_i (f_i -
    \\frac{1}{k-1}\\sum_{j \\ne i} f_j) \\nabla \\log q(z_i)`::

        from storch_pyro.estimators import Draw, Estimator, Terms

        class LooReinforce(Estimator):
            def __init__(self, n_samples=4):
                super().__init__(n_samples)

            @classmethod
            def supports(cls, fn):
                return True

            def draw(self, site):
                value = site.fn.sample(site.sample_shape(self.n_samples))
                return Draw(value, size=self.n_samples, score=site.log_prob(value),
                            builtin_baseline=True)

            def surrogate(self, draw, downstream):
                dim, k = downstream.site.sample_dim, self.n_samples
                cost = downstream.cost
                baseline = (cost.sum(dim, keepdim=True) - cost) / (k - 1)
                box = draw.score - draw.score.detach()
                return Terms(control=-(box * baseline).sum(dim, keepdim=True) / k)

        def story(logits):
            with pyro.plate("coordinates", 3):
                z = storch.sample("z", dist.Bernoulli(logits=logits), estimator=LooReinforce())
                storch.add_cost("f", (z - 0.3) ** 2)

        StorchELBO().differentiable_loss(story, None, torch.zeros(3, requires_grad=True))
    """

    #: Every public estimator class, so errors can list the ones that would work.
    registry: ClassVar[List[Type["Estimator"]]] = []

    def __init__(self, n_samples: int = 1) -> None:
        if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
            raise ValueError(
                f"{type(self).__name__}: n_samples must be a positive int, got {n_samples!r}"
            )
        self.n_samples = n_samples

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):
            Estimator.registry.append(cls)

    @property
    def baseline(self):
        """The baseline this estimator carries, if any (see :mod:`storch_pyro.baselines`)."""
        return None

    @classmethod
    def supports(cls, fn: Distribution) -> bool:
        """Whether this estimator can handle the distribution ``fn``."""
        raise NotImplementedError

    def draw(self, site: Site) -> Draw:
        """Draws the site's value(s): see :class:`Site` and :class:`Draw`."""
        raise NotImplementedError

    def surrogate(self, draw: Draw, downstream: Downstream) -> Optional[Terms]:
        """The zero-valued terms this estimator adds to the surrogate, given its
        :class:`Draw` and the site's :class:`Downstream` costs; ``None`` (the default) for
        none. Called once per site and step, after the model has run."""
        return None

    def example_value(self, fn: Distribution) -> torch.Tensor:
        """One value shaped and typed like those the site receives, without a sample dim
        and without side effects on the estimator: what :class:`~storch_pyro.StorchELBO`
        hands the program when it probes for ``max_plate_nesting``. ``fn.sample()`` by
        default."""
        return fn.sample()

    def for_site(self, site: str) -> "Estimator":
        """The instance that serves ``site`` (called once per site and instance, the
        result cached as Pyro's reparameterization strategies cache theirs): a shallow copy,
        so attributes an estimator sets for its site stay per site while modules and
        parameters are shared."""
        return copy.copy(self)

    def check(self, site: str, fn: Distribution) -> None:
        """Raises :class:`UnsupportedDistributionError` unless :meth:`supports` ``fn``."""
        if not self.supports(fn):
            raise UnsupportedDistributionError(
                f"site '{site}': estimator {type(self).__name__} cannot handle "
                f"{_describe(fn)}{self._unsupported_reason(fn)}. Estimators that would work "
                f"there: {', '.join(working_estimators(fn)) or 'none'}. Choose one with "
                f"storch_pyro.sample(..., estimator=...) or storch_pyro.handlers.estimator."
            )

    def _unsupported_reason(self, fn: Distribution) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_samples={self.n_samples})"


def adds_terms(estimator: Estimator) -> bool:
    """Whether ``estimator`` implements :meth:`Estimator.surrogate`."""
    return type(estimator).surrogate is not Estimator.surrogate


def working_estimators(fn: Distribution) -> List[str]:
    """Names of the registered estimators whose :meth:`Estimator.supports` accepts ``fn``.

    Example::

        working_estimators(dist.Bernoulli(0.3))   # ['ARM', 'DisARM', 'Enumerate', ...]
    """
    names = []
    for cls in Estimator.registry:
        try:
            if cls.supports(fn):
                names.append(cls.__name__)
        except NotImplementedError:
            pass
    return names


def innermost_distribution(fn: Distribution) -> Distribution:
    """The distribution at the end of ``fn``'s ``base_dist`` chain (through
    ``Independent``, ``.expand``, masks): e.g. the ``Bernoulli`` of
    ``Bernoulli(logits).expand([3]).to_event(1).mask(m)``."""
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def _describe(fn: Distribution) -> str:
    base = innermost_distribution(fn)
    name = type(base).__name__
    return name if base is fn else f"{type(fn).__name__}({name})"


def without_masks(fn: Distribution) -> Distribution:
    """``fn`` without the :class:`~pyro.distributions.MaskedDistribution` wrappers of
    ``fn.mask(...)`` (through ``Independent``); ``fn`` itself where it has none."""
    if isinstance(fn, MaskedDistribution):
        return without_masks(fn.base_dist)
    if isinstance(fn, Independent):
        base = without_masks(fn.base_dist)
        return fn if base is fn.base_dist else Independent(base, fn.reinterpreted_batch_ndims)
    return fn


def log_prob_error(site: str, error: ValueError) -> ValueError:
    """The error of a log-density that failed at ``site`` (as ``poutine.trace`` names it)."""
    return ValueError(
        f"Error while computing log_prob at site '{site}':\n{error}\nCheck that the value "
        f"(observed data, or the guide's sample) is in the support of the site's "
        f"distribution, with a shape that broadcasts to its batch shape."
    )
