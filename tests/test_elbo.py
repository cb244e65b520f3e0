"""Behaviour of StorchELBO as a Pyro loss: its three entry points agree, it matches Pyro's
Trace_ELBO value, trains with SVI, accepts TraceGraph_ELBO's baseline annotations, registers
baseline state in the param store, handles multi-sample sites, and leaves storch.sample /
storch.add_cost inert outside itself."""

import copy
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints

import storch_pyro as storch
from storch_pyro import baselines, estimators, handlers

# ---- models -----------------------------------------------------------------------------

DATA = torch.tensor([0.3, -1.2, 0.8, 2.1, -0.4, 1.0, 0.0, 0.6, -2.0, 1.5])
X_OBS = torch.tensor([0.5, -1.0, 2.0, 0.3])
X_MASK = torch.tensor([True, False, True, False])
K_MASK = torch.tensor([True, True, False, True])


def rich_model():
    """Plates, subsampling, poutine.scale, poutine.mask, obs_mask, pyro.factor,
    pyro.deterministic, continuous and discrete latents."""
    mu = storch.sample("mu", dist.Normal(0.0, 2.0))
    s = pyro.sample("s", dist.Bernoulli(0.4))
    pyro.deterministic("mu2", mu * 2)
    pyro.factor("f", -0.5 * mu**2)
    with pyro.plate("data", 10, subsample_size=4) as idx:
        with poutine.scale(scale=0.7):
            pyro.sample("obs", dist.Normal(mu + s, 1.0), obs=DATA[idx])
    with pyro.plate("p2", 4):
        with poutine.mask(mask=K_MASK):
            k = pyro.sample("k", dist.Categorical(torch.tensor([0.2, 0.3, 0.5])))
        pyro.sample("x", dist.Normal(k.float(), 1.0), obs=X_OBS, obs_mask=X_MASK)


def rich_guide(guide_cost=None):
    """``guide_cost``: also an ``add_cost`` of that value per element of plate "p2" (inside
    the plate: a plate is entered once per name, as poutine.trace requires)."""
    m = pyro.param("m", torch.tensor(0.1))
    p = pyro.param("p", torch.tensor(0.6), constraint=constraints.unit_interval)
    k_logits = pyro.param("k_logits", torch.zeros(3))
    x_loc = pyro.param("x_loc", torch.zeros(4))
    pyro.sample("mu", dist.Normal(m, 1.0))
    pyro.sample("s", dist.Bernoulli(p))
    with pyro.plate("data", 10, subsample_size=4):
        pass
    with pyro.plate("p2", 4):
        with poutine.mask(mask=K_MASK):
            pyro.sample("k", dist.Categorical(logits=k_logits))
        pyro.sample("x_unobserved", dist.Normal(x_loc, 1.0))
        if guide_cost is not None:
            storch.add_cost("guide_cost", torch.tensor(guide_cost))


def scg_model(x):
    """A pure stochastic computation graph: no guide, costs from add_cost."""
    logits = pyro.param("logits", torch.zeros(3))
    loc = pyro.param("loc", torch.tensor(0.2))
    z = storch.sample("z", dist.Normal(loc, 1.0))
    with pyro.plate("data", 3):
        b = storch.sample(
            "b",
            dist.Bernoulli(logits=logits),
            estimator=estimators.ScoreFunction(n_samples=3, baseline=baselines.LeaveOneOut()),
        )
        storch.add_cost("fit", (b - x) ** 2 + z)
    c = pyro.sample("c", dist.Categorical(logits=torch.zeros(4)))
    storch.add_cost("reg", z**2 + c)


def elbo_model(x):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("data", 3):
        b = pyro.sample("b", dist.Bernoulli(0.3))
        pyro.sample("x", dist.Normal(z + b, 1.0), obs=x)


def elbo_guide(x):
    loc = pyro.param("loc", torch.tensor(0.2))
    logits = pyro.param("logits", torch.zeros(3))
    pyro.sample("z", dist.Normal(loc, 1.0))
    with pyro.plate("data", 3):
        storch.sample(
            "b",
            dist.Bernoulli(logits=logits),
            estimator=estimators.ScoreFunction(n_samples=2),
            baseline=baselines.MovingAverage(),
        )


X3 = torch.tensor([1.0, 0.0, 1.0])


def _three_ways(elbo, model, guide, *args, seed=0):
    pyro.set_rng_seed(seed)
    a = elbo.loss(model, guide, *args)
    pyro.set_rng_seed(seed)
    b = elbo.differentiable_loss(model, guide, *args).item()
    pyro.set_rng_seed(seed)
    c = elbo.loss_and_grads(model, guide, *args)
    return a, b, c


# ---- (a) loss == differentiable_loss == loss_and_grads ----------------------------------


