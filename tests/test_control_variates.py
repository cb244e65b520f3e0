"""REBAR, RELAX and LAX: learned control variates trained inside SVI.

Same standard as ``test_unbiased.py``: the mean of ``n`` independent gradient estimates is
compared with the EXACT gradient (enumeration of the discrete support, or a closed form),
coordinate by coordinate, within 4.5 standard errors, under a fixed seed; each test states
its power. The control variates are held fixed there (``learn=False``, a fixed network): the
estimators are unbiased for ANY control variate, which is what makes training them safe.
Variance figures are same-run ratios at a fixed seed.
"""

import copy
import itertools

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from scipy import stats as scipy_stats

import storch_pyro as storch
from storch_pyro import baselines, estimators, handlers
from storch_pyro.diagnostics import GradientStats, gradient_stats
from storch_pyro.errors import StorchError, UnsupportedDistributionError
from storch_pyro.estimators.relaxed_sampling import (
    gumbel_conditional,
    gumbel_sample,
    logistic_conditional,
    logistic_sample,
    open_uniform,
)

Z_BOUND = 4.5


def assert_unbiased(stats: GradientStats, bound: float = Z_BOUND) -> None:
    z = stats.z_scores
    assert z.abs().max() < bound, (
        f"biased: z-scores {z.tolist()}\nmean  {stats.mean.tolist()}\n"
        f"exact {stats.exact.tolist()}\ns.e.  {stats.std_error.tolist()}"
    )


def assert_power(stats: GradientStats, fraction: float) -> None:
    """Every standard error is below ``fraction`` of the largest exact coordinate, so a bias
    of about ``4.5 * fraction`` of the gradient's scale would fail the test."""
    assert stats.std_error.max() < fraction * stats.exact.abs().max(), (
        stats.std_error, stats.exact)


def _leaf(values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, requires_grad=True)


def copies_stats(model, guide, values, n, exact, *args, **elbo_options) -> GradientStats:
    """:func:`gradient_stats` of ``n`` independent estimates of the gradient w.r.t. the first
    argument ``x`` of ``model`` and ``guide`` (``guide=None``: a pure SCG) at ``x = values``,
    drawn in one call: both run in ``plate("copies", n)`` (they have no plates of their own)
    with their own copy of ``x`` per index, and the gradient w.r.t. copy ``i`` is one
    estimate (a site's terms only multiply the costs at its own plate index). The same
    estimates as ``n`` calls: the estimators here carry no state from call to call (no
    optimizer steps their control variates)."""
    x = torch.tensor(values).expand(n, len(values)).clone().requires_grad_()

    def in_copies(program):
        def copies(*args):
            with pyro.plate("copies", n):
                program(*args)

        return copies

    elbo = storch.StorchELBO(**elbo_options)
    loss = elbo.differentiable_loss(
        in_copies(model), None if guide is None else in_copies(guide), x, *args)
    (samples,) = torch.autograd.grad(loss, [x])
    variance = samples.var(0)
    return GradientStats(samples.mean(0), variance, (variance / n).sqrt(), n, exact)


