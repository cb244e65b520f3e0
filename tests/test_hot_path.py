"""The per-site fast paths: ``add_cost`` recorded without ``apply_stack`` where every
messenger on Pyro's stack is known (:func:`storch_pyro.handlers.tracing.record_cost_directly`),
the cost terms of one ordinal stacked into a few tensor ops
(:func:`storch_pyro.surrogate._stacked_cost_terms`), and the per-site estimator cache for
estimators that are not hashable. Each fast path must record and compute exactly what the
general path does: they are compared on the same draw for exact equality (``torch.equal``),
so any difference in a recorded value, plate frame, scale, mask or gradient fails."""

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.poutine.broadcast_messenger import BroadcastMessenger
from pyro.poutine.messenger import Messenger

import storch_pyro as storch
from storch_pyro import estimators, handlers, surrogate
from storch_pyro.handlers.resolution import instance_for_site


class _Bystander(Messenger):
    """A user's messenger without hooks: its presence sends add_cost through apply_stack."""


class _Spy(Messenger):
    def __init__(self):
        super().__init__()
        self.seen = []

    def _pyro_storch_cost(self, msg):
        self.seen.append(msg["name"])


def _with_bystander(model):
    """``model`` run under an unknown user handler (the full apply_stack path)."""

    def wrapped():
        with _Bystander():
            model()

    return wrapped


def _handled_model(w, bystander=False):
    """Costs under nested, subsampled and sequential plates, poutine.scale, poutine.mask and
    pyro.markov, of full and lower rank."""
    def model():
        storch.add_cost("outside", (w ** 2).sum())
        with pyro.plate("outer", 3, dim=-2):
            with pyro.plate("inner", 4, dim=-1):
                z = storch.sample("z", dist.Bernoulli(logits=w[0].expand(3, 4)))
                storch.add_cost("nested", (z - 0.3) * w[1])
                storch.add_cost("scalar_in_plates", w.sum())
            with pyro.plate("sub", 10, subsample_size=4, dim=-1) as index:
                storch.add_cost("subsampled", z.sum(-2, keepdim=True) * w[0] + index)
            with poutine.scale(scale=0.25):
                storch.add_cost("scaled", z.sum() * w[1])
            with poutine.mask(mask=torch.tensor([True, False, True]).unsqueeze(-1)):
                storch.add_cost("masked", z.sum(-1, keepdim=True) * w[0])
            with poutine.mask(mask=False):
                storch.add_cost("masked_out", z.sum() * w[0])
        prev = torch.zeros(())
        for t in pyro.markov(range(3)):
            y = storch.sample(f"y_{t}", dist.Bernoulli(logits=w[1] + prev))
            storch.add_cost(f"step_{t}", (y - prev) ** 2 * w[0])
            prev = y
        for i in pyro.plate("seq", 2):
            storch.add_cost(f"seq_{i}", w[0] * i)

    return _with_bystander(model) if bystander else model


def _record(model, seed=3, log=None):
    """The run of a loss's second step (validation on: the first step of a structure is
    validated as it runs, with a recording messenger on the stack; later ones are not);
    ``log`` is cleared before it."""
    elbo = storch.StorchELBO(max_plate_nesting=2)
    elbo.differentiable_loss(model, None)
    if log is not None:
        log.clear()
    pyro.set_rng_seed(seed)
    (run,), validated = elbo._validated_runs(model, None, (), {})
    assert not validated
    return run, surrogate.surrogate_loss(run)


def test_add_cost_fast_path_records_what_apply_stack_records(monkeypatch):
    w = torch.tensor([0.3, -0.7], requires_grad=True)
    calls = []
    real = pyro.poutine.runtime.apply_stack

    def counting(msg):
        calls.append(msg["type"])
        return real(msg)

    monkeypatch.setattr(pyro.poutine.runtime, "apply_stack", counting)
    fast, fast_loss = _record(_handled_model(w))
    assert calls.count("storch_cost") == 12  # the first (validated) step only
    calls.clear()
    full, full_loss = _record(_handled_model(w, bystander=True))
    assert calls.count("storch_cost") == 2 * len(fast.costs) == 24  # the general path
    assert [c.name for c in fast.costs] == [c.name for c in full.costs]
    for a, b in zip(fast.costs, full.costs):
        assert (a.sign, a.ordinal, a.seq, a.n_before, a.weight, a.deps) == (
            b.sign, b.ordinal, b.seq, b.n_before, b.weight, b.deps), a.name
        assert a.value.shape == b.value.shape and torch.equal(a.value, b.value), a.name
    assert torch.equal(fast_loss, full_loss)
    grads = [torch.autograd.grad(loss, w)[0] for loss in (fast_loss, full_loss)]
    assert torch.equal(*grads)