@pytest.mark.parametrize(
    "model, guide, args",
    [
        (elbo_model, elbo_guide, (X3,)),
        (scg_model, None, (X3,)),
        (rich_model, rich_guide, ()),
    ],
    ids=["elbo", "scg", "rich"],
)
@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_values_agree(model, guide, args, num_particles, seed):
    elbo = storch.StorchELBO(num_particles=num_particles, max_plate_nesting=1)
    a, b, c = _three_ways(elbo, model, guide, *args, seed=seed)
    assert isinstance(a, float) and isinstance(c, float)
    assert b == pytest.approx(a, rel=1e-5, abs=1e-5)
    assert c == pytest.approx(a, rel=1e-5, abs=1e-5)


def test_loss_values_agree_with_guessed_plate_nesting():
    # the guess runs the model once (consuming random numbers, as Pyro's guess does), so
    # each entry point gets a fresh loss object to guess at the same point of the stream
    values = []
    for method in ("loss", "differentiable_loss", "loss_and_grads"):
        pyro.set_rng_seed(4)
        elbo = storch.StorchELBO()
        value = getattr(elbo, method)(scg_model, None, X3)
        values.append(value.item() if isinstance(value, torch.Tensor) else value)
        assert elbo.max_plate_nesting == 1
    assert values[1] == pytest.approx(values[0], rel=1e-5)
    assert values[2] == pytest.approx(values[0], rel=1e-5)


def test_loss_does_not_build_a_graph_or_touch_grads():
    storch.StorchELBO().loss(elbo_model, elbo_guide, X3)
    assert pyro.param("loc").grad is None
    loss = storch.StorchELBO().differentiable_loss(elbo_model, elbo_guide, X3)
    assert loss.requires_grad and loss.shape == ()
    storch.StorchELBO().loss_and_grads(elbo_model, elbo_guide, X3)
    assert pyro.param("loc").grad is not None
    assert pyro.param("logits").grad is not None


# ---- (b) same value as Trace_ELBO -------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_loss_as_trace_elbo(seed):
    pyro.set_rng_seed(seed)
    expected = pyro.infer.Trace_ELBO().loss(rich_model, rich_guide)
    pyro.set_rng_seed(seed)
    actual = storch.StorchELBO().loss(rich_model, rich_guide)
    assert actual == pytest.approx(expected, rel=1e-5)
    pyro.set_rng_seed(seed)
    actual = storch.StorchELBO().differentiable_loss(rich_model, rich_guide).item()
    assert actual == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("max_plate_nesting", [1, float("inf")])
def test_same_loss_as_trace_elbo_with_particles(vectorize, max_plate_nesting):
    kwargs = dict(
        num_particles=3, vectorize_particles=vectorize, max_plate_nesting=max_plate_nesting
    )
    pyro.set_rng_seed(5)
    expected = pyro.infer.Trace_ELBO(**kwargs).loss(rich_model, rich_guide)
    pyro.set_rng_seed(5)
    actual = storch.StorchELBO(**kwargs).loss(rich_model, rich_guide)
    assert actual == pytest.approx(expected, rel=1e-5)


def reparam_model():
    loc = pyro.param("prior_loc", torch.tensor(0.3))
    z = pyro.sample("z", dist.Normal(loc, 1.0))
    with pyro.plate("data", 10, subsample_size=5) as idx:
        with poutine.scale(scale=0.5):
            pyro.sample("obs", dist.Normal(z, 1.0), obs=DATA[idx])
    pyro.factor("f", -0.1 * z**2)


def reparam_guide():
    m = pyro.param("m", torch.tensor(0.1))
    s = pyro.param("s", torch.tensor(0.8), constraint=constraints.positive)
    pyro.sample("z", dist.Normal(m, s))
    with pyro.plate("data", 10, subsample_size=5):
        pass


def test_same_gradient_as_trace_elbo_when_reparameterized():
    # with only Pathwise sites both losses are the same differentiable function of the noise
    pyro.set_rng_seed(3)
    expected = pyro.infer.Trace_ELBO().differentiable_loss(reparam_model, reparam_guide)
    params = [pyro.param(n).unconstrained() for n in ("prior_loc", "m", "s")]
    g_expected = torch.autograd.grad(expected, params)
    pyro.set_rng_seed(3)
    actual = storch.StorchELBO().differentiable_loss(reparam_model, reparam_guide)
    g_actual = torch.autograd.grad(actual, params)
    assert actual.item() == pytest.approx(expected.item(), rel=1e-5)
    for ge, ga in zip(g_expected, g_actual):
        assert torch.allclose(ge, ga, rtol=1e-5, atol=1e-6)


# ---- (c) SVI convergence on a small discrete model --------------------------------------

_PRIORS = {
    "bernoulli": torch.tensor([0.7, 0.3]),
    "categorical": torch.tensor([0.5, 0.3, 0.2]),
}
_LOCS = torch.tensor([0.0, 1.5, -1.0])
_X = torch.tensor([0.8, 1.0, 0.6])


