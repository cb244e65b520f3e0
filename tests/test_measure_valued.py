"""MeasureValued: weak-derivative gradients (Mohamed, Rosca, Figurnov & Mnih 2020, §6).

Unbiasedness is tested as in ``test_unbiased.py``: the mean of ``n`` independent gradient
estimates against the EXACT gradient (a closed form, or enumeration of the discrete support),
coordinate by coordinate, within 4.5 standard errors at a fixed seed (conftest), with the
power stated. The ``n`` estimates come from one loss over a plate of ``n`` independent copies
of the toy whose parameters are ``n`` identical rows of a leaf tensor, so row ``i`` of the
gradient is the estimate of copy ``i`` (this also exercises the plate: every plate index is
perturbed at once, each cost being per index). Variance figures are same-run comparisons at
equal numbers of evaluations of the cost.
"""

import contextlib
import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import stats as scipy_stats

import storch_pyro as storch
from storch_pyro import baselines, estimators
from storch_pyro.errors import StorchError, UnsupportedDistributionError

F64 = torch.float64
Z_BOUND = 4.5
N = 10000


def _rows(values, n: int = N) -> torch.Tensor:
    """``n`` identical rows of ``values``: a leaf whose row ``i`` is copy ``i``'s parameter."""
    values = torch.as_tensor(values, dtype=F64)
    return values.expand((n,) + values.shape).clone().requires_grad_()


def _leaf(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64, requires_grad=True)


def assert_unbiased(estimates: torch.Tensor, exact: torch.Tensor, power: float) -> None:
    """Per coordinate ``|mean - exact| < 4.5 s.e.``, and every s.e. below ``power`` times the
    largest exact coordinate: a bias of about ``(4.5 + 2) * power`` of the gradient's scale
    fails with probability above 97%."""
    n = estimates.shape[0]
    mean = estimates.mean(0)
    se = estimates.std(0) / math.sqrt(n)
    exact = exact.reshape(mean.shape)
    z = (mean - exact) / se.clamp(min=1e-300)
    assert z.abs().max() < Z_BOUND, (z, mean, exact, se)
    assert se.max() < power * exact.abs().max(), (se, exact)


def _grads(model, params):
    loss = storch.StorchELBO().differentiable_loss(model, None)
    return torch.autograd.grad(loss, params)


