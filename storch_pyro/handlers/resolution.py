"""Site resolution: which estimator and baseline a stochastic site gets, by the precedence
rules of :func:`storch_pyro.handlers.estimator` and :func:`storch_pyro.handlers.baseline`,
and the per-site estimator instances."""

import weakref
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK, Message

from storch_pyro.baselines import Baseline, _PyroAnnotation
from storch_pyro.errors import StorchError
from storch_pyro.estimators.base import Draw, Estimator
from storch_pyro.estimators.pathwise import Pathwise
from storch_pyro.estimators.score_function import ScoreFunction
from storch_pyro.handlers.config import (
    BaselineMessenger,
    EstimatorMessenger,
    _SiteConfigMessenger,
)
from storch_pyro.site_options import DRAWN, INFER_KEY, REPLAYED, SiteOptions

_DEFAULT_PATHWISE = Pathwise()
_DEFAULT_SCORE_FUNCTION = ScoreFunction()
_NO_OPTIONS = SiteOptions()
#: The options of a site without choices, once drawn or replayed (the common case, made
#: once: ``dataclasses.replace`` is a tenth of a site's bookkeeping).
_DRAWN = SiteOptions(status=DRAWN)
_REPLAYED = SiteOptions(status=REPLAYED)


#: The per-site instances of each configured estimator, by the estimator's ``id`` (an
#: estimator need not be hashable, e.g. a ``@dataclass`` with ``eq=True``):
#: ``{id(estimator): (weak reference to it, {site: instance})}``; an entry goes when its
#: estimator is garbage-collected.
_PER_SITE: Dict[int, Tuple["weakref.ref[Estimator]", Dict[str, Estimator]]] = {}


def _forget(key: int, ref: "weakref.ref[Estimator]") -> None:
    entry = _PER_SITE.get(key)
    if entry is not None and entry[0] is ref:
        del _PER_SITE[key]


def instance_for_site(estimator: Estimator, site: str) -> Estimator:
    """The instance of ``estimator`` that serves ``site``: made once per site by
    :meth:`~storch_pyro.estimators.base.Estimator.for_site` and cached (as Pyro's
    reparameterization strategies cache their per-site objects), so an instance given for
    several sites (a handler's config, ``default_estimator``) keeps per-site attributes per
    site, and the same site gets the same instance at every step. The cache is keyed by
    the estimator's identity, not its hash or equality: two equal estimators are two
    configurations, each with its own per-site instances.

    Example::

        shared = estimators.GumbelSoftmax(0.5)
        assert instance_for_site(shared, "a") is instance_for_site(shared, "a")
        assert instance_for_site(shared, "a") is not instance_for_site(shared, "b")
    """
    key = id(estimator)
    entry = _PER_SITE.get(key)
    if entry is None or entry[0]() is not estimator:
        if getattr(estimator, "_serves_site", None) == site:  # already a per-site instance
            return estimator
        ref = weakref.ref(estimator, lambda ref, key=key: _forget(key, ref))
        entry = _PER_SITE[key] = (ref, {})
    instances = entry[1]
    instance = instances.get(site)
    if instance is None:
        instance = instances[site] = estimator.for_site(site)
        instance._serves_site = site
    return instance


@dataclass
class SiteConfig:
    """A site's estimator and baseline, as :func:`resolve_site` chose them."""

    estimator: Estimator
    baseline: Optional[Baseline]
    #: Whether the baseline was named for this site (an error where it cannot apply),
    #: rather than by a callable config or an annotation (ignored there).
    explicit_baseline: bool

    def baseline_for(self, site: str, estimator: Estimator, draw: Draw) -> Optional[Baseline]:
        """The baseline, where the draw has a score term for it to apply to and no baseline
        of its own (:attr:`Draw.builtin_baseline`)."""
        baseline = self.baseline
        if baseline is None:
            return None
        if draw.score is None or draw.builtin_baseline:
            if self.explicit_baseline:
                reason = (
                    "has a built-in baseline" if draw.score is not None
                    else "has no score-function term for it to apply to"
                )
                raise StorchError(
                    f"site '{site}': a baseline was given, but its estimator "
                    f"{type(estimator).__name__} {reason}. Remove the baseline or use e.g. "
                    f"ScoreFunction."
                )
            return None
        baseline.check(site, estimator.n_samples)
        return baseline