@pytest.mark.parametrize("kind", ["bernoulli", "categorical"])
def test_svi_converges_to_exact_posterior(kind):
    prior = _PRIORS[kind]
    n = len(prior)
    locs = _LOCS[:n]

    def model():
        if kind == "bernoulli":
            k = pyro.sample("k", dist.Bernoulli(prior[1])).long()
        else:
            k = pyro.sample("k", dist.Categorical(prior))
        with pyro.plate("data", len(_X)):
            pyro.sample("x", dist.Normal(locs[k], 1.0), obs=_X)

    def guide():
        if kind == "bernoulli":
            logit = pyro.param("logit", torch.tensor(-3.0))
            pyro.sample("k", dist.Bernoulli(logits=logit))
        else:
            logits = pyro.param("logits", torch.tensor([-1.0, -1.0, 1.0]))
            pyro.sample("k", dist.Categorical(logits=logits))

    def guide_probs():
        if kind == "bernoulli":
            p = torch.sigmoid(pyro.param("logit").detach())
            return torch.stack([1 - p, p])
        return pyro.param("logits").detach().softmax(0)

    # exact posterior and -log evidence by enumeration
    joint = prior.log() + dist.Normal(locs[:, None], 1.0).log_prob(_X).sum(-1)
    posterior = joint.softmax(0)

    def exact_neg_elbo(q):
        return (q * (q.log() - joint)).sum().item()

    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), loss=storch.StorchELBO())
    losses, probs = [], []
    with handlers.estimator(config={"k": estimators.ScoreFunction()}):
        with handlers.baseline(config={"k": baselines.MovingAverage(0.9)}):
            for step in range(1500):
                losses.append(svi.step())
                probs.append(guide_probs())
    q_start, q_end = probs[0], torch.stack(probs[-600:]).mean(0)
    assert sum(losses[-100:]) / 100 < sum(losses[:100]) / 100
    assert exact_neg_elbo(q_end) < exact_neg_elbo(q_start) - 0.1
    assert exact_neg_elbo(q_end) == pytest.approx(-joint.logsumexp(0).item(), abs=0.02)
    assert torch.allclose(q_end, posterior, atol=0.06), (q_end, posterior)
    assert baselines.MovingAverage.param_name("k") in pyro.get_param_store()


# ---- (d) TraceGraph_ELBO's baseline annotations -----------------------------------------


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, x):
        return self.linear(x).squeeze(-1)


_XS = torch.tensor([[0.5, 1.0], [-0.3, 0.2], [1.1, -0.7], [0.0, 0.4], [2.0, 1.0], [-1.0, -1.0]])


def annotated_model(x, options_fn):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Bernoulli(0.3))
        pyro.sample("x", dist.Normal(2.0 * z[:, None], 1.0).to_event(1), obs=x)


def annotated_guide(x, options_fn):
    logits = pyro.param("q_logits", torch.zeros(len(x)))
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Bernoulli(logits=logits), infer={"baseline": options_fn(x)})


def _decaying(x):
    return {"use_decaying_avg_baseline": True, "baseline_beta": 0.95}


def test_decaying_average_annotation():
    elbo = storch.StorchELBO()
    svi = pyro.infer.SVI(annotated_model, annotated_guide, pyro.optim.Adam({"lr": 0.05}), elbo)
    for _ in range(5):
        svi.step(_XS, _decaying)
    name = "__baseline_avg_downstream_cost_z"
    assert name in pyro.get_param_store()
    avg = pyro.get_param_store()[name]
    assert avg.shape == (len(_XS),)  # per element, as in TraceGraph_ELBO
    assert torch.all(avg != 0)
    # loss() leaves it alone, loss_and_grads updates it
    before = avg.detach().clone()
    elbo.loss(annotated_model, annotated_guide, _XS, _decaying)
    assert torch.equal(pyro.get_param_store()[name].detach(), before)
    elbo.loss_and_grads(annotated_model, annotated_guide, _XS, _decaying)
    assert not torch.equal(pyro.get_param_store()[name].detach(), before)


def test_nn_baseline_annotation_gets_gradients():
    net = _Net()

    def options(x):
        pyro.module("my_nn_baseline", net)
        return {"nn_baseline": net, "nn_baseline_input": x}

    elbo = storch.StorchELBO()
    elbo.loss_and_grads(annotated_model, annotated_guide, _XS, options)
    for p in net.parameters():
        assert p.grad is not None and torch.all(torch.isfinite(p.grad))
        assert p.grad.abs().sum() > 0
    assert "my_nn_baseline$$$linear.weight" in pyro.get_param_store()

    # and SVI trains it: its squared error to the downstream ELBO term falls. In Pyro's
    # sign, as under TraceGraph_ELBO: log p - log q is about -3 here (the cost, about +3).
    def fit_error():
        with torch.no_grad():
            return ((net(_XS) + 3.0) ** 2).mean().item()

    pyro.clear_param_store()
    for p in net.parameters():
        p.grad = None
    svi = pyro.infer.SVI(annotated_model, annotated_guide, pyro.optim.Adam({"lr": 0.05}), elbo)
    start = fit_error()
    for _ in range(60):
        svi.step(_XS, options)
    assert fit_error() < start