def _normal_cdf(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def step(z):
    return (z > 0.5).to(z.dtype)


# ==== 1. unbiased against closed forms ========================================================


@pytest.mark.parametrize("loc, scale", [(0.3, 0.8), (-0.2, 0.5), (2.0, 1.5)])
def test_normal_step_function_closed_form(loc, scale):
    """f(z) = 1[z > 0.5], E f = Phi((mu - 0.5) / sigma): no derivative of f exists, the
    weak derivatives need none. Power: s.e. below 2% of the largest coordinate."""
    mu, sigma = _rows(loc), _rows(scale)

    def model():
        with pyro.plate("copies", N):
            z = storch.sample("z", dist.Normal(mu, sigma), estimator=estimators.MeasureValued())
            storch.add_cost("step", step(z))

    g_mu, g_sigma = _grads(model, [mu, sigma])
    m, s = _leaf(loc), _leaf(scale)
    exact = torch.autograd.grad(_normal_cdf((m - 0.5) / s), [m, s])
    assert_unbiased(torch.stack([g_mu, g_sigma], -1), torch.stack(exact), 0.02)


@pytest.mark.parametrize("which", ["loc", "scale"])
def test_normal_one_parameter(which):
    """Only the parameter that requires grad is perturbed (2 extra evaluations for the mean,
    1 for the scale); the quadratic cost E (z - 1)^2 = (mu - 1)^2 + sigma^2 has gradient
    (2 (mu - 1), 2 sigma). Power: s.e. below 2% of the gradient."""
    loc, scale = 0.3, 0.8
    mu = _rows(loc) if which == "loc" else torch.full((N,), loc, dtype=F64)
    sigma = _rows(scale) if which == "scale" else torch.full((N,), scale, dtype=F64)
    values = []

    def model():
        with pyro.plate("copies", N):
            z = storch.sample("z", dist.Normal(mu, sigma), estimator=estimators.MeasureValued())
            values.append(z)
            storch.add_cost("c", (z - 1.0) ** 2)

    (g,) = _grads(model, [mu if which == "loc" else sigma])
    assert values[-1].shape == ((3 if which == "loc" else 2), N)
    exact = torch.tensor(2 * (loc - 1.0) if which == "loc" else 2 * scale, dtype=F64)
    assert_unbiased(g.unsqueeze(-1), exact, 0.02)


def test_normal_event_perturbs_coordinates_one_at_a_time():
    """.to_event(1) with a non-separable cost 1[z_1 + z_2 > 0.5]: E f =
    Phi((mu_1 + mu_2 - 0.5) / |sigma|). Perturbing both coordinates at once would be biased;
    1 + 3 * 2 = 7 evaluations per draw. Power: s.e. below 2.5% of the largest coordinate."""
    loc, scale = [0.3, -0.1], [0.8, 1.3]
    mu, sigma = _rows(loc), _rows(scale)
    values = []

    def model():
        with pyro.plate("copies", N):
            z = storch.sample("z", dist.Normal(mu, sigma).to_event(1),
                              estimator=estimators.MeasureValued())
            values.append(z)
            storch.add_cost("c", step(z.sum(-1)))

    g_mu, g_sigma = _grads(model, [mu, sigma])
    assert values[-1].shape == (7, N, 2)
    m, s = _leaf(loc), _leaf(scale)
    exact = torch.autograd.grad(_normal_cdf((m.sum() - 0.5) / s.pow(2).sum().sqrt()), [m, s])
    assert_unbiased(torch.cat([g_mu, g_sigma], -1), torch.cat(exact), 0.025)


def test_poisson_closed_form():
    """f(N) = 1[N >= 3]: d/d lambda P(N >= 3) = P(N = 2) = e^-lambda lambda^2 / 2.
    Power: s.e. below 2% of the gradient."""
    rate = 1.7
    lam = _rows(rate)

    def model():
        with pyro.plate("copies", N):
            n = storch.sample("n", dist.Poisson(lam), estimator=estimators.MeasureValued())
            storch.add_cost("c", (n >= 3).to(F64))

    (g,) = _grads(model, [lam])
    exact = torch.tensor(math.exp(-rate) * rate**2 / 2, dtype=F64)
    assert_unbiased(g.unsqueeze(-1), exact, 0.02)


# ==== 2. unbiased against enumeration =========================================================

PHI = [0.3, -1.0, 2.0]


def bernoulli_cost(b):
    """Not separable in the coordinates."""
    return (b[..., 0] + b[..., 1] * b[..., 2] - 0.4) ** 2


def bernoulli_exact(logits=True):
    phi = _leaf(PHI)
    p = torch.sigmoid(phi) if logits else phi
    total = 0.0
    for bits in itertools.product([0.0, 1.0], repeat=3):
        b = torch.tensor(bits, dtype=F64)
        total = total + torch.where(b > 0, p, 1 - p).prod() * bernoulli_cost(b)
    return torch.autograd.grad(total, [phi])[0]


@pytest.mark.parametrize("param", ["logits", "probs"])
def test_bernoulli_event_enumeration(param):
    """A .to_event(1) Bernoulli of 3 coordinates, non-separable cost, both parameterizations.
    Power: s.e. below 2% of the largest coordinate."""
    values = PHI if param == "logits" else [0.3, 0.6, 0.9]
    phi = _rows(values)

    def model():
        with pyro.plate("copies", N):
            fn = dist.Bernoulli(**{param: phi}).to_event(1)
            b = storch.sample("b", fn, estimator=estimators.MeasureValued())
            storch.add_cost("c", bernoulli_cost(b))

    (g,) = _grads(model, [phi])
    if param == "logits":
        exact = bernoulli_exact()
    else:
        p = _leaf(values)
        total = sum(
            torch.where(torch.tensor(bits) > 0, p, 1 - p).prod()
            * bernoulli_cost(torch.tensor(bits, dtype=F64))
            for bits in itertools.product([0.0, 1.0], repeat=3))
        exact = torch.autograd.grad(total, [p])[0]
    assert_unbiased(g, exact, 0.02)


CAT_LOGITS = [[0.3, -0.2, 1.0], [-1.0, 0.0, 0.5]]
TABLE = torch.tensor([[0.0, 1.0, 3.0], [2.0, -1.0, 0.5]], dtype=F64)


def categorical_cost(z):
    """Indices ``z[..., 2]``; not separable."""
    return (TABLE[0][z[..., 0]] * TABLE[1][z[..., 1]] - 0.7) ** 2


@pytest.mark.parametrize("onehot", [False, True], ids=["categorical", "onehot"])
def test_categorical_event_enumeration(onehot):
    """Two latents of 3 categories as one event, non-separable cost: the estimate for logit
    i is p_i (f(i) - sum_j p_j f(j)), one evaluation per other category and latent; it sums
    to zero over the categories. Power: s.e. below 2% of the largest coordinate."""
    logits = _rows(CAT_LOGITS)
    family = dist.OneHotCategorical if onehot else dist.Categorical
    values = []

    def model():
        with pyro.plate("copies", N):
            z = storch.sample("z", family(logits=logits).to_event(1),
                              estimator=estimators.MeasureValued())
            values.append(z)
            storch.add_cost("c", categorical_cost(z.argmax(-1) if onehot else z))

    (g,) = _grads(model, [logits])
    assert values[-1].shape[0] == 1 + 2 * 2  # (K - 1) shifts per latent
    assert g.sum(-1).abs().max() < 1e-12
    lg = _leaf(CAT_LOGITS)
    p = torch.softmax(lg, -1)
    total = sum(p[0, i] * p[1, j] * categorical_cost(torch.tensor([i, j]))
                for i in range(3) for j in range(3))
    assert_unbiased(g, torch.autograd.grad(total, [lg])[0], 0.02)


def test_single_categorical_is_exact():
    """With one categorical latent and a cost of it alone, the K evaluations make the
    estimate the exact gradient (zero variance)."""
    lg = _leaf([0.3, -0.2, 1.0, 0.0])
    costs = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)

    def model():
        k = storch.sample("k", dist.Categorical(logits=lg), estimator=estimators.MeasureValued())
        storch.add_cost("c", costs[k])

    (g,) = _grads(model, [lg])
    exact = torch.autograd.grad((torch.softmax(lg, -1) * costs).sum(), [lg])[0]
    assert torch.allclose(g, exact, atol=1e-12)


