"""Effect handlers of storch_pyro.

User-facing: :func:`estimator` and :func:`baseline` choose per-site estimators and baselines
from outside a model; :func:`sequence` makes the sites of an autoregressive loop one
stochastic node. Internal: :class:`~storch_pyro.handlers.tracing.StorchMessenger`, which
:class:`~storch_pyro.StorchELBO` installs to draw sites, allocate sample dims and record costs.
"""

from storch_pyro.handlers.config import BaselineMessenger, EstimatorMessenger, baseline, estimator
from storch_pyro.handlers.tracing import StorchMessenger
from storch_pyro.sequence import SequenceMessenger, sequence

__all__ = [
    "estimator",
    "baseline",
    "sequence",
    "EstimatorMessenger",
    "BaselineMessenger",
    "SequenceMessenger",
    "StorchMessenger",
]