def test_baseline_value_annotation():
    def options(x):
        value = pyro.param("b_value", torch.zeros(len(x)))
        return {"baseline_value": value}

    elbo = storch.StorchELBO()
    elbo.loss_and_grads(annotated_model, annotated_guide, _XS, options)
    grad = pyro.param("b_value").unconstrained().grad
    assert grad is not None and grad.abs().sum() > 0
    svi = pyro.infer.SVI(annotated_model, annotated_guide, pyro.optim.Adam({"lr": 0.05}), elbo)
    for _ in range(3):
        svi.step(_XS, options)

    # a constant baseline value works too
    svi.step(_XS, lambda x: {"baseline_value": torch.tensor(1.0)})


@pytest.mark.parametrize(
    "options_fn",
    [_decaying, lambda x: {"baseline_value": torch.full((len(x),), 2.0)}],
    ids=["decaying", "value"],
)
def test_annotated_loss_value_matches_tracegraph(options_fn):
    for seed in range(2):
        pyro.set_rng_seed(seed)
        expected = pyro.infer.TraceGraph_ELBO().loss(
            annotated_model, annotated_guide, _XS, options_fn
        )
        pyro.set_rng_seed(seed)
        actual = storch.StorchELBO().loss(annotated_model, annotated_guide, _XS, options_fn)
        assert actual == pytest.approx(expected, rel=1e-5)


def _reparam_annotated_model():
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.5))


def _reparam_annotated_guide():
    m = pyro.param("m", torch.tensor(0.0))
    pyro.sample("z", dist.Normal(m, 1.0), infer={"baseline": {"use_decaying_avg_baseline": True}})


def test_tracegraph_ignores_annotation_on_reparameterized_site():
    pyro.infer.TraceGraph_ELBO().loss_and_grads(_reparam_annotated_model, _reparam_annotated_guide)


def test_annotation_on_reparameterized_site_runs_unchanged():
    storch.StorchELBO().loss_and_grads(_reparam_annotated_model, _reparam_annotated_guide)


# ---- (e) baseline state in the param store ----------------------------------------------


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, x):
        return self.linear(x).squeeze(-1)


def test_learned_baseline_registered_and_trained_by_svi():
    net = _Linear()
    xs = torch.randn(8, 2)
    record = {}
    learned = baselines.Learned(net, name="my_baseline")

    def model(x):
        with pyro.plate("data", len(x)):
            z = storch.sample(
                "z", dist.Bernoulli(0.5), estimator=estimators.ScoreFunction(baseline=learned)
            )
            cost = 3.0 + 2.0 * z + x[:, 0]
            record["cost"] = cost
            storch.add_cost("c", cost)

    svi = pyro.infer.SVI(model, None, pyro.optim.Adam({"lr": 0.05}), loss=storch.StorchELBO())
    errors = []
    for _ in range(200):
        with torch.no_grad():
            b = net(xs)
        svi.step(xs)
        errors.append(((b - record["cost"]) ** 2).mean().item())
    store = pyro.get_param_store()
    assert {"my_baseline$$$linear.weight", "my_baseline$$$linear.bias"} <= set(store.keys())
    # the stored params are the module's params, trained in place by SVI
    assert store["my_baseline$$$linear.bias"] is net.linear.bias
    first, last = sum(errors[:20]) / 20, sum(errors[-50:]) / 50
    assert last < 0.25 * first
    assert last < 2.0  # Var(2 z) = 1 is the floor


def test_learned_baseline_default_name():
    net = _Linear()

    def model(x):
        with pyro.plate("data", len(x)):
            z = storch.sample(
                "site_a",
                dist.Bernoulli(0.5),
                estimator=estimators.ScoreFunction(baseline=baselines.Learned(net)),
            )
            storch.add_cost("c", z + x[:, 0])

    storch.StorchELBO().loss_and_grads(model, None, torch.randn(4, 2))
    assert "storch_pyro.baseline.site_a$$$linear.weight" in pyro.get_param_store()
    assert net.linear.weight.grad is not None


def test_learned_baseline_input_fn():
    net = _Linear()

    def model(x, offset):
        with pyro.plate("data", len(x)):
            z = storch.sample("z", dist.Bernoulli(0.5))
            storch.add_cost("c", z + offset)

    learned = baselines.Learned(net, input_fn=lambda x, offset: x * offset)
    with handlers.baseline(config={"z": learned}):
        storch.StorchELBO().loss_and_grads(model, None, torch.randn(4, 2), 2.0)
    assert net.linear.weight.grad is not None


