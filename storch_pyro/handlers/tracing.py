"""The internal messenger :class:`~storch_pyro.StorchELBO` installs around the guide and model.

In one pass it draws every stochastic site with its estimator (allocating a sample dim left
of all plates for sites with ``n_samples > 1``, as Pyro allocates enumeration dims), replays
guide values into the model, and records what the surrogate loss needs: the score term of
each stochastic node, and every cost with its plates and its position in execution order.
"""

from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

import torch
from pyro.distributions import Independent, MaskedDistribution
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK, Message
from pyro.poutine.subsample_messenger import _Subsample

from storch_pyro.baselines import Baseline, _PyroAnnotation
from storch_pyro.contraction import Chain
from storch_pyro.errors import MaskShapeError, StorchError
from storch_pyro.estimators.base import Estimator
from storch_pyro.estimators.enumeration import Enumerate
from storch_pyro.estimators.pathwise import Pathwise
from storch_pyro.estimators.score_function import ScoreFunction
from storch_pyro.handlers.config import (
    BaselineMessenger,
    EstimatorMessenger,
    _SiteConfigMessenger,
)
from storch_pyro.site_options import INFER_KEY

#: A frame key: (name, dim, counter); dim is None for sequential plates.
FrameKey = Tuple[str, Optional[int], int]
SAMPLE_FRAME_PREFIX = "storch_pyro.samples:"
#: ``msg["infer"]`` key of sample sites and costs that a :func:`~storch_pyro.handlers.sequence`
#: draws and records itself (:class:`StorchMessenger` skips them; the sequence registers one
#: node and its costs through :meth:`StorchMessenger.record_cost` when it closes).
SEQUENCE_KEY = "storch_pyro.sequence"

_DEFAULT_PATHWISE = Pathwise()
_DEFAULT_SCORE_FUNCTION = ScoreFunction()


class NeedsPlateNesting(Exception):
    """Raised (and caught by the loss) when a sample dim is needed before
    ``max_plate_nesting`` is known."""


@dataclass(slots=True)
class Node:
    """A stochastic site whose score term :math:`l_z` (``score``, ``None`` without one),
    baseline or control term enters the surrogate. ``log_prob`` gives its batch shape: its
    plates and the dims of every sample frame in ``ordinal`` (see :meth:`Run.on_frames`)."""

    name: str
    score: Optional[torch.Tensor]
    log_prob: torch.Tensor
    ordinal: FrozenSet[FrameKey]
    seq: tuple
    index: int
    estimator: Estimator
    baseline: Optional[Baseline]
    fn: Any
    state: Any
    sample_dim: Optional[int]
    own_frame: Optional[FrameKey]
    weight: Any
    #: With credit by data flow, the earlier nodes its distribution can depend on
    #: (:mod:`storch_pyro.data_flow`); ``None`` with credit by order (all earlier nodes).
    deps: Optional[FrozenSet[int]] = None
    #: Where the site's own cost is ``sign * scale * mask * log q(z)`` of its sampling
    #: distribution: the (detached) factor ``sign * scale * mask`` (see
    #: :func:`~storch_pyro.surrogate.surrogate_loss`); ``None`` elsewhere.
    direct: Optional[torch.Tensor] = None


@dataclass(slots=True)
class Cost:
    """A cost ``sign * value`` (to minimize), reduced to its plate and sample dims."""

    name: str
    value: torch.Tensor
    sign: float
    ordinal: FrozenSet[FrameKey]
    seq: tuple
    n_before: int
    weight: Any
    #: With credit by data flow, the nodes the cost can depend on; ``None`` with credit by
    #: order (the ``n_before`` nodes drawn before it).
    deps: Optional[FrozenSet[int]] = None


