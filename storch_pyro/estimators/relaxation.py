"""Biased, low-variance estimators for discrete sites: Gumbel-softmax and straight-through."""

from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch.distributions import (
    Bernoulli,
    Categorical,
    Distribution,
    OneHotCategorical,
    RelaxedBernoulli,
    RelaxedOneHotCategorical,
)

from storch_pyro.estimators.base import Draw, Estimator, Site, innermost_distribution
from storch_pyro.param_state import param_store_state
from storch_pyro.state import add_one, record


def discrete_base(fn: Distribution) -> Optional[Tuple[str, torch.Tensor]]:
    """``(kind, logits)`` of a Bernoulli, Categorical or OneHotCategorical, possibly
    wrapped (``.to_event``, ``.expand``, masked); logits broadcast to the site's full shape
    (``batch + event``, plus the category dim for Categorical). ``None`` otherwise."""
    base = innermost_distribution(fn)
    if not isinstance(base, (Bernoulli, Categorical, OneHotCategorical)):
        return None
    shape = tuple(fn.batch_shape) + tuple(fn.event_shape)
    if isinstance(base, Bernoulli):
        return "bernoulli", torch.broadcast_to(base.logits, shape)
    if isinstance(base, OneHotCategorical):
        return "onehot", torch.broadcast_to(base.logits, shape)
    return "categorical", torch.broadcast_to(base.logits, shape + base.logits.shape[-1:])


def _one_hot_argmax(y: torch.Tensor) -> torch.Tensor:
    return F.one_hot(y.argmax(-1), y.shape[-1]).to(y.dtype)


