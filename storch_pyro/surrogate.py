"""Assembles the surrogate loss from the records of a :class:`~storch_pyro.handlers.tracing.Run`.

For costs :math:`c` (with sample weight :math:`w_c`, the product over the sample dims they
carry of the weights of the samples: :math:`1/k` for ``k`` i.i.d. samples, :math:`q(z)` for
an enumerated support, ...) and stochastic nodes :math:`z` with score terms :math:`l_z`,

.. math::

    \\mathcal{S} = \\sum_c w_c\\, \\boxdot\\Big(\\sum_{z \\to c} l_z\\Big)\\, c
      + \\sum_z w_z\\,(1 - \\boxdot(l_z))\\,\\boxdot\\Big(\\sum_{y \\to z} l_y\\Big)\\,\\bot(b_z),
    \\qquad \\boxdot(x) = e^{x - \\bot(x)}

(DiCE, Foerster et al. 2018; the baseline term of Mao et al. 2019). Credit assignment
:math:`z \\to c`: :math:`z` was drawn before :math:`c` was computed (``credit="order"``), or
:math:`c` can depend on :math:`z` by data or control flow (``credit="data_flow"``, a subset:
:mod:`storch_pyro.data_flow`), and :math:`c` is not at
another index of a sequential plate :math:`z` is in. :math:`l_z` is summed over the dims of
plates (and sample dims) that :math:`c` is not in, and broadcast over the others, so a
node's score never multiplies costs at other indices of its vectorized plates. Costs that
share plates and predecessors are summed before they meet a magic box, so a model with many
sites costs a few tensor ops.
"""

from typing import Dict, FrozenSet, List, Optional, Tuple

import torch

from storch_pyro.baselines import BaselineContext
from storch_pyro.errors import NonFiniteCostError, StorchError
from storch_pyro.estimators.base import Downstream, adds_terms
from storch_pyro.handlers.records import SAMPLE_FRAME_PREFIX, Node, Run


def magic_box(x: torch.Tensor) -> torch.Tensor:
    """DiCE's :math:`\\boxdot(x) = \\exp(x - \\bot(x))`: value 1, gradient that of ``x``."""
    return torch.exp(x - x.detach())


def _compatible(node_seq: tuple, seq: tuple) -> bool:
    if not node_seq or not seq:
        return True
    counters = dict(seq)
    return all(counters.get(name, counter) == counter for name, counter in node_seq)


def _sum_except(tensor: torch.Tensor, keep) -> torch.Tensor:
    dims = [d for d in range(-tensor.dim(), 0) if d not in keep and tensor.shape[d] != 1]
    return tensor.sum(dims, keepdim=True) if dims else tensor


def _shared_dims(a: FrozenSet, b: FrozenSet) -> set:
    return {key[1] for key in a & b if key[1] is not None}


class _Group:
    __slots__ = ("value", "ordinal", "seq", "n_before", "weight", "deps")

    def __init__(self, value, ordinal, seq, n_before, weight, deps):
        self.value = value
        self.ordinal = ordinal
        self.seq = seq
        self.n_before = n_before
        self.weight = weight
        self.deps = deps


def _credited(node: Node, group: "_Group") -> bool:
    """Whether ``node``'s score meets a cost group, plates aside: drawn before it, and (with
    credit by data flow) one it can depend on."""
    return node.index < group.n_before if group.deps is None else node.index in group.deps


def _group_costs(run: Run) -> List[_Group]:
    """Sums the (signed) costs that share plates, sample dims and predecessors."""
    groups: Dict[Tuple[FrozenSet, object], _Group] = {}
    for cost in run.costs:
        key = (cost.ordinal, cost.n_before if cost.deps is None else cost.deps)
        group = groups.get(key)
        if group is None:
            value = cost.value if cost.sign > 0 else -cost.value
            groups[key] = _Group(value, cost.ordinal, cost.seq, cost.n_before, cost.weight,
                                 cost.deps)
        elif cost.sign > 0:
            group.value = group.value + cost.value
        else:
            group.value = group.value - cost.value
    return list(groups.values())


class _Boxes:
    """Magic boxes, computed once per score tensor."""

    def __init__(self) -> None:
        self.cache: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        hit = self.cache.get(id(scores))
        if hit is None:
            hit = self.cache[id(scores)] = (scores, magic_box(scores))
        return hit[1]