class Run:
    """What one particle's guide and model passes record."""

    def __init__(
        self,
        default_estimator: Optional[Estimator],
        first_sample_dim: Optional[int],
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
    ) -> None:
        self.default_estimator = default_estimator
        self.next_sample_dim = first_sample_dim
        self.max_plate_nesting = None if first_sample_dim is None else -first_sample_dim - 1
        self.args = args
        self.kwargs = kwargs
        self.nodes: List[Node] = []
        self.costs: List[Cost] = []
        self.sample_frames: List[Tuple[int, int, FrameKey]] = []
        #: Weight of each sample frame's samples: 1/k, or a tensor along its dim.
        self.frame_weights: Dict[FrameKey, Any] = {}
        #: Plates a cost must be in to carry a sample frame with per-plate-index weights.
        self.frame_plates: Dict[FrameKey, FrozenSet[FrameKey]] = {}
        self.guide_values: Dict[str, torch.Tensor] = {}
        #: Where a relaxed value stands in for a discrete one: the value densities see.
        self.density_values: Dict[str, torch.Tensor] = {}
        #: Sites whose estimator computes their log-densities itself: (estimator, state).
        self.density_owners: Dict[str, Tuple[Estimator, Any]] = {}
        #: Each site drawn so far: (estimator, distribution), for error messages.
        self.drawn: Dict[str, Tuple[Estimator, Any]] = {}
        #: Each pass's sample messages (by role), for Pyro's checks on validated steps.
        self.messages: Dict[str, List[Message]] = {}
        #: The first mask that did not broadcast to its site's log-density, raised after
        #: the model has run (see :meth:`raise_deferred`).
        self.deferred_error: Optional[Exception] = None
        #: Credit by data flow: the provenance of the run's tensors
        #: (:class:`~storch_pyro.data_flow.DataFlow`); ``None`` for credit by order.
        self.flow: Any = None
        #: The enumerated sites drawn inside ``pyro.markov`` in a pure stochastic
        #: computation graph, contracted by variable elimination
        #: (:mod:`storch_pyro.contraction`); ``None`` until the first one.
        self.chain: Optional[Chain] = None

    def raise_deferred(self) -> None:
        """Raises the error recorded for a mask of the wrong shape, if any.

        Pyro's losses compute log-densities (and apply masks) only after the guide and
        the model have run, so an error the program raises itself comes first, e.g.
        ``pyro.sample(..., obs_mask=)``'s ``Invalid obs_mask shape``. StorchELBO records
        each site as it runs; it defers a mask error to this point so that the same error
        comes first."""
        if self.deferred_error is not None:
            raise self.deferred_error

    def structure(self) -> tuple:
        """The sequence of cost and stochastic-site names: what identifies a model
        structure between steps."""
        return tuple(cost.name for cost in self.costs) + tuple(n.name for n in self.nodes)

    def check_batch_shape(
        self, site: str, batch_shape: torch.Size, n_samples: int, stack=()
    ) -> None:
        """Dims of a site left of ``max_plate_nesting`` must be earlier sites' sample dims:
        anything else (a plate in ``stack``, an undeclared batch dim) would silently mix
        with them."""
        if self.max_plate_nesting is None:
            return
        for frame in stack:
            if frame.dim is not None and -frame.dim > self.max_plate_nesting:
                raise StorchError(
                    f"site '{site}': plate '{frame.name}' is at dim {frame.dim}, left of "
                    f"max_plate_nesting={self.max_plate_nesting}, where sample dims of "
                    f"multi-sample sites go (plate stack overflow). Raise "
                    f"StorchELBO(max_plate_nesting=...) to at least {-frame.dim}, or leave "
                    f"it out to have it guessed."
                )
        sizes = {dim: size for dim, size, _ in self.sample_frames}
        for dim in range(-len(batch_shape), -self.max_plate_nesting):
            size = batch_shape[dim]
            if size != 1 and sizes.get(dim) != size:
                raise StorchError(
                    f"site '{site}': its batch shape {tuple(batch_shape)} has size {size} at "
                    f"dim {dim}, left of max_plate_nesting={self.max_plate_nesting}, where "
                    f"sample dims of multi-sample sites go"
                    + (f" (this site asks for n_samples={n_samples})" if n_samples > 1 else "")
                    + ". Declare batch dims with pyro.plate, or raise "
                    "StorchELBO(max_plate_nesting=...)."
                )

    def allocate_sample_dim(self, site: str, n_samples: int) -> Tuple[int, FrameKey]:
        if self.next_sample_dim is None:
            raise NeedsPlateNesting(site)
        dim = self.next_sample_dim
        self.next_sample_dim -= 1
        key = (SAMPLE_FRAME_PREFIX + site, dim, 0)
        self.sample_frames.append((dim, n_samples, key))
        self.frame_weights[key] = 1.0 / n_samples
        return dim, key

    def allocate_chain_dim(
        self, site: str, n_samples: int, scope, log: bool
    ) -> Tuple[int, FrameKey]:
        """A sample dim for an enumerated site inside ``pyro.markov``: recycled from a
        site out of its window where one is free (:meth:`Chain.allocate`)."""
        if self.next_sample_dim is None:
            raise NeedsPlateNesting(site)
        if self.chain is None:
            self.chain = Chain(log)

        def new_dim() -> int:
            dim = self.next_sample_dim
            self.next_sample_dim -= 1
            return dim

        dim, key, fresh = self.chain.allocate(site, scope, new_dim)
        if not fresh:
            self.sample_frames = [frame for frame in self.sample_frames if frame[0] != dim]
        self.sample_frames.append((dim, n_samples, key))
        return dim, key

    def weight_of(self, ordinal) -> Any:
        """Product of the sample weights of the sample frames in ``ordinal``."""
        weight = 1.0
        for key in ordinal:
            frame_weight = self.frame_weights.get(key)
            if frame_weight is not None:
                weight = weight * frame_weight
        return weight

    def on_frames(self, tensor: torch.Tensor, ordinal) -> torch.Tensor:
        """``tensor`` expanded (a view) to the sizes of the sample frames in ``ordinal``.

        A site's ordinal may hold a frame whose dim its own values lack: with ``a`` drawn
        ``k`` times, ``b`` enumerated (its support unexpanded, its weights
        :math:`q(b \\mid a_i)` along both dims) and ``c`` drawn per value of ``b``, the
        weights of ``c``'s samples carry ``a``'s dim although ``c``'s log-density does not.
        ``c``'s downstream costs differ along that dim, so its baseline and control terms
        are computed on the expanded shape and weighted there by
        :math:`\\tfrac1k\\, q(b \\mid a_i)`."""
        shape = list(tensor.shape)
        for dim, size, key in self.sample_frames:
            if key in ordinal:
                if len(shape) < -dim:
                    shape = [1] * (-dim - len(shape)) + shape
                shape[dim] = size
        return tensor if tensor.shape == tuple(shape) else tensor.expand(shape)

    def frames_of(self, tensor: torch.Tensor, stack, site: str = "") -> Tuple[Any, tuple, Any]:
        """(ordinal, sequential frames, sample weight) of a tensor recorded at a site: the
        sample frames whose dims the tensor has, and those whose dims the weights of these
        have (an enumerated site's weights q(z | g) depend on an upstream sample of g even
        where a cost of z does not)."""
        keys = [(f.name, f.dim, f.counter) for f in stack]
        weight = 1.0
        if self.sample_frames:
            plates = frozenset(keys)
            included = []
            shapes = [tensor.shape]
            chain = self.chain
            chain_dims: List[int] = []
            marginal_dims: List[int] = []
            marginal = None
            while shapes:
                shape = shapes.pop()
                for dim, size, key in self.sample_frames:
                    if key in included or len(shape) < -dim or shape[dim] == 1:
                        continue
                    included.append(key)
                    if chain is not None and chain.is_live(key):
                        chain_dims.append(dim)
                    else:
                        frame_weight = self.frame_weights[key]
                        weight = weight * frame_weight
                        if isinstance(frame_weight, torch.Tensor):
                            shapes.append(frame_weight.shape)
                    needed = self.frame_plates.get(key)
                    if needed is not None and not needed <= plates:
                        raise StorchError(
                            f"site '{site}' depends on the samples of "
                            f"'{key[0][len(SAMPLE_FRAME_PREFIX):]}', whose sample weights "
                            f"differ across the indices of plate(s) "
                            f"{sorted(k[0] for k in needed - plates)}, outside those plates. "
                            f"Move '{site}' inside them, or give that site an estimator that "
                            f"samples (e.g. ScoreFunction)."
                        )
                if not shapes and len(chain_dims) > len(marginal_dims) and not chain.log:
                    # The belief over the chain dims may bring in frames it is
                    # conditioned on, whose weights may bring in more chain dims.
                    marginal_dims = list(chain_dims)
                    marginal = chain.marginal(marginal_dims)
                    shapes.append(marginal.shape)
            if chain_dims and not chain.log:
                weight = weight * marginal
                version = chain.version_key()
                if version is not None:
                    included.append(version)
            keys.extend(included)
        seq = tuple((f.name, f.counter) for f in stack if f.dim is None)
        return frozenset(keys), seq, weight


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
        self._pending: Dict[str, Tuple[Estimator, Optional[Baseline], Optional[int], Any]] = {}

    def __exit__(self, *args, **kwargs):
        chain = self.run.chain
        if args and args[0] is None and chain is not None and chain.log and self.role == "model":
            # The model's enumerated sites, summed out: one cost -log sum_z p(x, z).
            value = chain.finish()
            if value is not None:
                name = chain.first_site + ":marginal"
                chain.log = False  # recorded as a plain cost
                ordinal, seq, weight = self.run.frames_of(value, chain.stack, name)
                # Credit by order (every guide site's score), also under credit="data_flow".
                self._add_cost(name, value, chain.scale, 1.0, ordinal, seq, weight,
                               chain.stack, by_order=True)
                chain.log = True
        return super().__exit__(*args, **kwargs)

    # ---- drawing -------------------------------------------------------------------------
    def _pyro_sample(self, msg: Message) -> None:
        name = msg["name"]
        if self.role == "model":
            if not msg["is_observed"] and name in self.run.guide_values:
                msg["value"] = self.run.guide_values[name]
                msg["done"] = True
                for handler in _PYRO_STACK:
                    if isinstance(handler, _SiteConfigMessenger):
                        handler.replayed.add(name)
                return
        if msg["is_observed"] or msg["done"] or type(msg["fn"]) is _Subsample:
            return
        estimator, baseline = resolve_site(msg, self.run.default_estimator)
        fn = msg["fn"]
        self.run.drawn[name] = (estimator, fn)
        estimator.check(name, fn)
        k = estimator.sample_size(fn)
        sample_dim = None
        own_frame = None
        sample_shape: Tuple[int, ...] = ()
        if k > 1 or self.run.sample_frames:
            self.run.check_batch_shape(
                name, fn.batch_shape, estimator.n_samples, msg["cond_indep_stack"]
            )
        scope = msg["infer"].get("_markov_scope")
        if self.run.chain is not None:
            self.run.chain.check_inputs(name, fn.batch_shape, scope)
        if (k > 1 and type(estimator) is Enumerate
                and (self.role == "model"
                     or (self.role == "scg" and scope is not None and self.run.flow is None))):
            # A model's enumerated sites (ELBO mode) are summed out of p(x, z), as
            # TraceEnum_ELBO does; a pure SCG's are contracted along pyro.markov.
            sample_dim, own_frame = self.run.allocate_chain_dim(
                name, k, scope, self.role == "model"
            )
            # A recycled dim may lie right of the dims of the site's batch shape.
            support = fn.enumerate_support(expand=False)
            msg["value"] = support.reshape(
                (k,) + (1,) * (-sample_dim - 1) + support.shape[1 + len(fn.batch_shape):]
            )
            msg["done"] = True
            if self.role == "model":  # summed out, as Pyro marks model-side enumeration
                msg["infer"]["_enumerate_dim"] = sample_dim
            self._pending[name] = (estimator, baseline, sample_dim, own_frame, None)
            return
        if k > 1:
            sample_dim, own_frame = self.run.allocate_sample_dim(name, k)
            batch_rank = len(fn.batch_shape)
            room = -sample_dim - 1
            if batch_rank > room:  # only leading dims of size 1 can reach that far
                raise StorchError(
                    f"site '{name}': its batch shape {tuple(fn.batch_shape)} has more dims "
                    f"than max_plate_nesting={self.run.max_plate_nesting} plus earlier sample "
                    f"dims; squeeze its leading dims of size 1."
                )
            sample_shape = (k,) + (1,) * (room - batch_rank)
        msg["value"], state = estimator.draw_site(name, fn, sample_shape)
        msg["done"] = True
        self._pending[name] = (estimator, baseline, sample_dim, own_frame, state)

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
        log_prob = None
        density_value = value
        if pending is not None:
            log_prob = pending[0].log_density(fn, value, pending[4])
            if log_prob is not None:
                run.density_owners[name] = (pending[0], pending[4])
            else:
                density_value = pending[0].density_value(fn, value, pending[4])
                if density_value is not value:
                    run.density_values[name] = density_value
        else:
            density_value = run.density_values.get(name, value) if self.role == "model" else value
            owner = run.density_owners.get(name) if self.role == "model" else None
            if owner is not None:
                log_prob = owner[0].log_density(fn, value, owner[1])
        owned = log_prob is not None  # an estimator's own log-density (it handles masks)
        if not owned:
            try:
                log_prob = fn.log_prob(density_value)
            except ValueError as error:  # as poutine.trace reports it, naming the site
                raise ValueError(
                    f"Error while computing log_prob at site '{name}':\n{error}\nCheck that "
                    f"the value (observed data, or the guide's sample) is in the support of "
                    f"the site's distribution, with a shape that broadcasts to its batch shape."
                ) from error
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
            estimator, baseline, sample_dim, own_frame, state = pending
            # A mask removes log-density terms from the costs, never the expectation over
            # the site: the score term and sample weights use the unmasked density (as
            # Pyro's ScoreParts.scale_and_mask leaves score_function unmasked).
            unmasked = log_prob if owned else _unmasked_log_prob(fn, density_value, log_prob)
            if own_frame is not None:
                weights = estimator.sample_weights(fn, value, unmasked, state)
                if weights is not None:
                    if run.chain is not None and run.chain.is_live(own_frame):
                        chain = run.chain
                        if "_markov_depth" in msg["infer"]:
                            chain.note_site(name, msg["infer"]["_markov_depth"], value,
                                            fn.event_dim)
                        if not chain.log:
                            chain.extend(name, weights, stack)
                            return  # in a pure SCG: neither a node nor a cost
                        if chain.plates is None:
                            chain._check_plates(name, stack, "enumerated")
                        # In a model: a factor of p(x, z), as TraceEnum_ELBO, unmasked.
                        self._add_cost(name, unmasked, msg["scale"], -1.0, None, (), 1.0,
                                       stack)
                        return
                    else:
                        run.frame_weights[own_frame] = weights
                    varying = frozenset(
                        (f.name, f.dim, f.counter) for f in stack if f.dim is not None
                        and weights.dim() >= -f.dim and weights.shape[f.dim] > 1
                    )
                    if varying:
                        run.frame_plates[own_frame] = varying
            ordinal, seq, weight = run.frames_of(log_prob, stack, name)
            if self.role == "guide":
                run.guide_values[name] = value
            flow = run.flow
            deps = None
            if flow is not None:
                # What the site's distribution (and so its value) can depend on.
                provenance = flow.of((log_prob, unmasked, value, weight))
                deps = flow.resolve(provenance, len(run.nodes), name)
            chain = run.chain
            if chain is not None and "_markov_depth" in msg["infer"]:
                chain.note_site(name, msg["infer"]["_markov_depth"], value, fn.event_dim)
            if chain is not None and chain.log and chain.carries(unmasked) and not (
                    own_frame is not None and chain.is_live(own_frame)):
                raise StorchError(
                    f"site '{name}' is drawn per value of enumerated model sites (summed "
                    f"out of the model's joint density), which only enumerated sites can "
                    f"be. Enumerate '{name}' too, or draw it in the guide."
                )
            if chain is not None and self.role == "scg" and chain.carries(unmasked):
                # Drawn per value of enumerated chain sites: the score joins the belief.
                _check_foldable(name, estimator, baseline)
                if estimator.has_score:
                    chain.fold(name, estimator.score_term(fn, value, unmasked, state), stack)
                return
            if estimator.has_score or estimator.has_control_term:
                score = None
                if estimator.has_score:
                    score = estimator.score_term(fn, value, unmasked, state)
                direct = None
                if (flow is not None and type(estimator) is ScoreFunction
                        and self.role != "scg" and not owned
                        and density_value is value
                        and not isinstance(run.frame_weights.get(own_frame), torch.Tensor)):
                    sign = 1.0 if self.role == "guide" else -1.0
                    direct = scale_and_mask(torch.full_like(log_prob, sign), msg["scale"],
                                            msg["mask"]).detach()
                run.nodes.append(
                    Node(name, score, run.on_frames(masked, ordinal), ordinal, seq,
                         len(run.nodes), estimator,
                         baseline, fn, state, sample_dim, own_frame, weight, deps, direct)
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
        value = msg["value"]
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"add_cost('{msg['name']}'): the cost must be a tensor, got {type(value)}"
            )
        stack = msg["cond_indep_stack"]
        _check_cost_shape(msg["name"], value, stack)
        value = scale_and_mask(value, 1.0, msg["mask"])
        ordinal, seq, weight = self.run.frames_of(value, stack, msg["name"])
        self._add_cost(msg["name"], value, msg["scale"], 1.0, ordinal, seq, weight, stack)

    def record_cost(self, name: str, value: torch.Tensor, scale: Any, stack) -> None:
        """Records an ``add_cost`` cost (already masked) with the frames of ``value``: the hook
        through which a :func:`~storch_pyro.handlers.sequence` adds the costs computed inside
        it once its node is registered (so its score term multiplies them)."""
        ordinal, seq, weight = self.run.frames_of(value, stack, name)
        self._add_cost(name, value, scale, 1.0, ordinal, seq, weight, stack)

    def _add_cost(self, name, value, scale, sign, ordinal, seq, weight, stack,
                  deps=None, by_order: bool = False) -> None:
        run = self.run
        chain = run.chain
        if chain is not None and chain.log and chain.carries(value):
            chain.add_factor(name, -sign * value, scale, stack)
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


