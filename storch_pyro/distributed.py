"""Estimator state synchronized across the processes of a data-parallel run
(``torch.distributed``: ``torchrun``, ``DistributedDataParallel``, Lightning's DDP strategy).

:class:`~storch_pyro.StorchELBO` commits the state updates of a step once, after the
surrogate is built (:mod:`storch_pyro.state`). With ``sync_state`` (by default whenever
``torch.distributed`` is initialized) the commit goes through a :class:`StateSync`: one
small ``all_reduce`` per step once the state names are known (one ``all_gather_object``
more on a step where a process records a new name), entered by every process at every
step, even one that recorded nothing. Processes may record different names (different model
structures, e.g. episodes of different lengths) without deadlocking, because the
collectives never depend on the names a process recorded. Each name's statistics are
averaged over the processes that recorded it,

.. math:: \\bar s = \\frac{1}{|R_s|} \\sum_{r \\in R_s} s_r,

unweighted: each process's step statistic (already averaged over its own records of the
step) counts once, whatever its batch size. Every process computes the same average from
the same gathered values in rank order, and applies the update of every name (also those it
did not record itself: the update rules are exchanged the first time a process records a
name), so the state stays identical on every rank.

Example::

    torch.distributed.init_process_group("gloo")
    elbo = StorchELBO()                      # synchronizes over the default group
    elbo = StorchELBO(sync_state=False)      # per-rank state
    elbo = StorchELBO(sync_state=group)      # another torch.distributed.ProcessGroup
"""

import pickle
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import torch
import torch.distributed as dist

from storch_pyro import state as estimator_state
from storch_pyro.errors import StorchError
from storch_pyro.param_state import param_store_state

_STATS, _GRADIENTS = "state:", "gradient:"  # the two kinds of keys exchanged

