"""The :class:`Estimator` base class shared by every gradient estimator."""

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Type

import torch
from torch.distributions import Distribution

from storch_pyro.errors import UnsupportedDistributionError


@dataclass
class ControlContext:
    """What :meth:`Estimator.control_terms` may look at, besides the detached downstream cost.

    :ivar site: the site's name (to name its parameters in the param store).
    :ivar sample_dim: the (negative) dim of the site's own samples, or ``None``.
    :ivar args: positional arguments of the model/guide the site lives in.
    :ivar kwargs: keyword arguments of the model/guide.
    :ivar live_cost: with :attr:`Estimator.needs_live_costs`: the downstream cost
        :math:`D_z` NOT detached (a function of the values drawn at the site, their
        parameters, and, through magic boxes, the score terms of later sites), on the site's
        batch shape like the detached one.
    :ivar live_total: the same costs summed over the site's plates (each cost counted once:
        dims of size 1 there), for pathwise terms that must not count a cost shared by the
        indices of a plate once per index; not summed over plates along which the sample
        weights of upstream sites vary (the loss weights the terms per index there).
    """

    site: str
    sample_dim: Optional[int]
    args: Tuple[Any, ...] = ()
    kwargs: Dict[str, Any] = field(default_factory=dict)
    live_cost: Optional[torch.Tensor] = None
    live_total: Optional[torch.Tensor] = None


