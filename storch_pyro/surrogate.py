"""Assembles the surrogate loss from the records of a :class:`~storch_pyro.handlers.tracing.Run`.

For costs :math:`c` (with sample weight :math:`w_c`, the product over the sample dims they
carry of the weights of the samples: :math:`1/k` for ``k`` i.i.d. samples, :math:`q(z)` for
an enumerated support, ...) and stochastic nodes :math:`z` with score terms :math:`l_z`,

.. math::

    \\mathcal{S} = \\sum_c w_c\\, \\boxdot\\Big(\\sum_{z \\to c} l_z\\Big)\\, c
      + \\sum_z w_z\\,(1 - \\boxdot(l_z))\\,\\boxdot\\Big(\\sum_{y \\to z} l_y\\Big)\\,\\bot(b_z),
    \\qquad \\boxdot(x) = e^{x - \\bot(x)}

(DiCE, Foerster et al. 2018; the baseline term of Mao et al. 2019). Credit assignment
:math:`z \\to c`: :math:`z` was drawn before :math:`c` was computed, and :math:`c` is not at
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
from storch_pyro.handlers.tracing import Node, Run


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
    __slots__ = ("value", "ordinal", "seq", "n_before", "weight")

    def __init__(self, value, ordinal, seq, n_before, weight):
        self.value = value
        self.ordinal = ordinal
        self.seq = seq
        self.n_before = n_before
        self.weight = weight


def _group_costs(run: Run) -> List[_Group]:
    """Sums the (signed) costs that share plates, sample dims and predecessors."""
    groups: Dict[Tuple[FrozenSet, int], _Group] = {}
    for cost in run.costs:
        key = (cost.ordinal, cost.n_before)
        group = groups.get(key)
        if group is None:
            value = cost.value if cost.sign > 0 else -cost.value
            groups[key] = _Group(value, cost.ordinal, cost.seq, cost.n_before, cost.weight)
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
        self.frame_weights = run.frame_weights
        self.cache: Dict[FrozenSet, Tuple[int, Optional[torch.Tensor]]] = {}

    def __call__(self, ordinal: FrozenSet, seq: tuple, n: int) -> Optional[torch.Tensor]:
        done, total = self.cache.get(ordinal, (0, None))
        if n < done:
            done, total = 0, None
        for node in self.nodes[done:n]:
            if node.score is not None and _compatible(node.seq, seq):
                score = node.score
                if node.own_frame is not None and node.own_frame not in ordinal:
                    weight = self.frame_weights[node.own_frame]
                    if isinstance(weight, torch.Tensor):
                        score = score * weight.detach()
                score = _sum_except(score, _shared_dims(node.ordinal, ordinal))
                total = score if total is None else total + score
        self.cache[ordinal] = (n, total)
        return total


def expected_cost(run: Run) -> torch.Tensor:
    """The Monte Carlo estimate of the objective (the surrogate's value), without graph
    work: :math:`\\sum_c w_c\\, c`."""
    total = None
    for cost in run.costs:
        total = _add(total, cost.value if cost.sign > 0 else -cost.value, cost.weight)
    return torch.zeros(()) if total is None else total


def surrogate_loss(run: Run) -> torch.Tensor:
    """The surrogate :math:`\\mathcal{S}` of one particle; updates baseline state."""
    groups = _group_costs(run)
    prefix = _ScorePrefix(run)
    boxes = _Boxes()
    total = None
    for group in groups:
        scores = prefix(group.ordinal, group.seq, group.n_before)
        term = group.value if scores is None else boxes(scores) * group.value
        total = _add(total, term, group.weight)
    for node in run.nodes:
        if node.baseline is not None:
            total = _add(total, _baseline_term(run, node, groups, prefix, boxes), node.weight)
        if node.estimator.has_control_term:
            upstream_weight = run.weight_of(node.ordinal - {node.own_frame})
            total = _add(total, _control_term(run, node, groups, prefix, boxes), upstream_weight)
    return torch.zeros(()) if total is None else total


def _control_term(run: Run, node: Node, groups: List[_Group], prefix, boxes) -> torch.Tensor:
    """The estimator's zero-valued term, times the box of the scores upstream of the node
    (so that, as for baselines, the upstream score terms see it at higher orders)."""
    downstream = _downstream_cost(run, node, groups)
    term = node.estimator.control_term(node.fn, node.state, node.sample_dim, downstream)
    before = prefix(node.ordinal, node.seq, node.index)
    if before is not None:
        term = term * boxes(before)
    return term


def _downstream_cost(run: Run, node: Node, groups: List[_Group]) -> torch.Tensor:
    """:math:`D_z`: the detached costs the node's score multiplies, on the node's dims."""
    total = None
    shape = node.log_prob.shape
    rank = len(shape)
    for group in groups:
        if group.n_before > node.index and _compatible(node.seq, group.seq):
            value = group.value.detach()
            weight = run.weight_of(group.ordinal - node.ordinal)
            if isinstance(weight, torch.Tensor):
                value = value * weight.detach()
            reduced = _sum_except(value, _shared_dims(group.ordinal, node.ordinal))
            if reduced.dim() > rank:
                reduced = reduced.reshape(reduced.shape[reduced.dim() - rank:])
            if not isinstance(weight, torch.Tensor) and weight != 1.0:
                reduced = reduced * weight
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
    before = prefix(node.ordinal, node.seq, node.index)
    box = 1.0 - boxes(node.score)
    if before is not None:
        box = box * boxes(before)
    term = box * baseline.detach()
    if baseline.requires_grad:
        fit = (baseline - downstream).pow(2)
        term = term + (fit - fit.detach())
    return term


def raise_if_not_finite(run: Run) -> None:
    """Raises :class:`NonFiniteCostError` naming the first site of ``run`` whose cost or
    score is not finite; returns if there is none."""
    for node in run.nodes:
        weight = run.frame_weights.get(node.own_frame)
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
