"""The internal messenger :class:`~storch_pyro.StorchELBO` installs around the guide and model.

In one pass it draws every stochastic site with its estimator (allocating a sample dim left
of all plates for sites with several values, as Pyro allocates enumeration dims), replays
guide values into the model, and records what the surrogate loss needs in a
:class:`~storch_pyro.handlers.records.Run`: the score term of each stochastic node, and
every cost with its plates and its position in execution order. Which estimator a site gets
is :mod:`storch_pyro.handlers.resolution`'s job.
"""

from typing import Any, Callable, Dict, List, Optional

import pyro
import torch
from pyro.distributions.torch_distribution import TorchDistributionMixin
from pyro.distributions.util import scale_and_mask
from pyro.poutine.broadcast_messenger import BroadcastMessenger
from pyro.poutine.markov_messenger import MarkovMessenger
from pyro.poutine.mask_messenger import MaskMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.plate_messenger import PlateMessenger
from pyro.poutine.runtime import _PYRO_STACK, Message, default_process_message
from pyro.poutine.scale_messenger import ScaleMessenger
from pyro.poutine.subsample_messenger import SubsampleMessenger, _Subsample

from storch_pyro.baselines import Baseline
from storch_pyro.contraction import Chain
from storch_pyro.errors import MaskShapeError, StorchError
from storch_pyro.estimators.base import (
    Draw,
    Estimator,
    Site,
    adds_terms,
    log_prob_error,
    without_masks,
)
from storch_pyro.estimators.enumeration import Enumerate, SumAndSample
from storch_pyro.handlers.config import (
    BaselineMessenger,
    EstimatorMessenger,
    _SiteConfigMessenger,
)
from storch_pyro.handlers.records import (
    SAMPLE_FRAME_PREFIX,
    SEQUENCE_KEY,
    Cost,
    FrameKey,
    Node,
    Run,
)
from storch_pyro.handlers.resolution import (
    SiteConfig,
    mark_replayed,
    outer_config_handlers,
    resolve_site,
)


