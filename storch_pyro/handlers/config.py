"""The user-facing handlers: choose estimators and baselines per site from outside a model."""

import warnings
from dataclasses import replace
from typing import Any, Callable, Dict, Optional, Set, Union

from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message
from pyro.poutine.subsample_messenger import _Subsample

from storch_pyro.baselines import Baseline
from storch_pyro.errors import UnusedConfigWarning
from storch_pyro.estimators.base import Estimator
from storch_pyro.site_options import DRAWN, INFER_KEY, SiteOptions

_NO_OPTIONS = SiteOptions()


class _SiteConfigMessenger(Messenger):
    """Common part of :class:`EstimatorMessenger` and :class:`BaselineMessenger`.

    A handler writes its choice for an unobserved sample site into the site's typed
    options in ``msg["infer"]`` (:class:`~storch_pyro.site_options.SiteOptions`), unless a
    handler inside it wrote one already, so that the innermost choice wins. A handler around
    the loss (e.g. around ``svi.step``) sees a site only after the loss's messenger, which
    is inside it, drew the site: the loss asks such handlers itself, innermost first
    (:func:`~storch_pyro.handlers.resolution.outer_config_handlers`). So handlers work
    inside or outside the model, around ``svi.step``, or as decorators. They also note
    which names pass by as unobserved sample sites, and which a loss drew or replayed from
    the guide (the options' ``status``), to warn about names that configure nothing:
    misspelled, observed, or (when the handler decorates the model) sites that are drawn in
    the guide.
    """

    _kind = ""
    _type: type = object
    _example = ""
    _field = ""  # the SiteOptions field the handler writes

    def __init__(self, config: Union[Dict[str, Any], Callable[[Message], Any]]) -> None:
        super().__init__()
        if isinstance(config, dict):
            for name, value in config.items():
                if not isinstance(name, str):
                    raise TypeError(
                        f"handlers.{self._kind}: config keys must be site names (str), "
                        f"got {name!r}; write {{'site_name': ...}}"
                    )
                self._check_value(name, value)
        elif not callable(config):
            raise TypeError(
                f"handlers.{self._kind}: config must be a dict {{site_name: "
                f"{self._type.__name__}}} or a callable msg -> {self._type.__name__} | None, "
                f"got {type(config).__name__}"
            )
        self.config = config
        self._reset_names()

    def _reset_names(self) -> None:
        self._seen: Set[str] = set()
        self.drawn: Set[str] = set()
        self.replayed: Set[str] = set()

    def _check_value(self, site: str, value: Any) -> None:
        if value is not None and not isinstance(value, self._type):
            raise TypeError(
                f"handlers.{self._kind}: the config for site '{site}' must be a "
                f"storch_pyro {self._type.__name__} instance (e.g. {self._example}), got "
                f"{type(value).__name__}"
            )

    def lookup(self, msg: Message) -> Any:
        """The configured object for the site of ``msg``, or ``None``."""
        name = msg["name"]
        if isinstance(self.config, dict):
            return self.config.get(name)
        value = self.config(msg)
        self._check_value(name, value)
        return value

    def _pyro_sample(self, msg: Message) -> None:
        if msg["is_observed"]:
            return
        if isinstance(self.config, dict):
            self._seen.add(msg["name"])
        if msg["done"] or type(msg["fn"]) is _Subsample:  # drawn or replayed already
            return
        options = msg["infer"].get(INFER_KEY) or _NO_OPTIONS
        if getattr(options, self._field) is not None:  # an inner handler chose
            return
        value = self.lookup(msg)
        if value is not None:
            msg["infer"][INFER_KEY] = replace(options, **self._choice(value))

    def _choice(self, value: Any) -> Dict[str, Any]:
        return {self._field: value}

    def _pyro_post_sample(self, msg: Message) -> None:
        options = msg["infer"].get(INFER_KEY)
        if options is not None and options.status is not None:
            (self.drawn if options.status == DRAWN else self.replayed).add(msg["name"])

    def __enter__(self):
        self._reset_names()
        return super().__enter__()

    def __exit__(self, exc_type, exc_value, traceback):
        result = super().__exit__(exc_type, exc_value, traceback)
        if exc_type is None and isinstance(self.config, dict):
            effective = self.drawn | (self._seen - self.replayed)
            unused = sorted(set(self.config) - effective)
            if unused:
                replayed = sorted(set(unused) & self.replayed)
                hint = (
                    f" ({replayed} are drawn in the guide: apply the handler to the guide "
                    f"or around svi.step)" if replayed else ""
                )
                warnings.warn(
                    f"handlers.{self._kind}: config names site(s) {unused} that never "
                    f"appeared as an unobserved sample site while the handler was active"
                    f"{hint}; check the spelling (sites seen: "
                    f"{sorted(self._seen) or 'none'})",
                    UnusedConfigWarning,
                    stacklevel=2,
                )
        return result


