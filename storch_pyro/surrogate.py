"""Assembles the surrogate loss from the records of a :class:`~storch_pyro.handlers.tracing.Run`.

For costs :math:`c` (with sample weight :math:`w_c`, the product of :math:`1/k` over the
sample dims they carry) and stochastic nodes :math:`z` with score terms :math:`l_z`,

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
    groups: Dict[Tuple[FrozenSet, int], _Group] = {}
    for cost in run.costs:
        key = (cost.ordinal, cost.n_before)
        group = groups.get(key)
        if group is None:
            groups[key] = _Group(cost.value, cost.ordinal, cost.seq, cost.n_before, cost.weight)
        else:
            group.value = group.value + cost.value
    return list(groups.values())


class _ScorePrefix:
    """:math:`\\sum_{z \\to c} l_z` reduced to a cost's dims, extended incrementally."""

    def __init__(self, nodes: List[Node]) -> None:
        self.nodes = nodes
        self.cache: Dict[FrozenSet, Tuple[int, Optional[torch.Tensor]]] = {}

    def __call__(self, ordinal: FrozenSet, seq: tuple, n: int) -> Optional[torch.Tensor]:
        done, total = self.cache.get(ordinal, (0, None))
        if n < done:
            done, total = 0, None
        for node in self.nodes[done:n]:
            if _compatible(node.seq, seq):
                score = _sum_except(node.score, _shared_dims(node.ordinal, ordinal))
                total = score if total is None else total + score
        self.cache[ordinal] = (n, total)
        return total


def expected_cost(run: Run) -> torch.Tensor:
    """The Monte Carlo estimate of the objective (the surrogate's value), without graph
    work: :math:`\\sum_c w_c\\, c`."""
    total = 0.0
    for cost in run.costs:
        total = total + cost.value.sum() * cost.weight
    return torch.as_tensor(total)


def surrogate_loss(run: Run) -> torch.Tensor:
    """The surrogate :math:`\\mathcal{S}` of one particle; updates baseline state."""
    groups = _group_costs(run)
    prefix = _ScorePrefix(run.nodes)
    total = 0.0
    for group in groups:
        scores = prefix(group.ordinal, group.seq, group.n_before)
        term = group.value if scores is None else magic_box(scores) * group.value
        total = total + term.sum() * group.weight
    for node in run.nodes:
        if node.baseline is not None:
            total = total + _baseline_term(run, node, groups, prefix)
    return torch.as_tensor(total)


def _downstream_cost(node: Node, groups: List[_Group]) -> torch.Tensor:
    """:math:`D_z`: the detached costs the node's score multiplies, on the node's dims."""
    total = torch.zeros_like(node.score)
    for group in groups:
        if group.n_before > node.index and _compatible(node.seq, group.seq):
            reduced = _sum_except(group.value.detach(), _shared_dims(group.ordinal, node.ordinal))
            if reduced.dim() > total.dim():
                reduced = reduced.reshape(reduced.shape[reduced.dim() - total.dim():])
            total = total + reduced * (group.weight / node.weight)
    return total


def _baseline_term(run: Run, node: Node, groups: List[_Group], prefix: _ScorePrefix):
    downstream = _downstream_cost(node, groups)
    context = BaselineContext(node.name, node.sample_dim, node.n_samples, run.args, run.kwargs)
    baseline = node.baseline(context, downstream)
    if not isinstance(baseline, torch.Tensor):
        baseline = torch.as_tensor(baseline, dtype=downstream.dtype, device=downstream.device)
    try:
        fits = torch.broadcast_shapes(baseline.shape, downstream.shape) == downstream.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise StorchError(
            f"site '{node.name}': its baseline {node.baseline!r} returned shape "
            f"{tuple(baseline.shape)}, which does not broadcast to the site's batch shape "
            f"{tuple(downstream.shape)} (plates and sample dims). Make it return one value "
            f"per batch element, e.g. squeeze a trailing dim of size 1."
        )
    before = prefix(node.ordinal, node.seq, node.index)
    box = 1.0 - magic_box(node.score)
    if before is not None:
        box = box * magic_box(before)
    term = (box * baseline.detach()).sum() * node.weight
    if baseline.requires_grad:
        fit = (baseline - downstream).pow(2).sum() * node.weight
        term = term + (fit - fit.detach())
    return term


def raise_if_not_finite(run: Run) -> None:
    """Raises :class:`NonFiniteCostError` naming the first site of ``run`` whose cost or
    score is not finite; returns if there is none."""
    for cost in run.costs:
        if not torch.isfinite(cost.value).all():
            raise NonFiniteCostError(
                f"the cost at site '{cost.name}' is not finite (NaN or inf). Check the "
                f"parameters and data that reach it; for an observed site, that the data is "
                f"in the support of its distribution."
            )
    for node in run.nodes:
        if not torch.isfinite(node.score).all():
            raise NonFiniteCostError(
                f"the log-probability of the sample at site '{node.name}' is not finite; its "
                f"distribution's parameters may have become NaN or degenerate."
            )