def test_elbo_gradient_closed_form():
    """ELBO mode: guide q = N(m, s) (MeasureValued), model z ~ N(0, 1), x ~ N(z, 1) with x
    observed: -ELBO = -log s + (m^2 + s^2)/2 + ((x - m)^2 + s^2)/2 + const, gradient
    (2m - x, -1/s + 2s); the downstream cost includes log q and log p at every perturbed
    value. Power: s.e. below 3% of the largest coordinate."""
    x, loc, scale = 1.3, 0.4, 0.6
    n = 4 * N
    m, s = _rows(loc, n), _rows(scale, n)
    data = torch.full((n,), x, dtype=F64)

    def model():
        with pyro.plate("copies", n):
            z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=F64), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=data)

    def guide():
        with pyro.plate("copies", n):
            storch.sample("z", dist.Normal(m, s), estimator=estimators.MeasureValued())

    loss = storch.StorchELBO().differentiable_loss(model, guide)
    g_m, g_s = torch.autograd.grad(loss, [m, s])
    exact = torch.tensor([2 * loc - x, -1 / scale + 2 * scale], dtype=F64)
    assert_unbiased(torch.stack([g_m, g_s], -1), exact, 0.03)


def test_with_a_downstream_score_function_site_and_several_samples():
    """b ~ Bernoulli(sigmoid(a)) (MeasureValued, n_samples=2), then c ~ Bernoulli(sigmoid(d
    + b)) (score function): every evaluation of b draws its own c; the loss counts only b's
    draws. Exact by enumeration of the 4 states. Power: s.e. below 3% of the largest
    coordinate."""
    a0, d0 = 0.4, -0.7
    a, d = _rows(a0), _rows(d0)

    def cost(b, c):
        return (b + 2 * c - 1.2) ** 2 + b * c

    def model():
        with pyro.plate("copies", N):
            b = storch.sample("b", dist.Bernoulli(logits=a),
                              estimator=estimators.MeasureValued(n_samples=2))
            c = storch.sample("c", dist.Bernoulli(logits=d + b),
                              estimator=estimators.ScoreFunction())
            storch.add_cost("f", cost(b, c))

    g_a, g_d = _grads(model, [a, d])
    la, ld = _leaf(a0), _leaf(d0)
    total = 0.0
    for b, c in itertools.product([0.0, 1.0], repeat=2):
        pb = torch.sigmoid(la) if b else 1 - torch.sigmoid(la)
        pc = torch.sigmoid(ld + b) if c else 1 - torch.sigmoid(ld + b)
        total = total + pb * pc * cost(torch.tensor(b), torch.tensor(c))
    exact = torch.stack(torch.autograd.grad(total, [la, ld]))
    assert_unbiased(torch.stack([g_a, g_d], -1), exact, 0.03)


