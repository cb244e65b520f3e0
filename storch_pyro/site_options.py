"""The one typed object storch_pyro keeps in a sample site's ``msg["infer"]``."""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from storch_pyro.baselines import Baseline
    from storch_pyro.estimators.base import Estimator

#: The key under which :class:`SiteOptions` lives in ``msg["infer"]``.
INFER_KEY = "storch"


@dataclass(frozen=True)
class SiteOptions:
    """Per-site choices made in the call to :func:`storch_pyro.sample`."""

    estimator: Optional["Estimator"] = None
    baseline: Optional["Baseline"] = None
