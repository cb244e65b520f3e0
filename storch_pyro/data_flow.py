"""Credit by data flow (``StorchELBO(credit="data_flow")``): which stochastic nodes each cost
and each site can depend on.

By default (``credit="order"``) a node's score term multiplies every cost computed after it
(outside the plate indices it is not in): sound under any control flow, but in ELBO mode,
where the guide runs before the model, every guide site meets every model cost. Data-flow
credit narrows each cost's set of nodes :math:`A(c)` to those it can depend on, found by
provenance (Wingate et al. 2011) as a :class:`~torch.overrides.TorchFunctionMode` propagates
it through every torch op (:class:`~storch_pyro.sample_dims.ProvenanceTable`; the program
sees plain tensors):

* the value of a site carries the nodes its distribution depends on (the provenance of its
  log-density, i.e. of its parameters), its own index if it is a node, and the control set
  below; guide values replayed into the model carry theirs into the model pass;
* **control flow**: a tensor carrying provenance that leaves tensor land (``.item()``,
  ``bool()``, ``int()``, ``float()``, ``.tolist()``, ``.numpy()``, ``__index__`` as a Python
  index, size or ``range``, ``__format__``, ``torch.equal``: any torch function returning a
  Python value, except metadata such as ``.shape``) adds its nodes to a *control set*
  that every later cost and site depends on. Shapes that depend on values (``nonzero``,
  boolean masks, ``unique``, ...) count as values: reading them escapes too. Checks inside
  distributions' argument validation, which either raise or change nothing, do not count;
* **lost provenance**: a tensor with an autograd history made during the pass that no torch
  function produced (an op outside torch's function dispatch, e.g. a C++ extension or code
  under ``torch._C.DisableTorchFunction``) carries every earlier node (order-based credit
  there), and a warning names the first site or cost it reaches.

A node :math:`z` then gets credit for cost :math:`c` iff :math:`z \\in A(c)` (and the plate
rule of :mod:`storch_pyro.surrogate` allows it); since :math:`A(c)` only holds nodes drawn
before :math:`c`, data-flow credit is never wider than order credit. A cost that cannot
depend on :math:`z` has :math:`\\mathbb{E}[\\nabla \\log q(z)\\, c] = 0`, so dropping the
term keeps the estimator unbiased and removes its variance.

The dependency structure is rebuilt on every step (no caching: data-dependent control flow
on data can change it between minibatches).
"""

import sys
import warnings
import weakref
from typing import Any, FrozenSet, Iterable, Optional

import torch
from torch.distributions import Distribution

from storch_pyro.sample_dims import _EMPTY, _NO_FLOW, ProvenanceTable, _Provenance, _tensors

#: Provenance key of a tensor whose origin the mode did not see (lost provenance).
UNKNOWN = "storch_pyro.unknown_provenance"
_LOST = frozenset({UNKNOWN})

# Torch functions that return Python values about a tensor's metadata, not its values.
_METADATA = frozenset(
    {
        "__get__", "size", "dim", "ndimension", "__len__", "numel", "nelement", "stride",
        "is_contiguous", "storage_offset", "element_size", "is_floating_point",
        "is_complex", "get_device", "__hash__", "has_names", "is_shared", "is_pinned",
        "requires_grad_", "retain_grad", "register_hook", "backward", "__dir__",
        "is_set_to", "type",
    }
)
# Shape queries: escapes when the shape itself depends on values.
_SHAPE_QUERIES = frozenset({"__get__", "size", "__len__", "numel", "nelement", "dim",
                            "ndimension", "stride"})
# Ops whose output shape depends on their inputs' values.
_VALUE_SHAPED = frozenset(
    {
        "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount",
        "repeat_interleave",
    }
)


def _validation_codes() -> frozenset:
    """Code objects of argument/support validation: escapes there raise or change nothing."""
    codes = {Distribution.__init__.__code__, Distribution._validate_sample.__code__}
    try:
        from pyro.distributions.torch_distribution import TorchDistributionMixin

        validate = getattr(TorchDistributionMixin, "_validate_sample", None)
        if validate is not None:
            codes.add(validate.__code__)
    except ImportError:  # pragma: no cover
        pass
    return frozenset(codes)


_VALIDATION = _validation_codes()


def _in_validation() -> bool:
    frame = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return False
        code = frame.f_code
        if code in _VALIDATION or code.co_name in ("_validate_sample", "_validate_args"):
            return True
        frame = frame.f_back
    return False