def test_add_cost_reaches_an_unknown_messenger_inside_the_loss():
    spy = _Spy()

    class Doubler(Messenger):  # a user's messenger that changes the cost's scale
        def _pyro_storch_cost(self, msg):
            msg["scale"] = 2.0 * msg["scale"]

    def model():
        with spy, pyro.plate("p", 2):
            storch.add_cost("a", torch.ones(2))
            with Doubler():
                storch.add_cost("b", torch.ones(2))
        with poutine.block(hide_types=["storch_cost"]):
            storch.add_cost("hidden", torch.ones(()))  # hidden from the loss, as before

    loss = storch.StorchELBO(max_plate_nesting=1).differentiable_loss(model, None)
    assert spy.seen == ["a", "b"]
    assert loss.item() == 2.0 + 4.0


def test_add_cost_under_a_subclassed_plate_takes_the_general_path():
    class LoggingPlate(pyro.plate):
        def _process_message(self, msg):
            super()._process_message(msg)
            if msg["type"] == "storch_cost":
                msg["scale"] = 3.0 * msg["scale"]

    def model():
        with LoggingPlate("p", 2):
            storch.add_cost("a", torch.ones(2))

    loss = storch.StorchELBO(max_plate_nesting=1).differentiable_loss(model, None)
    assert loss.item() == 6.0


def _chain_model(w, T, baseline=None):
    """The RL chain of benchmarks/chains.py: actions a_t ~ Bern(sigmoid(w0 s_t + w1)) per
    episode (one row of ``w`` per episode, so each row's gradient is one independent draw),
    state s_{t+1} = s_t + a_t - 1/2, cost s_{t+1}^2 per step."""
    n = w.shape[0]

    def model():
        state = torch.zeros(n)
        with pyro.plate("episodes", n):
            for t in range(T):
                a = storch.sample(f"a_{t}", dist.Bernoulli(logits=w[:, 0] * state + w[:, 1]),
                                  estimator=estimators.ScoreFunction(baseline=baseline))
                state = state + a - 0.5
                storch.add_cost(f"c_{t}", state ** 2)

    return model


def _exact_chain_gradient(w0, T):
    """d/dw E[sum_t s_{t+1}^2] by enumerating the 2^T action sequences."""
    w = w0.clone().requires_grad_()
    actions = torch.cartesian_prod(*[torch.tensor([0.0, 1.0])] * T).reshape(-1, T)
    state = torch.zeros(len(actions))
    log_p, total = torch.zeros(len(actions)), torch.zeros(len(actions))
    for t in range(T):
        q = torch.distributions.Bernoulli(logits=w[0] * state + w[1])
        log_p = log_p + q.log_prob(actions[:, t])
        state = state + actions[:, t] - 0.5
        total = total + state ** 2
    (grad,) = torch.autograd.grad((log_p.exp() * total).sum(), w)
    return grad


def test_stacked_cost_terms_equal_the_per_group_loop_to_second_order(monkeypatch):
    w = torch.tensor([[0.4, -0.2], [-0.3, 0.5], [0.1, 0.0]], requires_grad=True)
    model = _chain_model(w, 6)

    def surrogate_and_hessian():
        pyro.set_rng_seed(5)
        loss = storch.StorchELBO(max_plate_nesting=1).differentiable_loss(model, None)
        (grad,) = torch.autograd.grad(loss, w, create_graph=True)
        rows = [torch.autograd.grad(g, w, retain_graph=True)[0] for g in grad.reshape(-1)]
        return loss, grad, torch.stack(rows)

    stacked = surrogate_and_hessian()
    monkeypatch.setattr(surrogate, "_MIN_STACKED", 10 ** 9)  # the per-group loop only
    looped = surrogate_and_hessian()
    for a, b in zip(stacked, looped):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert stacked[2].abs().sum() > 0  # a Hessian estimate that is not trivially zero


