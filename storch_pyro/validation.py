"""Pyro's validation for :class:`~storch_pyro.StorchELBO`, of the draw that is returned.

A validated step checks what Pyro's losses check, so that a model and guide written for
``Trace_ELBO`` / ``TraceGraph_ELBO`` fail (or warn) the same way under StorchELBO:
distribution parameters and values (torch's ``validate_args``), and, on the guide and model
passes recorded as Pyro traces, :func:`pyro.util.check_model_guide_match` (sites in one but not
the other, auxiliary sites, event dims and shapes that disagree, plates in the guide only,
``pyro.factor`` in the guide without ``has_rsample``), :func:`pyro.util.check_site_shape`
(plate dim collisions, batch dims outside any plate, ``max_plate_nesting`` too small), a
warning for guide sites annotated for enumeration, and duplicate site names.

A step is validated in one of two ways, and **never drawn twice**: a second, validated draw
of a step whose first draw showed a new structure would condition the returned estimate on
that structure, a bias wherever the structure is random (control flow on sampled values,
episodes of random length).

- **Inline** (:func:`check_run` after a run under Pyro's validation): torch checks each
  distribution as it is built and each value as it is scored.
- **After the fact** (:func:`check_run` with ``after_the_fact=True``, after a run with Pyro's
  validation off): the run's recorded sample sites are checked as torch would have checked
  them (:func:`check_distribution`, :func:`check_value`), then the same trace checks run.
  This is how StorchELBO validates a step whose structure is new while keeping the fast,
  unvalidated path for the structures it has validated.

Dims left of ``max_plate_nesting`` are ignored by the shape checks, as Pyro ignores
enumeration dims there, so the sample dims of multi-sample sites pass. On inline-validated
runs (the first step, every step with ``validate_every_step=True``, and ``loss``),
:class:`~storch_pyro.sample_dims.SampleDimChecks` also finds costs reduced over a sample dim:
it follows provenance while the program runs, so it cannot run after the fact.
"""

import warnings
from typing import Callable, Optional

import torch
from pyro import poutine
from pyro.poutine.guide import GuideMessenger
from pyro.poutine.trace_struct import Trace
from pyro.util import check_model_guide_match, check_site_shape
from torch.distributions import Distribution, constraints
from torch.distributions.utils import lazy_property

from storch_pyro.handlers.records import Run


def check_run(run: Run, max_plate_nesting: float, after_the_fact: bool = False) -> None:
    """Pyro's checks on a finished run (see the module docstring).

    :param Run run: the record of one particle's guide and model passes.
    :param max_plate_nesting: the loss's ``max_plate_nesting`` (dims left of it are ignored).
    :param bool after_the_fact: the run was drawn with Pyro's validation off: check its
        distributions and values too, as torch checks them when validation is on.
    """
    traces = {role: _trace_of(messages) for role, messages in run.messages.items()}
    if after_the_fact:
        for trace in traces.values():
            for site in _sample_sites(trace):
                _check_site(run, site)
    if "guide" in traces:
        check_model_guide_match(traces["model"], traces["guide"], max_plate_nesting)
        warn_if_enumerated(traces["guide"])
    run.raise_deferred()  # where Pyro's losses compute log-densities (and apply masks)
    for trace in traces.values():
        for site in _sample_sites(trace):
            site["log_prob"] = _log_density(run, site)
            check_site_shape(site, max_plate_nesting)


def check_distribution(fn: Distribution) -> None:
    """Raises torch's ``ValueError`` if a parameter of ``fn`` or of a distribution it wraps
    (``base_dist``, mixture components, ...) violates its constraint, as
    ``Distribution.__init__`` does with ``validate_args=True``."""
    seen = set()
    stack = [fn]
    while stack:
        d = stack.pop()
        if id(d) in seen:
            continue
        seen.add(id(d))
        stack.extend(v for v in vars(d).values() if isinstance(v, Distribution))
        try:
            arg_constraints = d.arg_constraints
        except NotImplementedError:
            continue
        for param, constraint in arg_constraints.items():
            if constraints.is_dependent(constraint):
                continue
            if param not in d.__dict__ and isinstance(getattr(type(d), param, None), lazy_property):
                continue  # a lazily computed parameter that nobody asked for
            value = getattr(d, param)
            if not torch._is_all_true(constraint.check(value)):
                raise ValueError(
                    f"Expected parameter {param} ({type(value).__name__} of shape "
                    f"{tuple(value.shape)}) of distribution {d!r} to satisfy the constraint "
                    f"{constraint!r}, but found invalid values:\n{value}"
                )


def check_value(fn: Distribution, value: torch.Tensor) -> None:
    """Raises torch's ``ValueError`` if ``value`` is outside the support of ``fn`` or does
    not broadcast with its shape, as ``log_prob`` does with ``validate_args=True``."""
    try:
        fn.support
    except NotImplementedError:
        return  # torch would only warn that it cannot check
    fn._validate_sample(value)


def _check_site(run: Run, site: dict) -> None:
    name, fn = site["name"], site["fn"]
    if _is_subsample(fn):
        return
    scale = site["scale"]
    if isinstance(scale, torch.Tensor) and not torch._is_all_true(scale > 0):
        raise ValueError(
            f"at site '{name}': expected scale > 0 but got {scale}. Consider using "
            f"poutine.mask() instead of poutine.scale()."
        )
    if not isinstance(fn, Distribution):
        return
    try:
        check_distribution(fn)
        if name not in run.density_owners:  # an estimator's own density checks its values
            check_value(fn, run.density_values.get(name, site["value"]))
    except ValueError as error:
        raise ValueError(
            f"at site '{name}' (checked after the run, as its structure was new): {error}"
        ) from error


def _log_density(run: Run, site: dict) -> torch.Tensor:
    name = site["name"]
    owner = run.density_owners.get(name)  # an estimator's own log-density
    if owner is not None:
        return owner(site["fn"], site["value"])
    return site["fn"].log_prob(run.density_values.get(name, site["value"]))


def _trace_of(messages) -> Trace:
    trace = Trace()
    for msg in messages:
        # Raises on a duplicate site name, as poutine.trace does.
        trace.add_node(msg["name"], **dict(msg))
    return trace


def _sample_sites(trace: Trace):
    return [
        site for site in trace.nodes.values()
        if site["type"] == "sample" and not _is_subsample(site["fn"])
    ]


def _is_subsample(fn) -> bool:
    return type(fn).__name__ == "_Subsample"


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