def test_impossible_category_is_not_evaluated():
    """A logit of -inf: the shifted value would have log q = -inf in ELBO mode; it is not
    evaluated (its gradient p_i (f(i) - E f) is 0), and the rest stays unbiased against the
    exact ELBO gradient over the 3 possible categories. Power: s.e. below 2.5% of the largest
    coordinate."""
    values = [0.3, -math.inf, 1.0, 0.0]
    logits = _rows(values)
    prior = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)

    def model():
        with pyro.plate("copies", N):
            pyro.sample("z", dist.Categorical(probs=prior))

    def guide():
        with pyro.plate("copies", N):
            storch.sample("z", dist.Categorical(logits=logits),
                          estimator=estimators.MeasureValued())

    loss = storch.StorchELBO().differentiable_loss(model, guide)
    (g,) = torch.autograd.grad(loss, [logits])
    assert torch.isfinite(loss) and torch.isfinite(g).all() and (g[:, 1] == 0).all()
    possible = torch.tensor([True, False, True, True])
    free = _leaf([0.3, 0.0, 1.0, 0.0])
    log_q = torch.log_softmax(free[possible], -1)
    exact = torch.autograd.grad((log_q.exp() * (log_q - prior[possible].log())).sum(), [free])[0]
    keep = [0, 2, 3]
    assert_unbiased(g[:, keep], exact[keep], 0.025)


@pytest.mark.parametrize("make_upstream", [
    pytest.param(lambda: estimators.ScoreFunction(3), id="score-function-3"),
    pytest.param(estimators.Enumerate, id="enumerate"),
])
def test_below_an_upstream_multi_sample_site(make_upstream):
    """a ~ Bernoulli(sigmoid(alpha)) with its own sample dim (3 samples, or the enumerated
    support with weights q(a)), then z ~ N(mu + a, 1) (MeasureValued), cost 1[z > 0.5]:
    E f = sum_a q(a) Phi(mu + a - 0.5). Power: s.e. below 2% of the largest coordinate."""
    alpha0, mu0 = -0.4, 0.2
    alpha, mu = _rows(alpha0), _rows(mu0)

    def model():
        with pyro.plate("copies", N):
            a = storch.sample("a", dist.Bernoulli(logits=alpha), estimator=make_upstream())
            z = storch.sample("z", dist.Normal(mu + a, 1.0),
                              estimator=estimators.MeasureValued())
            storch.add_cost("step", step(z))

    g_alpha, g_mu = _grads(model, [alpha, mu])
    al, m = _leaf(alpha0), _leaf(mu0)
    q = torch.sigmoid(al)
    total = (1 - q) * _normal_cdf(m - 0.5) + q * _normal_cdf(m + 1 - 0.5)
    exact = torch.stack(torch.autograd.grad(total, [al, m]))
    assert_unbiased(torch.stack([g_alpha, g_mu], -1), exact, 0.02)


def test_two_measure_valued_sites_in_a_chain():
    """z1 ~ N(mu, 1), z2 ~ N(z1, s) (both MeasureValued: z2 has its own sample dim over
    z1's), cost 1[z2 > 0.5]: E f = Phi((mu - 0.5) / sqrt(1 + s^2)). Power: s.e. below 2.5%
    of the largest coordinate."""
    mu0, s0 = 0.2, 0.7
    mu, s = _rows(mu0), _rows(s0)

    def model():
        with pyro.plate("copies", N):
            z1 = storch.sample("z1", dist.Normal(mu, 1.0), estimator=estimators.MeasureValued())
            z2 = storch.sample("z2", dist.Normal(z1, s), estimator=estimators.MeasureValued())
            storch.add_cost("step", step(z2))

    g_mu, g_s = _grads(model, [mu, s])
    m, sd = _leaf(mu0), _leaf(s0)
    exact = torch.stack(torch.autograd.grad(
        _normal_cdf((m - 0.5) / (1 + sd**2).sqrt()), [m, sd]))
    assert_unbiased(torch.stack([g_mu, g_s], -1), exact, 0.025)