def test_stacked_chain_gradient_is_unbiased():
    # Each of the N episodes has its own copy of w, so the rows of the gradient are N
    # independent estimates of the per-episode gradient; the surrogate of all of them is
    # built by the stacked path (T = 5 cost groups of one ordinal). Power: exact gradient
    # (3.005, -1.031), s.e. with N = 20000 about (0.043, 0.069), so a bias of 0.2 in the
    # first coordinate or 0.31 in the second fails; boxing each group with the prefix one
    # score short (an off-by-one in the stacked rows) fails at z = -52.
    T, N = 5, 20000
    w0 = torch.tensor([0.3, -0.2])
    w = w0.expand(N, 2).clone().requires_grad_()
    loss = storch.StorchELBO(max_plate_nesting=1).differentiable_loss(_chain_model(w, T), None)
    (grad,) = torch.autograd.grad(loss, w)
    mean, se = grad.mean(0), grad.std(0) / N ** 0.5
    exact = _exact_chain_gradient(w0, T)
    assert ((mean - exact).abs() < 4.5 * se).all(), (mean, exact, se)


@dataclass
class _TunedScoreFunction(estimators.ScoreFunction):
    """An estimator written as a plain ``@dataclass`` (eq=True, not frozen): unhashable."""

    tag: int = 0

    def __post_init__(self):
        super().__init__()


def test_unhashable_dataclass_estimator_gets_one_instance_per_site():
    shared = _TunedScoreFunction(tag=1)
    twin = _TunedScoreFunction(tag=1)  # equal, but another configuration
    with pytest.raises(TypeError):
        hash(shared)
    a = instance_for_site(shared, "a")
    assert instance_for_site(shared, "a") is a
    assert instance_for_site(shared, "b") is not a
    assert instance_for_site(twin, "a") is not a
    assert instance_for_site(a, "a") is a

    def model(phi):
        with pyro.plate("p", 3):
            x = storch.sample("x", dist.Bernoulli(logits=phi))
            y = storch.sample("y", dist.Bernoulli(logits=-phi))
            storch.add_cost("c", x + 2 * y)

    phi = torch.zeros(3, requires_grad=True)
    for config in ({"x": shared, "y": shared}, lambda msg: shared):
        with handlers.estimator(config=config):
            loss = storch.StorchELBO(max_plate_nesting=1).differentiable_loss(model, None, phi)
        loss.backward()
    elbo = storch.StorchELBO(max_plate_nesting=1, default_estimator=shared)
    elbo.differentiable_loss(model, None, phi).backward()
    assert torch.isfinite(phi.grad).all()


class _PlainNormal(dist.TorchDistribution):
    """A distribution with Pyro's generic ``expand`` (an ``ExpandedDistribution`` wrapper)."""

    arg_constraints = {}
    support = dist.constraints.real
    has_rsample = True

    def __init__(self, loc):
        self.loc = loc
        super().__init__(loc.shape, validate_args=False)

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        return self.loc.expand(shape) + torch.randn(shape)

    def log_prob(self, value):
        return -0.5 * (value - self.loc) ** 2


def _sites_model(w, bystander=False):
    """Sample sites whose plates need no broadcasting, need it, are subsampled, masked,
    scaled, under pyro.markov and handlers.estimator, observed, with a distribution whose
    expand wraps it; guide sites replayed into the model."""
    def model():
        with handlers.estimator(config={"h": estimators.ScoreFunction()}):
            with pyro.plate("outer", 3, dim=-2), pyro.plate("inner", 4, dim=-1):
                z = storch.sample("z", dist.Bernoulli(logits=w[0].expand(3, 4)))
                g = storch.sample("g", dist.Normal(w[1], 1.0))  # broadcast to (3, 4)
                storch.sample("h", dist.Bernoulli(logits=w[0] * z))
            with pyro.plate("sub", 10, subsample_size=4, dim=-1):
                storch.sample("s", dist.Normal(w[0] * g.sum(-2), 1.0))
            with pyro.plate("pair", 2):
                with poutine.scale(scale=0.5), poutine.mask(mask=torch.tensor([True, False])):
                    storch.sample("m", dist.Normal(w[1].expand(2), 1.0))
                p = storch.sample("p", _PlainNormal(w[1].expand(2)))
            prev = torch.zeros(())
            for t in pyro.markov(range(3)):
                prev = storch.sample(f"y_{t}", dist.Bernoulli(logits=w[1] + prev))
            storch.sample("x", dist.Normal(p.sum(), 1.0), obs=torch.tensor(0.5))
            storch.sample("k", dist.Normal(w[0], 1.0),
                          infer={"is_observed": True}, obs=torch.tensor(0.1))
            storch.add_cost("c", (z * g).sum() + prev)

    return _with_bystander(model) if bystander else model


