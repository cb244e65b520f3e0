"""Estimator and baseline state as explicit values, committed once per step.

As in optax, a stateful part of an estimator never changes its state while the surrogate is
built: it *reads* the state (a tensor in Pyro's param store, so it checkpoints with it) and
*records* the step's statistics together with its update rule
:math:`s_{t+1} = \\mathrm{update}(s_t, \\mathrm{stats}_t)`. After the surrogate is built,
:class:`~storch_pyro.StorchELBO` applies every recorded update once, through
:func:`commit`: the one place where a distributed run all-reduces the step's statistics
(one collective per step, whatever the model's structure). Statistics recorded under one
name within a step (several particles, several sites sharing one state) are averaged first,
so a shared schedule counts training steps, not sites.

Example (a baseline with explicit state, as :class:`~storch_pyro.baselines.MovingAverage`)::

    def __call__(self, ctx, downstream_cost):
        average = param_store_state(name)               # read, never changed here
        record(name, downstream_cost.detach().mean(), self.update)
        return torch.zeros(()) if average is None else average.detach().clone()
"""

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from storch_pyro.param_state import param_store_state, set_param_store_state

#: ``update(state, stats) -> new state``; ``state`` is ``None`` before the first update.
Update = Callable[[Optional[torch.Tensor], torch.Tensor], torch.Tensor]
#: ``all_reduce(stats_by_name) -> stats_by_name``: averages statistics across processes.
AllReduce = Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]


#: The update rule last recorded under each name, in this process or (registered by a
#: synchronizer, :mod:`storch_pyro.distributed`) in another: a process applies the updates of
#: states that only other processes recorded in a step, so state stays equal on every rank.
_KNOWN_UPDATES: Dict[str, Update] = {}


def register_update(name: str, update: Update) -> None:
    """Makes ``update`` the rule of state ``name`` (see :func:`known_update`).

    Example::

        register_update("storch_pyro.estimator.z.step", add_one)
    """
    _KNOWN_UPDATES[name] = update


def known_update(name: str) -> Optional[Update]:
    """The update rule last recorded (or registered) under ``name``, or ``None``.

    Example::

        update = known_update("storch_pyro.baseline.z.moving_average")  # MovingAverage.update
    """
    return _KNOWN_UPDATES.get(name)


class StepUpdates:
    """The state updates recorded during one step, by state name."""

    def __init__(self) -> None:
        self._stats: Dict[str, List[torch.Tensor]] = {}
        self._updates: Dict[str, Update] = {}

    def record(self, name: str, stats: torch.Tensor, update: Update) -> None:
        self._stats.setdefault(name, []).append(stats.detach())
        self._updates[name] = update
        register_update(name, update)

    def statistics(self) -> Dict[str, torch.Tensor]:
        """Each name's statistics, averaged over the records of the step."""
        return {
            name: values[0] if len(values) == 1 else torch.stack(values).mean(0)
            for name, values in self._stats.items()
        }

    def __bool__(self) -> bool:
        return bool(self._stats)

    def commit(self, all_reduce: Optional[AllReduce] = None) -> None:
        """Applies each update once (see :func:`commit`). With ``all_reduce``, it is called
        every step, even with no statistics (a collective must be entered by every
        process), and may return names this process did not record: their updates are
        applied with the rule recorded or registered under the name
        (:func:`known_update`); names without a known rule are skipped."""
        stats = self.statistics()
        if all_reduce is not None:
            stats = all_reduce(stats)
        with torch.no_grad():
            for name, value in stats.items():
                update = self._updates.get(name) or known_update(name)
                if update is None:
                    continue
                state = param_store_state(name)
                if state is not None and value.device != state.device:
                    value = value.to(state.device)
                new = update(None if state is None else state.detach(), value)
                if state is not None and state.shape == new.shape:
                    state.copy_(new)
                else:
                    set_param_store_state(name, new)
        self._stats.clear()


_CURRENT: List[StepUpdates] = []


@contextmanager
def recording() -> Iterator[StepUpdates]:
    """Collects the updates recorded (:func:`record`) while the context is open."""
    updates = StepUpdates()
    _CURRENT.append(updates)
    try:
        yield updates
    finally:
        _CURRENT.pop()


def record(name: str, stats: torch.Tensor, update: Update) -> None:
    """Records a state update for the current step (nothing outside
    :func:`recording`, e.g. when the loss is only evaluated).

    Example (a step counter, once per step however many sites record it)::

        record("storch_pyro.estimator.z.step", torch.ones(()), add_one)
    """
    if _CURRENT:
        _CURRENT[-1].record(name, stats, update)


def commit(updates: StepUpdates, all_reduce: Optional[AllReduce] = None) -> None:
    """Applies a step's updates once, after the surrogate is built: statistics recorded
    under one name are averaged, passed through ``all_reduce`` (where a distributed run
    averages them across processes: one collective per step, entered even when the step
    recorded nothing), and each state becomes ``update(state, stats)``."""
    updates.commit(all_reduce)


def add_one(state: Optional[torch.Tensor], stats: torch.Tensor) -> torch.Tensor:
    """The update of a step counter."""
    one = torch.ones((), dtype=torch.float64, device=stats.device)
    return one if state is None else state + 1.0


__all__: Tuple[str, ...] = (
    "StepUpdates",
    "recording",
    "record",
    "commit",
    "add_one",
    "register_update",
    "known_update",
)
