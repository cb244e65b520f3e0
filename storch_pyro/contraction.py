"""Enumerated sites along a ``pyro.markov`` chain, contracted by variable elimination.

Without this module every :class:`~storch_pyro.estimators.Enumerate` site opens a new
sample dim, and a cost's weight is the product of the weights :math:`q(z_s \\mid \\cdot)` of
every enumerated site upstream of it: along a chain of ``T`` binary sites that is a tensor of
``2^T`` values. Here (in a pure stochastic computation graph, ``guide=None``, under either
credit, and in a guide) the enumerated sites drawn inside ``pyro.markov`` share a few
recycled dims, as Pyro's ``EnumMessenger``
recycles enumeration dims: a site reuses the dim of a site that is out of its markov window,
and a :class:`Chain` eliminates the old site's variable from its *belief* first.

The belief :math:`B` is a tensor over the live chain dims (and plates, and the dims of
other sample frames it is conditioned on):

.. math::

    B(z_{\\text{live}}) = \\sum_{z_{\\text{eliminated}}}\\ \\prod_s q(z_s \\mid \\mathrm{pa}_s)
        \\prod_{y} \\boxdot(l_y),

the product of the enumerated sites' conditional probabilities (normalized, so summing out
a variable that nothing later depends on leaves the others' joint unchanged) and of the
magic boxes :math:`\\boxdot(l_y)` of the score terms of sampled sites drawn per value of an
enumerated one (their samples differ along a chain dim; their score must multiply every
later cost before that dim is summed out). A cost :math:`c` recorded with chain dims
:math:`D_c` gets the weight :math:`\\sum_{z \\notin D_c} B`, so the surrogate term
:math:`\\sum_{D_c} w_c\\, c` is :math:`\\mathbb{E}[c]` exactly (value and gradient of any
order, by autograd through the sums), and each sampled site's score meets exactly the costs
recorded after it (credit by order). This is variable elimination (forward filtering) in
the order ``pyro.markov`` declares: one product and one sum over ``K^{w+1}`` values per
site for a window of ``w`` live sites, so a chain of ``T`` sites costs :math:`O(T K^2)` time
and :math:`O(K^2)` memory per step (memory for autograd aside). The order is known while
the program runs, so no contraction order has to be searched (as ``pyro.ops.contract`` or
funsor would, over all ``T`` factors, at the end: 10x slower at ``T = 1000`` for one
normalizer, ``benchmarks.chains.compare_contraction``).

**In a guide** (ELBO mode) the sites are drawn, their dims recycled and their variables
summed out as above while the guide runs, and the guide's own costs :math:`\\log q` are
weighted by the live belief; but the model's costs come after the guide has run, when the
dims stand for the last sites only. So the chain keeps, for each site, the belief in which
its variable was last live (the one it is summed out of, or the final one): every variable
of its window live, and the magic box of every sampled site drawn per their values folded
in. When the model replays a site's value, its dim stands for that site again
(:meth:`Chain.replay`); a model cost :math:`c` carrying the dims of sites :math:`V` gets the
weight :math:`\\sum_{z \\notin V} B_V`, with :math:`B_V` the belief kept for the first of
:math:`V` to be summed out (where all of :math:`V` are live). Each weight is the exact joint
marginal :math:`q(z_V)` (times the boxes), so :math:`\\sum_c \\sum_{z_V} w_c\\, c` is
:math:`\\mathbb{E}_q[\\sum_c c]` in value and in gradient, by autograd through the kept
beliefs; the costs are attached to the forward pass after the fact, which is what a
deferred elimination with an expectation semiring (a belief and an expected cost carried
along the chain) computes too, with one marginal per cost instead of a second pass. Time and
memory stay :math:`O(T K^{w+1})`. The model must compute its costs of a site while the site
is the last one replayed at its dim (as a model that runs the same ``pyro.markov`` loop
does); on validated steps provenance finds a cost that used an older value, and a cost of
sites no window of the guide holds together raises.

**In a model with a guide** (ELBO mode) the enumerated model sites that the guide lacks are
summed out of the joint density, as ``TraceEnum_ELBO`` does (the objective is
:math:`-\\log p(x)` where they are concerned, not an expectation). There the belief is in
log-space, :math:`L = \\sum \\log f` over the model's factors that depend on the chain
(the enumerated sites' own log-probabilities, unmasked; the masked log-densities of the
sites and ``add_cost`` costs, negated, that depend on them), a recycled variable is
eliminated by ``logsumexp``, and at the end of the model one cost
:math:`-s \\log \\sum_z e^{L}` (per index of the chain's plates; :math:`s` the factors'
common scale) is recorded, credited to every guide site by order. Any model site, inside
``pyro.markov`` or not, with ``Enumerate`` and absent from the guide is part of it.

What cannot be contracted this way raises a :class:`~storch_pyro.errors.StorchError`
naming the site and the remedy: a site whose distribution depends on an enumerated site
outside its markov window, enumerated sites of one chain in different plates, a cost that
lacks the plates of the chain, a sampled site with a baseline or control variate drawn per
value of an enumerated one; with a guide's chain, a model cost of sites never live together,
a latent model site drawn per value of the chain, and a model-enumerated site that couples
guide sites no window holds together.
On validated steps, a cost computed from a value whose dim was
recycled is found by provenance (:mod:`storch_pyro.sample_dims`).

**Both at once** (a guide's chain, and model sites the guide lacks): the model's sum is a
second, log-space :class:`Chain` (``Run.model_chain``) kept as a sum of parts, one per
connected set of its live enumerated sites (:meth:`Chain.split`); before the model replays a
guide chain site, the model sites outside its window are summed out and each part left
without live model sites is recorded as a term of :math:`-\\log \\sum_w p(x, z, w)`, weighted
by the guide chain's marginal of the guide sites it carries (:meth:`Chain.release`).
"""