def _ma_model(c):
    logit = pyro.param("logit", torch.tensor(0.3))
    z = storch.sample(
        "z",
        dist.Bernoulli(logits=logit),
        estimator=estimators.ScoreFunction(baseline=baselines.MovingAverage(0.5)),
    )
    storch.add_cost("c", c + 0.0 * z)
    _ma_model.z = z


def test_moving_average_state_in_param_store():
    name = baselines.MovingAverage.param_name("z")
    assert "z" in name
    elbo = storch.StorchELBO()
    store = pyro.get_param_store()

    elbo.loss(_ma_model, None, 2.0)
    assert name not in store  # loss() does not update (nor create) it
    elbo.loss_and_grads(_ma_model, None, 2.0)
    assert store[name].item() == pytest.approx(2.0)  # first cost
    elbo.loss(_ma_model, None, 100.0)
    assert store[name].item() == pytest.approx(2.0)

    # used before update: the gradient uses b = 2, then the average moves to 3
    pyro.param("logit").grad = None
    elbo.loss_and_grads(_ma_model, None, 4.0)
    z = _ma_model.z
    expected = (4.0 - 2.0) * (z - torch.sigmoid(torch.tensor(0.3)))
    assert pyro.param("logit").grad.item() == pytest.approx(expected.item(), rel=1e-5)
    assert store[name].item() == pytest.approx(3.0)

    # survives get_state / set_state (a checkpoint)
    state = copy.deepcopy(store.get_state())
    pyro.clear_param_store()
    assert name not in pyro.get_param_store()
    pyro.get_param_store().set_state(state)
    assert pyro.get_param_store()[name].item() == pytest.approx(3.0)
    elbo.loss_and_grads(_ma_model, None, 6.0)
    assert pyro.get_param_store()[name].item() == pytest.approx(4.5)


def test_moving_average_state_survives_save_load(tmp_path):
    elbo = storch.StorchELBO()
    elbo.loss_and_grads(_ma_model, None, 2.0)
    elbo.loss_and_grads(_ma_model, None, 4.0)
    path = tmp_path / "params.pt"
    pyro.get_param_store().save(path)
    pyro.clear_param_store()
    pyro.get_param_store().load(path)
    name = baselines.MovingAverage.param_name("z")
    assert pyro.get_param_store()[name].item() == pytest.approx(3.0)


def test_moving_average_updated_by_svi_not_optimized():
    svi = pyro.infer.SVI(_ma_model, None, pyro.optim.Adam({"lr": 0.1}), storch.StorchELBO())
    for c in (2.0, 4.0, 6.0):
        svi.step(c)
    name = baselines.MovingAverage.param_name("z")
    # exactly the EMA: 2 -> 3 -> 4.5; Adam does not move it
    assert pyro.get_param_store()[name].item() == pytest.approx(4.5)


# ---- (f) multi-sample sites -------------------------------------------------------------


def _record_model(record, k_z=1, k_w=1):
    def model():
        with pyro.plate("a", 2, dim=-1):
            z = storch.sample(
                "z", dist.Normal(0.0, 1.0), estimator=estimators.ScoreFunction(n_samples=k_z)
            )
            w = storch.sample(
                "w", dist.Normal(z, 1.0), estimator=estimators.ScoreFunction(n_samples=k_w)
            )
            record["z"], record["w"] = z, w
            storch.add_cost("c", (w - 1.0) ** 2)

    return model


@pytest.mark.parametrize("max_plate_nesting", [1, 2, 3])
def test_sample_dim_left_of_plates(max_plate_nesting):
    record = {}
    storch.StorchELBO(max_plate_nesting=max_plate_nesting).differentiable_loss(
        _record_model(record, k_z=4), None
    )
    m = max_plate_nesting
    assert record["z"].shape == (4,) + (1,) * (m - 1) + (2,)
    assert record["z"].shape[-m - 1] == 4
    assert record["w"].shape == record["z"].shape


@pytest.mark.parametrize("max_plate_nesting", [1, 2, float("inf")])
def test_two_multi_sample_sites_nest(max_plate_nesting):
    record = {}
    elbo = storch.StorchELBO(max_plate_nesting=max_plate_nesting)
    elbo.differentiable_loss(_record_model(record, k_z=4, k_w=3), None)
    m = int(elbo.max_plate_nesting)
    assert m == (1 if max_plate_nesting == float("inf") else max_plate_nesting)
    z, w = record["z"], record["w"]
    assert z.dim() == m + 1 and z.shape[-m - 1] == 4
    assert w.dim() == m + 2 and w.shape[-m - 1] == 4 and w.shape[-m - 2] == 3
    assert w.shape[-1] == 2