class StorchMessenger(Messenger):
    """Draws, replays and records sites for one pass of a guide or model.

    :param Run run: the shared record of this particle.
    :param str role: ``"guide"`` (latent sites are stochastic nodes, cost :math:`+\\log q`),
        ``"model"`` (guide values are replayed, cost :math:`-\\log p`; latent sites absent
        from the guide are stochastic nodes) or ``"scg"`` (a model without guide: latent
        sites are stochastic nodes, costs are ``add_cost`` costs and :math:`-\\log p` of
        observed sites and factors).
    """

    def __init__(self, run: Run, role: str) -> None:
        super().__init__()
        self.run = run
        self.role = role
        self._messages = run.messages.setdefault(role, [])
        self._pending: Dict[str, tuple] = {}
        self._outer: List[_SiteConfigMessenger] = []

    def __enter__(self):
        result = super().__enter__()
        self._outer = outer_config_handlers(self)
        return result

    def __exit__(self, *args, **kwargs):
        chain = self.run.chain
        if chain is not None and chain.deferred and self.role == "guide":
            chain.end_guide()  # the model's costs come now (Chain.replay)
        model_chain = self.run.model_chain
        if args and args[0] is None and model_chain is not None and self.role == "model":
            # The model's enumerated sites, summed out: one cost -log sum_z p(x, z) (or one
            # per part, while a guide's chain is replayed: Chain.split).
            value = model_chain.finish()
            self._record_marginals(model_chain, [value] if value is not None else [])
            self._record_marginals(model_chain, model_chain.release(None))
        return super().__exit__(*args, **kwargs)

    def _record_marginals(self, model_chain: Chain, values: List[torch.Tensor]) -> None:
        """Records terms of :math:`-\\log \\sum_z p(x, z)` (no live enumerated model site
        left in them) as costs, weighted by the guide chain's marginals where they carry its
        dims."""
        name = model_chain.first_site + ":marginal"
        for value in values:
            ordinal, seq, weight = self.run.frames_of(value, model_chain.stack, name)
            # Credit by order (every guide site's score), also under credit="data_flow".
            self._add_cost(name, value, model_chain.scale, 1.0, ordinal, seq, weight,
                           model_chain.stack, by_order=True)
            model_chain.summed_costs.add(len(self.run.costs) - 1)

    # ---- drawing -------------------------------------------------------------------------
    def _pyro_sample(self, msg: Message) -> None:
        name = msg["name"]
        run = self.run
        if self.role == "model":
            if not msg["is_observed"] and name in run.guide_values:
                msg["value"] = run.guide_values[name]
                msg["done"] = True
                mark_replayed(msg)
                if run.chain is not None and run.chain.replaying:
                    frame = run.chain.frames.get(name)
                    model_chain = run.model_chain
                    if frame is not None and model_chain is not None:
                        # Terms of -log sum_w p(x, z, w) complete before its dim is retaken.
                        scope = msg["infer"].get("_markov_scope")
                        self._record_marginals(model_chain, model_chain.release(scope))
                        owner = run.chain.owners.get(frame[0])
                        if owner is not None and owner[0] != name:
                            model_chain.check_split(frame[0], name, owner[0])
                    frame = run.chain.replay(name)
                    if frame is not None:
                        run.use_chain_frame(*frame)
                return
        if msg["is_observed"] or msg["done"] or type(msg["fn"]) is _Subsample:
            return
        config = resolve_site(msg, run.default_estimator, self._outer)
        estimator = config.estimator
        fn = msg["fn"]
        run.drawn[name] = (estimator, fn)
        estimator.check(name, fn)
        stack = msg["cond_indep_stack"]

        def check_batch_shape() -> None:
            run.check_batch_shape(name, fn.batch_shape, estimator.n_samples, stack)

        if run.live_frames:
            check_batch_shape()
        site = Site(name, fn, run.next_sample_dim, run.max_plate_nesting, run.args, run.kwargs,
                    None if run.live_frames else check_batch_shape)
        scope = msg["infer"].get("_markov_scope")
        if run.chain is not None:
            run.chain.check_inputs(name, fn.batch_shape, scope)
        if run.model_chain is not None:
            run.model_chain.check_inputs(name, fn.batch_shape, scope)
        if (type(estimator) is Enumerate
                and (self.role == "model"
                     or scope is not None)):
            # A model's enumerated sites (ELBO mode) are summed out of p(x, z), as
            # TraceEnum_ELBO does; a pure SCG's or a guide's are contracted along
            # pyro.markov (a guide's after the model has run: Chain.replay).
            support = fn.enumerate_support(expand=False)
            k = support.shape[0]
            if k > 1:
                if not run.live_frames:
                    check_batch_shape()
                if run.chain is None and self.role == "guide":
                    run.chain = Chain(log=False)
                    run.chain.deferred = True
                sample_dim, own_frame = run.allocate_chain_dim(
                    name, k, scope, self.role == "model"
                )
                # A recycled dim may lie right of the dims of the site's batch shape.
                value = support.reshape(
                    (k,) + (1,) * (-sample_dim - 1) + support.shape[1 + len(fn.batch_shape):]
                )
                msg["value"] = value
                msg["done"] = True
                if self.role == "model":  # summed out, as Pyro marks model-side enumeration
                    msg["infer"]["_enumerate_dim"] = sample_dim
                site.sample_dim = sample_dim
                draw = Draw(value, size=k, weights=site.log_prob(value).exp())
                baseline = config.baseline_for(name, estimator, draw)
                self._pending[name] = (estimator, baseline, site, draw, own_frame)
                return
        if (run.chain is not None and not run.chain.replaying
                and type(estimator) is SumAndSample):
            _check_sum_and_sample_in_chain(name, fn.batch_shape, run.chain)
        draw = estimator.draw(site)
        baseline = config.baseline_for(name, estimator, draw)
        own_frame = None
        if draw.size > 1:
            site.sample_dim, own_frame = run.allocate_sample_dim(name, draw.size)
        else:
            site.sample_dim = None
        msg["value"] = draw.value
        msg["done"] = True
        self._pending[name] = (estimator, baseline, site, draw, own_frame)

    # ---- recording -----------------------------------------------------------------------
    def _pyro_post_sample(self, msg: Message) -> None:
        self._messages.append(msg)
        run = self.run
        name = msg["name"]
        fn = msg["fn"]
        value = msg["value"]
        if type(fn) is _Subsample:
            if self.role == "guide":
                run.guide_values[name] = value
            return
        if msg["infer"].get("_deterministic") or SEQUENCE_KEY in msg["infer"]:
            return
        pending = self._pending.pop(name, None)
        stack = msg["cond_indep_stack"]
        site = draw = None
        if pending is not None:
            estimator, baseline, site, draw, own_frame = pending
            density_value = value if draw.density_value is None else draw.density_value
            owner = draw.log_density
            if owner is not None:
                run.density_owners[name] = owner
            elif density_value is not value:
                run.density_values[name] = density_value
        else:
            density_value = run.density_values.get(name, value) if self.role == "model" else value
            owner = run.density_owners.get(name) if self.role == "model" else None
        owned = owner is not None  # an estimator's own log-density (it handles masks)
        if owned:
            log_prob = unmasked = owner(fn, value)
        elif site is not None and without_masks(fn) is fn:
            log_prob = unmasked = site.log_prob(density_value)  # the draw's, if it took it
        else:
            try:
                log_prob = fn.log_prob(density_value)
            except ValueError as error:  # as poutine.trace reports it, naming the site
                raise log_prob_error(name, error) from error
            # A mask removes log-density terms from the costs, never the expectation over
            # the site: the score term and sample weights use the unmasked density (as
            # Pyro's ScoreParts.scale_and_mask leaves score_function unmasked).
            unmasked = None if site is None else site.log_prob(density_value)
        try:
            masked = scale_and_mask(log_prob, 1.0, msg["mask"])
        except RuntimeError as error:
            if "must match the size" not in str(error):
                raise
            if run.deferred_error is None:
                run.deferred_error = _mask_shape_error(name, msg["mask"], log_prob)
                run.deferred_error.__cause__ = error
            if self.role == "guide":
                run.guide_values[name] = value
            return
        if pending is not None:
            chain = run.chain
            model_chain = run.model_chain
            if "_markov_depth" in msg["infer"]:
                for noted in (chain, model_chain):
                    if noted is not None:
                        noted.note_site(name, msg["infer"]["_markov_depth"], value,
                                        fn.event_dim)
            if own_frame is not None and draw.weights is not None:
                weights = draw.weights
                if model_chain is not None and model_chain.is_live(own_frame):
                    if model_chain.plates is None:
                        model_chain._check_plates(name, stack, "enumerated")
                    # In a model: a factor of p(x, z), as TraceEnum_ELBO, unmasked.
                    self._add_cost(name, unmasked, msg["scale"], -1.0, None, (), 1.0, stack)
                    return
                if chain is not None and chain.is_live(own_frame):
                    chain.extend(name, weights, stack)
                    if self.role == "scg":
                        return  # in a pure SCG: neither a node nor a cost
                    # In a guide: its cost log q(z | ...), weighted by the belief.
                    run.guide_values[name] = value
                    ordinal, seq, weight = run.frames_of(log_prob, stack, name)
                    self._add_cost(name, masked, msg["scale"], 1.0, ordinal, seq, weight, stack)
                    return
                run.set_frame_weights(own_frame, weights, stack)
            ordinal, seq, weight = run.frames_of(log_prob, stack, name)
            if self.role == "guide":
                run.guide_values[name] = value
            flow = run.flow
            deps = None
            if flow is not None:
                # What the site's distribution (and so its value) can depend on.
                provenance = flow.of((log_prob, unmasked, value, weight))
                deps = flow.resolve(provenance, len(run.nodes), name)
            if model_chain is not None and model_chain.carries(unmasked):
                raise StorchError(
                    f"site '{name}' is drawn per value of enumerated model sites (summed "
                    f"out of the model's joint density), which only enumerated sites can "
                    f"be. Enumerate '{name}' too, or draw it in the guide."
                )
            score = draw.score
            if chain is not None and chain.carries(unmasked):
                if chain.replaying:
                    raise StorchError(
                        f"site '{name}' of the model is drawn per value of the guide's "
                        f"enumerated sites (the pyro.markov chain that starts at "
                        f"'{chain.first_site}'), which only the guide's sites can be. Draw "
                        f"'{name}' in the guide."
                    )
                # Drawn per value of enumerated chain sites: the score joins the belief.
                _check_foldable(name, estimator, baseline)
                if score is not None:
                    chain.fold(name, score, stack)
                if flow is not None:  # what its value can depend on (no node of its own)
                    flow.tag(value, deps)
                    flow.tag(density_value, deps)
                if self.role == "scg":
                    return
                # In a guide: its cost log q(y | ...), weighted by the belief with its score.
                ordinal, seq, weight = run.frames_of(log_prob, stack, name)
                self._add_cost(name, masked, msg["scale"], 1.0, ordinal, seq, weight, stack)
                return
            if score is not None or adds_terms(estimator):
                direct = None
                if (flow is not None and score is unmasked and self.role != "scg"
                        and not isinstance(run.weights_of(own_frame), torch.Tensor)):
                    # the score is the site's own log-density: cancel the direct gradient
                    # of its cost (see surrogate._direct_term)
                    sign = 1.0 if self.role == "guide" else -1.0
                    direct = scale_and_mask(torch.full_like(log_prob, sign), msg["scale"],
                                            msg["mask"]).detach()
                run.nodes.append(
                    Node(name, score, run.on_frames(masked, ordinal), ordinal, seq,
                         len(run.nodes), estimator, baseline, site, draw, own_frame, weight,
                         deps, direct)
                )
                if deps is not None:
                    deps = deps | {len(run.nodes) - 1}
            if flow is not None:
                flow.tag(value, deps)
                flow.tag(density_value, deps)
            if self.role == "scg":
                return
            sign = 1.0 if self.role == "guide" else -1.0
            self._add_cost(name, masked, msg["scale"], sign, ordinal, seq, weight, stack, deps)
            return
        sign = 1.0 if self.role == "guide" else -1.0
        ordinal, seq, weight = run.frames_of(log_prob, stack, name)
        self._add_cost(name, masked, msg["scale"], sign, ordinal, seq, weight, stack)

    def _pyro_post_storch_cost(self, msg: Message) -> None:
        if SEQUENCE_KEY in msg["infer"]:
            return
        self.record_cost(msg["name"], checked_cost(msg), msg["scale"], msg["cond_indep_stack"])

    def record_cost(self, name: str, value: torch.Tensor, scale: Any, stack) -> None:
        """Records an ``add_cost`` cost (already masked) with the frames of ``value``: the hook
        through which a :func:`~storch_pyro.handlers.sequence` adds the costs computed inside
        it once its node is registered (so its score term multiplies them)."""
        ordinal, seq, weight = self.run.frames_of(value, stack, name)
        self._add_cost(name, value, scale, 1.0, ordinal, seq, weight, stack)

    def _add_cost(self, name, value, scale, sign, ordinal, seq, weight, stack,
                  deps=None, by_order: bool = False) -> None:
        run = self.run
        model_chain = run.model_chain
        if model_chain is not None and model_chain.carries(value):
            model_chain.add_factor(name, -sign * value, scale, stack)
            return
        if run.flow is not None and not by_order:
            provenance = run.flow.of((value, weight, scale))
            found = run.flow.resolve(provenance, len(run.nodes), name)
            deps = found if deps is None else deps | found
        value = _reduce_to_frames(value, stack, run)
        if not (isinstance(scale, float) and scale == 1.0):
            value = value * scale
        run.costs.append(
            Cost(name, value, sign, ordinal, seq, len(run.nodes), weight, deps)
        )