def resolve_site(
    msg: Message, default_estimator: Optional[Estimator]
) -> Tuple[Estimator, Optional[Baseline]]:
    """The site's estimator and baseline, by the precedence rules of
    :func:`storch_pyro.handlers.estimator` and :func:`storch_pyro.handlers.baseline`."""
    configs = [h for h in reversed(_PYRO_STACK) if isinstance(h, _SiteConfigMessenger)]
    for handler in configs:
        handler.drawn.add(msg["name"])
    options = msg["infer"].get(INFER_KEY)
    estimator = options.estimator if options is not None else None
    baseline = options.baseline if options is not None else None
    explicit_baseline = baseline is not None
    if estimator is None:
        for handler in configs:
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
    if baseline is None:
        baseline = estimator.baseline
        explicit_baseline = baseline is not None
    if baseline is None and "baseline" in msg["infer"]:
        # Like TraceGraph_ELBO, ignore the annotation where there is no score term.
        baseline = _annotated_baseline(msg)
    if baseline is None:
        for handler in configs:
            if type(handler) is BaselineMessenger:
                baseline = handler.lookup(msg)
                if baseline is not None:
                    explicit_baseline = isinstance(handler.config, dict)
                    break
    if baseline is not None:
        if not (estimator.has_score and estimator.accepts_baseline):
            if explicit_baseline:
                reason = (
                    "has a built-in baseline" if estimator.has_score
                    else "has no score-function term for it to apply to"
                )
                raise StorchError(
                    f"site '{msg['name']}': a baseline was given, but its estimator "
                    f"{type(estimator).__name__} {reason}. Remove the baseline or use e.g. "
                    f"ScoreFunction."
                )
            baseline = None
        else:
            baseline.check(msg["name"], estimator.n_samples)
    return estimator, baseline