def _add(total: Optional[torch.Tensor], term: torch.Tensor, weight) -> torch.Tensor:
    """``total + sum(term * weight)``; ``weight`` is a float or a tensor along sample dims."""
    if isinstance(weight, torch.Tensor):
        term = (term * weight).sum()
    else:
        term = term.sum()
        if weight != 1.0:
            term = term * weight
    return term if total is None else total + term


class _ScorePrefix:
    """:math:`\\sum_{z \\to c} l_z` reduced to a cost's dims, extended incrementally.

    A node's score is summed over its own sample dim where the cost lacks it, weighted
    there by the (detached) sample weights when they are not uniform: the cost does not
    depend on the samples, and :math:`\\sum_i w_i \\nabla l_{z_i}` is what has mean zero
    for weighted samples (without replacement, or a sampled remainder)."""

    def __init__(self, run: Run) -> None:
        self.nodes = run.nodes
        self.frames = run.frames
        self.cache: Dict[FrozenSet, Tuple[int, Optional[torch.Tensor]]] = {}
        self.by_deps: Dict[Tuple[FrozenSet, FrozenSet], Optional[torch.Tensor]] = {}

    def __call__(
        self, ordinal: FrozenSet, seq: tuple, n: int, deps: Optional[FrozenSet[int]] = None
    ) -> Optional[torch.Tensor]:
        if deps is not None:  # credit by data flow: the nodes in deps
            key = (ordinal, deps)
            if key in self.by_deps:
                return self.by_deps[key]
            total = None
            for index in sorted(deps):
                node = self.nodes[index]
                if node.score is not None and _compatible(node.seq, seq):
                    score = _score_on(node, ordinal, self.frames)
                    total = score if total is None else total + score
            self.by_deps[key] = total
            return total
        done, total = self.cache.get(ordinal, (0, None))
        if n < done:
            done, total = 0, None
        for node in self.nodes[done:n]:
            if node.score is not None and _compatible(node.seq, seq):
                score = _score_on(node, ordinal, self.frames)
                total = score if total is None else total + score
        self.cache[ordinal] = (n, total)
        return total


def _score_on(node: Node, ordinal: FrozenSet, frames: Dict) -> torch.Tensor:
    """The node's score reduced to the dims of a cost with ``ordinal``: summed over the
    dims the cost lacks, over its own sample dim with the (detached) sample weights when
    they are not uniform (see :class:`_ScorePrefix`)."""
    score = node.score
    if node.own_frame is not None and node.own_frame not in ordinal:
        weight = frames[node.own_frame].weights
        if isinstance(weight, torch.Tensor):
            score = score * weight.detach()
    return _sum_except(score, _shared_dims(node.ordinal, ordinal))


def expected_cost(run: Run) -> torch.Tensor:
    """The Monte Carlo estimate of the objective (the surrogate's value), without graph
    work: :math:`\\sum_c w_c\\, c`."""
    total = None
    for cost in run.costs:
        total = _add(total, cost.value if cost.sign > 0 else -cost.value, cost.weight)
    return _zero(run) if total is None else total


def surrogate_loss(run: Run) -> torch.Tensor:
    """The surrogate :math:`\\mathcal{S}` of one particle; updates baseline state."""
    groups = _group_costs(run)
    prefix = _ScorePrefix(run)
    boxes = _Boxes()
    total, rest = _stacked_cost_terms(run, groups)
    for group in rest:
        scores = prefix(group.ordinal, group.seq, group.n_before, group.deps)
        term = group.value if scores is None else boxes(scores) * group.value
        total = _add(total, term, group.weight)
    for node in run.nodes:
        if node.direct is not None:
            total = _add(total, _direct_term(node, prefix, boxes), node.weight)
        if node.baseline is not None:
            total = _add(total, _baseline_term(run, node, groups, prefix, boxes), node.weight)
        if adds_terms(node.estimator):
            if node.draw.perturbs_plates:
                _check_costs_in_plates(run, node)
            upstream_weight = run.weight_of(node.ordinal - {node.own_frame})
            terms = node.terms = node.estimator.surrogate(
                node.draw, _downstream(run, node, groups, upstream_weight)
            )
            if terms is not None:
                if terms.control is not None:
                    control = _boxed_by_upstream(terms.control, node, prefix, boxes)
                    total = _add(total, control, upstream_weight)
                if terms.shared is not None:
                    total = _add(total, terms.shared, upstream_weight)
    return _zero(run) if total is None else total


#: Fewest cost groups of one ordinal that :func:`_stacked_cost_terms` stacks.
_MIN_STACKED = 4