#: Messengers whose effect on an ``add_cost`` message :func:`record_cost_directly` knows:
#: plates (their frame, and the subsampling scale), ``poutine.scale``, ``poutine.mask``;
#: ``pyro.markov``, the estimator/baseline handlers and :class:`StorchMessenger` itself
#: do nothing to it before :meth:`StorchMessenger._pyro_post_storch_cost` records it.
_PLATES = (pyro.plate, PlateMessenger)
_ON_MESSAGE = (ScaleMessenger, MaskMessenger)
_PASSIVE = (MarkovMessenger, EstimatorMessenger, BaselineMessenger)


def record_cost_directly(name: str, value: torch.Tensor, fn: Callable) -> bool:
    """Records an ``add_cost`` cost without a pass through Pyro's ``apply_stack``, when
    every messenger on Pyro's stack is of a kind whose effect on the message is known
    (:data:`_PLATES`, :data:`_ON_MESSAGE`, :data:`_PASSIVE`, :class:`StorchMessenger`; see
    :func:`_known_stack`). Builds the message ``apply_stack`` would: each plate prepends
    its frame and multiplies the scale by its subsampling factor, ``poutine.scale`` and
    ``poutine.mask`` apply theirs (innermost first, as ``apply_stack``), then each
    :class:`StorchMessenger` records it (outermost first). Returns ``False``, having done
    nothing, where any other messenger is on the stack (a user's handler,
    ``poutine.trace``, ``poutine.block``, a :func:`~storch_pyro.handlers.sequence`): the
    caller then sends the message through ``apply_stack`` so that it sees it. Skips what
    ``apply_stack`` spends on messengers that ignore the message (a plate's
    ``BroadcastMessenger`` step, hook look-ups): about 40 % of an ``add_cost`` in
    profiles of the RL chain."""
    known = _known_stack()
    if known is None:
        return False
    if not known:
        return True  # nothing records it (the full path would also do nothing)
    stack = _PYRO_STACK
    msg = Message(
        type="storch_cost", name=name, fn=fn, is_observed=False, args=(value,), kwargs={},
        value=None, scale=1.0, mask=None, cond_indep_stack=(), done=False, stop=False,
        continuation=None, infer={},
    )
    for messenger in reversed(stack):
        kind = type(messenger)
        if kind in _PLATES:
            SubsampleMessenger._process_message(messenger, msg)  # broadcasting skips costs
        elif kind in _ON_MESSAGE:
            messenger._process_message(msg)
    msg["value"] = value
    msg["done"] = True
    for messenger in stack:
        if type(messenger) is StorchMessenger:
            messenger._pyro_post_storch_cost(msg)
    return True