class EstimatorMessenger(_SiteConfigMessenger):
    """The messenger :func:`estimator` returns; see there.

    Example::

        with EstimatorMessenger({"z": estimators.DisARM()}):
            svi.step(data)
    """

    _kind = "estimator"
    _type = Estimator
    _example = "estimators.ScoreFunction()"
    _field = "handler_estimator"


class BaselineMessenger(_SiteConfigMessenger):
    """The messenger :func:`baseline` returns; see there.

    Example::

        with BaselineMessenger({"z": baselines.MovingAverage(0.99)}):
            svi.step(data)
    """

    _kind = "baseline"
    _type = Baseline
    _example = "baselines.MovingAverage()"
    _field = "handler_baseline"

    def _choice(self, value: Any) -> Dict[str, Any]:
        return {self._field: value, "handler_baseline_named": isinstance(self.config, dict)}


def estimator(
    fn: Optional[Callable] = None,
    config: Union[Dict[str, Estimator], Callable[[Message], Optional[Estimator]], None] = None,
):
    """Chooses the gradient estimator of sites from outside the model.

    ``config`` is ``{site_name: Estimator}`` or a callable ``msg -> Estimator | None``.
    Precedence: an estimator given in :func:`storch_pyro.sample` wins; then the innermost
    handler, then outer ones, then ``StorchELBO(default_estimator=...)``, then
    :class:`~storch_pyro.estimators.Pathwise` where ``fn.has_rsample`` and
    :class:`~storch_pyro.estimators.ScoreFunction` elsewhere. A dict naming a site that never
    appears while the handler is active warns with
    :class:`~storch_pyro.errors.UnusedConfigWarning`.

    Example::

        with handlers.estimator(config={"z": estimators.ScoreFunction(n_samples=4)}):
            svi.step(data)

        discrete = handlers.estimator(
            model, config=lambda msg: None if msg["fn"].has_rsample
            else estimators.ScoreFunction(baseline=baselines.MovingAverage()))
    """
    if config is None:
        raise TypeError(
            "handlers.estimator: config is required: {site_name: Estimator} or a callable "
            "msg -> Estimator | None"
        )
    messenger = EstimatorMessenger(config)
    return messenger(fn) if fn is not None else messenger


def baseline(
    fn: Optional[Callable] = None,
    config: Union[Dict[str, Baseline], Callable[[Message], Optional[Baseline]], None] = None,
):
    """Chooses the baseline of score-function sites from outside the model.

    ``config`` is ``{site_name: Baseline}`` or a callable ``msg -> Baseline | None``.
    Precedence: ``storch_pyro.sample(..., baseline=)``, then a baseline carried by the
    site's estimator, then Pyro's ``infer={"baseline": ...}`` annotation, then the innermost
    handler, then outer ones. A baseline named in a dict for a site whose estimator has no
    score term (e.g. :class:`~storch_pyro.estimators.Pathwise`) is an error; callables may
    return one for any site, and it is used only where there is a score term.

    Example::

        with handlers.baseline(config={"z": baselines.MovingAverage(0.99)}):
            svi.step(data)
    """
    if config is None:
        raise TypeError(
            "handlers.baseline: config is required: {site_name: Baseline} or a callable "
            "msg -> Baseline | None"
        )
    messenger = BaselineMessenger(config)
    return messenger(fn) if fn is not None else messenger