def _stacked_cost_terms(
    run: Run, groups: List[_Group]
) -> Tuple[Optional[torch.Tensor], List[_Group]]:
    r"""The cost terms :math:`\sum_g w_g\, \boxdot(P_g)\, c_g` of the cost groups that share
    an ordinal (with credit by order), in a few tensor ops per ordinal rather than a few per
    group: the reduced scores :math:`l_1, \dots, l_J` of the nodes drawn before the
    ordinal's last group are stacked along a new leading dim, their prefix sums
    :math:`P = \mathrm{cumsum}(l)` give each group's :math:`\sum_{z \to c} l_z` (the row of
    the last node drawn before it), and the boxed groups are one product and one sum. The
    same expression as the per-group loop (so of any order), with a constant number of
    autograd nodes per ordinal: a chain of ``T`` sites with a cost per step costs
    :math:`O(1)` ops instead of :math:`O(T)` (hand-written REINFORCE's reward-to-go
    ``cumsum``). Returns the sum of these terms (``None`` if none) and the groups left to
    the loop (ordinals with fewer than :data:`_MIN_STACKED` groups, credit by data flow)."""
    by_ordinal: Dict[FrozenSet, List[_Group]] = {}
    rest: List[_Group] = []
    for group in groups:
        if group.deps is None:
            by_ordinal.setdefault(group.ordinal, []).append(group)
        else:
            rest.append(group)
    total = None
    for ordinal, members in by_ordinal.items():
        if len(members) < _MIN_STACKED:
            rest.extend(members)
            continue
        members.sort(key=lambda group: group.n_before)
        seq = members[0].seq  # the ordinal's sequential frames (the same for all members)
        last = members[-1].n_before
        scores: List[torch.Tensor] = []
        index: List[int] = []  # per node drawn before the last group: rows so far
        for node in run.nodes[:last]:
            if node.score is not None and _compatible(node.seq, seq):
                scores.append(_score_on(node, ordinal, run.frames))
            index.append(len(scores))
        boxed: List[_Group] = []
        rows: List[int] = []
        for group in members:
            n = index[group.n_before - 1] if group.n_before > 0 else 0
            if n == 0:  # no score before it
                total = _add(total, group.value, group.weight)
            else:
                boxed.append(group)
                rows.append(n - 1)
        if not boxed:
            continue
        values = [group.value if not isinstance(group.weight, torch.Tensor)
                  else group.value * group.weight for group in boxed]
        shapes = {t.shape for t in scores} | {v.shape for v in values}
        shape = shapes.pop() if len(shapes) == 1 else torch.broadcast_shapes(*shapes)
        prefix = torch.stack(_expanded(scores, shape)).cumsum(0)
        prefix = prefix.index_select(0, torch.tensor(rows, device=prefix.device))
        stacked = torch.stack(_expanded(values, shape))
        weights = [1.0 if isinstance(g.weight, torch.Tensor) else g.weight for g in boxed]
        if any(w != 1.0 for w in weights):
            stacked = stacked * torch.tensor(
                weights, dtype=stacked.dtype, device=stacked.device
            ).reshape((-1,) + (1,) * len(shape))
        total = _add(total, (magic_box(prefix) * stacked).sum(), 1.0)
    return total, rest


def _expanded(tensors: List[torch.Tensor], shape: torch.Size) -> List[torch.Tensor]:
    return [t if t.shape == shape else t.expand(shape) for t in tensors]


def _downstream(run: Run, node: Node, groups: List[_Group], upstream_weight) -> Downstream:
    """The node's :class:`~storch_pyro.estimators.base.Downstream` costs, computed when
    the estimator reads them."""
    return Downstream(
        node.site,
        lambda: _downstream_cost(run, node, groups),
        lambda: _live_downstream_cost(run, node, groups, upstream_weight),
    )


def _direct_term(node: Node, prefix: "_ScorePrefix", boxes: _Boxes) -> torch.Tensor:
    r"""The site's own cost :math:`c_z = a \log q(z)` (``a = node.direct``: sign, scale,
    mask) has, besides its score-function terms, a direct gradient :math:`a \nabla l_z`
    of mean zero (:math:`\mathbb{E}[\nabla \log q(z)] = 0`) that acts like a baseline of
    :math:`-a` and adds variance (about 3x on independent Bernoulli latents). This term,
    :math:`(1 - \boxdot(l_z))\,\boxdot(\sum_{y \to z} l_y)\, a`, is a baseline term of
    value :math:`a`: zero-valued, of mean zero at every order, and its first-order gradient
    :math:`-a \nabla l_z` cancels the direct one (what Pyro's ELBOs do by giving
    non-reparameterized sites no entropy term)."""
    before = prefix(node.ordinal, node.seq, node.index, node.deps)
    box = 1.0 - boxes(node.score)
    if before is not None:
        box = box * boxes(before)
    return box * node.direct


