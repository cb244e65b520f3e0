"""A baseline of a site upstream of an enumerated ``pyro.markov`` chain (in a model without
guide, and in a guide): its downstream cost :math:`D_g` weights the chain's costs by their
marginals given ``g`` (``Run.chain_marginals``, :func:`storch_pyro.surrogate._on_node_dims`),
so it is :math:`\\mathbb{E}[\\sum_t c(z_t) \\mid g]`; the gradient is unbiased.

Before, the costs were summed over the chain's values unweighted: :math:`D_g` was the same
for every ``g`` (71.5 here, where :math:`\\mathbb{E}[\\sum_t c \\mid g]` is 20.2 to 30.2),
so a leave-one-out baseline subtracted a constant and a moving average tracked it: still
unbiased (the baseline of a sample never depended on that sample), but the variance of the
gradient of ``g``'s logits rose (see ``benchmarks/RESULTS.md``)."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate

import storch_pyro as storch
from storch_pyro import baselines, estimators

T, K, G = 5, 3, 3


def _params(seed=0):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(G, dtype=torch.float64, generator=generator).requires_grad_()
    W = torch.randn(G, K, K, dtype=torch.float64, generator=generator).requires_grad_()
    cost = 3 * torch.randn(K, dtype=torch.float64, generator=generator)
    return a, W, cost


def _chain(a, W, cost, n, add_costs=True):
    """A global g, then z_t ~ q(z_t | g, z_{t-1}) inside pyro.markov, a cost c(z_t) per
    step (a factor -c); n independent copies in a plate."""
    with pyro.plate("copies", n, dim=-1):
        g = pyro.sample("g", dist.Categorical(logits=a))
        z = torch.tensor(0)
        for t in pyro.markov(range(T)):
            z = pyro.sample(f"z_{t}", dist.Categorical(logits=W[g, z]))
            if add_costs:
                pyro.factor(f"c_{t}", -cost[z])


def _model(cost, n):
    """The model of the guide case: uniform priors, the costs per step."""
    with pyro.plate("copies", n, dim=-1):
        pyro.sample("g", dist.Categorical(logits=torch.zeros(G, dtype=torch.float64)))
        for t in pyro.markov(range(T)):
            z = pyro.sample(f"z_{t}", dist.Categorical(logits=torch.zeros(K,
                                                                          dtype=torch.float64)))
            pyro.factor(f"c_{t}", -cost[z])


def _exact_scg(a, W, cost):
    """E_g[sum_t E[c(z_t) | g]] by the forward recursion per value of g."""
    total = 0.0
    for g in range(G):
        marginal = W[g, 0].softmax(-1)
        expected = (marginal * cost).sum()
        for _ in range(1, T):
            marginal = marginal @ W[g].softmax(-1)
            expected = expected + (marginal * cost).sum()
        total = total + a.softmax(-1)[g] * expected
    return total


def _gradients(make, role, n, batches, seed=0):
    """``batches`` gradients of (a, W), each of the loss of n copies over n, and the exact
    one."""
    a, W, cost = _params()
    params = (a, W)
    if role == "scg":
        exact = _exact_scg(a, W, cost)
    else:
        exact = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(
            lambda: _model(cost, 1), config_enumerate(lambda: _chain(a, W, cost, 1, False)))
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(exact, params)])
    torch.manual_seed(seed)
    pyro.clear_param_store()
    config = {f"z_{t}": estimators.Enumerate() for t in range(T)}
    draws = []
    for _ in range(batches):
        config["g"] = make()
        elbo = storch.StorchELBO(max_plate_nesting=1)
        with storch.handlers.estimator(config=config):
            if role == "scg":
                loss = elbo.differentiable_loss(lambda: _chain(a, W, cost, n), None)
            else:
                loss = elbo.differentiable_loss(lambda: _model(cost, n),
                                                lambda: _chain(a, W, cost, n, False))
        draws.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss / n, params)]))
    return torch.stack(draws), exact


class _ControlVariate(torch.nn.Module):
    """RELAX's c_phi: (..., G) relaxed scores -> (...)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(G, 1).double()

    def forward(self, z):
        return self.linear(z).squeeze(-1)


_ESTIMATORS = {
    "leave-one-out": lambda: estimators.ScoreFunction(n_samples=4,
                                                      baseline=baselines.LeaveOneOut()),
    "moving-average": lambda: estimators.ScoreFunction(baseline=baselines.MovingAverage()),
}


