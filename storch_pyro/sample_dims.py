"""Sample dims the program must keep, and what to say when it cannot handle them.

A site whose estimator draws several values (``n_samples > 1``, ARM's and DisARM's pairs,
REBAR's evaluations, ``Enumerate``, ``UnorderedSet``) hands the program a value with a
*sample dim* left of the plates, and the loss averages each cost over it (with the sample
weights :math:`w`): :math:`\\sum_i w_i\\, c_i`. A cost that depends on the samples but was
reduced over their dim by the program (``(z * w).sum()``) breaks this silently: a sum over
``k`` samples counts ``k`` times, an enumerated site loses its weights :math:`q(z)` (and
with them the gradient). Two tools here:

* :class:`SampleDimChecks`, on validated steps: records, for each cost, the sample frames
  its value depends on, by provenance (Wingate et al. 2011): a
  :class:`~torch.overrides.TorchFunctionMode` propagates, through every torch op, the set of
  sample frames of the inputs to the outputs, starting from the site values handed to the
  program. A cost whose provenance holds a frame that its dims lack (absent, or of size
  1), and that its sample weights do not bring in either (an enumerated site's weights
  :math:`q(z \\mid a)` carry an upstream frame of :math:`a`), was reduced over it, and
  :meth:`SampleDimChecks.check` raises a
  :class:`~storch_pyro.errors.StorchError` naming the cost and the site. No tensor is
  wrapped (the program sees plain tensors; provenance lives in a table keyed by tensor
  identity), and the program is not run again. A cost that does not depend on a site (no
  torch op links them) never raises; dependence through Python numbers (``.item()``) is not
  seen (a miss, never a false alarm).
* :func:`explain_errors`, on every step: an exception escaping the guide or model while a
  site holds a sample dim or a relaxed one-hot value (``z.item()`` on several samples,
  ``table[z]`` on a one-hot float, 2-D code given a 3-D value) gets a note naming those sites
  and the remedy (:meth:`BaseException.add_note`; torch is not patched).
"""

import weakref
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message
from pyro.poutine.subsample_messenger import _Subsample
from torch.overrides import TorchFunctionMode

from storch_pyro.errors import StorchError
from storch_pyro.estimators.relaxation import discrete_base
from storch_pyro.handlers.records import SAMPLE_FRAME_PREFIX, Run

REMEDY = (
    "The model and guide must broadcast over dims left of their plates, as with Pyro's "
    "enumeration (no .item(), bool() or Python branching on such a value, no reshape, "
    "indexing or 2-D code that assumes its rank), or the site needs an estimator with one "
    "value per draw, e.g. ScoreFunction(baseline=MovingAverage())."
)

# Ops whose output does not depend on the values of their tensor arguments (only on
# their shape, dtype or device).
_NO_FLOW = frozenset(
    {
        "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor",
        "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
        "randint_like",
    }
)


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


class ProvenanceTable:
    """Provenance (a frozenset of sample frame keys) by tensor identity, holding no tensor
    alive: an entry whose tensor was freed (its id reused) is ignored."""

    def __init__(self) -> None:
        self.entries: Dict[int, Tuple[Any, frozenset]] = {}

    def get(self, tensor: torch.Tensor) -> frozenset:
        entry = self.entries.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return _EMPTY
        return entry[1]

    def add(self, tensor: torch.Tensor, provenance: frozenset) -> None:
        old = self.get(tensor)
        if not provenance <= old:
            self.entries[id(tensor)] = (weakref.ref(tensor), old | provenance)


_EMPTY: frozenset = frozenset()