def test_two_multi_sample_sites_with_two_plates():
    record = {}

    def model():
        with pyro.plate("a", 2, dim=-1), pyro.plate("b", 3, dim=-2):
            z = storch.sample(
                "z", dist.Normal(0.0, 1.0), estimator=estimators.ScoreFunction(n_samples=4)
            )
            w = storch.sample(
                "w", dist.Normal(z, 1.0), estimator=estimators.ScoreFunction(n_samples=5)
            )
            record["w"] = w
            storch.add_cost("c", (w - 1.0) ** 2)

    storch.StorchELBO().differentiable_loss(model, None)
    assert record["w"].shape == (5, 4, 3, 2)


@pytest.mark.parametrize("max_plate_nesting", [1, float("inf")])
def test_loss_estimates_same_expectation_whatever_k(max_plate_nesting):
    # E[(w - 1)^2], w ~ N(z, 1), z ~ N(0, 1): Var(w) + 1 = 3, twice (plate of 2) = 6
    n = 300
    for k_z, k_w in [(1, 1), (4, 1), (1, 5), (3, 4)]:
        elbo = storch.StorchELBO(max_plate_nesting=max_plate_nesting)
        values = torch.tensor([elbo.loss(_record_model({}, k_z, k_w), None) for _ in range(n)])
        stderr = values.std() / math.sqrt(n)
        assert abs(values.mean().item() - 6.0) < 4 * stderr.item() + 1e-3, (k_z, k_w)


def _gaussian_model(x):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def _gaussian_guide(x):
    pyro.sample("z", dist.Normal(pyro.param("m", torch.tensor(0.5)), 0.7))


def test_multi_sample_guide_site_estimates_neg_elbo():
    x, m, s = torch.tensor(1.2), 0.5, 0.7
    log2pi = math.log(2 * math.pi)
    exact = 0.5 * log2pi + 0.5 * ((x.item() - m) ** 2 + 2 * s**2 + m**2) - math.log(s) - 0.5
    n = 300
    for k in (1, 6):
        elbo = storch.StorchELBO(max_plate_nesting=0)
        with handlers.estimator(config={"z": estimators.ScoreFunction(n_samples=k)}):
            values = torch.tensor(
                [elbo.loss(_gaussian_model, _gaussian_guide, x) for _ in range(n)]
            )
        stderr = values.std() / math.sqrt(n)
        assert abs(values.mean().item() - exact) < 4 * stderr.item() + 1e-3, k
    # more samples per site: less variance of the loss estimate
    with handlers.estimator(config={"z": estimators.ScoreFunction(n_samples=16)}):
        many = torch.tensor([elbo.loss(_gaussian_model, _gaussian_guide, x) for _ in range(50)])
    assert many.std() < values.std()


def _wide_cost_model():
    # a cost with an undeclared batch dim (summed), after a multi-sample site (the cost keeps
    # z's sample dim: reducing over it, z.mean(), is an error, see test_errors.py)
    z = storch.sample("z", dist.Normal(0.0, 1.0), estimator=estimators.ScoreFunction(n_samples=3))
    storch.add_cost("c", torch.arange(5.0) + 0.0 * z)


def test_cost_with_undeclared_batch_dim_explicit_nesting():
    assert storch.StorchELBO(max_plate_nesting=1).loss(_wide_cost_model, None) == pytest.approx(
        10.0
    )


def test_cost_with_undeclared_batch_dim_guessed_nesting():
    assert storch.StorchELBO().loss(_wide_cost_model, None) == pytest.approx(10.0)


# ---- (g) outside StorchELBO -------------------------------------------------------------


@pytest.mark.parametrize(
    "fn",
    [
        lambda: dist.Normal(torch.tensor(0.3, requires_grad=True), 1.0),
        lambda: dist.Bernoulli(0.4),
        lambda: dist.Categorical(torch.ones(5) / 5),
        lambda: dist.Normal(torch.zeros(3), 1.0).to_event(1),
    ],
)
def test_sample_outside_storch_elbo_is_pyro_sample(fn):
    est = estimators.ScoreFunction(n_samples=4, baseline=baselines.MovingAverage())
    pyro.set_rng_seed(7)
    expected = pyro.sample("z", fn())
    pyro.set_rng_seed(7)
    actual = storch.sample("z", fn(), estimator=est)
    assert torch.equal(actual, expected)
    assert actual.shape == expected.shape
    assert actual.requires_grad == expected.requires_grad
    # also under handlers that Pyro installs
    pyro.set_rng_seed(7)
    tr_expected = poutine.trace(lambda: pyro.sample("z", fn())).get_trace()
    pyro.set_rng_seed(7)
    tr_actual = poutine.trace(lambda: storch.sample("z", fn(), estimator=est)).get_trace()
    assert torch.equal(tr_actual.nodes["z"]["value"], tr_expected.nodes["z"]["value"])
    assert tr_actual.nodes["z"]["type"] == "sample"


