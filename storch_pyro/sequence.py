"""Sequences: the sites of an autoregressive loop as ONE stochastic node.

A sequence of ``L`` categorical choices drawn ``k`` at a time per site would give ``k^L``
values; :func:`sequence` instead draws ``k`` *joint* samples of the whole sequence on one
shared sample dim, and registers one stochastic node with the loss: its log-probability is
the sum of the step log-probabilities, its sample weights come from the estimator.

Spelling (stable: examples and user code rely on it)::

    import storch_pyro as storch
    from storch_pyro import estimators, handlers

    def model(src, reference):
        state = encoder(src)                                   # [*batch, H]
        with handlers.sequence("translation",
                               estimator=estimators.UnorderedSet(n_samples=4),
                               eos=EOS) as seq:
            for t in pyro.markov(range(max_len)):
                tok = storch.sample(f"tok_{t}", dist.Categorical(logits=decoder(state)))
                state = step(seq.reorder(state), tok)          # reorder right after sampling
        tokens, mask = seq.values()                            # [k, *batch, L] each
        storch.add_cost("bleu", -bleu(tokens, mask, reference))   # one value per sequence

    loss = storch.StorchELBO().differentiable_loss(model, None, src, reference)

**reorder.** Each step's value holds the token of every row of the beam (size ``k`` at the
sequence's sample dim). With stochastic beam search a row's parent (the prefix it extends)
is any row of the previous step, so every tensor computed *before* the step that has the
sample dim (a decoder state, a token history) must be passed through ``seq.reorder(x)``
*after* the sample and before it meets the new token: it gathers the rows of ``x`` by the
parent indices of the step just drawn. Note the placement: a state computed from the
previous rows and the new tokens would mix different sequences (so ``reorder`` before the
first step, the mark of a reorder at the top of the loop, raises). ``reorder`` is the
identity for i.i.d. sampling and an expansion (each row repeated once per token) for
:class:`~storch_pyro.estimators.Enumerate`. ``x``'s sample dim is found as for Pyro
enumeration: left of its ``event_dim`` rightmost dims (default 1: a state ``[..., H]``;
``event_dim=0`` for one value per row). A tensor without the sample dim (size 1 there, or
too few dims: e.g. the encoder state before the first step) is returned as it is.

**Estimators** (``estimator=``):

* ``ScoreFunction(n_samples=k, baseline=LeaveOneOut())``: ``k`` i.i.d. sequences, REINFORCE
  on the joint log-probability with any baseline (RLOO here). Unbiased.
* ``UnorderedSet(n_samples=k)``: ``k`` distinct sequences by stochastic beam search (Kool,
  van Hoof & Welling 2019) and the unordered set estimator with its built-in baseline (Kool
  et al. 2020); leave-one-out ratios exact for ``k <= 12``, quadrature above. Unbiased.
* ``ImportanceWeightedSet(n_samples=k, normalized=True)``: the same beam, priority-sampling
  weights; normalized (default) biased but consistent, ``normalized=False`` unbiased.
* ``Enumerate()``: every sequence (``V^L`` rows: short sequences only), weighted by its
  probability. Exact.

**End of sequence.** With ``eos=`` a token id, a row that drew ``eos`` stays finished: its
later tokens are ``eos`` and contribute no log-probability. :meth:`SequenceMessenger.values`
then returns ``(tokens, mask)``, ``mask`` true up to and including each row's ``eos``.

**Costs inside the loop** (``storch.add_cost`` per step) are gathered onto the final rows
(the cost of the prefix a final sequence extends) and credited by the whole sequence node:
unbiased, as each is a function of the sequence; finer credit by prefix is not done.

**Limits.** Every latent site inside is a step of the sequence: a ``Categorical`` (indices)
without its own estimator; observed sites must be outside (use ``add_cost`` inside). One
sequence at a time (no nesting); in a model run without guide (``StorchELBO`` with
``guide=None``, the SCG mode), with credit by order. Outside a ``StorchELBO`` (plain Pyro)
the sites are ordinary ``pyro.sample`` sites, ``reorder`` is the identity and ``values``
stacks what was drawn.
"""

from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from pyro.distributions import Categorical
from pyro.poutine.indep_messenger import IndepMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK, Message
from pyro.poutine.subsample_messenger import _Subsample