def _straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Value ``hard``, gradient that of ``soft``."""
    return hard + (soft - soft.detach())


class _Relaxation(Estimator):
    @classmethod
    def supports(cls, fn: Distribution) -> bool:
        return discrete_base(fn) is not None

    def _unsupported_reason(self, fn: Distribution) -> str:
        return " (it needs a Bernoulli, Categorical or OneHotCategorical)"

    def example_value(self, fn: Distribution) -> torch.Tensor:
        kind, logits = discrete_base(fn)
        if kind != "categorical":
            return fn.sample()
        return F.one_hot(fn.sample(), logits.shape[-1]).to(logits.dtype)

    def _draw(self, value: torch.Tensor, kind: str, hard: torch.Tensor) -> Draw:
        """The value, with log-densities evaluated at the discrete ``hard`` it stands for."""
        density_value = hard.argmax(-1) if kind == "categorical" else hard
        return Draw(value, size=self.n_samples, density_value=density_value)


class GumbelSoftmax(_Relaxation):
    """Gumbel-softmax / Concrete relaxation (Jang, Gu & Poole 2017; Maddison, Mnih & Teh
    2017): with Gumbel noise :math:`G`,

    .. math:: y = \\mathrm{softmax}\\big((\\log \\pi + G)/\\tau\\big),

    and the binary Concrete :math:`y = \\sigma((\\phi + \\log u - \\log(1-u))/\\tau)` for a
    Bernoulli. The downstream code receives :math:`y` and gradients flow through it
    (biased; the bias vanishes as :math:`\\tau \\to 0` while the variance grows).
    ``hard=True`` is the straight-through Gumbel estimator: the value is the discrete
    :math:`H(y)` (one-hot of the argmax, or :math:`1[y > 1/2]`), the gradient that of
    :math:`y`.

    **Categorical sites receive one-hot shaped values** (a trailing dim of size K): write
    the model with them as vectors, ``z @ table`` rather than ``table[z]`` (or use
    ``OneHotCategorical``). The site's log-densities (:math:`\\log q`, :math:`\\log p`) are
    evaluated at the discrete :math:`H(y)` and differentiated only through the parameters.

    :param temperature: :math:`\\tau > 0`, a float, or a callable of the number of training
        draws made so far (a schedule, e.g. ``lambda step: max(0.5, math.exp(-1e-4 *
        step))``). Only draws made with autograd enabled count, so evaluating the loss
        (``StorchELBO.loss``, ``SVI.evaluate_loss``, ``torch.no_grad``) leaves the schedule
        where it is.
    :param bool hard: straight-through Gumbel.
    :param int n_samples: values drawn per site (a sample dim of that size).
    :param str name: where a schedule's step counter lives in Pyro's param store
        (``"<name>.step"``); default ``"storch_pyro.estimator.<first site>"``. It is saved and
        loaded with ``pyro.get_param_store().save/load``, so a resumed run continues the
        schedule where it stopped (and ``pyro.clear_param_store()`` restarts it).

    Example::

        with handlers.estimator(config={"z": estimators.GumbelSoftmax(0.5, hard=True)}):
            svi.step(data)
    """

    def __init__(
        self,
        temperature: Union[float, Callable[[int], float]] = 1.0,
        hard: bool = False,
        n_samples: int = 1,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(n_samples)
        if not callable(temperature) and not float(temperature) > 0:
            raise ValueError(f"GumbelSoftmax: temperature must be > 0, got {temperature!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"GumbelSoftmax: name must be a str, got {type(name).__name__}")
        self.temperature = temperature
        self.hard = hard
        self.name = name
        self._site = "?"
        self._unnamed_step = 0  # draws made before any site named the estimator

    def for_site(self, site: str) -> "GumbelSoftmax":
        """A copy for ``site`` that shares the schedule's step counter: the sites an
        instance serves advance one schedule, once per training step."""
        if self.name is None:
            self.name = f"storch_pyro.estimator.{site}"
        instance = super().for_site(site)
        instance._site = site
        return instance

    def check(self, site: str, fn: Distribution) -> None:
        super().check(site, fn)
        self._site = site
        if self.name is None:
            self.name = f"storch_pyro.estimator.{site}"

    @property
    def step_param_name(self) -> Optional[str]:
        """The param-store name of the schedule's step counter."""
        return None if self.name is None else f"{self.name}.step"

    @property
    def step(self) -> int:
        """Training draws (autograd enabled) made so far: the argument of a temperature
        schedule."""
        if self.name is None:
            return self._unnamed_step
        state = param_store_state(self.step_param_name)
        return 0 if state is None else int(state.item())

    def _advance(self) -> None:
        """Records one more training step of the schedule, committed after the surrogate
        is built (:mod:`storch_pyro.state`): once per step, however many sites share the
        estimator."""
        if not callable(self.temperature):
            return
        if self.name is None:
            self._unnamed_step += 1
            return
        record(self.step_param_name, torch.ones((), dtype=torch.float64), add_one)

    def current_temperature(self) -> float:
        """:math:`\\tau` for the next draw."""
        if callable(self.temperature):
            step = self.step
            tau = float(self.temperature(step))
            if not tau > 0:
                raise ValueError(
                    f"site '{self._site}': the GumbelSoftmax temperature schedule gave "
                    f"temperature {tau} at step {step}; make it return a value > 0 at every "
                    f"step (e.g. max(0.1, ...))"
                )
            return tau
        return float(self.temperature)

    def draw(self, site: Site) -> Draw:
        fn, sample_shape = site.fn, site.sample_shape(self.n_samples)
        kind, logits = discrete_base(fn)
        tau = torch.tensor(self.current_temperature(), dtype=logits.dtype, device=logits.device)
        if torch.is_grad_enabled():  # evaluating the loss is not a training step
            self._advance()
        if kind == "bernoulli":
            soft = RelaxedBernoulli(tau, logits=logits).rsample(sample_shape)
            hard = (soft > 0.5).to(soft.dtype)
        else:
            soft = RelaxedOneHotCategorical(tau, logits=logits).rsample(sample_shape)
            hard = _one_hot_argmax(soft)
        value = _straight_through(hard, soft) if self.hard else soft
        return self._draw(value, kind, hard)

    def __repr__(self) -> str:
        return (
            f"GumbelSoftmax(temperature={self.temperature!r}, hard={self.hard}, "
            f"n_samples={self.n_samples})"
        )


class StraightThrough(_Relaxation):
    """Straight-through estimator (Bengio, Léonard & Courville 2013): the value is a hard
    sample :math:`z \\sim q`, the gradient that of its mean (the probabilities):
    :math:`z + \\pi - \\bot(\\pi)`. Biased, low variance. Categorical sites receive one-hot
    values, and log-densities are evaluated at the hard sample, as for
    :class:`GumbelSoftmax`.

    Example::

        b = storch.sample("b", dist.Bernoulli(logits=phi), estimator=estimators.StraightThrough())
    """

    def draw(self, site: Site) -> Draw:
        fn, sample_shape = site.fn, site.sample_shape(self.n_samples)
        kind, logits = discrete_base(fn)
        if kind == "bernoulli":
            probs = torch.sigmoid(logits)
            hard = torch.bernoulli(probs.detach().expand(tuple(sample_shape) + probs.shape))
        else:
            probs = torch.softmax(logits, -1)
            hard = OneHotCategorical(probs=probs.detach()).sample(sample_shape)
        return self._draw(_straight_through(hard, probs), kind, hard)

    def __repr__(self) -> str:
        return "StraightThrough()"