def _known_stack() -> Optional[bool]:
    """``None`` where a messenger of a kind :func:`record_cost_directly` and
    :func:`sample_directly` do not know is on Pyro's stack (by exact type: a subclass may
    have hooks of its own); else whether a :class:`StorchMessenger` is."""
    storch = False
    for messenger in _PYRO_STACK:
        kind = type(messenger)
        if kind is StorchMessenger:
            storch = True
        elif not (kind in _PLATES or kind in _ON_MESSAGE or kind in _PASSIVE):
            return None
    return storch


def sample_directly(
    name: str, fn: Any, args: tuple, kwargs: Dict[str, Any]
) -> Optional[torch.Tensor]:
    """``pyro.sample(name, fn, *args, **kwargs)`` for a :func:`storch_pyro.sample` site
    under a :class:`StorchMessenger`, where every messenger on Pyro's stack is known (as
    for :func:`record_cost_directly`); ``None``, having done nothing, elsewhere (and with
    ``obs_mask``), where the caller calls ``pyro.sample``.

    The same message as ``pyro.sample``'s goes through the same hooks in ``apply_stack``'s
    order, with one difference: a plate's broadcasting step is skipped where it would
    replace the distribution by an equal one, i.e. where its batch shape already has each
    enclosing plate's size at the plate's dim and its class's ``expand`` is one of
    ``torch.distributions`` (which returns the same class with the same parameters; Pyro's
    generic ``expand`` would wrap it in an ``ExpandedDistribution``, so it is kept). The
    skipped ``expand`` is about a tenth of a site's time in a loop of small sites."""
    if kwargs.get("obs_mask") is not None or not _known_stack():
        return None
    kwargs = dict(kwargs)
    obs = kwargs.pop("obs", None)
    kwargs.pop("obs_mask", None)
    infer = kwargs.pop("infer", None)
    infer = {} if infer is None else infer.copy()
    is_observed = infer.pop("is_observed", obs is not None)
    msg = Message(
        type="sample", name=name, fn=fn, is_observed=is_observed, args=args, kwargs=kwargs,
        value=obs, infer=infer, scale=1.0, mask=None, cond_indep_stack=(), done=False,
        stop=False, continuation=None,
    )
    stack = _PYRO_STACK
    pointer = 0
    for messenger in reversed(stack):
        pointer += 1
        if type(messenger) in _PLATES:
            SubsampleMessenger._process_message(messenger, msg)
            if not _broadcast_is_identity(msg):
                BroadcastMessenger._pyro_sample(msg)
        else:
            messenger._process_message(msg)
        if msg["stop"]:
            break
    default_process_message(msg)
    for messenger in stack[-pointer:]:
        messenger._postprocess_message(msg)
    continuation = msg["continuation"]
    if continuation is not None:
        continuation(msg)
    return msg["value"]