class Net(torch.nn.Module):
    """A small control variate: an MLP over the last dim, that dim summed away."""

    def __init__(self, d: int, hidden: int = 8, seed: int = 1) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(d, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.mlp(z).squeeze(-1)


class ElementwiseNet(Net):
    """A control variate for a site in a plate: one value per element."""

    def __init__(self, hidden: int = 8, seed: int = 1) -> None:
        super().__init__(1, hidden, seed)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.mlp(z.unsqueeze(-1)).squeeze(-1)


# ==== 1. the conditional relaxed samplers z~ ~ p(z | b) ========================================
# KS tests at n = 20000 reject (at p < 1e-3) a CDF error above about 0.014; a location error
# of 0.1 in the logistic (0.025 in CDF) or in a Gumbel (0.037) is rejected, see the controls.

N_KS = 20000
P_MIN = 1e-3


@pytest.mark.parametrize("phi", [-2.0, 0.7])
def test_logistic_conditional_is_the_conditional(phi):
    logits = torch.full((N_KS,), phi, dtype=torch.float64)
    z = logistic_sample(logits, open_uniform((N_KS,), logits))
    b = (z > 0).double()
    z_tilde = logistic_conditional(logits, b, open_uniform((N_KS,), logits))
    assert torch.equal(z_tilde > 0, b > 0)
    p = torch.sigmoid(torch.tensor(phi)).item()

    def marginal(x, shift=0.0):
        return torch.sigmoid(torch.as_tensor(x) - phi - shift).numpy()

    # Mixed over b ~ Bernoulli(p), z~ is the unconditional logistic(phi).
    assert scipy_stats.kstest(z_tilde.numpy(), marginal).pvalue > P_MIN
    assert scipy_stats.kstest(z_tilde.numpy(), lambda x: marginal(x, 0.1)).pvalue < P_MIN
    # Given b = 1 it is the logistic truncated to (0, inf); given b = 0, to (-inf, 0).
    ones, zeros = z_tilde[b > 0].numpy(), z_tilde[b == 0].numpy()
    assert scipy_stats.kstest(ones, lambda x: (marginal(x) - (1 - p)) / p).pvalue > P_MIN
    assert scipy_stats.kstest(zeros, lambda x: marginal(x) / (1 - p)).pvalue > P_MIN


def test_gumbel_conditional_is_the_conditional():
    logits = torch.tensor([-1.0, 0.5, 2.0, 0.0], dtype=torch.float64)
    log_probs = torch.log_softmax(logits, -1).expand(N_KS, 4)
    z = gumbel_sample(log_probs, open_uniform((N_KS, 4), log_probs))
    one_hot = torch.nn.functional.one_hot(z.argmax(-1), 4).double()
    z_tilde = gumbel_conditional(log_probs, one_hot, open_uniform((N_KS, 4), log_probs))
    assert torch.equal(z_tilde.argmax(-1), one_hot.argmax(-1))
    for i in range(4):
        location = log_probs[0, i].item()

        def gumbel_cdf(x, shift=0.0):
            return torch.exp(-torch.exp(-(torch.as_tensor(x) - location - shift))).numpy()

        assert scipy_stats.kstest(z_tilde[:, i].numpy(), gumbel_cdf).pvalue > P_MIN, i
        shifted = scipy_stats.kstest(z_tilde[:, i].numpy(), lambda x: gumbel_cdf(x, 0.1))
        assert shifted.pvalue < P_MIN, i
    # Given b, the maximum is a standard Gumbel (log-normalizer 0) whatever b is.
    top = (z_tilde * one_hot).sum(-1)
    standard = scipy_stats.kstest(
        top.numpy(), lambda x: torch.exp(-torch.exp(-torch.as_tensor(x))).numpy())
    assert standard.pvalue > P_MIN


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_conditional_samplers_at_extreme_parameters(dtype):
    n = 5000
    logits = torch.tensor([30.0, -30.0, 0.0, -18.42], dtype=dtype).expand(n, 4)
    for forced in (0.0, 1.0):  # condition on b, including the value of probability ~1e-13
        b = torch.full_like(logits, forced)
        z_tilde = logistic_conditional(logits, b, open_uniform(logits.shape, logits))
        assert torch.isfinite(z_tilde).all()
        assert torch.equal(z_tilde > 0, b > 0)
    probs = torch.tensor([1e-8, 1.0 - 2e-8, 1e-8], dtype=dtype)
    for log_probs in (torch.log(probs), torch.log_softmax(torch.tensor([30.0, -30.0, 0.0],
                                                                       dtype=dtype), -1)):
        log_probs = log_probs.expand(n, 3)
        for category in range(3):
            one_hot = torch.zeros(n, 3, dtype=dtype)
            one_hot[:, category] = 1.0
            z_tilde = gumbel_conditional(log_probs, one_hot, open_uniform((n, 3), log_probs))
            assert torch.isfinite(z_tilde).all()
            assert (z_tilde.argmax(-1) == category).all()


EXTREME_MODELS = [
    pytest.param(lambda x: dist.Bernoulli(logits=x).to_event(1), [30.0, -30.0, 0.0],
                 id="bernoulli-logits"),
    pytest.param(lambda x: dist.Bernoulli(probs=x).to_event(1), [1e-8, 1.0 - 1e-8, 0.5],
                 id="bernoulli-probs"),
    pytest.param(lambda x: dist.OneHotCategorical(logits=x), [30.0, -30.0, 0.0],
                 id="onehot-logits"),
    pytest.param(lambda x: dist.OneHotCategorical(probs=x), [1e-8, 1.0 - 2e-8, 1e-8],
                 id="onehot-probs"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("make_dist, values", EXTREME_MODELS)
@pytest.mark.parametrize("make_estimator", [
    pytest.param(lambda: estimators.REBAR(n_samples=4), id="rebar"),
    pytest.param(lambda: estimators.RELAX(Net(3), rebar_term=True, n_samples=4),
                 id="relax+rebar"),
])
def test_extreme_parameters_give_finite_gradients(make_estimator, make_dist, values, dtype):
    """Logits of +-30 and probabilities of 1e-8: finite loss, estimator gradient and
    variance gradients (loss_and_grads, with eta, temperature and the network trained)."""
    x = pyro.param("x", torch.tensor(values, dtype=dtype))
    estimator = make_estimator()
    if isinstance(estimator, estimators.RELAX):
        estimator.network.module.to(dtype)

    def model():
        b = storch.sample("b", make_dist(pyro.param("x")), estimator=estimator)
        storch.add_cost("f", ((b - 0.3) ** 2).sum(-1))

    elbo = storch.StorchELBO(max_plate_nesting=0)
    for _ in range(30):
        loss = elbo.loss_and_grads(model, None)
        grads = [param.grad for _, param in pyro.get_param_store().named_parameters()]
        assert torch.isfinite(torch.tensor(loss))
        assert all(g is not None and torch.isfinite(g).all() for g in grads), grads
        for _, param in pyro.get_param_store().named_parameters():
            param.grad = None
    assert x.dtype == dtype


# ==== 2. unbiasedness for fixed control variates: discrete toys, exact by enumeration ========

TARGET = torch.tensor([0.0, 1.0, 0.3])
WEIGHTS = torch.tensor([0.8, -0.5, 1.3])
PHI = [-0.5, 0.3, 1.0]


def papers_toy_cost(b):
    """Tucker et al.'s toy f(b) = sum (b - 0.499)^2 (the gradient is tiny: 0.002 p(1-p))."""
    return ((b - 0.499) ** 2).sum(-1)


def nonlinear_cost(b):
    return ((b - TARGET) ** 2).sum(-1) + ((b * WEIGHTS).sum(-1) - 0.7) ** 2


def bernoulli_exact(cost, phi_values) -> torch.Tensor:
    phi = _leaf(phi_values, torch.float64)
    total = 0.0
    for bits in itertools.product([0.0, 1.0], repeat=len(phi_values)):
        b = torch.tensor(bits, dtype=torch.float64)
        log_q = dist.Bernoulli(logits=phi).log_prob(b).sum()
        total = total + log_q.exp() * cost(b.float()).double()
    (grad,) = torch.autograd.grad(total, [phi])
    return grad.float()


def bernoulli_event_model(phi, estimator, cost):
    b = storch.sample("b", dist.Bernoulli(logits=phi).to_event(1), estimator=estimator)
    storch.add_cost("f", cost(b))


def bernoulli_probs_model(p, estimator, cost):
    b = storch.sample("b", dist.Bernoulli(probs=torch.sigmoid(p)).to_event(1),
                      estimator=estimator)
    storch.add_cost("f", cost(b))


def bernoulli_plate_model(phi, estimator, cost):
    """b in a plate: a cost per element inside, and a nonlinear cost of all of b outside
    (each element's REBAR term must see the whole outside cost, its pathwise part once)."""
    with pyro.plate("p", 3):
        b = storch.sample("b", dist.Bernoulli(logits=phi), estimator=estimator)
        storch.add_cost("inside", (b - TARGET) ** 2)
    storch.add_cost("outside", ((b * WEIGHTS).sum(-1, keepdim=True) - 0.7) ** 2)


def plate_cost(b):
    return ((b - TARGET) ** 2).sum(-1) + ((b * WEIGHTS).sum(-1) - 0.7) ** 2


N_DRAWS = 300
K = 100  # samples per draw: each estimate averages K triples, so 30000 triples per test

BERNOULLI_CASES = [
    pytest.param(lambda: estimators.REBAR(learn=False, n_samples=K), id="rebar"),
    pytest.param(lambda: estimators.REBAR(temperature=2.0, eta=0.4, learn=False, n_samples=K),
                 id="rebar-eta0.4-temp2"),
    pytest.param(lambda: estimators.RELAX(Net(3), n_samples=K), id="relax"),
    pytest.param(lambda: estimators.RELAX(Net(3), rebar_term=True, learn=False, n_samples=K),
                 id="relax+rebar"),
]


@pytest.mark.parametrize("cost", [papers_toy_cost, nonlinear_cost], ids=["toy", "nonlinear"])
@pytest.mark.parametrize("model", [bernoulli_event_model, bernoulli_probs_model],
                         ids=["logits", "probs"])
@pytest.mark.parametrize("make_estimator", BERNOULLI_CASES)
def test_unbiased_on_bernoulli(make_estimator, model, cost):
    """Power: toy, s.e. about 1e-4 against gradients of 5e-4 (a relaxed estimator such as
    Gumbel-softmax at temperature 0.5 is off by far more); nonlinear, s.e. below 2% of the
    largest coordinate (0.37)."""
    stats = copies_stats(model, None, PHI, N_DRAWS, bernoulli_exact(cost, PHI),
                         make_estimator(), cost)
    assert_unbiased(stats)
    if cost is nonlinear_cost:
        assert_power(stats, 0.02)


@pytest.mark.parametrize("make_estimator", [
    pytest.param(lambda: estimators.REBAR(learn=False, n_samples=K), id="rebar"),
    pytest.param(lambda: estimators.RELAX(ElementwiseNet(), n_samples=K), id="relax"),
    pytest.param(lambda: estimators.RELAX(ElementwiseNet(), rebar_term=True, learn=False,
                                          n_samples=K), id="relax+rebar"),
])
def test_unbiased_in_a_plate_with_costs_inside_and_outside(make_estimator):
    """Power: s.e. below 2% of the largest coordinate of the exact gradient."""
    phi = _leaf(PHI)
    estimator = make_estimator()
    elbo = storch.StorchELBO(max_plate_nesting=1)
    stats = gradient_stats(
        lambda: elbo.differentiable_loss(bernoulli_plate_model, None, phi, estimator, None),
        [phi], N_DRAWS, bernoulli_exact(plate_cost, PHI))
    assert_unbiased(stats)
    assert_power(stats, 0.02)


def test_unbiased_in_a_masked_plate():
    """poutine.mask on the site's plate: masked elements get no gradient, the others the
    exact one. Power: s.e. below 2% of the unmasked coordinates."""
    phi = _leaf(PHI)
    mask = torch.tensor([True, False, True])

    def model(phi, estimator):
        with pyro.plate("p", 3), poutine.mask(mask=mask):
            b = storch.sample("b", dist.Bernoulli(logits=phi), estimator=estimator)
            storch.add_cost("inside", (b - TARGET) ** 2 + 2.0 * b * TARGET.flip(0))

    estimator = estimators.REBAR(learn=False, n_samples=K)
    elbo = storch.StorchELBO(max_plate_nesting=1)
    exact = bernoulli_exact(
        lambda b: (((b - TARGET) ** 2 + 2.0 * b * TARGET.flip(0)) * mask).sum(-1), PHI)
    stats = gradient_stats(lambda: elbo.differentiable_loss(model, None, phi, estimator),
                           [phi], N_DRAWS, exact)
    assert stats.mean[1] == 0.0 and abs(stats.exact[1]) < 1e-12
    keep = torch.tensor([0, 2])
    assert (stats.z_scores[keep].abs() < Z_BOUND).all(), stats.z_scores
    assert_power(stats, 0.02)


def upstream_model(theta, estimator):
    """``b`` (REBAR) depends on ``a``, drawn before it with 3 samples and a score-function
    estimator: b's values carry a's sample dim, and a's score multiplies b's control term."""
    a = storch.sample("a", dist.Bernoulli(logits=theta[0]),
                      estimator=estimators.ScoreFunction(n_samples=3))
    b = storch.sample("b", dist.Bernoulli(logits=theta[1] + 1.5 * a), estimator=estimator)
    storch.add_cost("f", (a + b - 0.7 * a * b - 0.4) ** 2 + a)


def upstream_exact(theta_values) -> torch.Tensor:
    theta = _leaf(theta_values, torch.float64)
    total = 0.0
    for a, b in itertools.product([0.0, 1.0], repeat=2):
        a_, b_ = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        log_p = (dist.Bernoulli(logits=theta[0]).log_prob(a_)
                 + dist.Bernoulli(logits=theta[1] + 1.5 * a_).log_prob(b_))
        total = total + log_p.exp() * ((a + b - 0.7 * a * b - 0.4) ** 2 + a)
    (grad,) = torch.autograd.grad(total, [theta])
    return grad.float()


@pytest.mark.parametrize("make_estimator", [
    pytest.param(lambda: estimators.REBAR(learn=False, n_samples=20), id="rebar"),
    pytest.param(lambda: estimators.RELAX(ElementwiseNet(), n_samples=20), id="relax"),
])
def test_unbiased_below_an_upstream_multi_sample_site(make_estimator):
    """Power: s.e. below 4% of the largest coordinate."""
    theta = _leaf([0.3, -0.6])
    estimator = make_estimator()  # RELAX: z carries a's sample dim, one value per entry
    elbo = storch.StorchELBO(max_plate_nesting=0)
    stats = gradient_stats(lambda: elbo.differentiable_loss(upstream_model, None, theta,
                                                            estimator),
                           [theta], 1000, upstream_exact([0.3, -0.6]))
    assert_unbiased(stats)
    assert_power(stats, 0.04)


def test_an_estimator_with_a_control_term_below_relaxed_values_is_an_error():
    def model():
        a = storch.sample("a", dist.Bernoulli(0.4), estimator=estimators.REBAR())
        b = storch.sample("b", dist.Bernoulli(logits=a - 0.5), estimator=estimators.DisARM())
        storch.add_cost("f", a * b)

    with pytest.raises(StorchError, match="site 'b' depends on the relaxed values of site 'a'"):
        storch.StorchELBO().differentiable_loss(model, None)


# Categorical toys: K = 4 categories, f(b) = (w_b - 0.3)^2 + 0.5 w_b.
CAT_LOGITS = [-1.0, 0.5, 2.0, 0.0]
CAT_W = torch.tensor([1.0, -0.5, 0.7, 2.0])


def categorical_cost_of_index(index):
    w = CAT_W[index]
    return (w - 0.3) ** 2 + 0.5 * w


def categorical_exact(logits_values) -> torch.Tensor:
    logits = _leaf(logits_values, torch.float64)
    probs = torch.softmax(logits, -1)
    total = (probs * categorical_cost_of_index(torch.arange(4)).double()).sum()
    (grad,) = torch.autograd.grad(total, [logits])
    return grad.float()


def categorical_model(logits, estimator):
    """Values are one-hot (REBAR, RELAX+rebar) or indices (RELAX): both handled."""
    z = storch.sample("z", dist.Categorical(logits=logits), estimator=estimator)
    w = z @ CAT_W if z.dtype.is_floating_point else CAT_W[z]
    storch.add_cost("f", (w - 0.3) ** 2 + 0.5 * w)


def one_hot_probs_model(logits, estimator):
    z = storch.sample("z", dist.OneHotCategorical(probs=torch.softmax(logits, -1)),
                      estimator=estimator)
    w = z @ CAT_W
    storch.add_cost("f", (w - 0.3) ** 2 + 0.5 * w)


@pytest.mark.parametrize("model", [categorical_model, one_hot_probs_model],
                         ids=["categorical-logits", "onehot-probs"])
@pytest.mark.parametrize("make_estimator", [
    pytest.param(lambda: estimators.REBAR(learn=False, n_samples=K), id="rebar"),
    pytest.param(lambda: estimators.REBAR(temperature=1.5, eta=0.5, learn=False, n_samples=K),
                 id="rebar-eta0.5-temp1.5"),
    pytest.param(lambda: estimators.RELAX(Net(4), n_samples=K), id="relax"),
    pytest.param(lambda: estimators.RELAX(Net(4), rebar_term=True, learn=False, n_samples=K),
                 id="relax+rebar"),
])
def test_unbiased_on_categorical(make_estimator, model):
    """Power: s.e. below 3% of the largest coordinate."""
    stats = copies_stats(model, None, CAT_LOGITS, N_DRAWS, categorical_exact(CAT_LOGITS),
                         make_estimator())
    assert_unbiased(stats)
    assert_power(stats, 0.03)


# ==== 3. LAX on a Normal toy: E[(x - t)^2] = (mu - t)^2 + s^2 per coordinate ================

LAX_TARGET = torch.tensor([1.0, -0.5])


def lax_model(mu, log_s, estimator):
    x = storch.sample("x", dist.Normal(mu, log_s.exp()).to_event(1), estimator=estimator)
    storch.add_cost("f", ((x - LAX_TARGET) ** 2).sum(-1))  # x arrives detached: a black box


class Quadratic(torch.nn.Module):
    """A fixed control variate close to the cost: sum (z - center)^2."""

    def __init__(self, center) -> None:
        super().__init__()
        self.center = torch.nn.Parameter(torch.tensor(center))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return ((z - self.center) ** 2).sum(-1)


@pytest.mark.parametrize("n_samples, make_net, draws, power", [
    # 3000 draws (were 2000 calls): s.e. / largest coordinate 0.045 at 2000 (seeds 0-5:
    # 0.042-0.051), too close to 0.05 for a fixed seed; at 3000, 0.034-0.041 (20 seeds).
    pytest.param(1, lambda: Quadratic([0.8, -0.3]), 3000, 0.05, id="quadratic"),
    pytest.param(20, lambda: Quadratic([0.8, -0.3]), N_DRAWS, 0.03, id="quadratic-k20"),
    pytest.param(1, lambda: Net(2), 2000, 0.12, id="mlp"),
    pytest.param(20, lambda: Net(2), N_DRAWS, 0.08, id="mlp-k20"),
])
def test_lax_unbiased_on_normal(n_samples, make_net, draws, power):
    """Power: s.e. below ``power`` of the largest coordinate (with a control variate near
    the cost, the rest is the pathwise variance; the MLP, far from it, leaves
    score-function variance). The ``draws`` estimates are copies in a plate, in one call."""
    mu, log_s = torch.tensor([0.2, 0.4]), torch.tensor([-0.3, 0.1])
    estimator = estimators.LAX(make_net(), n_samples=n_samples)
    exact = torch.cat([2 * (mu - LAX_TARGET), 2 * log_s.exp() ** 2])

    def model(x, estimator):  # x = (mu, log_s)
        lax_model(x[..., :2], x[..., 2:], estimator)

    stats = copies_stats(model, None, torch.cat([mu, log_s]).tolist(), draws, exact, estimator)
    assert_unbiased(stats)
    assert_power(stats, power)


def test_lax_value_reaches_the_cost_detached():
    mu, log_s = _leaf([0.2, 0.4]), _leaf([-0.3, 0.1])
    seen = []

    def model(mu, log_s):
        x = storch.sample("x", dist.Normal(mu, log_s.exp()).to_event(1),
                          estimator=estimators.LAX(Net(2)))
        seen.append(x)
        storch.add_cost("f", x.sum())

    storch.StorchELBO().differentiable_loss(model, None, mu, log_s)
    assert not seen[0].requires_grad


# ==== 4. ELBO mode: REBAR / RELAX in a guide, exact ELBO gradient by enumeration ============

PRIOR = torch.tensor([0.3, 0.6, 0.5])
OBS_W = torch.tensor([1.5, -1.0, 0.8])
Y = torch.tensor(0.9)


def bernoulli_model(lz, estimator):
    z = pyro.sample("z", dist.Bernoulli(probs=PRIOR).to_event(1))
    pyro.sample("y", dist.Normal((z * OBS_W).sum(-1), 1.0), obs=Y)


def bernoulli_guide(lz, estimator):
    storch.sample("z", dist.Bernoulli(logits=lz).to_event(1), estimator=estimator)


def bernoulli_elbo_exact(lz_values) -> torch.Tensor:
    lz = _leaf(lz_values, torch.float64)
    total = 0.0
    for bits in itertools.product([0.0, 1.0], repeat=3):
        z = torch.tensor(bits, dtype=torch.float64)
        log_q = dist.Bernoulli(logits=lz).log_prob(z).sum()
        log_p = (dist.Bernoulli(probs=PRIOR.double()).log_prob(z).sum()
                 + dist.Normal((z * OBS_W.double()).sum(), 1.0).log_prob(Y.double()))
        total = total + log_q.exp() * (log_q - log_p)
    (grad,) = torch.autograd.grad(total, [lz])
    return grad.float()


CAT_MEANS = torch.tensor([-1.0, 0.5, 2.0, 1.0])
CAT_PRIOR = torch.tensor([0.1, 0.2, 0.3, 0.4])


def categorical_model_elbo(lz, estimator):
    z = pyro.sample("z", dist.Categorical(probs=CAT_PRIOR))
    mean = z @ CAT_MEANS if z.dtype.is_floating_point else CAT_MEANS[z]
    pyro.sample("y", dist.Normal(mean, 1.0), obs=Y)


def categorical_guide(lz, estimator):
    storch.sample("z", dist.Categorical(logits=lz), estimator=estimator)


def categorical_elbo_exact(lz_values) -> torch.Tensor:
    lz = _leaf(lz_values, torch.float64)
    log_q = torch.log_softmax(lz, -1)
    log_p = (CAT_PRIOR.double().log()
             + dist.Normal(CAT_MEANS.double(), 1.0).log_prob(Y.double()))
    total = (log_q.exp() * (log_q - log_p)).sum()
    (grad,) = torch.autograd.grad(total, [lz])
    return grad.float()


@pytest.mark.parametrize("make_estimator", [
    pytest.param(lambda d: estimators.REBAR(learn=False, n_samples=K), id="rebar"),
    pytest.param(lambda d: estimators.RELAX(Net(d), n_samples=K), id="relax"),
    pytest.param(lambda d: estimators.RELAX(Net(d), rebar_term=True, learn=False,
                                            n_samples=K), id="relax+rebar"),
])
@pytest.mark.parametrize("kind, elbo_options", [
    ("bernoulli", {}),
    ("categorical", {}),
    pytest.param("bernoulli", {"num_particles": 3, "vectorize_particles": True},
                 id="bernoulli-vectorized-particles"),
])
def test_unbiased_elbo_gradient(kind, elbo_options, make_estimator):
    """The relaxed evaluations use log q, log p continuous in the relaxed value; the ELBO
    gradient stays exact in expectation. Power: s.e. below 3% of the largest coordinate."""
    if kind == "bernoulli":
        lz_values, model, guide, exact = [0.4, -1.0, 1.2], bernoulli_model, bernoulli_guide, \
            bernoulli_elbo_exact
        d = 3
    else:
        lz_values, model, guide, exact = CAT_LOGITS, categorical_model_elbo, categorical_guide, \
            categorical_elbo_exact
        d = 4
    stats = copies_stats(model, guide, lz_values, N_DRAWS, exact(lz_values), make_estimator(d),
                         **elbo_options)
    assert_unbiased(stats)
    assert_power(stats, 0.03)


@pytest.mark.parametrize("make_estimator, power", [
    pytest.param(lambda: estimators.REBAR(learn=False, n_samples=K), 0.03, id="rebar"),
    pytest.param(lambda: estimators.RELAX(Net(3), n_samples=K), 0.05, id="relax"),
])
def test_unbiased_with_a_mask_on_the_guide_site_only(make_estimator, power):
    """poutine.mask(False) on the guide site removes log q from the costs, never the
    expectation over q: the gradient is that of E_q[-log p(z, y)]. Power: s.e. below
    ``power`` of the largest coordinate (the untrained RELAX network adds variance)."""
    def guide(lz, estimator):
        with poutine.mask(mask=False):
            bernoulli_guide(lz, estimator)

    lz_values = [0.4, -1.0, 1.2]
    theta = _leaf(lz_values, torch.float64)
    total = 0.0
    for bits in itertools.product([0.0, 1.0], repeat=3):
        z = torch.tensor(bits, dtype=torch.float64)
        log_p = (dist.Bernoulli(probs=PRIOR.double()).log_prob(z).sum()
                 + dist.Normal((z * OBS_W.double()).sum(), 1.0).log_prob(Y.double()))
        total = total - dist.Bernoulli(logits=theta).log_prob(z).sum().exp() * log_p
    (exact,) = torch.autograd.grad(total, [theta])
    stats = copies_stats(bernoulli_model, guide, lz_values, N_DRAWS, exact.float(),
                         make_estimator())
    assert_unbiased(stats)
    assert_power(stats, power)


def test_loss_value_counts_only_the_hard_samples():
    """The value of the surrogate (and of ``loss``) is the Monte Carlo estimate at b: with
    a cost that is 0 at every discrete value and not elsewhere, it is exactly 0."""
    phi = _leaf(PHI)

    def model(phi):
        b = storch.sample("b", dist.Bernoulli(logits=phi).to_event(1),
                          estimator=estimators.REBAR(n_samples=4))
        shapes.append(b.shape)
        storch.add_cost("f", (b * (1 - b)).sum(-1))

    shapes = []
    elbo = storch.StorchELBO(max_plate_nesting=0)
    assert elbo.differentiable_loss(model, None, phi).item() == 0.0
    assert elbo.loss(model, None, phi) == 0.0
    assert shapes[0] == (12, 3)  # b, sigma(z), sigma(z~) for 4 samples


# ==== 5. training inside SVI: the right .grad on each parameter ==============================


def toy_svi_model(estimator):
    phi = pyro.param("phi", torch.tensor(PHI))
    bernoulli_event_model(phi, estimator, nonlinear_cost)


@pytest.mark.parametrize("make_estimator, cv_names", [
    pytest.param(lambda: estimators.REBAR(n_samples=3),
                 ["storch_pyro.rebar.b.eta", "storch_pyro.rebar.b.temperature"], id="rebar"),
    pytest.param(lambda: estimators.RELAX(Net(3), rebar_term=True, n_samples=3),
                 ["storch_pyro.relax.b.eta", "storch_pyro.relax.b.temperature",
                  "storch_pyro.relax.b$$$mlp.0.weight", "storch_pyro.relax.b$$$mlp.2.bias"],
                 id="relax+rebar"),
])
def test_loss_and_grads_leaves_estimator_and_variance_gradients(make_estimator, cv_names):
    """Under the same seed: phi.grad is the surrogate's gradient (what differentiable_loss
    gives), and each control-variate parameter's grad is d/dphi_cv sum(g^2) for g that
    gradient w.r.t. the site's logits (phi here)."""
    estimator = make_estimator()
    elbo = storch.StorchELBO(max_plate_nesting=0)
    pyro.set_rng_seed(3)
    elbo.loss_and_grads(toy_svi_model, None, estimator)
    store = dict(pyro.get_param_store().named_parameters())
    got = {name: store[name].grad.clone() for name in ["phi"] + cv_names}
    for param in store.values():
        param.grad = None

    pyro.set_rng_seed(3)
    loss = elbo.differentiable_loss(toy_svi_model, None, estimator)
    (g,) = torch.autograd.grad(loss, [store["phi"]], create_graph=True)
    expected = torch.autograd.grad((g ** 2).sum(), [store[n] for n in cv_names])
    assert torch.allclose(got["phi"], g.detach())
    for name, grad in zip(cv_names, expected):
        assert torch.allclose(got[name], grad, atol=1e-6), name
        assert got[name].abs().sum() > 0, name


def _lax_svi_model(estimator):
    mu = pyro.param("mu", torch.tensor([0.2, 0.4]))
    lax_model(mu, torch.zeros(2), estimator)


@pytest.mark.parametrize("model, make_estimator", [
    pytest.param(toy_svi_model, lambda: estimators.REBAR(n_samples=3), id="rebar"),
    pytest.param(toy_svi_model, lambda: estimators.RELAX(Net(3), n_samples=3), id="relax"),
    pytest.param(toy_svi_model, lambda: estimators.RELAX(Net(3), rebar_term=True),
                 id="relax+rebar"),
    pytest.param(_lax_svi_model, lambda: estimators.LAX(Net(2)), id="lax"),
])
def test_differentiable_loss_trains_control_variates_like_loss_and_grads(
    model, make_estimator
):
    """One torch optimizer over differentiable_loss trains everything: its backward leaves
    the same .grad on every parameter (the estimator's gradient on the model's, the variance
    gradient on the control variate's) as loss_and_grads, under the same seed."""
    estimator = make_estimator()
    elbo = storch.StorchELBO(max_plate_nesting=0)
    grads = []
    for path in ("loss_and_grads", "differentiable_loss"):
        pyro.set_rng_seed(3)
        if path == "loss_and_grads":
            elbo.loss_and_grads(model, None, estimator)
        else:
            elbo.differentiable_loss(model, None, estimator).backward()
        store = dict(pyro.get_param_store().named_parameters())
        grads.append({name: param.grad.clone() for name, param in store.items()})
        for param in store.values():
            param.grad = None
    assert len(grads[0]) >= 3 and grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, atol=1e-6), name
        if name not in ("phi", "mu"):
            assert grad.abs().sum() > 0, name  # the control variate is trained


def test_lax_loss_and_grads_trains_the_network_on_the_variance():
    estimator = estimators.LAX(Net(2))

    def model():
        mu = pyro.param("mu", torch.tensor([0.2, 0.4]))
        lax_model(mu, torch.zeros(2), estimator)

    elbo = storch.StorchELBO()
    pyro.set_rng_seed(5)
    elbo.loss_and_grads(model, None)
    store = dict(pyro.get_param_store().named_parameters())
    weight = "storch_pyro.lax.x$$$mlp.0.weight"
    got_mu, got_w = store["mu"].grad.clone(), store[weight].grad.clone()
    pyro.set_rng_seed(5)
    loss = elbo.differentiable_loss(model, None)
    (g,) = torch.autograd.grad(loss, [store["mu"]], create_graph=True)
    (expected,) = torch.autograd.grad((g ** 2).sum(), [store[weight]])
    assert torch.allclose(got_mu, g.detach())
    assert torch.allclose(got_w, expected, atol=1e-6)


def test_parameters_checkpoint_with_the_param_store(tmp_path):
    svi = pyro.infer.SVI(lambda: toy_svi_model(estimators.REBAR()), None,
                         pyro.optim.Adam({"lr": 0.05}), loss=storch.StorchELBO())
    for _ in range(20):
        svi.step()
    store = pyro.get_param_store()
    eta = store["storch_pyro.rebar.b.eta"].item()
    assert eta != 1.0 and store["storch_pyro.rebar.b.temperature"].item() > 0
    store.save(tmp_path / "params.pt")
    pyro.clear_param_store()
    store.load(tmp_path / "params.pt")
    assert store["storch_pyro.rebar.b.eta"].item() == eta


# ==== 6. the variance falls with training ====================================================
# Papers' toy f(b) = sum (b - 0.499)^2 over 3 coordinates, logits start at 0. Figures (seed 0,
# 300 SVI steps of Adam(lr 1e-2)): see the asserts' messages.


def _toy_variance(estimator, phi_values, n=400) -> float:
    phi = _leaf(phi_values)
    elbo = storch.StorchELBO()
    stats = gradient_stats(
        lambda: elbo.differentiable_loss(bernoulli_event_model, None, phi, estimator,
                                         papers_toy_cost), [phi], n)
    return stats.total_variance


def test_relax_and_rebar_variance_falls_with_training(seed=0):
    results = {}
    for name, make in [("relax", lambda: estimators.RELAX(Net(3))),
                       ("rebar", lambda: estimators.REBAR())]:
        pyro.clear_param_store()
        estimator = make()
        untrained = copy.deepcopy(estimator)
        pyro.set_rng_seed(seed)

        def model():
            phi = pyro.param("phi", torch.zeros(3))
            bernoulli_event_model(phi, estimator, papers_toy_cost)

        svi = pyro.infer.SVI(model, None, pyro.optim.Adam({"lr": 1e-2}),
                             loss=storch.StorchELBO())
        for _ in range(300):
            svi.step()
        phi = pyro.param("phi").detach().tolist()
        trained = _toy_variance(estimator, phi)
        pyro.clear_param_store()  # step 0: initial eta, temperature, network
        step0 = _toy_variance(untrained, phi)
        score = _toy_variance(estimators.ScoreFunction(), phi)
        results[name] = (trained / score, trained / step0)
    # measured (seeds 0, 1, 2): relax 0.0009, 0.0010, 0.0004 of ScoreFunction's variance and
    # 0.0007, 0.0007, 0.0003 of its step-0 variance; rebar 0.36-0.37 and 0.78-0.85.
    assert results["relax"][0] < 0.01 and results["relax"][1] < 0.01, results
    assert results["rebar"][0] < 0.5 and results["rebar"][1] < 0.95, results


# ==== 7. a small discrete VAE: variance vs ScoreFunction + MovingAverage =====================
# 16 binarized 8x8 digits, 8 binary latents per data point in plate("data", 16), linear
# encoder and decoder (fixed random weights), uniform prior. Variance: trace of the covariance
# of the gradient of the encoder's 520 parameters.

VAE_K = 8


def vae_data() -> torch.Tensor:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return torch.tensor(digits.data[:16] > 7, dtype=torch.get_default_dtype())


def vae_params(x):
    weights = torch.Generator().manual_seed(0)
    d = x.shape[1]
    return {
        "W_enc": 0.3 * torch.randn(d, VAE_K, generator=weights),
        "b_enc": torch.zeros(VAE_K),
        "W_dec": 0.3 * torch.randn(VAE_K, d, generator=weights),
        "b_dec": torch.zeros(d),
    }


def vae_model(x, p):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(VAE_K)).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=z @ p["W_dec"] + p["b_dec"]).to_event(1), obs=x)