#: ``sync_state`` of :class:`~storch_pyro.StorchELBO`: ``None`` (synchronize over the default
#: group when ``torch.distributed`` is initialized), ``True`` (the default group, required),
#: ``False`` (per-rank state) or a ``ProcessGroup``.
SyncState = Union[None, bool, Any]


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is available and initialized.

    Example::

        rank = torch.distributed.get_rank() if is_distributed() else 0
    """
    return dist.is_available() and dist.is_initialized()


class StateSync:
    """The ``all_reduce`` of :func:`storch_pyro.state.commit` for a process group (see the
    module docstring).

    **Protocol.** The processes keep the same list of the state names seen so far (with
    their shapes). Each step, every process enters one ``all_reduce`` (sum) of a float64
    buffer laid out by that list: a flag, then per name a count (1 if this process recorded
    it) and its statistics (zeros if not). A name's average is its summed statistics over
    its summed count. A process that recorded a name not in the list (or of another shape)
    sets the flag, and then every process, seeing it, also enters one
    ``all_gather_object`` of ``{name: statistics}`` and of the update rules not sent before;
    the list grows by the new names. So a step costs one small ``all_reduce`` once the names
    are known, two collectives the first time a name appears, and the collectives never
    depend on what a process recorded: no deadlock whatever the structures.

    :param group: a ``torch.distributed.ProcessGroup``; ``None`` for the default group.

    Example (what :class:`~storch_pyro.StorchELBO` does by default under ``torchrun``)::

        sync = StateSync()                       # the default process group
        storch_pyro.state.commit(updates, all_reduce=sync)
    """

    def __init__(self, group: Optional[Any] = None) -> None:
        self.group = group
        self._announced: Set[str] = set()
        self._names: List[str] = []  # the same on every process
        self._shapes: Dict[str, torch.Size] = {}
        self._dtypes: Dict[str, torch.dtype] = {}

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def __call__(self, stats: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return self.exchange(stats, {})[0]

    def exchange(
        self, stats: Dict[str, torch.Tensor], gradients: Dict[str, torch.Tensor]
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """``stats`` averaged over the processes that recorded each name, and
        ``gradients`` (by param-store name) averaged over all processes (a process without
        a name counting as zero, as DDP counts an unused parameter): in the same
        collectives."""
        if self.world_size == 1:
            return stats, gradients
        entries = {**{_STATS + k: v for k, v in stats.items()},
                   **{_GRADIENTS + k: v for k, v in gradients.items()}}
        buffer = self._pack(entries)
        dist.all_reduce(buffer, group=self.group)
        if float(buffer[0]) == 0.0:
            out = self._unpack(buffer, entries)
        else:
            out = self._gather(entries, stats)
        return ({k[len(_STATS):]: v for k, v in out.items() if k.startswith(_STATS)},
                {k[len(_GRADIENTS):]: v for k, v in out.items() if k.startswith(_GRADIENTS)})

    # ---- the steady state: one all_reduce --------------------------------------------------
    def _device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _pack(self, entries: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``[flag, counts..., values...]`` in the order of the known keys."""
        new = any(key not in self._shapes or value.shape != self._shapes[key]
                  for key, value in entries.items())
        counts = [torch.full((1,), float(new), dtype=torch.float64, device=self._device())]
        values = []
        for key in self._names:
            value = entries.get(key)
            known = value is not None and value.shape == self._shapes[key]
            counts.append(counts[0].new_full((1,), 1.0 if known else 0.0))
            values.append(value.detach().reshape(-1).to(counts[0]) if known else
                          counts[0].new_zeros(self._shapes[key].numel()))
        return torch.cat(counts + values)

    def _unpack(self, buffer: torch.Tensor,
                entries: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        n = len(self._names)
        counts, offset, out = buffer[1:1 + n].tolist(), 1 + n, {}
        for key, count in zip(self._names, counts):
            shape = self._shapes[key]
            if count > 0:
                total = buffer[offset:offset + shape.numel()].reshape(shape)
                divisor = self.world_size if key.startswith(_GRADIENTS) else count
                out[key] = self._place(key, total / divisor, entries.get(key))
            offset += shape.numel()
        return out

    # ---- a step with new keys: one all_gather_object more ------------------------------
    def _gather(self, entries: Dict[str, torch.Tensor],
                stats: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        payload = {
            "entries": {key: value.detach().cpu() for key, value in entries.items()},
            "updates": self._new_updates(stats),
        }
        gathered: List[Optional[Dict[str, Any]]] = [None] * self.world_size
        dist.all_gather_object(gathered, payload, group=self.group)
        by_key: Dict[str, List[torch.Tensor]] = {}
        for other in gathered:
            assert other is not None
            for name, update in other["updates"].items():
                if name not in stats and estimator_state.known_update(name) is None:
                    estimator_state.register_update(name, update)
            for key, value in other["entries"].items():
                by_key.setdefault(key, []).append(value)
        out = {}
        for key, values in by_key.items():
            if key.startswith(_GRADIENTS):
                mean = self._average(key[len(_GRADIENTS):], values, None)
                mean = mean * (len(values) / self.world_size)
            else:
                mean = self._average(key[len(_STATS):], values, None)
            if key not in self._shapes:
                self._names.append(key)
            self._shapes[key], self._dtypes[key] = mean.shape, mean.dtype
            out[key] = self._place(key, mean, entries.get(key))
        return out

    def _place(self, key: str, mean: torch.Tensor,
               local: Optional[torch.Tensor]) -> torch.Tensor:
        """``mean`` on the device and dtype of this process's value, or of the stored state
        where it has none."""
        if local is not None:
            return mean.to(device=local.device, dtype=local.dtype)
        dtype = self._dtypes.get(key, mean.dtype)
        existing = param_store_state(key.split(":", 1)[1])
        return mean.to(dtype) if existing is None else mean.to(existing.device, dtype)

    def _new_updates(self, stats: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        """The update rules of names this process sends for the first time (those that
        pickle: a rule that does not is applied only by processes that record it)."""
        updates = {}
        for name in stats:
            if name in self._announced:
                continue
            self._announced.add(name)
            update = estimator_state.known_update(name)
            try:
                pickle.dumps(update)
            except Exception:
                continue
            updates[name] = update
        return updates

    @staticmethod
    def _average(name: str, values: List[torch.Tensor],
                 local: Optional[torch.Tensor]) -> torch.Tensor:
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise StorchError(
                f"state '{name}': the processes recorded statistics of different shapes "
                f"{sorted(shapes)}, which cannot be averaged (Pyro's decaying-average baseline "
                f"keeps one value per batch element). Give every process the same batch size, "
                f"use a baseline with scalar state (baselines.MovingAverage), or "
                f"StorchELBO(sync_state=False) for per-rank state."
            )
        mean = values[0] if len(values) == 1 else torch.stack(
            [v.to(torch.float64) for v in values]).mean(0).to(values[0].dtype)
        return mean if local is None else mean.to(device=local.device, dtype=local.dtype)


def check_sync_state(sync_state: SyncState) -> None:
    """Raises ``TypeError`` unless ``sync_state`` is ``None``, a bool or a
    ``torch.distributed.ProcessGroup``."""
    if sync_state is None or isinstance(sync_state, bool):
        return
    if dist.is_available() and isinstance(sync_state, dist.ProcessGroup):
        return
    raise TypeError(
        f"StorchELBO: sync_state must be None (synchronize when torch.distributed is "
        f"initialized), True, False or a torch.distributed.ProcessGroup, got "
        f"{type(sync_state).__name__}"
    )


def resolve(sync_state: SyncState) -> Optional[Any]:
    """The process group to synchronize over (``None`` meaning the default one), or
    ``False`` when the state stays per-rank."""
    if sync_state is False:
        return False
    if sync_state is None:
        return None if is_distributed() else False
    if not is_distributed():
        raise StorchError(
            "StorchELBO(sync_state=...): torch.distributed is not initialized; call "
            "torch.distributed.init_process_group (torchrun does not do it for you) before the "
            "first step, or leave sync_state at its default to synchronize only when it is."
        )
    return None if sync_state is True else sync_state


__all__ = ["StateSync", "SyncState", "check_sync_state", "is_distributed", "resolve"]