def test_sample_fast_path_draws_and_records_what_pyro_sample_does(monkeypatch):
    w = torch.tensor([0.3, -0.7], requires_grad=True)
    broadcasts = []
    real = BroadcastMessenger._pyro_sample

    def counting(msg):
        broadcasts.append(msg["name"])
        return real(msg)

    monkeypatch.setattr(BroadcastMessenger, "_pyro_sample", staticmethod(counting))
    fast, fast_loss = _record(_sites_model(w), log=broadcasts)
    fast_broadcasts = list(broadcasts)
    full, full_loss = _record(_sites_model(w, bystander=True), log=broadcasts)
    # Each plate broadcasts each site in it; the fast path skips z's, h's, m's and s's,
    # whose batch shapes match their plates already (and keeps g's, which needs it, and
    # p's, a distribution with Pyro's generic expand).
    assert sorted(broadcasts) == sorted(fast_broadcasts + ["z", "z", "h", "h", "m", "s"])
    assert fast_broadcasts.count("g") == 2 and fast_broadcasts.count("p") == 1
    assert [n.name for n in fast.nodes] == [n.name for n in full.nodes]
    for a, b in zip(fast.nodes, full.nodes):
        assert type(a.fn) is type(b.fn) and a.fn.batch_shape == b.fn.batch_shape, a.name
        assert (a.ordinal, a.seq, a.index, a.sample_dim) == (b.ordinal, b.seq, b.index,
                                                              b.sample_dim), a.name
        assert torch.equal(a.draw.value, b.draw.value), a.name
        assert torch.equal(a.score, b.score) and torch.equal(a.log_prob, b.log_prob), a.name
    fns = [{m["name"]: m["fn"] for m in run.messages["scg"]} for run in (fast, full)]
    assert {k: type(v) for k, v in fns[0].items()} == {k: type(v) for k, v in fns[1].items()}
    assert type(fns[0]["p"]).__name__ == "ExpandedDistribution"  # Pyro's generic expand
    assert [c.name for c in fast.costs] == [c.name for c in full.costs]
    for a, b in zip(fast.costs, full.costs):
        assert (a.sign, a.ordinal, a.n_before) == (b.sign, b.ordinal, b.n_before), a.name
        assert torch.equal(a.value, b.value), a.name
    assert torch.equal(fast_loss, full_loss)
    grads = [torch.autograd.grad(loss, w)[0] for loss in (fast_loss, full_loss)]
    assert torch.equal(*grads)


def test_sample_fast_path_in_elbo_mode_matches_the_general_path():
    def model(data, bystander=False):
        loc = storch.sample("loc", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 3):
            b = storch.sample("b", dist.Bernoulli(logits=torch.zeros(3)))
            storch.sample("x", dist.Normal(loc + b, 1.0), obs=data)

    def guide(data, bystander=False):
        q = pyro.param("q", torch.tensor(0.2))
        logits = pyro.param("logits", torch.zeros(3))
        with (_Bystander() if bystander else poutine.scale(scale=1.0)):
            storch.sample("loc", dist.Normal(q, 1.0))
            with pyro.plate("data", 3):
                storch.sample("b", dist.Bernoulli(logits=logits))

    data = torch.tensor([0.5, -1.0, 2.0])
    results = []
    for bystander in (False, True):
        elbo = storch.StorchELBO(max_plate_nesting=1)
        elbo.differentiable_loss(model, guide, data, bystander)
        pyro.set_rng_seed(7)
        loss = elbo.differentiable_loss(model, guide, data, bystander)
        params = [pyro.param("q").unconstrained(), pyro.param("logits").unconstrained()]
        results.append((loss, *torch.autograd.grad(loss, params)))
    for a, b in zip(*results):
        assert torch.equal(a, b)