def vae_guide(x, p):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Bernoulli(logits=x @ p["W_enc"] + p["b_enc"]).to_event(1))


class VaeControlVariate(torch.nn.Module):
    """c_phi(z, x): one value per data point, from the relaxed latents and the data."""

    def __init__(self, d: int) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(VAE_K + d, 32), torch.nn.Tanh(),
                                       torch.nn.Linear(32, 1))
        torch.nn.init.zeros_(self.mlp[2].weight)

    def forward(self, z, x, *other_args):
        x = x.expand(z.shape[:-1] + x.shape[-1:])
        return self.mlp(torch.cat([torch.sigmoid(z), x], -1)).squeeze(-1)


def _vae_variance(estimator, x, p, train_steps, n, seed) -> float:
    guide = handlers.estimator(vae_guide, config={"z": estimator})
    elbo = storch.StorchELBO(max_plate_nesting=1)
    pyro.set_rng_seed(seed)
    if train_steps:
        # SVI trains only the estimator's parameters: the VAE's are plain tensors here.
        svi = pyro.infer.SVI(vae_model, guide, pyro.optim.Adam({"lr": 3e-3}), loss=elbo)
        for _ in range(train_steps):
            svi.step(x, p)
    else:
        for _ in range(100):  # warms a moving-average baseline up
            elbo.differentiable_loss(vae_model, guide, x, p)
    for value in p.values():
        value.grad = None
    stats = gradient_stats(lambda: elbo.differentiable_loss(vae_model, guide, x, p),
                           [p["W_enc"], p["b_enc"]], n)
    return stats.total_variance


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_discrete_vae_variance_against_score_function_with_moving_average(seed):
    """Variance of the encoder gradient relative to ScoreFunction + MovingAverage(0.9)
    (warmed up over 100 draws), measured at seeds 0 / 1: REBAR untrained 0.69 / 0.68, REBAR
    after 300 SVI steps 0.32 / 0.30, RELAX (rebar_term, network of z and x) 0.32 / 0.30.
    ``python -m pytest -s -m slow -k discrete_vae`` prints them."""
    x = vae_data()
    p = {name: value.requires_grad_() for name, value in vae_params(x).items()}
    n = 300
    variance = {
        "score+ma": _vae_variance(
            estimators.ScoreFunction(baseline=baselines.MovingAverage(0.9)), x, p, 0, n, seed),
    }
    pyro.clear_param_store()
    variance["rebar-step0"] = _vae_variance(estimators.REBAR(), x, p, 0, n, seed)
    pyro.clear_param_store()
    variance["rebar"] = _vae_variance(estimators.REBAR(), x, p, 300, n, seed)
    pyro.clear_param_store()
    variance["relax+rebar"] = _vae_variance(
        estimators.RELAX(VaeControlVariate(x.shape[1]), rebar_term=True, with_context=True),
        x, p, 300, n, seed)
    ratios = {name: v / variance["score+ma"] for name, v in variance.items()}
    print(f"\ndiscrete VAE encoder-gradient variance / ScoreFunction+MovingAverage: {ratios}")
    assert ratios["rebar"] < 0.5 and ratios["relax+rebar"] < 0.5, ratios
    assert ratios["rebar"] < ratios["rebar-step0"], ratios