from storch_pyro.errors import StorchError, UnsupportedDistributionError
from storch_pyro.estimators._sequence_math import beam_step, priority_weights, set_weights
from storch_pyro.estimators.base import Downstream, Draw, Estimator, Site, Terms
from storch_pyro.estimators.enumeration import Enumerate
from storch_pyro.estimators.importance_set import ImportanceWeightedSet
from storch_pyro.estimators.relaxation import discrete_base
from storch_pyro.estimators.score_function import ScoreFunction
from storch_pyro.estimators.unordered_set import UnorderedSet
from storch_pyro.handlers.tracing import (
    SEQUENCE_KEY,
    Node,
    StorchMessenger,
    _reduce_to_frames,
    checked_cost,
)
from storch_pyro.site_options import INFER_KEY

_ESTIMATORS = "ScoreFunction, UnorderedSet, ImportanceWeightedSet or Enumerate"


class _SequenceNode(Estimator):
    """The estimator the loss sees at a sequence's node: score term = joint log-probability;
    with set weights, the zero-valued baseline term of the unordered set estimator
    :math:`-\\sum_i w_i (l_i - \\bot l_i) B_i`, :math:`B_i = \\sum_j W_{ij} D_j`."""

    def __init__(self, source: Estimator, sequence: str, k: int) -> None:
        super().__init__(k)
        self.source = source
        self.sequence = sequence

    def surrogate(self, draw: Draw, downstream: Downstream) -> Optional[Terms]:
        if draw.state is None:  # no set weights: the score term alone
            return None
        score, w, w_baseline = draw.state  # [..., k] set layout
        sample_dim = downstream.site.sample_dim
        cost = downstream.cost.movedim(sample_dim, -1)
        baseline = (w_baseline * cost.unsqueeze(-2)).sum(-1)
        term = -(w * (score - score.detach()) * baseline).sum(-1)
        return Terms(control=term.unsqueeze(sample_dim))

    def __repr__(self) -> str:
        return f"{self.source!r} over sequence '{self.sequence}'"


