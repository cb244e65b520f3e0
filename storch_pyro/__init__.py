"""storch_pyro: Monte Carlo gradient estimators for stochastic computation graphs in Pyro."""

from storch_pyro import baselines, diagnostics, estimators, handlers
from storch_pyro.elbo import StorchELBO
from storch_pyro.iwelbo import IWELBO
from storch_pyro.primitives import add_cost, sample

__version__ = "0.1.0"

__all__ = [
    "IWELBO",
    "StorchELBO",
    "add_cost",
    "baselines",
    "diagnostics",
    "estimators",
    "handlers",
    "sample",
]