# ==== 8. errors ==============================================================================


def test_rebar_on_a_normal_site_names_the_site():
    def model():
        storch.sample("w", dist.Normal(0.0, 1.0), estimator=estimators.REBAR())

    with pytest.raises(UnsupportedDistributionError, match="site 'w'.*REBAR.*Normal"):
        storch.StorchELBO().differentiable_loss(model, None)


def test_relax_on_a_normal_site_names_the_site():
    def model():
        storch.sample("w", dist.Normal(0.0, 1.0), estimator=estimators.RELAX(Net(1)))

    with pytest.raises(UnsupportedDistributionError, match="site 'w'.*RELAX.*LAX"):
        storch.StorchELBO().differentiable_loss(model, None)


def test_lax_on_a_bernoulli_site_names_the_site():
    def model():
        storch.sample("b", dist.Bernoulli(0.3), estimator=estimators.LAX(Net(1)))

    with pytest.raises(UnsupportedDistributionError, match="site 'b'.*LAX.*RELAX"):
        storch.StorchELBO().differentiable_loss(model, None)


@pytest.mark.parametrize("make_estimator, expected", [
    pytest.param(lambda: estimators.RELAX(torch.nn.Linear(3, 1)), r"\(\)", id="relax"),
    pytest.param(lambda: estimators.RELAX(torch.nn.Linear(3, 2), rebar_term=True), r"\(1,\)",
                 id="relax+rebar"),
])
def test_control_variate_with_the_wrong_output_shape_names_the_site(make_estimator, expected):
    phi = _leaf(PHI)
    with pytest.raises(StorchError, match=r"site 'b'.*Linear.*shape " + expected):
        storch.StorchELBO().differentiable_loss(bernoulli_event_model, None, phi,
                                                make_estimator(), nonlinear_cost)