class SequenceMessenger(Messenger):
    """The messenger :func:`sequence` returns: it draws the sites in its context on one
    shared sample dim and, when it closes, registers one stochastic node with the loss.

    Example::

        with handlers.sequence("y", estimator=estimators.UnorderedSet(4)) as seq:
            for t in pyro.markov(range(5)):
                tok = storch.sample(f"tok_{t}", dist.Categorical(logits=decoder(state)))
                state = step(seq.reorder(state), tok)
        tokens = seq.values()   # [4, *batch, 5]
    """

    def __init__(self, name: str, estimator: Optional[Estimator] = None,
                 eos: Optional[int] = None) -> None:
        super().__init__()
        if not isinstance(name, str):
            raise TypeError(f"handlers.sequence: name must be a str, got {type(name).__name__}")
        if estimator is None:
            estimator = ScoreFunction()
        if not isinstance(estimator, (ScoreFunction, UnorderedSet, ImportanceWeightedSet,
                                      Enumerate)):
            raise StorchError(
                f"sequence '{name}': estimator {estimator!r} cannot estimate over a sequence; "
                f"use {_ESTIMATORS}."
            )
        if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int) or eos < 0):
            raise TypeError(f"sequence '{name}': eos must be a token id (int >= 0), got {eos!r}")
        self.name = name
        self.estimator = estimator
        self.eos = eos
        self._reset()

    def _reset(self) -> None:
        self._storch: Optional[StorchMessenger] = None
        self._sites: List[str] = []
        self._tokens: List[torch.Tensor] = []  # set layout [*rest, K_t] (or raw values)
        self._parents: List[Optional[torch.Tensor]] = []
        self._alive: List[torch.Tensor] = []
        self._costs: List[Tuple[Message, int]] = []
        self._stack: Optional[tuple] = None
        self._final: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None
        self._dim: Optional[int] = None
        self._key: Any = None
        self._outer_plates: Dict[int, int] = {}
        self._rows = 0
        self._last_parents: Optional[torch.Tensor] = None
        self._prev_rows = 0

    # ---- context ------------------------------------------------------------------------
    def __enter__(self) -> "SequenceMessenger":
        for handler in _PYRO_STACK:
            if isinstance(handler, SequenceMessenger):
                raise StorchError(
                    f"sequence '{self.name}' is opened inside sequence '{handler.name}': "
                    f"sequences cannot be nested. Draw the inner choices as steps of the "
                    f"outer sequence, or close it first."
                )
        self._reset()
        for handler in reversed(_PYRO_STACK):
            if isinstance(handler, StorchMessenger):
                self._storch = handler
                break
        if self._storch is not None:
            run = self._storch.run
            if self._storch.role != "scg":
                raise StorchError(
                    f"sequence '{self.name}' is in the {self._storch.role}: sequences are "
                    f"supported in a model run without guide (StorchELBO with guide=None)."
                )
            if run.flow is not None:
                raise StorchError(
                    f"sequence '{self.name}': credit='data_flow' does not support sequences "
                    f"yet; use the default credit='order'."
                )
        for handler in _PYRO_STACK:
            if isinstance(handler, IndepMessenger) and handler.dim is not None:
                size = getattr(handler, "subsample_size", None) or handler.size
                self._outer_plates[handler.dim] = size
        return super().__enter__()

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        super().__exit__(exc_type, exc_value, traceback)
        if exc_type is None and self._storch is not None:
            self._finish()

    # ---- the user's tools -----------------------------------------------------------------
    def reorder(self, x: torch.Tensor, event_dim: int = 1) -> torch.Tensor:
        """``x`` with its rows gathered by the parent indices of the step just drawn (call it
        right after each sample on every earlier tensor with the sample dim; see the module
        docstring). ``event_dim``: how many rightmost dims of ``x`` are not batch dims."""
        if not self._tokens:
            raise StorchError(
                f"sequence '{self.name}': seq.reorder was called before the first step. Call "
                f"it right after each sample, on the tensors computed before that sample "
                f"(state = step(seq.reorder(state), tok)): a state reordered at the top of the "
                f"loop has already met the new tokens in the old row order."
            )
        parents = self._last_parents
        if parents is None:
            return x
        dim = self._dim - event_dim
        if x.dim() < -dim or x.shape[dim] == 1:
            return x
        if x.shape[dim] != self._prev_rows:
            raise StorchError(
                f"sequence '{self.name}': reorder got a tensor of shape {tuple(x.shape)} with "
                f"size {x.shape[dim]} at dim {dim} (the sample dim, left of event_dim="
                f"{event_dim} event dims), where the previous step had {self._prev_rows} "
                f"rows. Call seq.reorder once per step, right after the sample, on tensors "
                f"computed before it; pass event_dim= for tensors with more event dims."
            )
        index = _to_sample_layout(parents, -self._dim - 1)
        index = index.reshape(index.shape + (1,) * event_dim)
        shape = _broadcast(x.shape[dim + 1:] if dim + 1 < 0 else (),
                                       index.shape[1:])
        lead = x.shape[:x.dim() + dim]
        x = x.expand(lead + (x.shape[dim],) + shape)
        index = index.expand(lead + (index.shape[0],) + shape)
        return x.gather(x.dim() + dim, index)

    def values(self) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """The tokens of every sequence ``[k, *batch, L]`` in the final row order (the
        sample dim first, as each step's value has it); with ``eos=``, ``(tokens, mask)``,
        ``mask`` true up to and including each row's ``eos``."""
        if not self._tokens:
            raise StorchError(f"sequence '{self.name}' has no steps yet: values() needs a "
                              f"sample site inside handlers.sequence.")
        if self._storch is None:  # plain Pyro: what was drawn
            tokens = torch.stack(torch.broadcast_tensors(*self._tokens), -1)
            if self.eos is None:
                return tokens
            ended = (tokens == self.eos).long().cumsum(-1)
            mask = (ended - (tokens == self.eos).long()) == 0
            return tokens, mask
        if self._final is None:
            raise StorchError(f"sequence '{self.name}': call values() after the with block.")
        tokens, mask = self._final
        return tokens if self.eos is None else (tokens, mask)

    # ---- drawing --------------------------------------------------------------------------
    def _pyro_sample(self, msg: Message) -> None:
        if type(msg["fn"]) is _Subsample:
            return
        site = msg["name"]
        options = msg["infer"].get(INFER_KEY)
        if options is not None and (options.estimator is not None or options.baseline is not None):
            raise StorchError(
                f"site '{site}' in sequence '{self.name}' has its own estimator or baseline: "
                f"the sites of a sequence form one stochastic node. Give the estimator to "
                f"handlers.sequence('{self.name}', estimator=...) and drop it at the site."
            )
        if self._storch is None:
            return
        if msg["is_observed"]:
            raise StorchError(
                f"observed site '{site}' is inside sequence '{self.name}': every site there is "
                f"a step of the sequence. Add its log-likelihood with storch.add_cost inside, "
                f"or observe it after the sequence."
            )
        if site in self._sites:
            raise StorchError(f"sequence '{self.name}': site '{site}' is drawn twice; give each "
                              f"step its own name (e.g. f'tok_{{t}}').")
        found = discrete_base(msg["fn"])
        if found is None or found[0] != "categorical" or msg["fn"].event_shape != ():
            raise UnsupportedDistributionError(
                f"site '{site}' in sequence '{self.name}': a step must be a Categorical "
                f"(token indices), got {type(msg['fn']).__name__}; draw other variables outside "
                f"handlers.sequence."
            )
        msg["infer"][SEQUENCE_KEY] = self.name
        self._sites.append(site)
        msg["value"], msg["fn"] = self._draw(site, msg["fn"], found[1], msg["cond_indep_stack"])
        msg["done"] = True

    def _pyro_post_sample(self, msg: Message) -> None:
        if self._storch is None:
            if not msg["is_observed"] and type(msg["fn"]) is not _Subsample:
                self._tokens.append(msg["value"])
            return
        if msg["infer"].get(SEQUENCE_KEY) != self.name:
            return
        stack = msg["cond_indep_stack"]
        plates = {(f.name, f.dim) for f in stack if f.dim is not None}
        if self._stack is None:
            self._stack = stack
        elif plates != {(f.name, f.dim) for f in self._stack if f.dim is not None}:
            raise StorchError(
                f"site '{msg['name']}' in sequence '{self.name}' is in plates "
                f"{sorted(p[0] for p in plates)}, unlike its first step "
                f"'{self._sites[0]}': every step of a sequence must be in the same plates."
            )

    def _pyro_storch_cost(self, msg: Message) -> None:
        if self._storch is not None:
            msg["infer"][SEQUENCE_KEY] = self.name

    def _pyro_post_storch_cost(self, msg: Message) -> None:
        if self._storch is not None and msg["infer"].get(SEQUENCE_KEY) == self.name:
            self._costs.append((msg, len(self._tokens)))

    def _draw(self, site: str, fn, logits: torch.Tensor, stack) -> Tuple[torch.Tensor, Any]:
        run = self._storch.run
        first = self._dim is None
        estimator = self.estimator
        k = estimator.n_samples
        if first:
            self._dim, self._key = run.allocate_sample_dim(self.name, 1 if isinstance(
                estimator, Enumerate) else k, sites=[])
            self._rows = 1 if isinstance(estimator, (Enumerate,)) else k
            self._prev_rows = self._rows
        room = -self._dim - 1
        rows = self._rows
        vocab = logits.shape[-1]
        batch = tuple(logits.shape[:-1])
        if len(batch) > room + 1:
            raise StorchError(
                f"site '{site}' in sequence '{self.name}': its batch shape {batch} has more "
                f"dims than max_plate_nesting plus the sample dims; declare batch dims with "
                f"pyro.plate."
            )
        batch = (1,) * (room + 1 - len(batch)) + batch
        if batch[0] not in (1, rows):
            raise StorchError(
                f"site '{site}' in sequence '{self.name}': its distribution has size "
                f"{batch[0]} at the sequence's sample dim {self._dim}, where the sequence "
                f"has {rows} rows. Draw ONE site per step for all rows at once (not one site "
                f"per beam or sample), and pass earlier tensors through seq.reorder."
            )
        # A Categorical's logits are normalized log-probabilities already.
        log_p = logits.reshape(batch + (vocab,)).movedim(0, -2)
        plates = dict(self._outer_plates)
        plates.update({f.dim: f.size for f in stack if f.dim is not None})
        rest = [1] * room
        for dim, size in plates.items():
            if -dim <= room:
                rest[dim] = size
        rest = _broadcast(tuple(rest), log_p.shape[:-2])
        if first:
            self._init_state(rest, log_p)
        else:
            self._broadcast_state(rest)
        log_p = log_p.expand(rest + (rows, vocab))
        finished = self._finished
        if self.eos is not None:
            forced = torch.full_like(log_p, float("-inf"))
            forced[..., self.eos] = 0.0
            log_p = torch.where(finished.unsqueeze(-1), forced, log_p)
        with torch.no_grad():
            parents, tokens = self._select(log_p.detach(), rest, rows, vocab, k)
        identity = parents is None
        new_rows = tokens.shape[-1]
        if identity:  # i.i.d.: row i extends row i
            chosen = log_p
            self._log_p = self._log_p + log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            alive = ~finished
        else:
            chosen = log_p.gather(-2, parents.unsqueeze(-1).expand(rest + (new_rows, vocab)))
            step_lp = chosen.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            self._log_p = self._log_p.gather(-1, parents) + step_lp
            alive = ~finished.gather(-1, parents)
        self._finished = ~alive | (tokens == self.eos) if self.eos is not None else ~alive
        self._tokens.append(tokens)
        self._alive.append(alive)
        self._parents.append(parents)
        self._last_parents = parents
        self._prev_rows, self._rows = rows, new_rows
        frame = run.frames[self._key]
        frame.sites.append(site)
        frame.parents.append(parents)
        frame.size = new_rows  # Enumerate: the frame grows
        value = _to_sample_layout(tokens, room)
        if identity and self.eos is None:
            return value, fn  # row i was drawn from row i of the site's own distribution
        return value, Categorical(logits=_to_sample_layout(chosen, room, event=1))

    def _init_state(self, rest, log_p) -> None:
        rows = self._rows
        dtype, device = log_p.dtype, log_p.device
        self._log_p = torch.zeros(rest + (rows,), dtype=dtype, device=device)
        self._finished = torch.zeros(rest + (rows,), dtype=torch.bool, device=device)
        top = torch.full(rest + (rows,), float("-inf"), dtype=dtype, device=device)
        top[..., 0] = 0.0  # one root; the other rows are empty until the beam fills
        self._top = top
        self._kappa = torch.full(rest, float("-inf"), dtype=dtype, device=device)

    def _broadcast_state(self, rest) -> None:
        shape = rest + (self._rows,)
        if tuple(self._log_p.shape) != tuple(shape):
            self._log_p = self._log_p.expand(shape)
            self._finished = self._finished.expand(shape)
            self._top = self._top.expand(shape)
            self._kappa = self._kappa.expand(rest)

    def _select(self, log_p, rest, rows, vocab, k) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """Parent rows (``None``: row i extends row i) and tokens ``[*rest, K_new]`` of the
        new rows."""
        estimator = self.estimator
        device = log_p.device
        if isinstance(estimator, ScoreFunction):
            probs = log_p.exp().reshape(-1, vocab)
            return None, torch.multinomial(probs, 1).reshape(log_p.shape[:-1])
        if isinstance(estimator, Enumerate):
            parents = torch.arange(rows, device=device).repeat_interleave(vocab)
            tokens = torch.arange(vocab, device=device).repeat(rows)
            return parents.expand(rest + (rows * vocab,)), tokens.expand(rest + (rows * vocab,))
        phi = self._log_p.detach()
        phi = torch.where(self._top > float("-inf"), phi, torch.full_like(phi, float("-inf")))
        parents, tokens, top, dropped = beam_step(log_p, phi, self._top, k)
        self._top = top
        self._kappa = torch.maximum(self._kappa, dropped)
        return parents, tokens

    # ---- registering the node -----------------------------------------------------------------
    def _finish(self) -> None:
        storch = self._storch
        run = storch.run
        if not self._tokens:
            for msg, _ in self._costs:
                self._record(msg, None)
            return
        room = -self._dim - 1
        rows = self._rows
        rest = tuple(self._log_p.shape[:-1])
        # Ancestry: for each step, the row (of that step) each final row descends from
        # (None: the same row, for i.i.d. sampling).
        index: Optional[torch.Tensor] = None
        ancestry: List[Optional[torch.Tensor]] = [None] * len(self._tokens)
        for t in range(len(self._tokens) - 1, -1, -1):
            ancestry[t] = index
            parents = self._parents[t]
            if parents is not None:
                parents = parents.expand(rest + parents.shape[-1:])
                index = parents if index is None else parents.gather(-1, index)
        tokens = [_gather(tok, a, rest) for tok, a in zip(self._tokens, ancestry)]
        alive = [_gather(m, a, rest) for m, a in zip(self._alive, ancestry)]
        self._final = (_to_sample_layout(torch.stack(tokens, -1), room, event=1),
                       _to_sample_layout(torch.stack(alive, -1), room, event=1))
        estimator = self.estimator
        log_p = self._log_p
        if not isinstance(estimator, (ScoreFunction, Enumerate)):
            if not bool(torch.isfinite(self._top).all()):
                raise StorchError(
                    f"sequence '{self.name}': {estimator!r} draws {estimator.n_samples} "
                    f"distinct sequences, but fewer have positive probability. Lower n_samples "
                    f"or use Enumerate()."
                )
        stack = self._stack
        state = None
        baseline = None
        if isinstance(estimator, ScoreFunction):
            weights = None
            baseline = estimator.baseline
            if baseline is not None:
                baseline.check(self.name, estimator.n_samples)
        elif isinstance(estimator, Enumerate):
            weights = _to_sample_layout(log_p.exp(), room)
        else:
            if isinstance(estimator, UnorderedSet):
                w, w_baseline = set_weights(log_p, estimator.method)
            else:
                w, w_baseline = priority_weights(log_p, self._kappa, estimator.normalized)
            weights = _to_sample_layout(w, room)
            state = (log_p, w, w_baseline)
        if weights is not None:
            run.set_frame_weights(self._key, weights, stack)
        if not isinstance(estimator, Enumerate):
            score = _to_sample_layout(log_p, room)
            ordinal, seq, weight = run.frames_of(score, stack, self.name)
            adapter = _SequenceNode(estimator, self.name, rows)
            site = Site(self.name, None, self._dim, run.max_plate_nesting, run.args, run.kwargs)
            draw = Draw(score, size=rows, score=score, state=state)
            run.nodes.append(Node(
                self.name, score, run.on_frames(score, ordinal), ordinal, seq,
                len(run.nodes), adapter, baseline, site, draw, self._key, weight,
            ))
        for msg, step in self._costs:
            self._record(msg, ancestry[step - 1] if step > 0 else None)

    def _record(self, msg: Message, ancestry: Optional[torch.Tensor]) -> None:
        """Adds a cost computed inside the sequence, its rows gathered onto the final rows."""
        name, stack = msg["name"], msg["cond_indep_stack"]
        value = _reduce_to_frames(checked_cost(msg), stack, self._storch.run)
        if ancestry is not None and value.dim() >= -self._dim and value.shape[self._dim] != 1:
            room = -self._dim - 1
            index = _to_sample_layout(ancestry, room)
            lead = value.shape[:value.dim() + self._dim]
            shape = _broadcast(value.shape[value.dim() + self._dim + 1:],
                                           index.shape[1:])
            value = value.expand(lead + value.shape[len(lead):len(lead) + 1] + shape)
            index = index.expand(lead + index.shape[:1] + shape)
            value = value.gather(len(lead), index)
        self._storch.record_cost(name, value, msg["scale"], stack)