def _check_costs_in_plates(run: Run, node: Node) -> None:
    """Raises if a cost after ``node`` carries its sample dim (depends on its values) but
    lacks one of its vectorized plates (see :attr:`Estimator.needs_costs_in_plates`)."""
    if node.own_frame is None:
        return
    plates = {key for key in node.ordinal
              if key[1] is not None and not key[0].startswith(SAMPLE_FRAME_PREFIX)}
    for cost in run.costs:
        if (cost.n_before > node.index and node.own_frame in cost.ordinal
                and not plates <= cost.ordinal and _compatible(node.seq, cost.seq)):
            missing = sorted(key[0] for key in plates - cost.ordinal)
            raise StorchError(
                f"cost '{cost.name}' depends on the value of site '{node.name}' but lies "
                f"outside its plate(s) {missing}; {type(node.estimator).__name__} perturbs "
                f"every index of those plates at once, which is exact only for costs "
                f"computed per plate index. Compute '{cost.name}' inside the plate(s), make "
                f"the site's coordinates an event (.to_event) so that they are perturbed one "
                f"at a time, or use another estimator (e.g. ScoreFunction) at '{node.name}'."
            )


def _zero(run: Run) -> torch.Tensor:
    """The loss of a run without costs: zero, on the device and dtype of its sites."""
    for node in run.nodes:
        return node.log_prob.new_zeros(())
    return torch.zeros(())


def _boxed_by_upstream(term: torch.Tensor, node: Node, prefix, boxes) -> torch.Tensor:
    """``term`` times the magic box of the scores upstream of the node."""
    before = prefix(node.ordinal, node.seq, node.index, node.deps)
    return term if before is None else term * boxes(before)