from collections import Counter
from typing import Dict, FrozenSet, Iterable, List, Optional, Set, Tuple

import torch

from storch_pyro.errors import StorchError

#: A frame key, as in :mod:`storch_pyro.handlers.tracing`: (name, dim, counter).
FrameKey = Tuple[str, Optional[int], int]
#: Prefix of the pseudo-frame that tells apart costs recorded before and after a score was
#: folded into the belief (so that the surrogate never groups them under one weight).
VERSION_PREFIX = "storch_pyro.chain_version"


def _plates(stack) -> FrozenSet[FrameKey]:
    return frozenset((f.name, f.dim, f.counter) for f in stack if f.dim is not None)


def _has_dim(tensor: torch.Tensor, dim: int) -> bool:
    return tensor.dim() >= -dim and tensor.shape[dim] > 1


class Chain:
    """The enumerated sites of one pass drawn inside ``pyro.markov`` (see the module
    docstring): their recycled dims and the belief over the live ones; for a guide's
    chain, also the belief each site was last live in, which weights the model's costs
    (:meth:`replay`)."""

    def __init__(self, log: bool = False) -> None:
        #: Log-space (a model's enumerated sites in ELBO mode: the belief is a sum of
        #: log-factors, eliminated by logsumexp), or a product of probabilities.
        self.log = log
        #: The plate stack of the chain's first site (for the cost :meth:`finish` adds).
        self.stack: tuple = ()
        self.belief: Optional[torch.Tensor] = None
        #: Live chain dim -> (site, frame key).
        self.owners: Dict[int, Tuple[str, FrameKey]] = {}
        #: Every chain frame key ever allocated -> its site (for error messages).
        self.recycled: Dict[FrameKey, str] = {}
        #: Site -> (markov depth at its draw, chain dims its value carries), for every site
        #: drawn inside pyro.markov while the chain exists.
        self.sites: Dict[str, Tuple[int, FrozenSet[int]]] = {}
        self.plates: Optional[FrozenSet[FrameKey]] = None
        self.first_site = ""
        self.version = 0
        #: In log-space, the common scale of the factors.
        self.scale = None
        #: A guide's chain (ELBO mode): the model's costs come after the guide has run, so
        #: the belief each site's variable was last live in is kept (see :meth:`replay`).
        self.deferred = False
        #: After the guide: the model replays the guide's values (see :meth:`replay`).
        self.replaying = False
        #: Guide chain site -> (its dim, its frame key, its size).
        self.frames: Dict[str, Tuple[int, FrameKey, int]] = {}
        #: Frame key -> (the belief just before its variable was summed out, or at the end
        #: of the guide; the live dims then -> their frame keys).
        self.snapshots: Dict[FrameKey, Tuple[torch.Tensor, Dict[int, FrameKey]]] = {}
        #: Frame key -> rank of its snapshot in time.
        self.snapshot_rank: Dict[FrameKey, int] = {}
        self._marginals: Dict[FrozenSet[FrameKey], torch.Tensor] = {}
        #: In log-space, while a guide's chain is replayed (:meth:`split`): the belief as a
        #: sum of parts, one per connected set of the model's live enumerated sites.
        self.parts: Optional[List[torch.Tensor]] = None
        #: Parts whose enumerated sites are all summed out, to be recorded as costs.
        self.ready: List[torch.Tensor] = []
        #: Dims released early (:meth:`release`) -> their site, free for the next sites.
        self.released: Dict[int, str] = {}
        #: Indices in ``Run.costs`` of the terms of the sum (whose enumerated sites' dims
        #: were summed out, not lost: :mod:`storch_pyro.sample_dims`).
        self.summed_costs: Set[int] = set()

    # ---- dims ----------------------------------------------------------------------------
    def is_live(self, key: FrameKey) -> bool:
        owner = self.owners.get(key[1])  # type: ignore[arg-type]
        return owner is not None and owner[1] == key

    def visible_dims(self, scope: Optional[Counter]) -> Set[int]:
        """Live chain dims that a site with markov ``scope`` may depend on: those of the
        sites in its window (as Pyro's ``EnumMessenger`` decides which dims are in use)."""
        if scope is None:
            return set(self.owners)
        visible: Set[int] = set()
        for site, depth in scope.items():
            entry = self.sites.get(site)
            if entry is not None and entry[0] == depth:
                visible |= entry[1]
        return visible & set(self.owners)

    def check_inputs(self, site: str, batch_shape: torch.Size, scope: Optional[Counter]) -> None:
        """Raises if the site's distribution varies along the dim of an enumerated site out
        of its markov window (that dim may be recycled: the value would be silently
        wrong)."""
        if scope is None or self.replaying:
            return
        visible = self.visible_dims(scope)
        owners = {dim: owner for dim, (owner, _) in self.owners.items()}
        owners.update(self.released)
        for dim, owner in owners.items():
            if len(batch_shape) >= -dim and batch_shape[dim] > 1 and dim not in visible:
                raise StorchError(
                    f"site '{site}' depends on the enumerated site '{owner}', which is "
                    f"outside its pyro.markov window: its dim {dim} is recycled by later "
                    f"enumerated sites, so the value would be wrong. Widen the window "
                    f"(pyro.markov(..., history=...)), or make '{site}' depend only on the "
                    f"sites of the steps in its window."
                )

    def allocate(
        self, site: str, scope: Counter, new_dim, size: int = 0
    ) -> Tuple[int, FrameKey, bool]:
        """A dim for the enumerated ``site``: the dim of a chain site out of its window
        (whose variable is summed out of the belief first), else ``new_dim()``. Returns
        (dim, frame key, whether it is a new dim)."""
        visible = self.visible_dims(scope)
        free = sorted((d for d in self.owners if d not in visible), reverse=True)
        if self.released:
            dim = max(self.released)
            del self.released[dim]
            fresh = False
        elif free:
            dim = free[0]
            self._eliminate(dim)
            fresh = False
        else:
            dim = new_dim()
            fresh = True
        key: FrameKey = ("storch_pyro.samples:" + site, dim, 0)
        self.owners[dim] = (site, key)
        if self.deferred:
            self.frames[site] = (dim, key, size)
        self.recycled[key] = site
        if not self.first_site:
            self.first_site = site
        return dim, key, fresh

    def note_site(self, site: str, depth: int, value: torch.Tensor, event_dim: int) -> None:
        """Records the chain dims a site's value carries (what later sites in its window
        may depend on)."""
        shape = value.shape[: value.dim() - event_dim]
        dims = frozenset(d for d in self.owners if len(shape) >= -d and shape[d] > 1)
        self.sites[site] = (depth, dims)

    def _eliminate(self, dim: int) -> None:
        belief = self.belief
        if self.deferred:
            self._snapshot(self.owners[dim][1])
        if self.parts is not None:
            del self.owners[dim]
            parts = [part.logsumexp(dim, keepdim=True) if _has_dim(part, dim) else part
                     for part in self.parts]
            self.parts = [part for part in parts if self.carries(part)]
            self.ready += [part for part in parts if not self.carries(part)]
            return
        if belief is not None and _has_dim(belief, dim):
            if self.log:
                self.belief = belief.logsumexp(dim, keepdim=True)
            else:
                self.belief = belief.sum(dim, keepdim=True)
        del self.owners[dim]

    # ---- factors -------------------------------------------------------------------------
    def _check_plates(self, site: str, stack, what: str) -> FrozenSet[FrameKey]:
        plates = _plates(stack)
        if self.plates is None:
            self.plates = plates
            self.stack = tuple(stack)
        elif not self.plates <= plates or (what == "enumerated" and plates != self.plates):
            raise StorchError(
                f"site '{site}' ({what}, drawn per value of the enumerated sites of the "
                f"pyro.markov chain that starts at '{self.first_site}') is in plate(s) "
                f"{sorted(k[0] for k in plates)}, the chain's sites in "
                f"{sorted(k[0] for k in self.plates)}. StorchELBO contracts a chain whose "
                f"enumerated sites share one set of plates. Move the site into the chain's "
                f"plates, or give it an estimator that samples (e.g. ScoreFunction)."
            )
        return plates

    def extend(self, site: str, weights: torch.Tensor, stack) -> None:
        """Multiplies the belief by an enumerated site's weights :math:`q(z \\mid \\cdot)`."""
        self._check_plates(site, stack, "enumerated")
        self.belief = weights if self.belief is None else self.belief * weights

    def fold(self, site: str, score: torch.Tensor, stack) -> None:
        """Multiplies the belief by the magic box of a sampled site's score term (summed
        over the plates the chain is not in: a product of boxes over their indices)."""
        plates = self._check_plates(site, stack, "sampled")
        extra = [key[1] for key in plates - self.plates if _has_dim(score, key[1])]
        if extra:
            score = score.sum(extra, keepdim=True)
        box = torch.exp(score - score.detach())
        self.belief = box if self.belief is None else self.belief * box
        self.version += 1

    def add_factor(self, name: str, log_factor: torch.Tensor, scale, stack) -> None:
        r"""Adds a log-factor of the model (:math:`\log p` of a site, scaled and masked, or
        minus an ``add_cost`` cost) that depends on the chain's enumerated sites, summed over
        the plates the chain is not in (a product of factors over their indices). As in
        TraceEnum_ELBO, the factors are unscaled and their common ``scale`` (subsampling,
        ``poutine.scale``) multiplies the log of the sum."""
        same = self.scale is None or scale is self.scale or scale == self.scale
        if isinstance(same, torch.Tensor):
            same = bool(same.all())
        if self.scale is None:
            self.scale = scale
        elif not same:
            raise StorchError(
                f"'{name}' depends on the enumerated model site(s) of the chain that starts "
                f"at '{self.first_site}' but has another scale ({scale} vs {self.scale}): "
                f"the sum over their values needs one common scale (subsampling, "
                f"poutine.scale). Give the chain's sites and the sites that depend on them "
                f"the same scale."
            )
        plates = _plates(stack)
        if self.plates is None or not self.plates <= plates:
            raise StorchError(
                f"'{name}' depends on the enumerated model site(s) of the chain that starts "
                f"at '{self.first_site}', but lies outside their plate(s) "
                f"{sorted(k[0] for k in (self.plates or frozenset()) - plates)}; the sum "
                f"over their values would be exponential in the plate size. Compute it "
                f"inside those plates, or enumerate the site in the guide."
            )
        extra = [key[1] for key in plates - self.plates if _has_dim(log_factor, key[1])]
        if extra:
            log_factor = log_factor.sum(extra, keepdim=True)
        if self.parts is not None:
            dims = {d for d in self.owners if _has_dim(log_factor, d)}
            joined = [part for part in self.parts if any(_has_dim(part, d) for d in dims)]
            self.parts = [part for part in self.parts if all(part is not j for j in joined)]
            self.parts.append(sum(joined, log_factor))
            return
        self.belief = log_factor if self.belief is None else self.belief + log_factor

    def finish(self) -> Optional[torch.Tensor]:
        r"""In log-space: minus the log of the sum over the live sites' values of the
        product of factors (per index of the chain's plates), :math:`-\log \sum_z
        p(x, z)` (the variables already eliminated were summed as they were recycled)."""
        if self.parts is not None:  # the parts left are recorded apart (release)
            for dim in sorted(self.owners):
                self._eliminate(dim)
            return None
        belief = self.belief
        if belief is None:
            return None
        dims = [d for d in self.owners if _has_dim(belief, d)]
        for dim in sorted(dims):
            belief = belief.logsumexp(dim, keepdim=True)
        return -belief

    def carries(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` varies along a live chain dim."""
        return any(_has_dim(tensor, dim) for dim in self.owners)

    def marginal(
        self, dims: Iterable[int], name: str = "", plates: FrozenSet = frozenset()
    ) -> torch.Tensor:
        """The belief summed over the live chain dims not in ``dims``; while the model
        replays a guide's chain, the joint marginal of the sites whose values it replayed
        last at ``dims`` (see :meth:`replay`), for the cost ``name`` with ``plates``."""
        if self.replaying:
            return self._replayed_marginal(dims, name, plates)
        keep = set(dims)
        belief = self.belief
        assert belief is not None
        drop = [d for d in self.owners if d not in keep and _has_dim(belief, d)]
        return belief.sum(drop, keepdim=True) if drop else belief

    def version_key(self) -> Optional[FrameKey]:
        if self.replaying:  # never grouped with a guide cost (see surrogate._group_costs)
            return (VERSION_PREFIX, None, -1)
        return (VERSION_PREFIX, None, self.version) if self.version else None

    # ---- a guide's chain, replayed by the model ------------------------------------------
    def _snapshot(self, key: FrameKey) -> None:
        """Keeps the belief in which the variable of ``key`` is last live: the one
        :meth:`replay` weights the model's costs of that variable by."""
        live = {dim: owner[1] for dim, owner in self.owners.items()}
        self.snapshots[key] = (self.belief, live)
        self.snapshot_rank[key] = len(self.snapshot_rank)

    def end_guide(self) -> None:
        """Called when the guide has run: keeps the final belief for the live variables,
        and from now on weights costs by the kept beliefs (:meth:`replay`)."""
        for _, key in sorted(self.owners.values(), key=lambda owner: -owner[1][1]):
            self._snapshot(key)
        self.replaying = True

    def replay(self, site: str) -> Optional[Tuple[int, int, FrameKey]]:
        r"""The model replays the value of the guide's chain site ``site``: from now on its
        dim stands for that site's variable (the model computes its costs of the site
        while the site is in its markov window, as the guide did). Returns (dim, size,
        frame key), or ``None`` for a site that is not in the chain.

        The guide ran first, so the dims were recycled before any model cost was
        computed. A model cost :math:`c` of the variables :math:`V` (the dims it carries)
        is weighted by their joint marginal :math:`\sum_{z \notin V} B`, with :math:`B` the
        belief kept when the first of them was summed out (:meth:`_snapshot`): every
        variable of :math:`V` live, and every sampled site drawn per their values folded
        in. This is forward filtering with the costs attached after the fact: value and
        gradient of :math:`\sum_V w_c\, c` are exactly :math:`\mathbb{E}_q[c]`'s, and
        the total cost is linear in the length of the chain."""
        frame = self.frames.get(site)
        if frame is None:
            return None
        dim, key, size = frame
        self.owners[dim] = (site, key)
        return dim, size, key

    def _replayed_marginal(self, dims: Iterable[int], name: str, plates: FrozenSet) -> torch.Tensor:
        keys = frozenset(self.owners[d][1] for d in dims)
        cached = self._marginals.get(keys)
        if cached is not None:
            return cached
        first = min(keys, key=self.snapshot_rank.__getitem__)
        belief, live = self.snapshots[first]
        apart = sorted(self.recycled[key] for key in keys if live.get(key[1]) != key)
        if apart:
            apart_names = ", ".join(f"'{site}'" for site in apart)
            raise StorchError(
                f"cost '{name}' of the model depends on the guide's enumerated sites "
                f"'{self.recycled[first]}' and {apart_names}, which are never in one pyro.markov "
                f"window of the guide: their joint distribution was summed out. Widen the "
                f"guide's window (pyro.markov(..., history=...)) to hold them, or compute "
                f"the cost from sites of one window."
            )
        if self.plates is not None and not self.plates <= plates:
            raise StorchError(
                f"cost '{name}' of the model depends on the guide's enumerated site "
                f"'{self.recycled[first]}' (a pyro.markov chain) but lies outside its "
                f"plate(s) {sorted(k[0] for k in self.plates - plates)}. Compute it inside "
                f"those plates."
            )
        keep = {key[1] for key in keys}
        drop = [d for d in live if d not in keep and _has_dim(belief, d)]
        marginal = belief.sum(drop, keepdim=True) if drop else belief
        self._marginals[keys] = marginal
        return marginal

    # ---- a model's log-space chain while a guide's chain is replayed ---------------------
    def split(self) -> None:
        r"""Keeps the log-space belief as a sum of parts, one per connected set of live
        enumerated sites: :math:`-\log \sum_w p(x, z, w)` is then a sum of terms, each of
        the guide sites of one part, recorded as soon as its model sites are summed out
        (:meth:`release`), while the guide chain's dims still stand for those sites."""
        self.parts = []

    def release(self, scope: Optional[Counter]) -> List[torch.Tensor]:
        r"""Before the model replays a guide chain site with markov ``scope``: sums out the
        model's enumerated sites outside that window (their dims become free for the next
        ones), and returns the parts left with no live model site, :math:`-\log \sum`
        over their sites (costs over the guide's chain dims)."""
        if scope is not None:
            visible = self.visible_dims(scope)
            # Only sites drawn inside pyro.markov: one drawn outside is in every window.
            for dim in [d for d, (site, _) in self.owners.items()
                        if d not in visible and site in self.sites]:
                site = self.owners[dim][0]
                self._eliminate(dim)
                self.released[dim] = site
        ready, self.ready = self.ready, []
        return [-part for part in ready]

    def check_split(self, dim: int, site: str, guide_site: str) -> None:
        """Raises if a part with live model sites carries the guide chain's ``dim``, about to
        stand for ``site`` instead of ``guide_site``: that part's sum couples sites of the
        guide that no window holds."""
        for part in self.parts or ():
            if _has_dim(part, dim):
                model_sites = sorted(self.owners[d][0] for d in self.owners if _has_dim(part, d))
                names = ", ".join(f"'{name}'" for name in model_sites)
                raise StorchError(
                    f"the model's enumerated site(s) {names} (summed out of p(x, z)) depend "
                    f"on the guide's enumerated site '{guide_site}' and are not summed out "
                    f"yet when the model replays '{site}', which takes its dim: -log sum "
                    f"over their values couples guide sites that no pyro.markov window holds "
                    f"together. Enumerate {names} in the guide too, or make them depend on "
                    f"the sites of one window of the chain (e.g. one such site per step)."
                )

    def describe_stale(self, key: FrameKey) -> Optional[str]:
        """For a recycled frame key: the message naming its site; ``None`` if live."""
        if key not in self.recycled or self.is_live(key):
            return None
        owner = self.owners.get(key[1])  # type: ignore[arg-type]
        now = f", now used by '{owner[0]}'" if owner is not None else ""
        return (
            f"the enumerated site '{self.recycled[key]}' (dim {key[1]}{now}), outside its "
            f"pyro.markov window"
        )