#: Distribution classes whose ``expand`` is torch's (type- and parameter-preserving).
_TORCH_EXPAND: Dict[type, bool] = {}


def _broadcast_is_identity(msg: Message) -> bool:
    """Whether ``BroadcastMessenger._pyro_sample(msg)`` would leave the site's distribution
    as it is, up to an equal copy (see :func:`sample_directly`)."""
    fn = msg["fn"]
    if msg["done"] or not isinstance(fn, TorchDistributionMixin):
        return True  # it does nothing then
    kind = type(fn)
    torch_expand = _TORCH_EXPAND.get(kind)
    if torch_expand is None:
        torch_expand = _TORCH_EXPAND[kind] = getattr(
            kind.expand, "__module__", ""
        ).startswith("torch.distributions.")
    if not torch_expand:
        return False
    shape = fn.batch_shape
    for frame in msg["cond_indep_stack"]:
        if frame.dim is None or frame.size == -1:
            continue
        if len(shape) < -frame.dim or shape[frame.dim] != frame.size:
            return False
    return True


def _check_foldable(name: str, estimator: Estimator, baseline: Optional[Baseline]) -> None:
    """A sampled site drawn per value of enumerated chain sites enters the chain's belief
    by its score term alone (:meth:`Chain.fold`)."""
    if baseline is not None or adds_terms(estimator):
        what = (
            "a baseline" if baseline is not None
            else f"{type(estimator).__name__}'s control term"
        )
        raise StorchError(
            f"site '{name}' is drawn per value of enumerated sites of a pyro.markov chain "
            f"(contracted by variable elimination), where {what} is not supported. Use "
            f"ScoreFunction() without a baseline there, enumerate the site too, or draw it "
            f"outside pyro.markov."
        )


