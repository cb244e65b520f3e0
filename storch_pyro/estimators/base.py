"""The :class:`Estimator` base class shared by every gradient estimator."""

from typing import Any, ClassVar, List, Optional, Tuple, Type

import torch
from torch.distributions import Distribution

from storch_pyro.errors import UnsupportedDistributionError


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
    #: Whether a baseline from :mod:`storch_pyro.baselines` may be added to the score term
    #: (not where the estimator has a built-in one).
    accepts_baseline: ClassVar[bool] = True
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


def _describe(fn: Distribution) -> str:
    base: Optional[Distribution] = fn
    while hasattr(base, "base_dist"):
        base = base.base_dist
    name = type(base).__name__
    return name if base is fn else f"{type(fn).__name__}({name})"