def test_sample_outside_storch_elbo_observed_and_conditioned():
    obs = torch.tensor(1.5)
    # Pyro warns about observing outside inference; storch.sample behaves the same
    with pytest.warns(RuntimeWarning, match="outside of inference"):
        assert pyro.sample("x", dist.Normal(0.0, 1.0), obs=obs) is obs
    with pytest.warns(RuntimeWarning, match="outside of inference"):
        value = storch.sample(
            "x", dist.Normal(0.0, 1.0), obs=obs, estimator=estimators.ScoreFunction()
        )
    assert value is obs
    conditioned = poutine.condition(
        lambda: storch.sample("x", dist.Normal(0.0, 1.0), estimator=estimators.Pathwise()),
        data={"x": obs},
    )
    assert conditioned() is obs


def test_add_cost_outside_storch_elbo_does_nothing():
    assert storch.add_cost("c", torch.tensor(3.0)) is None
    assert storch.add_cost("c", 3.0) is None
    with poutine.trace() as tr:
        storch.add_cost("c", torch.tensor(3.0))
    assert "c" not in [n for n, s in tr.trace.nodes.items() if s["type"] == "sample"]


def test_add_cost_is_a_storch_cost_message_that_poutine_trace_ignores():
    cost = torch.tensor(3.0)
    seen = []

    class Spy(poutine.messenger.Messenger):
        def _pyro_storch_cost(self, msg):
            seen.append((msg["name"], msg["value"]))

    with Spy():
        storch.add_cost("c", cost)
    assert seen == [("c", None)]  # the value is filled in after the handlers' first pass
    tr = poutine.trace(lambda: storch.add_cost("c", cost)).get_trace()
    assert "c" not in tr.nodes  # Pyro's trace records sample and param messages only