class _Provenance(TorchFunctionMode):
    """Propagates provenance through torch ops, in a :class:`ProvenanceTable`, without
    changing any result."""

    def __init__(self, table: ProvenanceTable) -> None:
        super().__init__()
        self.table = table

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        in_place = name == "__setitem__" or (name[-1:] == "_" and name[-2:] != "__")
        if not (in_place or kwargs or isinstance(result, (torch.Tensor, tuple, list))):
            return result  # .shape, .item(), bool(), ...: nothing to record
        if name in _NO_FLOW:
            return result
        get = self.table.get
        provenance = _EMPTY
        for arg in args:
            if isinstance(arg, torch.Tensor):
                found = get(arg)
            elif isinstance(arg, (tuple, list)):
                found = _EMPTY.union(*(get(t) for t in _tensors(arg)))
            else:
                continue
            if found:
                provenance = provenance | found
        for tensor in _tensors(kwargs):
            provenance = provenance | get(tensor)
        if provenance:
            add = self.table.add
            for tensor in _tensors(result):
                add(tensor, provenance)
            if in_place and args and isinstance(args[0], torch.Tensor):
                add(args[0], provenance)  # the mutated tensor
            for tensor in _tensors(kwargs.get("out")):
                add(tensor, provenance)
        return result


class _Recorder(Messenger):
    """Inside a pass's ``StorchMessenger`` (so it sees what that recorded): tags the value
    of each drawn site with its own sample frame, and notes which costs lost a frame."""

    def __init__(self, checks: "SampleDimChecks") -> None:
        super().__init__()
        self.checks = checks

    def _postprocess_message(self, msg: Message) -> None:
        self.checks._collect()
        if (msg["type"] != "sample" or msg["is_observed"] or type(msg["fn"]) is _Subsample
                or not isinstance(msg["value"], torch.Tensor)):
            return
        key = self.checks.frame_of(msg["name"])
        if key is not None:
            self.checks.table.add(msg["value"], frozenset({key}))


class SampleDimChecks:
    """Finds costs reduced over a sample dim their value depends on (validated steps).

    Enter :meth:`recording` inside each pass's ``StorchMessenger``, then call
    :meth:`check` on the finished run.

    Example::

        checks = SampleDimChecks(run)
        with StorchMessenger(run, "scg"), checks.recording():
            model()
        checks.check()   # StorchError if e.g. add_cost("f", z.sum()) with n_samples=4
    """

    def __init__(self, run: Run, table: Optional[ProvenanceTable] = None) -> None:
        self.run = run
        #: Shared with a :class:`~storch_pyro.data_flow.DataFlow`, whose mode propagates it.
        self.shared = table is not None
        self.table = table if table is not None else ProvenanceTable()
        self.lost: List[Tuple[str, Any]] = []
        self._n_costs = 0

    def frame_of(self, site: str) -> Optional[tuple]:
        """The key of the site's own sample frame, if it has one."""
        name = SAMPLE_FRAME_PREFIX + site
        for frame in self.run.live_frames.values():
            if frame.key[0] == name:
                return frame.key
        return None

    @contextmanager
    def recording(self) -> Iterator[None]:
        with ExitStack() as stack:
            stack.enter_context(_Recorder(self))
            if not self.shared:
                stack.enter_context(_Provenance(self.table))
            yield
        self._collect()

    def _collect(self) -> None:
        costs = self.run.costs
        if len(costs) == self._n_costs:
            return
        sizes = {frame.key: frame.size for frame in self.run.live_frames.values()}
        model_chain = self.run.model_chain
        for index in range(self._n_costs, len(costs)):
            cost = costs[index]
            provenance = self.table.get(cost.value)
            if model_chain is not None and index in model_chain.summed_costs:
                # a term of -log sum_w p(x, z, w): the model's enumerated sites summed out
                provenance = frozenset(key for key in provenance
                                       if key not in model_chain.recycled)
            # A key without a size is an enumerated chain site's whose dim was recycled
            # (storch_pyro.contraction): the cost used a value out of its markov window.
            lost = [key for key in provenance
                    if type(key) is tuple and key not in cost.ordinal
                    and sizes.get(key, 2) > 1]
            if lost:
                self.lost.append((cost.name, sorted(lost, key=lambda key: -key[1])))
        self._n_costs = len(costs)

    def check(self) -> None:
        """Raises :class:`StorchError` for the first cost that lost a sample dim."""
        self._collect()
        if not self.lost:
            return
        cost, keys = self.lost[0]
        chains = [c for c in (self.run.chain, self.run.model_chain) if c is not None]
        stale = [chain.describe_stale(key) for chain in chains for key in keys]
        stale = [text for text in stale if text is not None]
        if stale:
            raise StorchError(
                f"cost '{cost}' depends on {stale[0]}: the dim of that site's values was "
                f"recycled for a later site, so the cost would silently use that site's "
                f"values instead. Compute the cost in a step whose pyro.markov window holds "
                f"the site (e.g. in the same step), or widen the window "
                f"(pyro.markov(..., history=...))."
            )
        sites = ", ".join(_describe_frame(self.run, key) for key in keys)
        raise StorchError(
            f"cost '{cost}' depends on the samples of site(s) {sites}, but lacks their sample "
            f"dim: the program reduced over it (e.g. .sum() or .mean() over all dims, or "
            f"indexing), or moved it (a reduction over a plate's dim without keepdim). The "
            f"loss averages each cost over the sample dims itself, so this loss would be wrong "
            f"(a sum counts each sample again; Enumerate's weights are lost, and with them "
            f"the gradient). Reduce costs over plate dims only, keeping the sample dims where "
            f"they are: e.g. .sum(-1, keepdim=True) over a plate's dim instead of .sum(), or "
            f"call add_cost inside the plate."
        )


