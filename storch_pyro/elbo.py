"""StorchELBO: a :class:`pyro.infer.ELBO` whose gradient is each site's chosen estimator."""

import math
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pyro
import pyro.util
import torch
from pyro import poutine
from pyro.infer.elbo import ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

from storch_pyro import distributed
from storch_pyro import state as estimator_state
from storch_pyro.data_flow import DataFlow
from storch_pyro.errors import NonFiniteCostError
from storch_pyro.estimators.base import Estimator
from storch_pyro.handlers.records import Run
from storch_pyro.handlers.resolution import outer_config_handlers, resolve_site
from storch_pyro.handlers.tracing import StorchMessenger
from storch_pyro.param_state import param_store_state
from storch_pyro.sample_dims import (
    SampleDimChecks,
    example_sites,
    explain_errors,
    run_sites,
)
from storch_pyro.surrogate import (
    VarianceGradient,
    add_variance_correction,
    expected_cost,
    raise_if_not_finite,
    surrogate_loss,
    variance_gradients,
)
from storch_pyro.validation import check_guide_supported, check_run


class StorchELBO(ELBO):
    """A loss for ``SVI`` (or plain PyTorch) whose gradient is a per-site Monte Carlo
    gradient estimator, chosen with :func:`storch_pyro.sample`, :mod:`storch_pyro.handlers`
    or ``default_estimator``.

    **ELBO mode** (a guide is given): unobserved guide sites are stochastic nodes; the costs
    are :math:`-\\log p` of every model site and :math:`+\\log q` of every guide site (scaled by
    plates' subsampling, ``poutine.scale``, masked by ``poutine.mask``), plus the costs of
    :func:`storch_pyro.add_cost`. The loss value estimates :math:`-\\mathrm{ELBO}` (plus the
    expected added costs). Latent model sites that the guide lacks are stochastic nodes too.

    **Pure stochastic computation graph** (``guide=None``): every unobserved model site is a
    stochastic node, and the objective is :math:`\\mathbb{E}[\\sum \\text{costs}]`, where the
    costs are those of :func:`~storch_pyro.add_cost`, plus :math:`-\\log p` of observed sites
    and ``pyro.factor`` s if the model has any.

    The loss is the surrogate of :mod:`storch_pyro.surrogate`: its value is the Monte Carlo
    estimate of the objective, its gradient (of any order, with ``create_graph=True``) the
    estimators' unbiased estimate of the objective's.

    :param int num_particles: independent evaluations averaged per step.
    :param int max_plate_nesting: bound on nested plates; guessed by running the model once
        when a sample dim is first needed (``n_samples > 1``, vectorized particles).
    :param bool vectorize_particles: evaluate particles in one vectorized pass.
    :param Estimator default_estimator: for sites with no estimator from the call or a
        handler (otherwise Pathwise where ``has_rsample``, else ScoreFunction).
    :param bool validate_every_step: with Pyro's validation on (its default), StorchELBO
        validates distributions, values, the model/guide match and the loss's finiteness on
        the first step of each model structure (the sequence of cost and site names), then
        skips that work for structures it has validated (a step is a call of ``loss``,
        ``differentiable_loss`` or ``loss_and_grads``), which saves a fifth of the step
        time of a small model and avoids device syncs on a GPU. A step is never drawn twice:
        a step whose (unvalidated) run shows a new structure is validated after the fact, on
        its recorded distributions and values (:mod:`storch_pyro.validation`), so the
        estimate has the same distribution whatever the setting. ``True`` validates every
        step as it runs: do this when later minibatches may hold data outside a
        distribution's support.
    :param sync_state: estimator state across the processes of a data-parallel run
        (:mod:`storch_pyro.distributed`). By default (``None``) the step's state updates
        are averaged over ``torch.distributed``'s default process group whenever it is
        initialized (one small ``all_reduce`` per step, one ``all_gather_object`` more on
        a step that records a new state name; every process must take every gradient
        step, as under DDP); ``False`` keeps the state per rank; a ``ProcessGroup`` synchronizes
        over that group; ``True`` requires ``torch.distributed`` to be initialized.
    :param str credit: which costs a site's score term multiplies. ``"order"`` (default):
        every cost computed after the site (outside plate indices it is not in); cheap, and
        sound under any control flow. ``"data_flow"``: only the costs that can depend on
        the site's value, by tensor data flow, through later sites' distributions, or
        through control flow (a value that reaches Python, e.g. ``.item()`` or ``bool()``,
        makes every later cost depend on it) (:mod:`storch_pyro.data_flow`); as unbiased,
        with much less variance where costs depend on few sites (TraceGraph_ELBO's variance
        on independent latents), at the price of provenance tracking through every torch op.

    When ``max_plate_nesting`` is not given, the first call runs the program once more to
    guess it (as Pyro's ``TraceEnum_ELBO`` does), before the draw that is returned; pass
    ``max_plate_nesting`` to skip that extra run (e.g. for a program that steps an
    environment).

    Example::

        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=StorchELBO())
        loss = StorchELBO().differentiable_loss(story, None, a, b, c)  # no guide
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool = False,
        default_estimator: Optional[Estimator] = None,
        validate_every_step: bool = False,
        sync_state: distributed.SyncState = None,
        *,
        credit: str = "order",
        **kwargs: Any,
    ) -> None:
        if credit not in ("order", "data_flow"):
            raise ValueError(
                f"StorchELBO: credit must be 'order' or 'data_flow', got {credit!r}"
            )
        if default_estimator is not None and not isinstance(default_estimator, Estimator):
            raise TypeError(
                "StorchELBO: default_estimator must be a storch_pyro Estimator, got "
                f"{type(default_estimator).__name__}"
            )
        distributed.check_sync_state(sync_state)
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            **kwargs,
        )
        self.default_estimator = default_estimator
        self.validate_every_step = validate_every_step
        self.credit = credit
        self._validated_structures: set = set()
        self._flow_warned: set = set()  # names data-flow credit fell back to order for
        self._nesting_guessed = False
        self.sync_state = sync_state
        self._syncs: dict = {}

    def __getstate__(self) -> dict:
        # The synchronizers hold process groups, which do not pickle (Lightning's
        # ddp_spawn, deepcopy): a copy makes its own on its first step.
        state = self.__dict__.copy()
        state["_syncs"] = {}
        return state

    # ---- public interface ------------------------------------------------------------------
    def loss(self, model: Callable, guide: Optional[Callable], *args: Any, **kwargs: Any) -> float:
        """The Monte Carlo estimate of the objective (:math:`-\\mathrm{ELBO}`), as a float.
        Leaves baseline state untouched. Validated as :meth:`differentiable_loss` is (see
        ``validate_every_step``): a structure validated by an earlier call of either is not
        validated again, which halves the cost of repeated calls."""
        with torch.no_grad():
            runs, _ = self._validated_runs(model, guide, args, kwargs)
            value = float(sum(expected_cost(run) for run in runs)) / self.num_particles
            if not math.isfinite(value):
                _raise_not_finite(runs)
        return value

    def differentiable_loss(
        self, model: Callable, guide: Optional[Callable], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """The surrogate loss: a tensor whose value estimates the objective and whose
        gradient is the estimators' gradient estimate for the model and guide parameters,
        and the variance gradient for the parameters of learned control variates (REBAR,
        RELAX, LAX): one optimizer over it trains everything."""
        with estimator_state.recording() as updates:
            runs, validated = self._validated_runs(model, guide, args, kwargs)
            total, variance = self._surrogate(runs)
        if validated and not bool(torch.isfinite(total)):
            _raise_not_finite(runs)
        return self._commit(updates, total, variance)

    def loss_and_grads(
        self, model: Callable, guide: Optional[Callable], *args: Any, **kwargs: Any
    ) -> float:
        """Backpropagates the surrogate loss (:meth:`differentiable_loss`) and returns its
        value as a float."""
        with estimator_state.recording() as updates:
            runs, _ = self._validated_runs(model, guide, args, kwargs)
            surrogate, variance = self._surrogate(runs)
        value = surrogate.item()
        if not math.isfinite(value):
            _raise_not_finite(runs)
        surrogate = self._commit(updates, surrogate, variance)
        if surrogate.requires_grad:
            surrogate.backward(retain_graph=self.retain_graph)
        return value

    # ---- internals -------------------------------------------------------------------------
    def _commit(
        self,
        updates: estimator_state.StepUpdates,
        surrogate: torch.Tensor,
        variance: List[VarianceGradient],
    ) -> torch.Tensor:
        """Applies the step's estimator-state updates once, after the surrogate is built
        (:mod:`storch_pyro.state`), and returns the surrogate with the control variates'
        variance gradients (:func:`~storch_pyro.surrogate.with_variance_gradients`).

        When synchronizing (``sync_state``), both go through one
        :class:`~storch_pyro.distributed.StateSync` exchange, entered even when this process
        recorded nothing: the state statistics are averaged over the processes that
        recorded them, and the variance gradients of control-variate parameters kept in
        Pyro's param store over all processes (a process without the parameter counting
        zero, as DDP would), so those parameters (REBAR's eta and temperature, networks
        registered with ``pyro.module``) stay equal on every rank without DDP. Parameters
        outside the param store (e.g. of a ``PyroModule`` with local params) are DDP's."""
        group = distributed.resolve(self.sync_state)
        if group is False:
            if updates:
                estimator_state.commit(updates)
            return add_variance_correction(surrogate, variance) if variance else surrogate
        key = id(group)
        if key not in self._syncs:
            self._syncs[key] = distributed.StateSync(group)
        sync = self._syncs[key]
        store = pyro.get_param_store()
        names = [store.param_name(param) for param, _, _ in variance]
        local = {name: grad for name, (_, _, grad) in zip(names, variance)
                 if name is not None and grad is not None}
        reduced: Dict[str, torch.Tensor] = {}

        def all_reduce(stats: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
            stats, gradients = sync.exchange(stats, local)
            reduced.update(gradients)
            return stats

        estimator_state.commit(updates, all_reduce=all_reduce)
        terms = [(param, own, reduced.get(name, grad) if name is not None else grad)
                 for name, (param, own, grad) in zip(names, variance)]
        for name in set(reduced) - set(names):  # parameters only other processes used
            param = param_store_state(name)
            if param is not None and param.requires_grad:
                terms.append((param, None, reduced[name]))
        return add_variance_correction(surrogate, terms) if terms else surrogate

    def _surrogate(self, runs) -> Tuple[torch.Tensor, List[VarianceGradient]]:
        """The particles' mean surrogate, and the variance gradients of the control
        variates it trains (:func:`~storch_pyro.surrogate.variance_gradients`)."""
        total = surrogate_loss(runs[0])
        for run in runs[1:]:
            total = total + surrogate_loss(run)
        if self.num_particles != 1:
            total = total / self.num_particles
        tuned = [node for run in runs for node in run.nodes
                 if node.terms is not None and node.terms.variance is not None]
        return total, (variance_gradients(total, tuned) if tuned else [])

    def _validated_runs(self, model, guide, args, kwargs):
        """Runs all particles and validates them (see ``validate_every_step``): inline on
        the first step and with ``validate_every_step``, else after the fact for runs whose
        structure is new. Never draws a run twice. Returns the runs and whether they were
        validated."""
        if not is_validation_enabled():
            return list(self._runs(model, guide, args, kwargs)), False
        if self.validate_every_step or not self._validated_structures:
            runs = list(self._runs(model, guide, args, kwargs))  # checked as they run
            self._validated_structures.update(run.structure() for run in runs)
            return runs, True
        with pyro.validation_enabled(False):
            runs = list(self._runs(model, guide, args, kwargs))
        validated = False
        for run in runs:
            structure = run.structure()
            if structure not in self._validated_structures:
                check_run(run, self._check_nesting(run), after_the_fact=True)
                self._validated_structures.add(structure)
                validated = True
        return runs, validated

    def _runs(self, model, guide, args, kwargs) -> Iterator[Run]:
        """One :class:`Run` per particle (a single one when vectorized)."""
        check_guide_supported(guide)
        # Before any draw that is returned: a run aborted where a sample dim is first needed
        # and drawn again would condition the estimate on its first sites.
        self._ensure_max_plate_nesting(model, guide, args, kwargs)
        if self.vectorize_particles and self.num_particles > 1:
            model = self._vectorized_num_particles(model)
            if guide is not None:
                guide = self._vectorized_num_particles(guide)
            runs = 1
        else:
            runs = self.num_particles
        for _ in range(runs):
            yield self._run(model, guide, args, kwargs)

    def _run(self, model, guide, args, kwargs) -> Run:
        first_sample_dim = -int(self.max_plate_nesting) - 1
        run = Run(self.default_estimator, first_sample_dim, args, kwargs)
        validating = is_validation_enabled()
        if self.credit == "data_flow":
            run.flow = DataFlow(warned=self._flow_warned)
        # Costs reduced over a sample dim: found by provenance, on inline-validated runs.
        table = None if run.flow is None else run.flow.table
        sample_dims = SampleDimChecks(run, table) if validating else None
        notes = explain_errors(lambda: run_sites(run))
        if guide is None:
            with notes, StorchMessenger(run, "scg"), _recording(sample_dims, run):
                model(*args, **kwargs)
        else:
            with notes, StorchMessenger(run, "guide"), _recording(sample_dims, run):
                guide(*args, **kwargs)
            with notes, StorchMessenger(run, "model"), _recording(sample_dims, run):
                model(*args, **kwargs)
        if validating:
            check_run(run, self._check_nesting(run))
            sample_dims.check()
        else:
            run.raise_deferred()  # a mask of the wrong shape (see Run.raise_deferred)
        return run

    def _check_nesting(self, run: Run) -> float:
        """The ``max_plate_nesting`` Pyro's shape checks use: a guessed value only where the
        run has sample dims to ignore (a guess from one run must not reject a later
        structure's deeper plates)."""
        if self._nesting_guessed and not run.live_frames:
            return float("inf")
        return self.max_plate_nesting

    def _get_trace(self, model, guide, args, kwargs) -> Run:
        """One particle's record (the hook :class:`pyro.infer.ELBO` asks for)."""
        self._ensure_max_plate_nesting(model, guide, args, kwargs)
        return self._run(model, guide, args, kwargs)

    def _ensure_max_plate_nesting(self, model, guide, args, kwargs) -> None:
        """Unless it is known, sets ``max_plate_nesting`` from one run without sample dims:
        the deepest plate dim, or the largest batch rank of any site or cost if that is
        larger (so sample dims never collide with undeclared batch dims). With vectorized
        particles this run draws random numbers, as Pyro's guess does; otherwise the random
        number generators are restored after it, so the step draws what it would have drawn
        without it."""
        if self.max_plate_nesting != float("inf"):
            return
        vectorized = self.vectorize_particles and self.num_particles > 1
        probe = _NestingProbe(self.default_estimator)
        with _rng_restored(not vectorized), poutine.block(), explain_errors(
            lambda: example_sites(probe.values)
        ):
            if guide is None:
                with probe:
                    model(*args, **kwargs)
            else:
                with probe:
                    with poutine.trace() as guide_tracer:  # no trace shapes in errors
                        guide(*args, **kwargs)
                    poutine.replay(model, trace=guide_tracer.trace)(*args, **kwargs)
        self.max_plate_nesting = probe.nesting + (1 if vectorized else 0)
        self._nesting_guessed = True


@contextmanager
def _recording(sample_dims: Optional[SampleDimChecks], run: Run):
    """Provenance for the sample-dim checks and for credit by data flow (one mode)."""
    with ExitStack() as stack:
        if sample_dims is not None:
            stack.enter_context(sample_dims.recording())
        if run.flow is not None:
            stack.enter_context(run.flow.mode())
        yield


@contextmanager
def _rng_restored(enabled: bool):
    """Restores Pyro's random number generators (torch's, Python's, NumPy's, and CUDA's where
    initialized) on exit."""
    if not enabled:
        yield
        return
    state = pyro.util.get_rng_state()
    devices = range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            pyro.util.set_rng_state(state)


class _NestingProbe(Messenger):
    """Records the deepest plate dim and the largest batch rank of sites and costs. Draws
    each latent site's value as its estimator would hand it to the program (e.g. one-hot
    for a relaxed Categorical), without sample dims."""

    def __init__(self, default_estimator: Optional[Estimator]) -> None:
        super().__init__()
        self.default_estimator = default_estimator
        self.nesting = 0
        self.values: dict = {}
        self._outer: list = []

    def __enter__(self):
        result = super().__enter__()
        self._outer = outer_config_handlers(self)
        return result

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or msg["done"] or type(msg["fn"]) is _Subsample:
            return
        estimator = resolve_site(msg, self.default_estimator, self._outer).estimator
        estimator.check(msg["name"], msg["fn"])
        msg["value"] = estimator.example_value(msg["fn"])
        msg["done"] = True
        self.values[msg["name"]] = (estimator, msg["fn"], msg["value"])

    def _postprocess_message(self, msg) -> None:
        if msg["type"] == "sample" and type(msg["fn"]) is not _Subsample:
            rank = len(msg["fn"].batch_shape)
        elif msg["type"] == "storch_cost":
            rank = msg["value"].dim()
        else:
            return
        dims = [-frame.dim for frame in msg["cond_indep_stack"] if frame.dim is not None]
        self.nesting = max([self.nesting, rank] + dims)


def _raise_not_finite(runs) -> None:
    for run in runs:
        raise_if_not_finite(run)
    raise NonFiniteCostError(
        "the loss is not finite although every cost and score is; a baseline or "
        "control variate may have diverged: lower the learning rate, or check the baselines' "
        "state in the param store (pyro.get_param_store())."
    )


__all__ = ["StorchELBO"]