def test_vectorized_particles():
    """StorchELBO(num_particles=3, vectorize_particles=True): the particle plate is one more
    plate the site and its cost are in. Closed form as in the step-function test. Power:
    s.e. below 2% of the largest coordinate."""
    loc, scale = 0.3, 0.8
    mu, sigma = _rows(loc), _rows(scale)

    def model():
        with pyro.plate("copies", N):
            z = storch.sample("z", dist.Normal(mu, sigma), estimator=estimators.MeasureValued())
            storch.add_cost("step", step(z))

    elbo = storch.StorchELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    loss = elbo.differentiable_loss(model, None)
    g_mu, g_sigma = torch.autograd.grad(loss, [mu, sigma])
    m, s = _leaf(loc), _leaf(scale)
    exact = torch.autograd.grad(_normal_cdf((m - 0.5) / s), [m, s])
    assert_unbiased(torch.stack([g_mu, g_sigma], -1), torch.stack(exact), 0.02)


# ==== 3. values, shapes, the loss value ======================================================


def test_loss_value_counts_only_the_draws():
    """The perturbed values have sample weight 0: the loss is the mean cost of the draws."""
    mu = _leaf(0.3)
    seen = []

    def model():
        z = storch.sample("z", dist.Normal(mu, 1.0), estimator=estimators.MeasureValued(3))
        seen.append(z.detach())
        storch.add_cost("c", z**2)

    loss = storch.StorchELBO().differentiable_loss(model, None)
    z = seen[-1]
    assert z.shape == (3 + 3 * 2,)  # 3 draws, then 2 evaluations (mu +- W) for each
    assert torch.allclose(loss, (z[:3] ** 2).mean())


def test_normal_evaluation_points_have_the_weak_derivatives_laws():
    """Slot 0 (the draw mu + sigma M U) is N(mu, sigma^2); slots 1, 2 are mu +- sigma W with
    W ~ Weibull(sqrt 2, 2) (CDF 1 - exp(-w^2 / 2)); slot 3 is mu + sigma M with M double-sided
    Maxwell (|M| a chi with 3 degrees of freedom). KS tests at n = 10000 (p > 1e-3 rejects
    a CDF error above about 0.02)."""
    loc, scale = 0.3, 0.8
    mu, sigma = _rows(loc), _rows(scale)
    seen = []

    def model():
        with pyro.plate("copies", N):
            z = storch.sample("z", dist.Normal(mu, sigma), estimator=estimators.MeasureValued())
            seen.append(z.detach())
            storch.add_cost("c", z)

    _grads(model, [mu, sigma])
    z = (seen[-1] - loc) / scale
    assert z.shape == (4, N)
    assert scipy_stats.kstest(z[0].numpy(), "norm").pvalue > 1e-3
    assert torch.allclose(z[1], -z[2])
    assert scipy_stats.kstest(z[1].numpy(), "weibull_min", args=(2, 0, math.sqrt(2))).pvalue > 1e-3
    assert scipy_stats.kstest(z[3].abs().numpy(), "chi", args=(3,)).pvalue > 1e-3
    assert scipy_stats.kstest(z[0].abs().numpy(), "chi", args=(3,)).pvalue < 1e-3  # control
    assert abs((z[3] > 0).double().mean().item() - 0.5) < 0.02
    # the coupling: the draw is M U, so |z_0| <= |z_3| with the same sign
    assert (z[0].abs() <= z[3].abs() + 1e-12).all() and (z[0] * z[3] >= 0).all()