class Estimator:
    """How one stochastic site draws its value(s) and what it adds to the surrogate loss.

    In the general form of Storchastic (van Krieken et al. 2021, arXiv:2104.00428) an
    estimator has a *proposal* (how samples are drawn), a *weighting* of the samples, a
    *multiplicative* score term :math:`l_z` and an *additive* control variate :math:`a_z`.
    :class:`~storch_pyro.StorchELBO` assembles, for costs :math:`c` and sites :math:`z`,

    .. math::

        \\sum_c w_c\\, \\boxdot\\Big(\\sum_{z \\preceq c} l_z\\Big)\\, c
        + \\sum_z (1 - \\boxdot(l_z))\\, a_z,
        \\qquad \\boxdot(x) = \\exp(x - \\bot(x)).

    Subclasses set :attr:`has_score` (whether :math:`l_z = \\log q(z)` multiplies the
    downstream costs), implement :meth:`draw` and :meth:`supports`, and may add a
    zero-valued term built from the site's downstream costs (:meth:`control_term`, with
    :attr:`has_control_term`), as antithetic estimators do.

    :param int n_samples: number of independent samples drawn at the site. With ``k > 1``
        the value gets a sample dimension of size ``k`` left of all plates, and the loss
        averages over it.

    Example (a new estimator: the score function without its score term, i.e. plain
    sampling, whose gradient ignores the site)::

        class Frozen(Estimator):
            has_score = False

            @classmethod
            def supports(cls, fn):
                return True

            def draw(self, fn, sample_shape):
                return fn.sample(sample_shape), None

        with handlers.estimator(config={"z": Frozen(n_samples=4)}):
            loss = StorchELBO().differentiable_loss(model, None)
    """

    #: Whether :math:`\\log q(z)` of the drawn value enters the surrogate as a score term.
    has_score: ClassVar[bool] = True
    #: Whether :meth:`control_term` adds to the surrogate.
    has_control_term: ClassVar[bool] = False
    #: Whether the surrogate calls :meth:`control_terms` (with a :class:`ControlContext`)
    #: rather than :meth:`control_term`.
    uses_control_context: ClassVar[bool] = False
    #: Whether :class:`ControlContext` must carry the undetached downstream costs.
    needs_live_costs: ClassVar[bool] = False
    #: Whether ``StorchELBO.loss_and_grads`` trains parameters of this estimator by the
    #: variance of the gradient estimate (:meth:`variance_parameters`).
    trains_control_variate: ClassVar[bool] = False
    #: Whether a baseline from :mod:`storch_pyro.baselines` may be added to the score term
    #: (not where the estimator has a built-in one).
    accepts_baseline: ClassVar[bool] = True
    #: Whether the estimator's extra evaluations perturb every index of the site's
    #: vectorized plates at once (measure-valued derivatives): then a downstream cost that
    #: depends on the site's value must lie in all of its plates, and the loss raises
    #: otherwise.
    needs_costs_in_plates: ClassVar[bool] = False
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

    def sample_size(self, fn: Distribution) -> int:
        """Size of the site's sample dim: the number of values drawn (``n_samples``,
        ``2 * n_samples`` for antithetic pairs, the support size for enumeration)."""
        return self.n_samples

    def sample_weights(
        self, fn: Distribution, value: torch.Tensor, log_prob: torch.Tensor, state: Any
    ) -> Optional[torch.Tensor]:
        """Weights of the drawn values along the site's sample dim (shaped like
        ``log_prob``), or ``None`` for equal weights ``1 / sample_size``. Weights that
        require grad are differentiated (as in exact enumeration)."""
        return None

    def density_value(self, fn: Distribution, value: torch.Tensor, state: Any) -> torch.Tensor:
        """The value at which the site's log-densities (:math:`\\log q` in the guide,
        :math:`\\log p` in the model) are evaluated: ``value`` itself, or the discrete value
        a relaxed sample stands for."""
        return value

    def score_term(
        self, fn: Distribution, value: torch.Tensor, log_prob: torch.Tensor, state: Any
    ) -> torch.Tensor:
        """The score term :math:`l_z` (used when :attr:`has_score`): ``log_prob`` (masked)
        by default."""
        return log_prob

    def log_density(
        self, fn: Distribution, value: torch.Tensor, state: Any
    ) -> Optional[torch.Tensor]:
        """The site's log-density at ``value`` for ``fn`` (the guide's or the model's
        distribution at this site), where it is not ``fn.log_prob(density_value(...))``
        (e.g. a log-density continuous in a relaxed value); ``None`` for that default."""
        return None

    def draw_site(
        self, site: str, fn: Distribution, sample_shape: Tuple[int, ...]
    ) -> Tuple[torch.Tensor, Any]:
        """:meth:`draw` at the named site (estimators with per-site parameters use the
        name)."""
        return self.draw(fn, sample_shape)

    def draw(self, fn: Distribution, sample_shape: Tuple[int, ...]) -> Tuple[torch.Tensor, Any]:
        """Draws the site's value, with ``sample_shape`` (``(sample_size, 1, ...)`` or
        ``()``) prepended to ``fn``'s shape. Returns the value and any state
        :meth:`control_term` needs later (e.g. the uniform noise)."""
        raise NotImplementedError

    def example_value(self, fn: Distribution) -> torch.Tensor:
        """One value shaped and typed like those the site receives, without a sample dim
        and without side effects on the estimator: what :class:`~storch_pyro.StorchELBO`
        hands the program when it probes for ``max_plate_nesting``. ``fn.sample()`` by
        default."""
        return fn.sample()

    def control_term(
        self, fn: Distribution, state: Any, sample_dim: Optional[int],
        downstream_cost: torch.Tensor,
    ) -> torch.Tensor:
        """A term of value zero whose gradient is the estimator's gradient, given the
        detached downstream cost :math:`D` of every drawn value (shaped like the site's
        batch shape, its own sample dim at ``sample_dim``). Reduced over the site's own
        samples (with their weights) and event dims, not over plates or upstream sample
        dims: the loss weights and sums those."""
        raise NotImplementedError

    def control_terms(
        self, fn: Distribution, state: Any, downstream_cost: torch.Tensor, ctx: ControlContext
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """With :attr:`uses_control_context`: the zero-valued terms ``(per_index, shared)``.
        ``per_index`` is as for :meth:`control_term` (the loss multiplies it by
        the magic box of upstream score terms); ``shared`` (or ``None``) is added as it is,
        summed once (first-order terms that span the indices of the site's plates)."""
        raise NotImplementedError

    def variance_parameters(self, state: Any) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        r"""With :attr:`trains_control_variate`: ``(targets, params)``. The surrogate
        gives each of ``params`` (leaf tensors) the gradient of :math:`\sum \hat g^2`,
        where :math:`\hat g` is the gradient estimate w.r.t. ``targets`` (the site's
        distribution parameters), instead of its own
        (:func:`~storch_pyro.surrogate.with_variance_gradients`)."""
        return [], []

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
