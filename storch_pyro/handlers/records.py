"""The record of one particle's run: its stochastic :class:`Node` s, its :class:`Cost` s and
its sample frames (:class:`Run`), which :mod:`storch_pyro.surrogate` turns into the loss."""

from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple

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
        self.sample_frames: List[Tuple[int, int, FrameKey]] = []
        #: Weight of each sample frame's samples: 1/k, or a tensor along its dim.
        self.frame_weights: Dict[FrameKey, Any] = {}
        #: Plates a cost must be in to carry a sample frame with per-plate-index weights.
        self.frame_plates: Dict[FrameKey, FrozenSet[FrameKey]] = {}
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

    def set_frame_weights(self, key: FrameKey, weights: torch.Tensor, stack) -> None:
        """Records the sample weights of a frame (a tensor along its dim), and the plates of
        ``stack`` along which they differ: a cost must be in those to carry the frame."""
        self.frame_weights[key] = weights
        varying = frozenset(
            (f.name, f.dim, f.counter) for f in stack if f.dim is not None
            and weights.dim() >= -f.dim and weights.shape[f.dim] > 1
        )
        if varying:
            self.frame_plates[key] = varying

    def allocate_sample_dim(self, site: str, n_samples: int) -> Tuple[int, FrameKey]:
        """A sample dim of size ``n_samples`` for ``site``, left of the earlier ones."""
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
        if not fresh:
            self.sample_frames = [frame for frame in self.sample_frames if frame[0] != dim]
        self.sample_frames.append((dim, n_samples, key))
        return dim, key

    def use_chain_frame(self, dim: int, size: int, key: FrameKey) -> None:
        """The model replays a guide's chain site: its frame takes the dim it shares with
        the chain's other sites (:meth:`Chain.replay`)."""
        self.sample_frames = [frame for frame in self.sample_frames if frame[0] != dim]
        self.sample_frames.append((dim, size, key))

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
            model_chain = self.model_chain
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
                    elif model_chain is not None and key in model_chain.recycled:
                        pass  # summed out of p(x, z) (a factor, not a weighted cost)
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
                if not shapes and len(chain_dims) > len(marginal_dims):
                    # The belief over the chain dims may bring in frames it is
                    # conditioned on, whose weights may bring in more chain dims.
                    marginal_dims = list(chain_dims)
                    marginal = chain.marginal(marginal_dims, site, plates)
                    shapes.append(marginal.shape)
            if chain_dims:
                weight = weight * marginal
                version = chain.version_key()
                if version is not None:
                    included.append(version)
            keys.extend(included)
            if chain_dims:
                self.chain_marginals[frozenset(keys)] = marginal
        seq = tuple((f.name, f.counter) for f in stack if f.dim is None)
        return frozenset(keys), seq, weight
