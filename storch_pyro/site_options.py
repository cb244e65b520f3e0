"""The one typed object storch_pyro keeps in a sample site's ``msg["infer"]``."""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from storch_pyro.baselines import Baseline
    from storch_pyro.estimators.base import Estimator

#: The key under which :class:`SiteOptions` lives in ``msg["infer"]``.
INFER_KEY = "storch"

#: :attr:`SiteOptions.status` of a site a loss drew with its estimator.
DRAWN = "drawn"
#: :attr:`SiteOptions.status` of a model site a loss replayed from the guide.
REPLAYED = "replayed"


@dataclass(frozen=True)
class SiteOptions:
    """Per-site choices: those made in the call to :func:`storch_pyro.sample`, those that
    :func:`storch_pyro.handlers.estimator` and :func:`storch_pyro.handlers.baseline` write
    (the innermost handler that has a choice for the site writes it), and what the loss did
    with the site.

    :ivar estimator: from :func:`storch_pyro.sample`.
    :ivar baseline: from :func:`storch_pyro.sample`.
    :ivar handler_estimator: from the innermost estimator handler with one for the site.
    :ivar handler_baseline: from the innermost baseline handler with one for the site.
    :ivar handler_baseline_named: whether that handler named the site (a dict config):
        then a baseline that cannot apply is an error rather than ignored.
    :ivar status: :data:`DRAWN` or :data:`REPLAYED` once a loss has handled the site.
    """

    estimator: Optional["Estimator"] = None
    baseline: Optional["Baseline"] = None
    handler_estimator: Optional["Estimator"] = None
    handler_baseline: Optional["Baseline"] = None
    handler_baseline_named: bool = False
    status: Optional[str] = None