@pytest.mark.parametrize("role", ["scg", "guide"])
@pytest.mark.parametrize("name", list(_ESTIMATORS))
def test_baseline_upstream_of_enumerated_chain_is_unbiased(name, role):
    """g (ScoreFunction(n_samples=4, LeaveOneOut()), or ScoreFunction(MovingAverage()))
    upstream of an enumerated chain of T = 5 (z_t's distribution reads g): the mean
    gradient of (a, W) over 20 batches of 200 copies is within 4.5 s.e. of the exact one
    (the forward recursion per value of g; in a guide, TraceEnum_ELBO with every site
    enumerated). The baseline's downstream cost is E[sum_t c(z_t) | g] exactly (checked
    below). Power: the s.e. is asserted below 0.05 per coordinate (measured at most 0.023
    with LeaveOneOut, 0.043 with MovingAverage), so a bias above ~0.23 fails, against
    gradients up to 2.4."""
    draws, exact = _gradients(_ESTIMATORS[name], role, 200, 20)
    mean, se = draws.mean(0), draws.std(0) / draws.shape[0] ** 0.5
    assert se.max() < 0.05, se
    assert ((mean - exact).abs() < 4.5 * se + 1e-9).all(), (mean, exact, se)


def test_relax_upstream_of_enumerated_chain_is_unbiased():
    """RELAX (its own control variate, no rebar term: the program sees only the hard g)
    upstream of the chain, in a model without guide: unbiased as above (20 batches of 800
    copies). Power: the s.e. is asserted below 0.1 per coordinate (measured at most 0.082),
    so a bias above ~0.45 fails, against gradients up to 2.4. (REBAR, and RELAX's
    rebar term, evaluate the downstream code at relaxed values of g, which indexing W[g]
    cannot take: they do not apply to this program.)"""
    draws, exact = _gradients(lambda: estimators.RELAX(_ControlVariate()), "scg", 800, 20)
    mean, se = draws.mean(0), draws.std(0) / draws.shape[0] ** 0.5
    assert se.max() < 0.1, se
    assert ((mean - exact).abs() < 4.5 * se + 1e-9).all(), (mean, exact, se)


@pytest.mark.parametrize("role", ["scg", "guide"])
def test_downstream_cost_of_an_upstream_site_is_the_chain_expectation(role, monkeypatch):
    """D_g seen by g's baseline: E[sum_t c(z_t) | g] for each sample of g (the chain's
    costs weighted by their marginals given g); before, the unweighted sum over the chain's
    values (the same for every g)."""
    from storch_pyro import surrogate

    a, W, cost = _params()
    seen = []
    original = surrogate._downstream_cost

    def spy(run, node, groups):
        value = original(run, node, groups)
        seen.append((node.name, node.draw.value.detach().clone(), value))
        return value

    monkeypatch.setattr(surrogate, "_downstream_cost", spy)
    config = {f"z_{t}": estimators.Enumerate() for t in range(T)}
    config["g"] = estimators.ScoreFunction(n_samples=4, baseline=baselines.LeaveOneOut())
    elbo = storch.StorchELBO(max_plate_nesting=1)
    torch.manual_seed(1)
    with storch.handlers.estimator(config=config):
        if role == "scg":
            elbo.differentiable_loss(lambda: _chain(a, W, cost, 2), None)
        else:
            elbo.differentiable_loss(lambda: _model(cost, 2), lambda: _chain(a, W, cost, 2, False))
    ((name, g, downstream),) = [entry for entry in seen if entry[0] == "g"]
    expected = torch.zeros(G, dtype=torch.float64)
    for value in range(G):
        marginal = W[value, 0].softmax(-1)
        expected[value] = (marginal * cost).sum()
        for _ in range(1, T):
            marginal = marginal @ W[value].softmax(-1)
            expected[value] += (marginal * cost).sum()
    if role == "guide":  # plus log q(g) - log p(g), and E[log q(z) - log p(z) | g]
        log_p = torch.log(torch.tensor(1.0 / K, dtype=torch.float64))
        expected += a.log_softmax(-1) + torch.log(torch.tensor(float(G), dtype=torch.float64))
        for value in range(G):
            marginal = W[value, 0].softmax(-1)
            q = W[value].log_softmax(-1)
            extra = (marginal * (W[value, 0].log_softmax(-1) - log_p)).sum()
            for _ in range(1, T):
                extra = extra + (marginal[:, None] * q.exp() * (q - log_p)).sum()
                marginal = marginal @ q.exp()
            expected[value] += extra
    assert torch.allclose(downstream.detach(), expected.detach()[g], atol=1e-9), (
        downstream, expected, g)