def _broadcast(*shapes) -> Tuple[int, ...]:
    """``torch.broadcast_shapes`` for plain shapes, without its overhead."""
    rank = max(len(s) for s in shapes)
    out = [1] * rank
    for shape in shapes:
        for i, size in enumerate(shape, rank - len(shape)):
            if size != 1:
                if out[i] != 1 and out[i] != size:
                    raise RuntimeError(f"shapes {shapes} do not broadcast")
                out[i] = size
    return tuple(out)


def _gather(x: torch.Tensor, index: Optional[torch.Tensor], rest) -> torch.Tensor:
    """``x [*rest, K_t]`` on the final rows ``index [*rest, K]`` (``None``: the same rows)."""
    x = x.expand(rest + x.shape[-1:])
    return x if index is None else x.gather(-1, index)


def _to_sample_layout(x: torch.Tensor, room: int, event: int = 0) -> torch.Tensor:
    """``[*rest, K, *event]`` (set layout, ``rest`` of rank ``room``) to
    ``[K, *rest, *event]``: the rows on the sample dim, left of ``room`` batch dims."""
    return x.movedim(-1 - event, 0)


def sequence(name: str, estimator: Optional[Estimator] = None,
             eos: Optional[int] = None) -> SequenceMessenger:
    """The sample sites inside form one sequence: ``k`` joint samples on one sample dim and
    ONE stochastic node (joint log-probability = sum of the steps' log-probabilities).

    :param str name: the node's name (in errors, and for its baseline's state).
    :param estimator: ``ScoreFunction(n_samples=k, baseline=...)`` (i.i.d.),
        ``UnorderedSet(n_samples=k)`` (stochastic beam search, unordered set estimator),
        ``ImportanceWeightedSet(n_samples=k)`` or ``Enumerate()``; default
        ``ScoreFunction()``.
    :param int eos: the end-of-sequence token id: a row that drew it stays finished.

    Example (see :mod:`storch_pyro.sequence`)::

        with handlers.sequence("y", estimator=estimators.UnorderedSet(n_samples=4)) as seq:
            for t in pyro.markov(range(max_len)):
                tok = storch.sample(f"tok_{t}", dist.Categorical(logits=decoder(state)))
                state = step(seq.reorder(state), tok)
        storch.add_cost("reward", -reward(seq.values()))
    """
    return SequenceMessenger(name, estimator, eos)
