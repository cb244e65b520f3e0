"""The sample-frame record (:class:`storch_pyro.estimators.Frame`): its reductions, and what a
run records for each kind of frame (i.i.d. samples, weights, a contracted ``pyro.markov``
chain with recycled dims, a sequence sharing one frame). The estimators' unbiasedness over
these frames is tested where they are (test_unbiased, test_enum_chain, test_sequence,
test_iwelbo); here the record itself."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.poutine.indep_messenger import CondIndepStackFrame

import storch_pyro as storch
from storch_pyro import estimators
from storch_pyro.estimators import Frame
from storch_pyro.handlers.records import Run
from tests import seq_toys as T


def _run(program, *args, **kwargs) -> Run:
    elbo = storch.StorchELBO(**kwargs)
    elbo._ensure_max_plate_nesting(program, None, args, {})
    return elbo._get_trace(program, None, args, {})


def test_reductions():
    v = torch.tensor([[1.0, -2.0, 0.5]]).T  # the frame at dim -2
    mean = Frame(("m", -2, 0), -2, 3)
    assert mean.weights == pytest.approx(1 / 3)
    assert torch.allclose(mean.reduce(v), v.mean(0))
    w = torch.tensor([[0.2, 0.3, 0.5]]).T
    weighted = Frame(("w", -2, 0), -2, 3)
    weighted.set_weights(w)
    assert weighted.reduction == "weighted" and weighted.plates == frozenset()
    assert torch.allclose(weighted.reduce(v, keepdim=True), (w * v).sum(0, keepdim=True))
    lme = Frame(("p", -2, 0), -2, 3, "log_mean_exp")
    assert torch.allclose(lme.reduce(v), torch.log(v.exp().mean(0)))
    lme_w = Frame(("p", -2, 0), -2, 3, "log_mean_exp", weights=w)
    assert torch.allclose(lme_w.reduce(v), torch.log((w * v.exp()).sum(0)))
    contracted = Frame(("c", -2, 0), -2, 2, "contracted")
    assert contracted.weights is None
    with pytest.raises(ValueError, match="contracted"):
        contracted.reduce(v)


def test_weights_varying_along_a_plate():
    """``set_weights`` notes the plates along which the weights vary (costs carrying the
    frame must be inside them)."""
    frame = Frame(("storch_pyro.samples:z", -2, 0), -2, 2)
    stack = [CondIndepStackFrame("data", -1, 3, 0), CondIndepStackFrame("other", -3, 1, 0)]
    frame.set_weights(torch.rand(2, 3), stack)
    assert frame.plates == frozenset({("data", -1, 0)}) and frame.site == "z"


def test_iid_and_weighted_frames():
    def program(logits):
        with pyro.plate("data", 2):
            a = storch.sample("a", dist.Bernoulli(logits=logits),
                              estimator=estimators.ScoreFunction(3))
            b = storch.sample("b", dist.Bernoulli(logits=logits * a),
                              estimator=estimators.Enumerate())
            storch.add_cost("f", a + b)

    run = _run(program, torch.zeros(2, requires_grad=True), max_plate_nesting=1)
    a, b = run.frames.values()
    assert (a.site, a.dim, a.size, a.reduction, a.weights) == ("a", -2, 3, "mean", 1 / 3)
    assert (b.site, b.dim, b.size, b.reduction) == ("b", -3, 2, "weighted")
    assert b.weights.shape == (2, 3, 2)  # q(b | a_i) along b's dim, a's dim and the plate
    assert b.plates == frozenset({("data", -1, 0)})
    assert list(run.live_frames) == [-2, -3] and a.sites == ["a"] and b.sites == ["b"]
    # the cost carries both frames, weighted by 1/3 * q(b | a_i)
    (cost,) = run.costs
    assert {a.key, b.key} <= cost.ordinal
    assert torch.allclose(cost.weight, b.weights / 3)


def test_chain_frames_are_contracted_and_recycled():
    """Along a ``pyro.markov`` chain (window 1), z_t takes the dim of z_{t-2}: Pyro's dim
    recycling. Every frame stays in ``run.frames``, the live ones in ``run.live_frames``."""
    transition = torch.randn(2, 2)

    def program():
        z = None
        for t in pyro.markov(range(5)):
            logits = torch.zeros(2) if z is None else transition[z]
            z = storch.sample(f"z_{t}", dist.Categorical(logits=logits))
            storch.add_cost(f"c_{t}", z.float())

    run = _run(program, max_plate_nesting=0, default_estimator=estimators.Enumerate())
    frames = list(run.frames.values())
    assert [f.site for f in frames] == [f"z_{t}" for t in range(5)]
    assert all(f.reduction == "contracted" and f.weights is None for f in frames)
    assert [f.dim for f in frames] == [-1, -2, -1, -2, -1]
    assert [f.recycled_by for f in frames] == ["z_2", "z_3", "z_4", None, None]
    assert [f.site for f in run.live_frames.values()] == ["z_3", "z_4"]


def test_sequence_shares_one_frame():
    """The steps of a sequence extend one frame; beam search (UnorderedSet) reorders its rows,
    so each step records parent rows; i.i.d. rows (ScoreFunction) record none."""
    p, _ = T.params()
    for estimator, reorders in ((estimators.UnorderedSet(3), True),
                                (estimators.ScoreFunction(3), False)):
        run = _run(T.model, p, None, estimator, None, True, max_plate_nesting=0)
        (frame,) = run.frames.values()
        assert frame.site == "y" and frame.size == 3
        assert frame.sites == [f"tok_{t}" for t in range(T.L)]
        assert len(frame.parents) == T.L
        assert all((parents is not None) == reorders for parents in frame.parents[1:])
        assert frame.reduction == ("weighted" if reorders else "mean")


def test_enumerated_sequence_frame_grows():
    p, _ = T.params()
    run = _run(T.model, p, None, estimators.Enumerate(), None, True, max_plate_nesting=0)
    (frame,) = run.frames.values()
    assert frame.size == T.V ** T.L and frame.reduction == "weighted"
    assert math.isclose(float(frame.weights.detach().sum()), 1.0, rel_tol=1e-5)


def test_frames_of_without_sample_dims():
    """A tensor with no dim left of the plates skips the frames: ordinal = the plates."""

    def program(logits):
        with pyro.plate("data", 2):
            a = storch.sample("a", dist.Bernoulli(logits=logits),
                              estimator=estimators.ScoreFunction(3))
            storch.add_cost("f", a)
            storch.add_cost("g", logits ** 2)

    run = _run(program, torch.zeros(2, requires_grad=True), max_plate_nesting=1)
    f, g = run.costs
    assert g.ordinal == frozenset({("data", -1, 0)}) and g.weight == 1.0
    assert f.ordinal == g.ordinal | {next(iter(run.frames))} and f.weight == 1 / 3
