"""The record of one particle's run: its stochastic :class:`Node` s, its :class:`Cost` s and
its sample :class:`Frame` s (:class:`Run`), which :mod:`storch_pyro.surrogate` turns into the
loss."""

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Literal, Optional, Tuple

import torch
from pyro.poutine.runtime import Message

from storch_pyro.baselines import Baseline
from storch_pyro.contraction import Chain
from storch_pyro.errors import StorchError
from storch_pyro.estimators.base import Draw, Estimator, Site, Terms

#: A frame key: (name, dim, counter); dim is None for sequential plates.
FrameKey = Tuple[str, Optional[int], int]
SAMPLE_FRAME_PREFIX = "storch_pyro.samples:"
#: ``msg["infer"]`` key of sample sites and costs that a :func:`~storch_pyro.handlers.sequence`
#: draws and records itself (:class:`~storch_pyro.handlers.tracing.StorchMessenger` skips
#: them; the sequence registers one node and its costs through
#: :meth:`~storch_pyro.handlers.tracing.StorchMessenger.record_cost` when it closes).
SEQUENCE_KEY = "storch_pyro.sequence"

#: How a frame's values are reduced to the objective (see :class:`Frame`).
Reduction = Literal["mean", "weighted", "contracted", "log_mean_exp"]


@dataclass(slots=True, eq=False)
class Frame:
    r"""A sample frame: ``size`` values of one or more sites along a dim ``dim`` left of all
    plates, and how the objective reduces over them.

    For values :math:`v_1, \dots, v_k` of a quantity along the frame (a cost, the log weight
    of a particle), the ``reduction`` is

    - ``"mean"``: i.i.d. samples, :math:`\frac1k \sum_i v_i` (``weights`` is the float
      :math:`1/k`);
    - ``"weighted"``: a weighted sum :math:`\sum_i w_i v_i` with ``weights`` a tensor along
      ``dim`` (and along the plates in ``plates``): enumeration (:math:`w_i = q(z_i \mid
      \cdot)`, differentiated), samples without replacement or a sampled remainder (detached
      weights);
    - ``"contracted"``: an enumerated site inside ``pyro.markov``, whose weights live in the
      belief of a :class:`~storch_pyro.contraction.Chain` rather than on the frame
      (``weights`` is ``None``): a cost with chain dims :math:`D_c` is weighted by
      :math:`\sum_{z \notin D_c} B(z)`, variable elimination along the chain; the dim is
      recycled (``recycled_by``) once the site leaves every later site's markov window;
    - ``"log_mean_exp"``: importance-weighted particles,
      :math:`\log \frac1k \sum_i e^{v_i}` (IWELBO's bound over its particle frame).

    The frame's sites (``sites``) extend it in order: one site, or the steps of a
    :func:`~storch_pyro.handlers.sequence`, whose ``k`` rows are ``k`` joint samples of the
    whole sequence; where a step reorders the rows (beam search, a set without replacement,
    a growing enumeration), ``parents[t]`` holds each new row's parent row at step ``t``
    (``None``: row ``i`` extends row ``i``).

    Example::

        frame = Frame(("particles", -1, 0), dim=-1, size=3, reduction="log_mean_exp")
        frame.reduce(torch.tensor([-1.0, -2.0, -3.0]))  # log((e^-1 + e^-2 + e^-3) / 3)
    """

    key: FrameKey
    dim: int
    size: int
    reduction: Reduction = "mean"
    #: :math:`w`: the float :math:`1/k`, a tensor along ``dim``, or ``None`` (contracted).
    weights: Any = None
    #: The plates the weights vary along: a quantity carrying the frame must be inside them.
    plates: FrozenSet[FrameKey] = frozenset()
    #: The sites that extend the frame, in order.
    sites: List[str] = field(default_factory=list)
    #: Per step of a sequence: parent row of each row (``None``: the same row).
    parents: List[Optional[torch.Tensor]] = field(default_factory=list)
    #: The site whose frame took over this frame's dim (``pyro.markov`` recycling), if any.
    recycled_by: Optional[str] = None

    def __post_init__(self) -> None:
        if self.weights is None and self.reduction in ("mean", "log_mean_exp"):
            self.weights = 1.0 / self.size

    @property
    def site(self) -> str:
        """The site (or sequence) that opened the frame."""
        return self.key[0][len(SAMPLE_FRAME_PREFIX):] if self.key[0].startswith(
            SAMPLE_FRAME_PREFIX) else self.key[0]

    def set_weights(self, weights: torch.Tensor, stack=()) -> None:
        """Makes the frame ``"weighted"`` by ``weights`` (a tensor along its dim), noting the
        plates of ``stack`` along which they differ (see :attr:`plates`)."""
        self.reduction = "weighted"
        self.weights = weights
        rank = weights.dim()
        self.plates = frozenset(
            (f.name, f.dim, f.counter) for f in stack if f.dim is not None
            and rank >= -f.dim and weights.shape[f.dim] > 1
        )

    def reduce(self, values: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
        """``values`` reduced over the frame's dim by its :attr:`reduction`: the sum of the
        weighted values, or the log-mean-exp. A contracted frame is reduced by its chain's
        belief, not alone (``ValueError``)."""
        dim = self.dim
        if self.reduction == "contracted":
            raise ValueError(
                f"frame of '{self.site}' is contracted: reduce it with its Chain's belief "
                f"(Chain.marginal)"
            )
        if self.reduction == "log_mean_exp":
            if isinstance(self.weights, torch.Tensor):
                return torch.logsumexp(values + self.weights.log(), dim, keepdim=keepdim)
            return torch.logsumexp(values, dim, keepdim=keepdim) - math.log(self.size)
        if isinstance(self.weights, torch.Tensor):
            return (values * self.weights).sum(dim, keepdim=keepdim)
        return values.sum(dim, keepdim=keepdim) * self.weights


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
    #: The site as the estimator drew it (its distribution, sample dim, program arguments).
    site: Site
    #: What the estimator drew (:class:`~storch_pyro.estimators.base.Draw`).
    draw: Draw
    own_frame: Optional[FrameKey]
    weight: Any
    #: With credit by data flow, the earlier nodes its distribution can depend on
    #: (:mod:`storch_pyro.data_flow`); ``None`` with credit by order (all earlier nodes).
    deps: Optional[FrozenSet[int]] = None
    #: Where the site's own cost is ``sign * scale * mask * log q(z)`` of its sampling
    #: distribution: the (detached) factor ``sign * scale * mask`` (see
    #: :func:`~storch_pyro.surrogate.surrogate_loss`); ``None`` elsewhere.
    direct: Optional[torch.Tensor] = None
    #: What the estimator added to the surrogate (set when the surrogate is built).
    terms: Optional[Terms] = None

    @property
    def sample_dim(self) -> Optional[int]:
        """The dim of the site's own samples, or ``None``."""
        return self.site.sample_dim

    @property
    def fn(self) -> Any:
        """The site's distribution."""
        return self.site.fn


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
        #: Every sample frame opened in the run, in order (recycled ones included).
        self.frames: Dict[FrameKey, Frame] = {}
        #: The frames whose dims are in use, by dim, in the order they took their dim.
        self.live_frames: Dict[int, Frame] = {}
        #: (ordinal keys, plates, sequential frames) per plate stack (see :meth:`frames_of`).
        self._stacks: Dict[tuple, Tuple[FrozenSet[FrameKey], FrozenSet[FrameKey], tuple]] = {}
        self.guide_values: Dict[str, torch.Tensor] = {}
        #: Where a relaxed value stands in for a discrete one: the value densities see.
        self.density_values: Dict[str, torch.Tensor] = {}
        #: Sites whose estimator computes their log-densities itself: ``(fn, value) -> log p``.
        self.density_owners: Dict[str, Callable[[Any, torch.Tensor], torch.Tensor]] = {}
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
        #: computation graph or a guide, contracted by variable elimination
        #: (:mod:`storch_pyro.contraction`); ``None`` until the first one.
        self.chain: Optional[Chain] = None
        #: Ordinal of a cost carrying live chain dims -> their marginal (the factor of the
        #: cost's weight that :meth:`weight_of` lacks): the costs downstream of a site
        #: upstream of the chain are weighted by it (``surrogate._downstream_cost``).
        self.chain_marginals: Dict[FrozenSet[FrameKey], torch.Tensor] = {}
        #: A model's enumerated sites (with a guide), summed out of p(x, z) in log-space
        #: (split in parts while a guide's chain is replayed); ``None`` until the first one.
        self.model_chain: Optional[Chain] = None

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
        live = self.live_frames
        for dim in range(-len(batch_shape), -self.max_plate_nesting):
            size = batch_shape[dim]
            frame = live.get(dim)
            if size != 1 and (frame is None or frame.size != size):
                raise StorchError(
                    f"site '{site}': its batch shape {tuple(batch_shape)} has size {size} at "
                    f"dim {dim}, left of max_plate_nesting={self.max_plate_nesting}, where "
                    f"sample dims of multi-sample sites go"
                    + (f" (this site asks for n_samples={n_samples})" if n_samples > 1 else "")
                    + ". Declare batch dims with pyro.plate, or raise "
                    "StorchELBO(max_plate_nesting=...)."
                )

    def set_frame_weights(self, key: FrameKey, weights: torch.Tensor, stack) -> None:
        """Records the sample weights of a frame (a tensor along its dim), and the plates of
        ``stack`` along which they differ: a cost must be in those to carry the frame
        (:meth:`Frame.set_weights`)."""
        self.frames[key].set_weights(weights, stack)

    def weights_of(self, key: Optional[FrameKey]) -> Any:
        """The sample weights of the frame ``key`` (``None`` for a contracted frame or no
        frame)."""
        frame = self.frames.get(key)  # type: ignore[arg-type]
        return None if frame is None else frame.weights

    def allocate_sample_dim(
        self, site: str, n_samples: int, sites: Optional[List[str]] = None
    ) -> Tuple[int, FrameKey]:
        """A sample dim of size ``n_samples`` for ``site``, left of the earlier ones: a new
        :class:`Frame` (``"mean"`` of its samples until weights are set), extended by
        ``sites`` (default: ``site``)."""
        dim = self.next_sample_dim
        self.next_sample_dim -= 1
        key = (SAMPLE_FRAME_PREFIX + site, dim, 0)
        frame = Frame(key, dim, n_samples, sites=[site] if sites is None else sites)
        self.frames[key] = frame
        self.live_frames[dim] = frame
        return dim, key

    def allocate_chain_dim(
        self, site: str, n_samples: int, scope, log: bool
    ) -> Tuple[int, FrameKey]:
        """A sample dim for an enumerated site inside ``pyro.markov``: recycled from a
        site out of its window where one is free (:meth:`Chain.allocate`). Its frame is
        ``"contracted"``: its weights are in the chain's belief (``log``: the model's sum
        over p(x, z), :attr:`model_chain`; else :attr:`chain`)."""
        if log:
            if self.model_chain is None:
                self.model_chain = Chain(log=True)
                if self.chain is not None and self.chain.replaying:
                    self.model_chain.split()
            chain = self.model_chain
        else:
            if self.chain is None:
                self.chain = Chain(log=False)
            chain = self.chain

        def new_dim() -> int:
            dim = self.next_sample_dim
            self.next_sample_dim -= 1
            return dim

        dim, key, fresh = chain.allocate(site, scope, new_dim, n_samples)
        live = self.live_frames
        if not fresh:
            live.pop(dim).recycled_by = site
        frame = Frame(key, dim, n_samples, "contracted", sites=[site])
        self.frames[key] = frame
        live[dim] = frame
        return dim, key

    def use_chain_frame(self, dim: int, size: int, key: FrameKey) -> None:
        """The model replays a guide's chain site: its frame takes the dim it shares with
        the chain's other sites (:meth:`Chain.replay`)."""
        self.live_frames[dim] = self.frames[key]

    def weight_of(self, ordinal) -> Any:
        """Product of the sample weights of the sample frames in ``ordinal``."""
        weight = 1.0
        frames = self.frames
        for key in ordinal:
            frame = frames.get(key)
            if frame is not None and frame.weights is not None:
                weight = weight * frame.weights
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
        for frame in self.live_frames.values():
            if frame.key in ordinal:
                dim = frame.dim
                if len(shape) < -dim:
                    shape = [1] * (-dim - len(shape)) + shape
                shape[dim] = frame.size
        return tensor if tensor.shape == tuple(shape) else tensor.expand(shape)

    def _stack_keys(self, stack) -> Tuple[FrozenSet[FrameKey], tuple]:
        """(frame keys, sequential frames) of a plate stack, cached per stack."""
        keys = tuple([(f.name, f.dim, f.counter) for f in stack])
        cached = self._stacks.get(keys)
        if cached is None:
            seq = tuple((f.name, f.counter) for f in stack if f.dim is None)
            cached = self._stacks[keys] = (frozenset(keys), seq)
        return cached

    def frames_of(self, tensor: torch.Tensor, stack, site: str = "") -> Tuple[Any, tuple, Any]:
        """(ordinal, sequential frames, sample weight) of a tensor recorded at a site: the
        sample frames whose dims the tensor has, and those whose dims the weights of these
        have (an enumerated site's weights q(z | g) depend on an upstream sample of g even
        where a cost of z does not); for contracted frames, the weight is the chain's belief
        summed over the other live chain dims (:meth:`Chain.marginal`)."""
        plates, seq = self._stack_keys(stack)
        live = self.live_frames
        if not live or tensor.dim() <= self.max_plate_nesting:  # no sample dims
            return plates, seq, 1.0
        weight: Any = None
        included: List[FrameKey] = []
        shapes = [tensor.shape]
        chain = self.chain
        model_chain = self.model_chain
        chain_dims: List[int] = []
        n_marginal = 0
        marginal = None
        while shapes:
            shape = shapes.pop()
            rank = len(shape)
            for frame in live.values():
                dim = frame.dim
                if rank < -dim or shape[dim] == 1:
                    continue
                key = frame.key
                if key in included:
                    continue
                included.append(key)
                if frame.reduction == "contracted":  # a live chain frame
                    if model_chain is None or key not in model_chain.recycled:
                        chain_dims.append(dim)
                    # else: summed out of p(x, z) (a factor, not a weighted cost)
                else:
                    frame_weight = frame.weights
                    weight = frame_weight if weight is None else weight * frame_weight
                    if isinstance(frame_weight, torch.Tensor):
                        shapes.append(frame_weight.shape)
                needed = frame.plates
                if needed and not needed <= plates:
                    raise StorchError(
                        f"site '{site}' depends on the samples of '{frame.site}', whose "
                        f"sample weights differ across the indices of plate(s) "
                        f"{sorted(k[0] for k in needed - plates)}, outside those plates. "
                        f"Move '{site}' inside them, or give that site an estimator that "
                        f"samples (e.g. ScoreFunction)."
                    )
            if not shapes and len(chain_dims) > n_marginal:
                # The belief over the chain dims may bring in frames it is
                # conditioned on, whose weights may bring in more chain dims.
                n_marginal = len(chain_dims)
                marginal = chain.marginal(chain_dims, site, plates)
                shapes.append(marginal.shape)
        ordinal = plates.union(included) if included else plates
        if chain_dims:
            weight = marginal if weight is None else weight * marginal
            version = chain.version_key()
            if version is not None:
                ordinal = ordinal | {version}
            self.chain_marginals[ordinal] = marginal
        if weight is None:
            weight = 1.0
        return ordinal, seq, weight