def _check_sum_and_sample_in_chain(name: str, batch_shape: torch.Size, chain: Chain) -> None:
    """Raises for a ``SumAndSample`` site drawn per value of an enumerated site whose dim
    the :class:`~storch_pyro.contraction.Chain` contracts (live in the chain): its ``k``
    values depend on that site's values, so they cannot be summed out of the belief and the
    dim could not be recycled. Drawn per value of a site that is not contracted (a
    ``SumAndSample`` or multi-sample step of a chain without ``Enumerate``), it keeps its own
    sample dim: exact and unbiased, the values growing as :math:`k^T` along a chain."""
    for dim, (parent, _) in chain.owners.items():
        if len(batch_shape) >= -dim and batch_shape[dim] > 1:
            raise StorchError(
                f"site '{name}' (SumAndSample) is drawn per value of site '{parent}', an "
                f"enumerated site of the pyro.markov chain that starts at "
                f"'{chain.first_site}' (contracted by variable elimination): its summed and "
                f"sampled values depend on the values of '{parent}', so they cannot be "
                f"contracted with it. Use Enumerate() there (exact, contracted along the "
                f"chain, linear in T) or ScoreFunction(), or make '{name}' independent of the "
                f"chain's enumerated sites."
            )


def _mask_shape_error(name: str, mask: torch.Tensor, log_prob: torch.Tensor) -> MaskShapeError:
    return MaskShapeError(
        f"site '{name}': its mask of shape {tuple(mask.shape)} (from poutine.mask, or "
        f"pyro.sample(..., obs_mask=)) does not broadcast to the shape "
        f"{tuple(log_prob.shape)} of its log-density (the site's batch shape). Give a mask "
        f"with one value per batch element (no event dims), broadcastable to "
        f"{tuple(log_prob.shape)}."
    )