def _train(sample_fn, loss, steps=25):
    pyro.clear_param_store()
    pyro.set_rng_seed(11)

    def model(x):
        z = sample_fn("z", dist.Normal(0.0, 1.0))
        b = sample_fn("b", dist.Bernoulli(0.5))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(z + b, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        p = pyro.param("p", torch.tensor(0.5), constraint=constraints.unit_interval)
        sample_fn("z", dist.Normal(loc, 1.0))
        sample_fn("b", dist.Bernoulli(p))

    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), loss)
    losses = [svi.step(DATA) for _ in range(steps)]
    return losses, {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


def _storch_sample(name, fn):
    est = estimators.ScoreFunction(n_samples=3) if fn.has_rsample else estimators.ScoreFunction()
    storch.add_cost(name + "_cost", torch.tensor(100.0))  # ignored by Trace_ELBO
    return storch.sample(name, fn, estimator=est, baseline=baselines.MovingAverage())


@pytest.mark.parametrize("loss", [pyro.infer.Trace_ELBO, pyro.infer.TraceGraph_ELBO])
def test_storch_sample_model_trains_like_pyro_sample_under_pyro_losses(loss):
    expected_losses, expected = _train(pyro.sample, loss())
    actual_losses, actual = _train(_storch_sample, loss())
    assert actual_losses == pytest.approx(expected_losses, rel=1e-6)
    assert set(actual) == set(expected)
    for name in expected:
        assert torch.allclose(actual[name], expected[name]), name


# ---- add_cost is a negative pyro.factor -------------------------------------------------


def _factor_model(use_factor):
    loc = pyro.param("loc", torch.tensor(0.3))
    z = pyro.sample("z", dist.Normal(loc, 1.0))
    b = pyro.sample("b", dist.Bernoulli(logits=loc))
    with pyro.plate("p", 3):
        with poutine.scale(scale=0.5), poutine.mask(mask=torch.tensor([True, False, True])):
            lp = -((z + b - torch.arange(3.0)) ** 2)
            if use_factor:
                pyro.factor("f", lp)
            else:
                storch.add_cost("f", -lp)
    with pyro.plate("data", 10, subsample_size=4) as idx:
        lp = -((DATA[idx] - z) ** 2)
        if use_factor:
            pyro.factor("d", lp)
        else:
            storch.add_cost("d", -lp)
    with poutine.scale(scale=2.0):
        if use_factor:
            pyro.factor("g", z * b)
        else:
            storch.add_cost("g", -z * b)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_add_cost_equals_negative_factor(seed):
    # in a pure SCG, pyro.factor(name, lp) is the cost -lp: both follow plates (with
    # subsampling scale), poutine.scale and poutine.mask in the same way
    pyro.set_rng_seed(seed)
    with_factor = storch.StorchELBO().differentiable_loss(_factor_model, None, True)
    g_factor = torch.autograd.grad(with_factor, [pyro.param("loc")])
    pyro.set_rng_seed(seed)
    with_cost = storch.StorchELBO().differentiable_loss(_factor_model, None, False)
    g_cost = torch.autograd.grad(with_cost, [pyro.param("loc")])
    assert with_cost.item() == pytest.approx(with_factor.item(), rel=1e-5)
    assert g_cost[0].item() == pytest.approx(g_factor[0].item(), rel=1e-5)


def test_add_cost_under_subsampling_is_scaled():
    def model():
        with pyro.plate("data", 10, subsample_size=4) as idx:
            storch.add_cost("c", DATA[idx])
            model.idx = idx

    value = storch.StorchELBO().loss(model, None)
    assert value == pytest.approx(2.5 * DATA[model.idx].sum().item(), rel=1e-5)


def test_scalar_cost_in_plate_counts_per_element():
    # "a cost of lower rank is broadcast over the plates, as pyro.factor is"
    def model():
        with pyro.plate("p", 5):
            storch.add_cost("c", torch.tensor(2.0))

    assert storch.StorchELBO().loss(model, None) == pytest.approx(10.0)


# ---- validation per model structure -----------------------------------------------------


def _branching_model(flag):
    # two model structures; the "x" branch observes a value outside Bernoulli's support
    if flag:
        pyro.sample("x", dist.Bernoulli(0.3), obs=torch.tensor(2.0))
    else:
        pyro.sample("y", dist.Bernoulli(0.3), obs=torch.tensor(1.0))


def _data_model(value):
    pyro.sample("x", dist.Bernoulli(0.3), obs=value)


def test_fresh_loss_validates_distributions():
    with pytest.raises(ValueError, match="support"):
        storch.StorchELBO().loss_and_grads(_branching_model, None, True)
    with pytest.raises(ValueError, match="support"):
        storch.StorchELBO().differentiable_loss(_branching_model, None, True)
    with pytest.raises(ValueError, match="support"):
        storch.StorchELBO().loss(_branching_model, None, True)


def test_validation_off_skips_checks():
    with pyro.validation_enabled(False):
        value = storch.StorchELBO().loss_and_grads(_branching_model, None, True)
    assert math.isfinite(value)


def test_validate_every_step_checks_later_data():
    elbo = storch.StorchELBO(validate_every_step=True)
    elbo.loss_and_grads(_data_model, None, torch.tensor(1.0))
    elbo.loss_and_grads(_data_model, None, torch.tensor(0.0))
    with pytest.raises(ValueError, match="support"):
        elbo.loss_and_grads(_data_model, None, torch.tensor(2.0))


def test_new_structure_is_validated_on_its_first_step():
    elbo = storch.StorchELBO()
    elbo.loss_and_grads(_branching_model, None, False)
    with pytest.raises(ValueError, match="support"):
        elbo.loss_and_grads(_branching_model, None, True)


def test_alternating_structures_are_all_validated():
    elbo = storch.StorchELBO()
    with pytest.raises(ValueError, match="support"):
        for step in range(6):
            elbo.loss_and_grads(_branching_model, None, step % 2 == 1)


def _chain_model(x):
    z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
    z2 = pyro.sample("z2", dist.Normal(z1, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(z2, 1.0), obs=x)


def _chain_guide(x):
    z1 = pyro.sample("z1", dist.Normal(0.3, 0.8))
    pyro.sample("z2", dist.Normal(z1 + 0.2, 0.9))


def test_nested_multi_sample_guide_sites_estimate_same_neg_elbo():
    x = torch.tensor([0.4, 1.1])
    n = 400
    means, errs = [], []
    for k1, k2 in [(1, 1), (3, 4)]:
        elbo = storch.StorchELBO()
        config = {
            "z1": estimators.ScoreFunction(n_samples=k1),
            "z2": estimators.ScoreFunction(n_samples=k2),
        }
        with handlers.estimator(config=config):
            values = torch.tensor([elbo.loss(_chain_model, _chain_guide, x) for _ in range(n)])
        means.append(values.mean().item())
        errs.append(values.var().item() / n)
    assert abs(means[0] - means[1]) < 4 * math.sqrt(errs[0] + errs[1])


def test_add_cost_in_model_and_guide_adds_to_neg_elbo():
    def model_with_cost():
        rich_model()
        storch.add_cost("model_cost", torch.tensor(5.0))

    def guide_with_cost():
        rich_guide(guide_cost=0.25)

    pyro.set_rng_seed(9)
    expected = pyro.infer.Trace_ELBO().loss(rich_model, rich_guide)
    pyro.set_rng_seed(9)
    actual = storch.StorchELBO().loss(model_with_cost, guide_with_cost)
    assert actual == pytest.approx(expected + 5.0 + 4 * 0.25, rel=1e-5)