def _live_downstream_cost(
    run: Run, node: Node, groups: List[_Group], upstream_weight
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""The downstream cost :math:`D_z` without detaching it, each cost group times the
    magic box of the score terms of the sites between the node and the cost (so its
    gradient estimates that of :math:`\mathbb{E}[D_z \mid z]`): on the node's batch shape,
    and summed over the node's plates (each cost once), except plates along which
    ``upstream_weight`` (the sample weights of upstream sites, which the loss multiplies
    into the node's terms) varies: summed there, the total would be weighted by each
    index's weight (an earlier version counted every index's cost with the sum of the
    weights, i.e. ~N times, for REBAR inside ``plate(N)`` below a SumAndSample site).
    Every cost that depends on the node is inside those plates (see
    :meth:`~storch_pyro.handlers.tracing.Run.frames_of`), so none is counted twice."""
    later = run.nodes[node.index + 1:]
    for other in later:
        if adds_terms(other.estimator) and node.own_frame in other.ordinal:
            raise StorchError(
                f"site '{other.name}' depends on the relaxed values of site '{node.name}' "
                f"({type(node.estimator).__name__}), whose control variate differentiates the "
                f"downstream cost through them; the gradient of '{other.name}''s estimator "
                f"{type(other.estimator).__name__} lives in a control term that this does not "
                f"see. Give '{other.name}' a score-function or pathwise estimator."
            )
    shape = node.log_prob.shape
    rank = len(shape)
    plate_dims = [
        key[1] for key in node.ordinal
        if key[1] is not None and not key[0].startswith(SAMPLE_FRAME_PREFIX)
        and not _varies_along(upstream_weight, key[1])
    ]
    per_index = shared = None
    for group in groups:
        if not _credited(node, group) or not _compatible(node.seq, group.seq):
            continue
        value = group.value
        scores = None
        for other in later:
            if other.index >= group.n_before:
                break
            if (other.score is not None and _credited(other, group)
                    and _compatible(other.seq, group.seq)):
                score = _score_on(other, group.ordinal, run.frames)
                scores = score if scores is None else scores + score
        if scores is not None:
            value = magic_box(scores) * value
        reduced = _on_node_dims(run, node, group, value, detach=False)
        dims = [d for d in plate_dims if reduced.dim() >= -d and reduced.shape[d] != 1]
        summed = reduced.sum(dims, keepdim=True) if dims else reduced
        per_index = reduced if per_index is None else per_index + reduced
        shared = summed if shared is None else shared + summed
    if per_index is None:
        zero = node.log_prob.new_zeros(shape)
        return zero, zero
    shared_shape = list(shape)
    for dim in plate_dims:
        if rank >= -dim:
            shared_shape[dim] = 1
    return per_index.expand(shape), shared.expand(shared_shape)


def _varies_along(weight, dim: int) -> bool:
    return isinstance(weight, torch.Tensor) and weight.dim() >= -dim and weight.shape[dim] != 1


def _on_node_dims(
    run: Run, node: Node, group: _Group, value: torch.Tensor, detach: bool
) -> torch.Tensor:
    """A cost group's ``value`` on the node's dims: times the sample weights of the frames
    the node lacks (detached or not) and the marginal of the enumerated chain sites it
    carries (:attr:`Run.chain_marginals`: :math:`q(z_V \\mid \\cdot)`, conditioned on the
    node's samples where the chain is), summed over the dims it does not share."""
    weight = run.weight_of(group.ordinal - node.ordinal)
    marginal = run.chain_marginals.get(group.ordinal)
    if marginal is not None:
        weight = weight * marginal
    if isinstance(weight, torch.Tensor):
        value = value * (weight.detach() if detach else weight)
    reduced = _sum_except(value, _shared_dims(group.ordinal, node.ordinal))
    rank = node.log_prob.dim()
    if reduced.dim() > rank:
        reduced = reduced.reshape(reduced.shape[reduced.dim() - rank:])
    if not isinstance(weight, torch.Tensor) and weight != 1.0:
        reduced = reduced * weight
    return reduced


def _downstream_cost(run: Run, node: Node, groups: List[_Group]) -> torch.Tensor:
    """:math:`D_z`: the detached costs the node's score multiplies, on the node's dims."""
    total = None
    shape = node.log_prob.shape
    for group in groups:
        if _credited(node, group) and _compatible(node.seq, group.seq):
            reduced = _on_node_dims(run, node, group, group.value.detach(), detach=True)
            total = reduced if total is None else total + reduced
    if total is None:
        return node.log_prob.new_zeros(shape)
    if total.shape != shape:
        total = total.expand(shape)
    return total


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    if len(shape) > len(target):
        return False
    return all(s == 1 or s == t for s, t in zip(reversed(shape), reversed(target)))


def _baseline_term(
    run: Run, node: Node, groups: List[_Group], prefix: _ScorePrefix, boxes: _Boxes
) -> torch.Tensor:
    r""":math:`(1 - \boxdot(l_z))\boxdot(\sum_{y \to z} l_y)\bot(b_z)`, unweighted and unsummed,
    plus the zero-valued squared-error term that trains a baseline requiring grad."""
    downstream = _downstream_cost(run, node, groups)
    context = BaselineContext(
        node.name, node.sample_dim, node.estimator.n_samples, run.args, run.kwargs
    )
    baseline = node.baseline(context, downstream)
    if not isinstance(baseline, torch.Tensor):
        baseline = torch.as_tensor(baseline, dtype=downstream.dtype, device=downstream.device)
    if not _broadcasts_to(baseline.shape, downstream.shape):
        raise StorchError(
            f"site '{node.name}': its baseline {node.baseline!r} returned shape "
            f"{tuple(baseline.shape)}, which does not broadcast to the site's batch shape "
            f"{tuple(downstream.shape)} (plates and sample dims). Make it return one value "
            f"per batch element, e.g. squeeze a trailing dim of size 1."
        )
    before = prefix(node.ordinal, node.seq, node.index, node.deps)
    box = 1.0 - boxes(node.score)
    if before is not None:
        box = box * boxes(before)
    term = box * baseline.detach()
    if baseline.requires_grad:
        fit = (baseline - downstream).pow(2)
        term = term + (fit - fit.detach())
    return term


def with_variance_gradients(surrogate: torch.Tensor, nodes: List[Node]) -> torch.Tensor:
    r"""``surrogate`` plus a zero-valued term that gives the control-variate parameters
    :math:`\phi` of ``nodes`` (REBAR's :math:`\eta, \lambda`, RELAX's and LAX's networks)
    the gradient of the variance objective :math:`\sum \hat g^2` instead of the
    surrogate's own (which has no meaning for them), where
    :math:`\hat g = \partial \mathcal{S} / \partial \vartheta` for the nodes'
    distribution parameters :math:`\vartheta`
    (:class:`~storch_pyro.estimators.base.VarianceTerm` in the nodes'
    :class:`~storch_pyro.estimators.base.Terms`); as
    :math:`\mathbb{E}[2\hat g\,\partial_\phi \hat g] = \partial_\phi \mathbb{E}[\hat g^2]`
    (Tucker et al. 2017, Grathwohl et al. 2018), this trains them to lower the variance:

    .. math::

        \mathcal{S} + \sum_\phi \big\langle \phi,\ \bot(\partial_\phi \textstyle\sum
        \hat g^2 - \partial_\phi \mathcal{S}) \big\rangle - \bot(\cdot)

    The model and guide parameters keep the estimator's gradient, so one optimizer over
    ``differentiable_loss`` trains everything, and ``loss_and_grads`` is its backward.
    Computing the term costs one double backward, done here (first order only). It is
    :func:`variance_gradients` followed by :func:`add_variance_correction` (between which a
    distributed run averages the variance gradients across processes)."""
    return add_variance_correction(surrogate, variance_gradients(surrogate, nodes))


#: ``(parameter, its gradient in the surrogate, its variance gradient)``, ``None`` where zero.
VarianceGradient = Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]


def variance_gradients(surrogate: torch.Tensor, nodes: List[Node]) -> List[VarianceGradient]:
    r"""For each control-variate parameter (leaf) of ``nodes``: its gradient in
    ``surrogate`` and :math:`\partial_\phi \sum \hat g^2` (see
    :func:`with_variance_gradients`)."""
    targets: Dict[int, torch.Tensor] = {}
    params: Dict[int, torch.Tensor] = {}
    for node in nodes:
        variance = None if node.terms is None else node.terms.variance
        if variance is not None:
            targets.update((id(t), t) for t in variance.targets if t.requires_grad)
            params.update((id(p), p) for p in variance.params if p.requires_grad)
    if not params or not surrogate.requires_grad:
        return []
    leaves = list(params.values())
    own = torch.autograd.grad(surrogate, leaves, retain_graph=True, allow_unused=True)
    of_variance: List[Optional[torch.Tensor]] = [None] * len(leaves)
    if targets:
        grads = torch.autograd.grad(
            surrogate, list(targets.values()), create_graph=True, allow_unused=True
        )
        variance = sum(g.pow(2).sum() for g in grads if g is not None)
        if isinstance(variance, torch.Tensor) and variance.requires_grad:
            of_variance = list(
                torch.autograd.grad(variance, leaves, retain_graph=True, allow_unused=True)
            )
    return list(zip(leaves, own, of_variance))


def add_variance_correction(
    surrogate: torch.Tensor, gradients: List[VarianceGradient]
) -> torch.Tensor:
    """``surrogate`` plus the zero-valued term that replaces each parameter's own gradient
    by its variance gradient (see :func:`with_variance_gradients`)."""
    correction = None
    for param, own_grad, variance_grad in gradients:
        if own_grad is None and variance_grad is None:
            continue
        if own_grad is None:
            delta = variance_grad
        elif variance_grad is None:
            delta = -own_grad
        else:
            delta = variance_grad - own_grad
        term = (param * delta.detach()).sum()
        correction = term if correction is None else correction + term
    if correction is None:
        return surrogate
    return surrogate + (correction - correction.detach())


def raise_if_not_finite(run: Run) -> None:
    """Raises :class:`NonFiniteCostError` naming the first site of ``run`` whose cost or
    score is not finite; returns if there is none."""
    for node in run.nodes:
        weight = run.weights_of(node.own_frame)
        if isinstance(weight, torch.Tensor) and not bool(torch.isfinite(weight).all()):
            raise NonFiniteCostError(
                f"the sample weights of site '{node.name}' ({node.estimator!r}) are not "
                f"finite: it drew values of probability zero, e.g. n_samples larger than the "
                f"number of categories with positive probability. Lower n_samples there."
            )
    for cost in run.costs:
        if not bool(torch.isfinite(cost.value).all()):
            raise NonFiniteCostError(
                f"the cost at site '{cost.name}' is not finite (NaN or inf). Check the "
                f"parameters and data that reach it; for an observed site, that the data is "
                f"in the support of its distribution."
            )
    for node in run.nodes:
        if not bool(torch.isfinite(node.log_prob).all()):
            raise NonFiniteCostError(
                f"the log-probability of the sample at site '{node.name}' is not finite; its "
                f"distribution's parameters may have become NaN or degenerate."
            )