def checked_cost(msg: Message) -> torch.Tensor:
    """An ``add_cost`` message's value, checked (a tensor, of its plates' shape) and masked."""
    name, value, stack = msg["name"], msg["value"], msg["cond_indep_stack"]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"add_cost('{name}'): the cost must be a tensor, got {type(value)}")
    _check_cost_shape(name, value, stack)
    return scale_and_mask(value, 1.0, msg["mask"])


def _check_cost_shape(name: str, value: torch.Tensor, stack) -> None:
    """An ``add_cost`` cost must have size 1 or the plate's size at each enclosing plate's
    dim (as a log-density must: Pyro's ``check_site_shape``)."""
    for frame in stack:
        dim = frame.dim
        if dim is not None and value.dim() >= -dim and value.shape[dim] not in (1, frame.size):
            raise StorchError(
                f"cost '{name}': its shape {tuple(value.shape)} has size {value.shape[dim]} at "
                f"dim {dim}, where plate '{frame.name}' has size {frame.size}. Compute the cost "
                f"per element of the plate (size {frame.size} or 1 at dim {dim}), or move "
                f"add_cost out of the plate."
            )


def _reduce_to_frames(value: torch.Tensor, stack, run: Run) -> torch.Tensor:
    """Sums a cost over dims that are neither plates nor sample dims, and broadcasts it
    over the plates it is in (a scalar cost inside ``plate(N)`` counts ``N`` times, as
    ``pyro.factor`` does)."""
    frame_dims = {f.dim: f.size for f in stack if f.dim is not None}
    sample_dims = run.live_frames
    extra = [
        d for d in range(-value.dim(), 0)
        if d not in frame_dims and d not in sample_dims and value.shape[d] != 1
    ]
    if extra:
        value = value.sum(extra, keepdim=True)
    if frame_dims:
        rank = max(value.dim(), -min(frame_dims))
        shape = [1] * (rank - value.dim()) + list(value.shape)
        for dim, size in frame_dims.items():
            shape[dim] = size if shape[dim] == 1 else shape[dim]
        if tuple(shape) != tuple(value.shape):
            value = value.expand(shape)
    return value


__all__ = [
    "SAMPLE_FRAME_PREFIX",
    "SEQUENCE_KEY",
    "Cost",
    "FrameKey",
    "Node",
    "Run",
    "SiteConfig",
    "StorchMessenger",
    "resolve_site",
]