def test_lax_with_the_wrong_output_shape_names_the_site():
    mu, log_s = _leaf([0.2, 0.4]), _leaf([-0.3, 0.1])
    with pytest.raises(StorchError, match=r"site 'x'.*shape \(\)"):
        storch.StorchELBO().differentiable_loss(lax_model, None, mu, log_s,
                                                estimators.LAX(torch.nn.Linear(2, 2)))


def test_rebar_with_a_non_discrete_model_site_names_the_site():
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        storch.sample("z", dist.Bernoulli(0.3), estimator=estimators.REBAR())

    with pytest.raises(StorchError, match="site 'z'.*REBAR.*relaxed"):
        storch.StorchELBO().differentiable_loss(model, guide)


def test_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        estimators.REBAR(temperature=0.0)
    with pytest.raises(TypeError, match="RELAX: control_variate must be a torch.nn.Module"):
        estimators.RELAX(lambda z: z.sum(-1))
    with pytest.raises(TypeError, match="LAX: control_variate"):
        estimators.LAX("net")


def test_registered():
    for cls in (estimators.REBAR, estimators.RELAX, estimators.LAX):
        assert cls in estimators.Estimator.registry
    assert "REBAR" in estimators.working_estimators(dist.Bernoulli(0.3))
    assert "LAX" in estimators.working_estimators(dist.Normal(0.0, 1.0))
    assert "LAX" not in estimators.working_estimators(dist.Bernoulli(0.3))