def outer_config_handlers(messenger: Messenger) -> List[_SiteConfigMessenger]:
    """The estimator and baseline handlers active around ``messenger`` (below it on Pyro's
    stack, e.g. around ``svi.step``), innermost first: they see a site only after
    ``messenger`` has drawn it, so a loss asks them itself. Call it when ``messenger`` is
    entered (once per pass); handlers inside it write their choices into ``msg["infer"]``
    (:class:`~storch_pyro.handlers.config.EstimatorMessenger`)."""
    stack = _PYRO_STACK[:_PYRO_STACK.index(messenger)] if messenger in _PYRO_STACK else []
    return [h for h in reversed(stack) if isinstance(h, _SiteConfigMessenger)]


def resolve_site(
    msg: Message,
    default_estimator: Optional[Estimator],
    outer: Sequence[_SiteConfigMessenger] = (),
) -> SiteConfig:
    """The site's estimator and baseline, by the precedence rules of
    :func:`storch_pyro.handlers.estimator` and :func:`storch_pyro.handlers.baseline`: from
    the site's options in ``msg["infer"]`` (:func:`storch_pyro.sample`'s, then those the
    handlers inside the loss wrote), then the handlers ``outer`` to the loss
    (:func:`outer_config_handlers`), then defaults. Marks the site as drawn in its options
    (for the handlers' unused-name warnings)."""
    for handler in outer:  # they see the site only afterwards, if no error stops it
        handler.drawn.add(msg["name"])
    options = msg["infer"].get(INFER_KEY) or _NO_OPTIONS
    estimator = options.estimator or options.handler_estimator
    baseline = options.baseline
    explicit_baseline = baseline is not None
    if estimator is None:
        for handler in outer:
            if type(handler) is EstimatorMessenger:
                estimator = handler.lookup(msg)
                if estimator is not None:
                    break
    if estimator is None:
        estimator = default_estimator
    if estimator is None:
        estimator = (
            _DEFAULT_PATHWISE if msg["fn"].has_rsample else _DEFAULT_SCORE_FUNCTION
        )
    estimator = instance_for_site(estimator, msg["name"])
    if baseline is None:
        baseline = estimator.baseline
        explicit_baseline = baseline is not None
    if baseline is None and "baseline" in msg["infer"]:
        # Like TraceGraph_ELBO, ignore the annotation where there is no score term.
        baseline = _annotated_baseline(msg)
    if baseline is None and options.handler_baseline is not None:
        baseline = options.handler_baseline
        explicit_baseline = options.handler_baseline_named
    if baseline is None:
        for handler in outer:
            if type(handler) is BaselineMessenger:
                baseline = handler.lookup(msg)
                if baseline is not None:
                    explicit_baseline = isinstance(handler.config, dict)
                    break
    msg["infer"][INFER_KEY] = (
        _DRAWN if options is _NO_OPTIONS else replace(options, status=DRAWN)
    )
    return SiteConfig(estimator, baseline, explicit_baseline)


def mark_replayed(msg: Message) -> None:
    """Marks a model site replayed from the guide in its options (for the handlers'
    unused-name warnings)."""
    options = msg["infer"].get(INFER_KEY) or _NO_OPTIONS
    msg["infer"][INFER_KEY] = (
        _REPLAYED if options is _NO_OPTIONS else replace(options, status=REPLAYED)
    )


def _annotated_baseline(msg: Message) -> Optional[Baseline]:
    options = msg["infer"]["baseline"]
    if not options:
        return None
    name = msg["name"]
    # Rebuilt each step: nn_baseline_input and baseline_value change with the data.
    baseline = _PyroAnnotation(name, dict(options))
    if not (baseline.use_average or baseline.nn_baseline is not None
            or baseline.value is not None):
        return None
    return baseline