@pytest.mark.parametrize("sizes, nesting, k", [((), 0, 1), ((3,), 2, 2), ((2, 3), 3, 3)])
def test_sample_dim_left_of_plates(sizes, nesting, k):
    """A Bernoulli site in nested plates, with room for more plates: its k draws and their
    k flips lie on one dim left of ``max_plate_nesting``; the loss is the mean cost of the
    draws."""
    logits = torch.full(sizes, 0.3, dtype=F64, requires_grad=True)
    target = torch.full(sizes, 0.6, dtype=F64)
    seen = []

    def model():
        with contextlib.ExitStack() as stack:
            for i, size in enumerate(sizes):
                stack.enter_context(pyro.plate(f"p{i}", size, dim=i - len(sizes)))
            b = storch.sample("b", dist.Bernoulli(logits=logits),
                              estimator=estimators.MeasureValued(k))
            seen.append(b.detach())
            storch.add_cost("c", (b - target) ** 2)

    loss = storch.StorchELBO(max_plate_nesting=nesting).differentiable_loss(model, None)
    value = seen[-1]
    assert value.shape == (2 * k,) + (1,) * (nesting - len(sizes)) + sizes
    costs = ((value - target) ** 2).reshape(2 * k, -1).sum(-1)
    assert torch.allclose(loss, costs[:k].mean())
    assert torch.equal(value[k:], 1 - value[:k])
    (grad,) = torch.autograd.grad(loss, [logits])
    assert torch.isfinite(grad).all()


def test_no_perturbations_without_gradient():
    """Under torch.no_grad (StorchELBO.loss) or with constant parameters, the site draws
    only its samples."""
    mu = _leaf(0.3)
    shapes = []

    def model():
        z = storch.sample("z", dist.Normal(mu, 1.0), estimator=estimators.MeasureValued())
        shapes.append(z.shape)
        storch.add_cost("c", z**2)

    storch.StorchELBO().loss(model, None)
    assert shapes[-1] == ()
    storch.StorchELBO().differentiable_loss(model, None)
    assert shapes[-1] == (3,)


def test_trains_with_svi_in_elbo_mode():
    """SVI with pyro.param (a constrained scale) and loss_and_grads: the guide N(loc, sc)
    reaches the exact posterior N(4x/5, 1/5) of z ~ N(0, 1), x ~ N(z, 1/2)."""
    data = torch.tensor([1.5, 0.7, 2.1, 1.2])

    def model():
        with pyro.plate("d", 4):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=data)

    def guide():
        loc = pyro.param("loc", torch.zeros(4))
        scale = pyro.param("scale", torch.ones(4), constraint=dist.constraints.positive)
        with pyro.plate("d", 4):
            storch.sample("z", dist.Normal(loc, scale), estimator=estimators.MeasureValued())

    svi = pyro.infer.SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.1, "lrd": 0.98}),
                         loss=storch.StorchELBO())
    for _ in range(150):
        svi.step()
    assert (pyro.param("loc") - 0.8 * data).abs().max() < 0.15
    assert (pyro.param("scale") - 0.2**0.5).abs().max() < 0.1


# ==== 4. variance against the score function at equal evaluations ===========================


def _variance(make_estimator, cost, loc, scale, event=False, n=4000, steps=3):
    """Per-coordinate variance of one gradient estimate over ``n`` copies, after ``steps - 1``
    steps that let a moving average settle."""
    estimator = make_estimator()
    for _ in range(steps):
        mu = _rows(loc, n)
        sigma = _rows(scale, n) if scale is not None else torch.full((n,), 0.8, dtype=F64)
        params = [mu] if scale is None else [mu, sigma]

        def model():
            with pyro.plate("copies", n):
                fn = dist.Normal(mu, sigma)
                z = storch.sample("z", fn.to_event(1) if event else fn, estimator=estimator)
                storch.add_cost("c", cost(z))

        grads = _grads(model, params)
    return torch.cat([g.reshape(n, -1) for g in grads], -1).var(0)


@pytest.mark.parametrize("loc", [0.0, 0.3, -1.0, 2.0])
def test_variance_below_score_function_on_a_step_mean(loc):
    """f(z) = 1[z > 0.5], the mean's gradient (sigma fixed at 0.8): MeasureValued's 3
    evaluations against ScoreFunction(3) with a moving-average baseline. Measured ratios
    0.14-0.49 at these 4 means (estimates over 4000 copies: relative s.e. of a variance
    about 3-5%)."""
    mvd = _variance(estimators.MeasureValued, step, loc, None)
    sf = _variance(lambda: estimators.ScoreFunction(3, baseline=baselines.MovingAverage()),
                   step, loc, None)
    assert mvd.sum() < 0.75 * sf.sum(), (mvd, sf)