def _site_of(key: tuple) -> str:
    return key[0][len(SAMPLE_FRAME_PREFIX):]


def _estimator_of(run: Run, site: str) -> str:
    drawn = run.drawn.get(site)
    return repr(drawn[0]) if drawn is not None else "?"


def _describe_frame(run: Run, key: tuple) -> str:
    site = _site_of(key)
    size = run.frames[key].size
    return f"'{site}' ({_estimator_of(run, site)}: dim {key[1]} of size {size})"


def run_sites(run: Run) -> List[str]:
    """What the sites of ``run`` drawn so far hand the program that plain Pyro would not:
    sample dims, and relaxed one-hot values where a Categorical gives an index."""
    lines = [
        f"site '{frame.site}' ({_estimator_of(run, frame.site)}) holds {frame.size} values "
        f"along a sample dim at dim {frame.dim}"
        for frame in run.live_frames.values()
    ]
    for site in list(run.density_values) + list(run.density_owners):
        drawn = run.drawn.get(site)
        if drawn is not None:
            line = _relaxed_line(site, drawn[0], drawn[1])
            if line is not None:
                lines.append(line)
    return lines


def _relaxed_line(site: str, estimator: Any, fn: Any) -> Optional[str]:
    base = discrete_base(fn)
    if base is None or base[0] != "categorical":
        return None
    return (
        f"site '{site}' ({estimator!r}) holds a relaxed one-hot value (floats over a last dim "
        f"of size {base[1].shape[-1]}) where its Categorical gives an index: use it as "
        f"weights (e.g. z @ table, not table[z])"
    )


def example_sites(values: Dict[str, Tuple[Any, Any, torch.Tensor]]) -> List[str]:
    """:func:`run_sites` for the values of the ``max_plate_nesting`` probe
    (``{site: (estimator, fn, value)}``), which have no sample dims."""
    lines = []
    for site, (estimator, fn, value) in values.items():
        if value.shape != fn.shape():
            line = _relaxed_line(site, estimator, fn)
            if line is not None:
                lines.append(line)
    return lines


class explain_errors:  # noqa: N801 (used as a function)
    """A context (reusable) that adds a note to an exception escaping it (a guide or model
    pass) when ``sites()`` names sites holding sample dims or relaxed values: those sites,
    and the remedy. storch_pyro's own errors, which name their site, are left as they are.

    Example::

        with explain_errors(lambda: run_sites(run)), StorchMessenger(run, "model"):
            model()   # z.item() on 4 samples: RuntimeError, noted "site 'z' (...) holds..."
    """

    def __init__(self, sites: Callable[[], List[str]]) -> None:
        self.sites = sites

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if (error is None or not isinstance(error, Exception)
                or isinstance(error, StorchError)):
            return False
        lines = self.sites()
        if lines:
            add_note(error, "storch_pyro: while this was raised, " + "; ".join(lines) + ". "
                     + REMEDY)
        return False


def add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)`` (Python >= 3.11), once; on older Pythons ``__notes__``
    is set as 3.11 would (shown by tracebacks from 3.11 on)."""
    notes = getattr(error, "__notes__", None) or []
    if note in notes:
        return
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:
        error.__notes__ = [*notes, note]
