"""Pyro's own model/guide checks, run by :class:`~storch_pyro.StorchELBO` on validated steps.

So that a model and guide written for ``Trace_ELBO`` / ``TraceGraph_ELBO`` fail (or warn) the
same way under StorchELBO, the guide and model passes of a validated step are also recorded
as Pyro traces (as ``poutine.trace`` records them) and handed to the checks Pyro's losses run:
:func:`pyro.util.check_model_guide_match` (sites in one but not the other, auxiliary sites,
event dims and shapes that disagree, plates in the guide only, ``pyro.factor`` in the guide
without ``has_rsample``), :func:`pyro.util.check_site_shape` (plate dim collisions, batch
dims outside any plate, ``max_plate_nesting`` too small) and a warning for guide sites
annotated for enumeration. Duplicate site names raise as in ``poutine.trace``.

Dims left of ``max_plate_nesting`` are ignored by the shape checks, as Pyro ignores
enumeration dims there, so the sample dims of multi-sample sites pass. On the same steps,
:class:`~storch_pyro.sample_dims.SampleDimChecks` finds costs reduced over a sample dim.
"""

import warnings
from contextlib import ExitStack, nullcontext
from typing import Callable, ContextManager, Optional

from pyro import poutine
from pyro.poutine.guide import GuideMessenger
from pyro.poutine.trace_messenger import TraceMessenger
from pyro.poutine.trace_struct import Trace
from pyro.util import check_model_guide_match, check_site_shape

from storch_pyro.handlers.tracing import Run
from storch_pyro.sample_dims import SampleDimChecks


class PyroChecks:
    """Records a run's guide and model traces when ``enabled`` and checks them.

    Example::

        checks = PyroChecks(run, enabled=is_validation_enabled(), max_plate_nesting=2)
        with StorchMessenger(run, "guide"), checks.recording("guide"):
            guide()
        with StorchMessenger(run, "model"), checks.recording("model"):
            model()
        checks.check()
    """

    def __init__(self, run: Run, enabled: bool, max_plate_nesting: float) -> None:
        self.run = run
        self.enabled = enabled
        self.max_plate_nesting = max_plate_nesting
        self.traces: dict = {}
        self.sample_dims = SampleDimChecks(run) if enabled else None

    def recording(self, role: str) -> ContextManager:
        """A context that records the pass of ``role`` (``"guide"``, ``"model"`` or
        ``"scg"``); enter it inside the :class:`StorchMessenger` of that pass."""
        if not self.enabled:
            return nullcontext()
        tracer = TraceMessenger()
        self.traces[role] = tracer
        stack = ExitStack()
        stack.enter_context(tracer)
        stack.enter_context(self.sample_dims.recording())
        return stack

    def check(self) -> None:
        """Pyro's checks on the recorded traces, then that no cost lost a sample dim
        (nothing when not enabled)."""
        if not self.enabled:
            return
        traces = {role: tracer.trace for role, tracer in self.traces.items()}
        if "guide" in traces:
            check_model_guide_match(traces["model"], traces["guide"], self.max_plate_nesting)
            warn_if_enumerated(traces["guide"])
        for trace in traces.values():
            self._check_site_shapes(trace)
        self.sample_dims.check()

    def _check_site_shapes(self, trace: Trace) -> None:
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or type(site["fn"]).__name__ == "_Subsample":
                continue
            owner = self.run.density_owners.get(name)  # an estimator's own log-density
            if owner is not None:
                log_prob = owner[0].log_density(site["fn"], site["value"], owner[1])
            else:
                value = self.run.density_values.get(name, site["value"])
                log_prob = site["fn"].log_prob(value)
            site["log_prob"] = log_prob
            check_site_shape(site, self.max_plate_nesting)


def check_guide_supported(guide: Optional[Callable]) -> None:
    """Raises ``NotImplementedError`` for a guide that is a
    :class:`~pyro.infer.autoguide.guides.GuideMessenger` (``AutoNormalMessenger``, ...):
    such a guide samples inside the model's execution, while StorchELBO runs the guide, then
    the model."""
    if guide is None:
        return
    unwrapped = poutine.unwrap(guide)
    if isinstance(unwrapped, GuideMessenger):
        raise NotImplementedError(
            f"StorchELBO: the guide {type(unwrapped).__name__} is a GuideMessenger, which "
            f"samples inside the model; StorchELBO needs a guide it can run before the "
            f"model. Use a callable guide, e.g. AutoNormal instead of AutoNormalMessenger."
        )


def warn_if_enumerated(guide_trace: Trace) -> None:
    """Warns, as ``Trace_ELBO`` does, about guide sites annotated for enumeration: an
    ``infer={"enumerate": ...}`` annotation is for ``TraceEnum_ELBO``; StorchELBO samples
    such sites with their estimator."""
    sites = [
        name
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample" and site["infer"].get("enumerate")
    ]
    if sites:
        warnings.warn(
            f"Found sample sites configured for enumeration: {', '.join(sites)}\n"
            "If you want to enumerate sites, you need to use TraceEnum_ELBO instead, or "
            "choose estimators.Enumerate() for them under StorchELBO (e.g. with "
            "storch_pyro.handlers.estimator(config={site: Enumerate()})); StorchELBO ignores "
            "the annotation and samples them with their estimator.",
            stacklevel=2,
        )