X = torch.tensor([[1.0, 0.5], [-0.3, 1.2], [0.8, -1.0], [1.5, 0.2], [-1.1, -0.4],
                  [0.2, 0.9], [-0.7, 0.3], [0.4, -0.6]], dtype=F64)
Y = torch.tensor([1, 1, -1, 1, -1, 1, -1, -1], dtype=F64)


def logistic_loss(w):
    """Logistic regression's negative log-likelihood of 8 points at weights ``w[..., 2]``."""
    return torch.nn.functional.softplus(-Y * (w.unsqueeze(-2) * X).sum(-1)).sum(-1)


def test_variance_below_score_function_on_logistic_regression():
    """w ~ N(mu, sigma).to_event(1) in 2 dimensions, cost the logistic loss: MeasureValued's
    1 + 3 * 2 = 7 evaluations against ScoreFunction(7) + MovingAverage. Measured: total
    variance 0.48 x (about that of the pathwise gradient, with 1 evaluation)."""
    loc, scale = [0.2, -0.1], [0.7, 0.9]
    mvd = _variance(estimators.MeasureValued, logistic_loss, loc, scale, event=True)
    sf = _variance(lambda: estimators.ScoreFunction(7, baseline=baselines.MovingAverage()),
                   logistic_loss, loc, scale, event=True)
    assert mvd.sum() < 0.7 * sf.sum(), (mvd, sf)


# ==== 5. first order only ====================================================================


def test_second_order_raises_and_first_order_is_right():
    mu = _leaf(0.3)

    def model():
        z = storch.sample("z", dist.Normal(mu, 1.0), estimator=estimators.MeasureValued())
        storch.add_cost("c", z**2)

    loss = storch.StorchELBO().differentiable_loss(model, None)
    with pytest.raises(StorchError, match="site 'z': MeasureValued gives first-order"):
        torch.autograd.grad(loss, [mu], create_graph=True)
    loss = storch.StorchELBO().differentiable_loss(model, None)
    (g,) = torch.autograd.grad(loss, [mu])
    assert torch.isfinite(g)


# ==== 6. errors ==============================================================================


def test_cost_outside_the_plate_that_depends_on_the_site_is_an_error():
    """A sum over the plate's indices would see every index perturbed at once."""
    mu = _leaf([0.1, 0.2, 0.3])

    def model():
        with pyro.plate("p", 3):
            z = storch.sample("z", dist.Normal(mu, 1.0), estimator=estimators.MeasureValued())
        storch.add_cost("total", step(z.sum(-1, keepdim=True)))

    with pytest.raises(StorchError, match="cost 'total' depends on the value of site 'z'"):
        storch.StorchELBO().differentiable_loss(model, None)


def test_cost_outside_the_plate_that_does_not_depend_on_the_site_is_fine():
    """A global cost computed after the site but not from it (e.g. the prior of a global
    latent in the model) carries no sample dim of the site: allowed, and unbiased.
    Power: s.e. below 2% of the gradient."""
    mu = _rows(0.3)
    w = _leaf(0.5)

    def model():
        with pyro.plate("copies", N):
            z = storch.sample("z", dist.Normal(mu, 1.0), estimator=estimators.MeasureValued())
            storch.add_cost("c", (z - 1.0) ** 2)
        storch.add_cost("global", w**2)

    g_mu, g_w = _grads(model, [mu, w])
    assert torch.allclose(g_w, 2 * w.detach())
    assert_unbiased(g_mu.unsqueeze(-1), torch.tensor(2 * (0.3 - 1.0), dtype=F64), 0.02)


def test_unsupported_distribution_names_the_site():
    """LogNormal is a TransformedDistribution of a Normal, not a Normal."""
    def model():
        z = storch.sample("z", dist.LogNormal(_leaf(0.0), 1.0),
                          estimator=estimators.MeasureValued())
        storch.add_cost("c", z)

    with pytest.raises(UnsupportedDistributionError, match="site 'z'.*MeasureValued"):
        storch.StorchELBO().differentiable_loss(model, None)


def test_registered():
    assert "MeasureValued" in estimators.working_estimators(dist.Poisson(1.0))
    assert repr(estimators.MeasureValued(2)) == "MeasureValued(n_samples=2)"
