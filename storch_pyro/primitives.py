"""The primitives a model or guide calls: :func:`sample` and :func:`add_cost`."""

from typing import Any, Optional

import pyro
import torch
from pyro.poutine.runtime import effectful

from storch_pyro.baselines import Baseline
from storch_pyro.estimators.base import Estimator
from storch_pyro.handlers.tracing import record_cost_directly, sample_directly
from storch_pyro.site_options import INFER_KEY, SiteOptions


def sample(
    name: str,
    fn: Any,
    *args: Any,
    estimator: Optional[Estimator] = None,
    baseline: Optional[Baseline] = None,
    **kwargs: Any,
) -> torch.Tensor:
    """:func:`pyro.sample` with a per-site gradient estimator and baseline.

    Outside a :class:`~storch_pyro.StorchELBO` it behaves exactly like ``pyro.sample``
    (other losses ignore the choice). ``kwargs`` (``obs=``, ``infer=``, ...) go to
    ``pyro.sample``. With ``estimator.n_samples = k > 1`` the value has an extra sample dim
    of size ``k`` left of all plates; downstream code broadcasts as with Pyro enumeration.

    Example::

        z = storch.sample("z", dist.Bernoulli(logits=phi),
                          estimator=estimators.ScoreFunction(n_samples=4),
                          baseline=baselines.LeaveOneOut())
    """
    if estimator is not None and not isinstance(estimator, Estimator):
        raise TypeError(
            f"storch_pyro.sample('{name}'): estimator must be a storch_pyro Estimator "
            f"(e.g. estimators.ScoreFunction()), got {type(estimator).__name__}"
        )
    if baseline is not None and not isinstance(baseline, Baseline):
        raise TypeError(
            f"storch_pyro.sample('{name}'): baseline must be a storch_pyro Baseline "
            f"(e.g. baselines.MovingAverage()), got {type(baseline).__name__}"
        )
    if estimator is not None or baseline is not None:
        infer = dict(kwargs.pop("infer", None) or {})
        infer[INFER_KEY] = SiteOptions(estimator, baseline)
        kwargs["infer"] = infer
    value = sample_directly(name, fn, args, kwargs)  # a fast path under StorchELBO
    return pyro.sample(name, fn, *args, **kwargs) if value is None else value


@effectful(type="storch_cost")
def _cost(value: torch.Tensor) -> torch.Tensor:
    return value


def add_cost(name: str, cost: torch.Tensor) -> None:
    """Registers ``cost`` (a tensor to *minimize*) as a cost node of the stochastic
    computation graph, in a model or a guide.

    Its batch dims follow the enclosing ``pyro.plate`` s (a cost of lower rank is broadcast
    over them, as ``pyro.factor`` is; dims outside any plate or sample dim are summed).
    Under :class:`~storch_pyro.StorchELBO` it is added to the loss; the score term of every
    stochastic site drawn before it (in the same plate index) multiplies it. Outside
    StorchELBO it does nothing (it is a ``"storch_cost"`` message that other handlers may see;
    ``poutine.trace`` does not record it).

    Example::

        e = storch.sample("e", dist.Normal(c + b, 1.0))
        storch.add_cost("f", (a + b) * e ** 2)
    """
    if not isinstance(name, str):
        raise TypeError(
            f"add_cost: name must be a str (the cost's site name), got {type(name).__name__}"
        )
    if not isinstance(cost, torch.Tensor):
        try:
            cost = torch.as_tensor(cost, dtype=torch.get_default_dtype())
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(
                f"add_cost('{name}'): the cost must be a tensor or a number, got "
                f"{type(cost).__name__}; compute it with torch from the sampled values"
            ) from error
    if not record_cost_directly(name, cost, _cost):  # a fast path for known handlers
        _cost(cost, name=name)