class DataFlow:
    """The provenance of one run's tensors in terms of stochastic node indices.

    ``table`` may be shared with :class:`~storch_pyro.sample_dims.SampleDimChecks` (its keys
    are sample frames, tuples; ours are ints and :data:`UNKNOWN`). ``warned``: the names
    already warned about (shared by a loss's runs, so each is named once per loss)."""

    def __init__(self, table: Optional[ProvenanceTable] = None,
                 warned: Optional[set] = None) -> None:
        self.table = table if table is not None else ProvenanceTable()
        #: Nodes whose values reached Python control flow so far.
        self.control: FrozenSet = _EMPTY
        #: Tensors whose shape depends on values: id -> (weakref, provenance).
        self.shapes = ProvenanceTable()
        #: Tensors with autograd history that a torch function made: id -> weakref.
        self.seen: dict = {}
        self.start = _sequence_nr()
        self._warned: set = warned if warned is not None else set()

    def mode(self) -> "_FlowProvenance":
        return _FlowProvenance(self)

    def of(self, tensors: Iterable[Any]) -> FrozenSet:
        """The provenance of ``tensors`` (tensors or None, in any nesting) and the control
        set."""
        provenance = self.control
        for obj in tensors:
            for tensor in _tensors(obj):
                provenance = provenance | self._get(tensor)
        return provenance

    def _get(self, tensor: torch.Tensor) -> FrozenSet:
        entries = self.table.entries
        entry = entries.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            found = entry[1]
        elif self.lost(tensor):
            return _LOST
        else:
            found = _EMPTY
        base = tensor._base
        if base is not None:
            entry = entries.get(id(base))
            if entry is not None and entry[0]() is base:
                found = found | entry[1]
        return found

    def lost(self, tensor: torch.Tensor) -> bool:
        """Made during the pass with autograd history, but by no torch function the mode saw."""
        grad_fn = tensor.grad_fn
        if grad_fn is None:
            return False
        seen = self.seen.get(id(tensor))
        if seen is not None and seen() is tensor:
            return False
        return id(tensor) not in self.table.entries and grad_fn._sequence_nr() >= self.start

    def tag(self, tensor: Any, provenance: FrozenSet) -> None:
        if isinstance(tensor, torch.Tensor) and provenance:
            self.table.add(tensor, provenance)

    def resolve(self, provenance: FrozenSet, n_before: int, name: str) -> FrozenSet[int]:
        """The node indices of ``provenance``: all ``n_before`` earlier nodes where it was
        lost (order-based credit for that record), with a warning naming it once per loss."""
        if UNKNOWN not in provenance:
            return frozenset(key for key in provenance if type(key) is int)
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(
                f"storch_pyro: credit by data flow could not trace what '{name}' depends on "
                f"(a tensor made by an op outside torch's function dispatch, e.g. a C++ "
                f"extension or torch._C.DisableTorchFunction, reaches it); it gets order-based "
                f"credit (every earlier site), which is unbiased but noisier. Compute it with "
                f"torch functions, or pass StorchELBO(credit='order') to silence this.",
                RuntimeWarning,
                stacklevel=2,
            )
        return frozenset(range(n_before))


def _sequence_nr() -> int:
    with torch.enable_grad():
        probe = torch.zeros((), device="cpu", requires_grad=True) * 1.0
    return probe.grad_fn._sequence_nr()


class _FlowProvenance(_Provenance):
    """:class:`~storch_pyro.sample_dims._Provenance`, plus escapes into Python (the control
    set), value-dependent shapes and lost provenance."""

    def __init__(self, flow: DataFlow) -> None:
        super().__init__(flow.table)
        self.flow = flow

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # The hot path of credit by data flow: every torch op of the program comes here.
        result = func(*args, **kwargs) if kwargs else func(*args)
        name = getattr(func, "__name__", "")
        flow = self.flow
        tensor_result = isinstance(result, torch.Tensor)
        if not tensor_result and (
            result is not None and not isinstance(result, (tuple, list))
            or name == "tolist" or isinstance(result, torch.Size)
        ):
            # a Python value (None, from __setitem__ and the like, carries nothing)
            if name in _METADATA:
                if name in _SHAPE_QUERIES and flow.shapes.entries:
                    self._escape(flow.shapes, args)
                return result
            self._escape(self.table, args, kwargs)
            return result
        in_place = name == "__setitem__" or (name[-1:] == "_" and name[-2:] != "__")
        if name in _NO_FLOW and not in_place:
            return result
        get = flow._get
        provenance = _EMPTY
        for arg in args:
            if isinstance(arg, torch.Tensor):
                found = get(arg)
            elif isinstance(arg, (tuple, list)):
                found = _EMPTY.union(*[get(tensor) for tensor in _tensors(arg)])
            else:
                continue
            if found:
                provenance = provenance | found
        if kwargs:
            for tensor in _tensors(kwargs):
                provenance = provenance | get(tensor)
        results = (result,) if tensor_result else tuple(_tensors(result))
        if provenance:
            add = self.table.add
            for tensor in results:
                add(tensor, provenance)
            if in_place and args and isinstance(args[0], torch.Tensor):
                target = args[0]
                add(target, provenance)  # the mutated tensor, and its base if a view
                if target._base is not None:
                    add(target._base, provenance)
            if kwargs:
                for tensor in _tensors(kwargs.get("out")):
                    add(tensor, provenance)
        else:
            seen = flow.seen
            for tensor in results:
                if tensor.grad_fn is not None:
                    seen[id(tensor)] = weakref.ref(tensor)
        shapes = flow.shapes
        shaped = _EMPTY
        if (name in _VALUE_SHAPED or (name == "__getitem__" and _has_mask(args))
                or (name == "where" and len(args) == 1)):
            shaped = provenance
        if shapes.entries:
            for tensor in _tensors(args):
                shaped = shaped | shapes.get(tensor)
        if shaped:
            for tensor in results:
                shapes.add(tensor, shaped)
        return result

    def _escape(self, table: ProvenanceTable, args, kwargs=None) -> None:
        get = self.flow._get if table is self.table else table.get  # values: views' bases too
        provenance = _EMPTY
        for tensor in _tensors(args):
            provenance = provenance | get(tensor)
        if kwargs:
            for tensor in _tensors(kwargs):
                provenance = provenance | get(tensor)
        provenance = frozenset(key for key in provenance if type(key) is not tuple)
        if provenance and not provenance <= self.flow.control and not _in_validation():
            self.flow.control = self.flow.control | provenance


def _has_mask(args) -> bool:
    return any(
        isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in _tensors(args[1:])
    )
