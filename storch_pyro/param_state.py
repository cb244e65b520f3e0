"""Estimator and baseline state kept in Pyro's param store, so that it is saved and loaded
with ``pyro.get_param_store().save/load`` (checkpoint and resume) like every parameter.

State tensors are stored unconstrained under a name the user can find (``storch_pyro.*``),
read without ``pyro.param`` (so ``SVI`` does not optimize them: they are not traced as
params), and updated in place without gradient.
"""

from typing import Optional

import pyro
import torch


def param_store_state(name: str) -> Optional[torch.Tensor]:
    """The tensor stored under ``name`` in Pyro's param store, or ``None``.

    Example::

        average = param_store_state("storch_pyro.baseline.z.moving_average")
    """
    store = pyro.get_param_store()
    params = getattr(store, "_params", None)
    if params is not None:
        return params.get(name)
    return store[name] if name in store else None


def set_param_store_state(name: str, value: torch.Tensor) -> torch.Tensor:
    """Stores ``value`` (detached) under ``name`` and returns the stored tensor.

    Example::

        step = set_param_store_state("storch_pyro.estimator.z.step", torch.zeros(()))
        with torch.no_grad():
            step.add_(1.0)
    """
    pyro.get_param_store()[name] = value.detach()
    return param_store_state(name)