def _check_foldable(name: str, estimator: Estimator, baseline: Optional[Baseline]) -> None:
    """A sampled site drawn per value of enumerated chain sites enters the chain's belief
    by its score term alone (:meth:`Chain.fold`)."""
    if baseline is not None or estimator.has_control_term:
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


def _mask_shape_error(name: str, mask: torch.Tensor, log_prob: torch.Tensor) -> MaskShapeError:
    return MaskShapeError(
        f"site '{name}': its mask of shape {tuple(mask.shape)} (from poutine.mask, or "
        f"pyro.sample(..., obs_mask=)) does not broadcast to the shape "
        f"{tuple(log_prob.shape)} of its log-density (the site's batch shape). Give a mask "
        f"with one value per batch element (no event dims), broadcastable to "
        f"{tuple(log_prob.shape)}."
    )


def _unmasked_log_prob(fn, value: torch.Tensor, log_prob: torch.Tensor) -> torch.Tensor:
    """``log_prob`` of ``fn`` at ``value`` without the masks of any
    :class:`~pyro.distributions.MaskedDistribution` in ``fn`` (``fn.mask(...)``), reusing
    ``log_prob`` when ``fn`` has none."""
    unmasked = _without_masks(fn)
    return log_prob if unmasked is fn else unmasked.log_prob(value)


def _without_masks(fn):
    if isinstance(fn, MaskedDistribution):
        return _without_masks(fn.base_dist)
    if isinstance(fn, Independent):
        base = _without_masks(fn.base_dist)
        return fn if base is fn.base_dist else Independent(base, fn.reinterpreted_batch_ndims)
    return fn


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
    sample_dims = {dim for dim, _, _ in run.sample_frames}
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
