"""GumbelSoftmax and StraightThrough: biased, low-variance estimators for discrete sites.

They are biased by design, so these tests check what they promise instead of unbiasedness:
the values they hand to downstream code (exactly one-hot / binary for ``hard=True`` and
straight-through, in the simplex / (0, 1) for the soft relaxation, with gradients), the
gradients they define (``hard=True``: that of the soft sample; straight-through: that of the
probabilities), the bias falling and the variance growing as the temperature falls (measured
against exact gradients, with standard errors far below the differences), temperature
schedules, training with ``SVI`` in ELBO mode, log-densities evaluated at the discrete value,
finite values and gradients at extreme logits, and errors naming the site. Fixed seeds
(conftest).
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI

import storch_pyro as storch
from storch_pyro import estimators, handlers
from storch_pyro.diagnostics import flat_grad, gradient_stats
from storch_pyro.errors import UnsupportedDistributionError
from tests.toys import discrete_fn

F64 = torch.float64

RELAXATIONS = [
    pytest.param(lambda: estimators.GumbelSoftmax(0.5, hard=True), id="gumbel-hard"),
    pytest.param(lambda: estimators.StraightThrough(), id="straight-through"),
]


def _leaf(values, dtype=F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, requires_grad=True)


# logits per plate index (plate of 4) for the categorical kinds, and for the Bernoulli kind
CAT_LOGITS = [[0.3, -0.2, 1.0], [-1.0, 0.0, 0.5], [2.0, -2.0, 0.0], [0.1, 0.1, 0.1]]
BERN_LOGITS = [0.3, -1.0, 2.0, 0.0]


def _draw(kind, estimator, dtype=F64, n_draws=30):
    """Values drawn by ``estimator`` at a site of ``kind`` in a plate of 4 (pure SCG with a
    cost that uses them), with the site's logits."""
    logits = _leaf(BERN_LOGITS if kind == "bernoulli" else CAT_LOGITS, dtype)
    values = []

    def model():
        with pyro.plate("p", 4):
            z = storch.sample("z", discrete_fn(kind, logits), estimator=estimator)
            values.append(z)
            weights = torch.arange(z.shape[-1], dtype=dtype) if kind != "bernoulli" else 1.0
            storch.add_cost("c", ((z * weights).sum(-1) if kind != "bernoulli" else z) ** 2)

    elbo = storch.StorchELBO(max_plate_nesting=1)  # no guessing run to append values
    for _ in range(n_draws):
        elbo.differentiable_loss(model, None)
    return logits, values


KINDS = ["bernoulli", "categorical", "onehot"]


# ==== 1. values ==============================================================================


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("make_estimator", RELAXATIONS)
def test_hard_values_are_exactly_discrete_and_carry_gradients(kind, make_estimator):
    """One-hot rows (Categorical sites too: a trailing dim of size K), or exactly 0/1 for a
    Bernoulli; they require grad, and the gradient w.r.t. the logits is finite and not 0."""
    logits, values = _draw(kind, make_estimator())
    seen = set()
    for z in values:
        if kind == "bernoulli":
            assert z.shape == (4,)
            assert ((z == 0) | (z == 1)).all(), z
        else:
            assert z.shape == (4, 3)
            assert ((z == 0) | (z == 1)).all() and (z.sum(-1) == 1).all(), z
        assert z.dtype == F64 and z.requires_grad
        seen.add(tuple(z.detach().reshape(-1).tolist()))
        (grad,) = torch.autograd.grad((z * torch.linspace(-1, 1, z.shape[-1])).sum(), [logits])
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert len(seen) > 1  # actually sampled


@pytest.mark.parametrize("kind", KINDS)
def test_soft_gumbel_values_lie_in_the_simplex(kind):
    logits, values = _draw(kind, estimators.GumbelSoftmax(1.0))
    for z in values:
        assert z.requires_grad
        if kind == "bernoulli":
            assert z.shape == (4,)
            assert ((z > 0) & (z < 1)).all(), z
        else:
            assert z.shape == (4, 3)
            assert (z >= 0).all() and (z <= 1).all()
            torch.testing.assert_close(z.sum(-1), torch.ones(4, dtype=F64))
            assert (z.max(-1).values < 1).any()  # relaxed, not one-hot
        (grad,) = torch.autograd.grad((z * torch.linspace(-1, 1, z.shape[-1])).sum(), [logits])
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_hard_gumbel_is_the_argmax_of_the_soft_sample_with_its_gradient(kind):
    """From the same seed, hard=True gives H(y) for the soft sample y of hard=False, and the
    same gradient (straight-through Gumbel: forward H(y), backward through y)."""
    pyro.set_rng_seed(3)
    logits_s, soft = _draw(kind, estimators.GumbelSoftmax(0.7), n_draws=5)
    pyro.set_rng_seed(3)
    logits_h, hard = _draw(kind, estimators.GumbelSoftmax(0.7, hard=True), n_draws=5)
    for y, h in zip(soft, hard):
        if kind == "bernoulli":
            expected = (y > 0.5).to(y.dtype)
        else:
            expected = torch.nn.functional.one_hot(y.argmax(-1), 3).to(y.dtype)
        assert torch.equal(h.detach(), expected.detach())
        r = torch.linspace(-1, 2, h.shape[-1], dtype=F64)
        (grad_soft,) = torch.autograd.grad((y * r).sum(), [logits_s])
        (grad_hard,) = torch.autograd.grad((h * r).sum(), [logits_h])
        torch.testing.assert_close(grad_hard, grad_soft, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_straight_through_gradient_is_that_of_the_probabilities(kind):
    logits, values = _draw(kind, estimators.StraightThrough(), n_draws=5)
    for z in values:
        r = torch.linspace(-1, 2, z.shape[-1], dtype=F64)
        (grad,) = torch.autograd.grad((z * r).sum(), [logits])
        probs = torch.sigmoid(logits) if kind == "bernoulli" else logits.softmax(-1)
        (expected,) = torch.autograd.grad((probs * r).sum(), [logits])
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


# ==== 2. bias and variance against the temperature ===========================================
#
# Exact gradients: OneHotCategorical(4) with f(z) = (z . W - c)^2, dJ/dlogits of
# sum_k pi_k (W_k - c)^2; Bernoulli in a plate of 3 with f = sum (b - t)^2, dJ/dphi =
# p (1 - p) (1 - 2 t). Each loss call averages R = 1000 independent draws (a plate of copies),
# so a call's gradient is the mean of 1000 estimates: n calls give the mean of 1000 n draws,
# and R times a call's variance is the variance of one draw's estimate.

W4 = torch.tensor([2.0, -1.0, 0.5, 1.5], dtype=F64)
C4 = 0.3
LOGITS4 = [0.5, -0.2, 0.3, -0.6]
TARGET = torch.tensor([0.0, 1.0, 0.3], dtype=F64)
PHI = [-0.5, 0.3, 1.0]
R = 1000


def onehot_copies(logits, estimator):
    with pyro.plate("copies", R, dim=-1):
        z = storch.sample("z", dist.OneHotCategorical(logits=logits), estimator=estimator)
        storch.add_cost("f", ((z * W4).sum(-1) - C4) ** 2 / R)


def onehot_exact():
    logits = _leaf(LOGITS4)
    return flat_grad((logits.softmax(-1) * (W4 - C4) ** 2).sum(), [logits])


def bernoulli_copies(phi, estimator):
    with pyro.plate("copies", R, dim=-2), pyro.plate("p", 3, dim=-1):
        b = storch.sample("b", dist.Bernoulli(logits=phi), estimator=estimator)
        storch.add_cost("f", (b - TARGET) ** 2 / R)


def bernoulli_exact():
    p = torch.sigmoid(torch.tensor(PHI, dtype=F64))
    return p * (1 - p) * (1 - 2 * TARGET)


def relaxed_stats(model, init, exact, estimator, n=300):
    """(norm of the bias, norm of the s.e. vector of the mean, total variance of one draw's
    estimate)."""
    x = _leaf(init)
    elbo = storch.StorchELBO()
    stats = gradient_stats(
        lambda: elbo.differentiable_loss(model, None, x, estimator), [x], n, exact
    )
    return (
        float(stats.bias.norm()),
        float(stats.std_error.norm()),
        stats.total_variance * R,
    )


TOYS = [
    pytest.param(onehot_copies, LOGITS4, onehot_exact, id="onehot"),
    pytest.param(bernoulli_copies, PHI, bernoulli_exact, id="bernoulli"),
]


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("model, init, exact_fn", TOYS)
def test_bias_falls_and_variance_grows_as_temperature_falls(model, init, exact_fn, hard):
    # Measured (seeds 0-2; 150k, 300k, 600k draws at tau = 1, 0.3, 0.1) ||bias||, the
    # norm of the s.e. vector at most 0.007 (one-hot) / 0.0018 (Bernoulli), and the total
    # variance of one draw's estimate:
    #                    bias                          variance
    #   one-hot, soft:   0.43, 0.172-0.173, 0.054-0.057;   0.23-0.27, 2.0-2.4, 8.3-8.6
    #   one-hot, hard:   0.36, 0.128-0.133, 0.040-0.042;   1.4-1.6, 8.0-8.5, 28-29
    #   Bernoulli, soft: 0.126, 0.040, 0.012-0.013;        0.025, 0.21-0.23, 0.94-0.98
    #   Bernoulli, hard: 0.146, 0.051-0.053, 0.016-0.017;  0.09-0.11, 0.50-0.53, 1.8-1.9
    # (StraightThrough, no temperature: bias 0.57, variance 1.6-1.8 (one-hot); bias 0.114,
    # variance 0.13-0.14 (Bernoulli).)
    # Each factor 0.3 in tau cuts the bias to 0.30-0.40 of its value: asserted < 0.6, with
    # the s.e. norms below a tenth of each difference (measured <= 0.08 of it); and it
    # multiplies the variance by 3.4-9.5: asserted > 2.
    exact = exact_fn()
    results = {
        tau: relaxed_stats(model, init, exact, estimators.GumbelSoftmax(tau, hard=hard), n)
        for tau, n in ((1.0, 150), (0.3, 300), (0.1, 600))
    }
    for high, low in ((1.0, 0.3), (0.3, 0.1)):
        bias_high, se_high, var_high = results[high]
        bias_low, se_low, var_low = results[low]
        assert bias_low < 0.6 * bias_high, results
        # the power: the difference is at least 10 standard errors of either estimate
        assert max(se_high, se_low) < 0.1 * (bias_high - bias_low), results
        assert var_low > 2 * var_high, results


# ==== 3. temperature schedules ===============================================================


def _scg_onehot(logits, estimator, record=None):
    z = storch.sample("z", dist.OneHotCategorical(logits=logits), estimator=estimator)
    if record is not None:
        record.append(z.detach())
    storch.add_cost("c", (z * W4).sum(-1) ** 2)


def test_callable_temperature_is_called_with_increasing_steps_and_used():
    calls = []

    def schedule(step):
        calls.append(step)
        return 100.0 if step < 3 else 0.01

    estimator = estimators.GumbelSoftmax(schedule)
    logits = _leaf(LOGITS4)
    values = []
    elbo = storch.StorchELBO(max_plate_nesting=0)  # no guessing run to append values
    for _ in range(6):
        elbo.differentiable_loss(_scg_onehot, None, logits, estimator, values)
    assert len(calls) >= 6 and calls[0] == 0
    assert all(b > a for a, b in zip(calls, calls[1:])), calls
    # the schedule's temperature is the one used: tau = 100 gives nearly uniform values,
    # tau = 0.01 nearly one-hot ones
    first, last = values[0], values[-1]
    assert first.max() < 0.3, first
    assert last.max() > 0.99, last


def test_evaluating_the_loss_leaves_the_schedule_alone():
    """Only training draws (autograd on) advance a schedule: StorchELBO.loss and
    SVI.evaluate_loss (both under no_grad) do not, SVI.step does."""
    estimator = estimators.GumbelSoftmax(lambda step: 1.0 / (1 + step))
    logits = _leaf(LOGITS4)
    elbo = storch.StorchELBO()
    elbo.loss(_scg_onehot, None, logits, estimator)
    assert estimator.step == 0
    elbo.differentiable_loss(_scg_onehot, None, logits, estimator)
    assert estimator.step == 1

    def model():
        _scg_onehot(pyro.param("logits", torch.tensor(LOGITS4, dtype=F64)), estimator)

    svi = pyro.infer.SVI(model, None, pyro.optim.Adam({"lr": 0.01}), loss=elbo)
    for _ in range(3):
        svi.evaluate_loss()
    assert estimator.step == 1
    svi.step()
    assert estimator.step == 2


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_invalid_temperature_raises(temperature):
    with pytest.raises(ValueError, match="temperature"):
        estimators.GumbelSoftmax(temperature)
    with pytest.raises(ValueError, match="temperature"):
        estimators.GumbelSoftmax(temperature, hard=True)


@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_schedule_returning_invalid_temperature_raises(bad):
    estimator = estimators.GumbelSoftmax(lambda step: 1.0 if step < 2 else bad)
    logits = _leaf(LOGITS4)
    elbo = storch.StorchELBO()
    elbo.differentiable_loss(_scg_onehot, None, logits, estimator)
    elbo.differentiable_loss(_scg_onehot, None, logits, estimator)
    with pytest.raises(ValueError, match="temperature"):
        elbo.differentiable_loss(_scg_onehot, None, logits, estimator)


# ==== 4. ELBO mode: a guide with Categorical latents, a model using them as one-hot =========
#
# Three well-separated clusters at -4, 0, 4; x_i ~ N(z_i . TABLE, 1), z_i ~ Cat(uniform).
# The best -ELBO (a one-hot q on the right cluster) is about 12.4.

TABLE = torch.tensor([-4.0, 0.0, 4.0])
X = torch.tensor([-4.2, 0.3, 3.8, -3.7, 4.4, -0.5])
TRUE_CLUSTER = torch.tensor([0, 1, 2, 0, 2, 1])


def mixture_model(x, record=None):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(logits=torch.zeros(3, dtype=x.dtype)))
        if record is not None:
            record["model_z"] = z
        pyro.sample("x", dist.Normal(z @ TABLE.to(x.dtype), 1.0), obs=x)


def mixture_guide(x, record=None):
    logits = pyro.param("q_logits", torch.zeros(len(x), 3, dtype=x.dtype))
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Categorical(logits=logits))


ELBO_ESTIMATORS = [
    pytest.param(lambda: estimators.GumbelSoftmax(0.5), 0.9, 14.0, id="gumbel-soft"),
    pytest.param(lambda: estimators.GumbelSoftmax(0.5, hard=True), 0.9, 14.0, id="gumbel-hard"),
    pytest.param(lambda: estimators.StraightThrough(), None, 20.0, id="straight-through"),
]


@pytest.mark.parametrize("make_estimator, min_prob, final_loss", ELBO_ESTIMATORS)
def test_svi_learns_clusters(make_estimator, min_prob, final_loss):
    # Measured (seeds 0-3), mean loss over the first / last 20 of 200 steps:
    #   soft GS(0.5): 33-36 -> 12.1-12.5, q(true cluster) >= 0.978
    #   hard GS(0.5): 50-54 -> 12.5-13.5, q(true cluster) >= 0.944
    #   StraightThrough: 37-54 -> 15.5-17.8, q(true cluster) >= 0.51 (slower; its argmax is
    #   right everywhere, which is what is asserted)
    svi = SVI(mixture_model, mixture_guide, pyro.optim.Adam({"lr": 0.1}), storch.StorchELBO())
    with handlers.estimator(config={"z": make_estimator()}):
        losses = [svi.step(X) for _ in range(200)]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.5 * first, (first, last)
    assert last < final_loss, last
    q = pyro.param("q_logits").detach().softmax(-1)
    assert torch.equal(q.argmax(-1), TRUE_CLUSTER), q
    if min_prob is not None:
        assert q[torch.arange(len(X)), TRUE_CLUSTER].min() > min_prob, q


@pytest.mark.parametrize(
    "make_estimator",
    [
        pytest.param(lambda: estimators.GumbelSoftmax(0.5), id="gumbel-soft"),
        pytest.param(lambda: estimators.GumbelSoftmax(0.5, hard=True), id="gumbel-hard"),
        pytest.param(lambda: estimators.StraightThrough(), id="straight-through"),
    ],
)
def test_log_densities_at_the_discrete_value(make_estimator):
    """The loss is log q(H(y)) - log p(H(y)) - log p(x | y) summed over the data, with the
    site's densities at the discrete H(y) and the likelihood computed (by the model) from
    the value y it received; its gradient is that of the same expression built by hand
    from y (which carries its graph to the logits): the site's log-densities are
    differentiated only through their parameters."""
    x = X.to(F64)
    logits = _leaf(
        [
            [0.5, -0.2, 0.1],
            [0.0, 0.3, -0.4],
            [1.0, 0.0, -1.0],
            [-0.3, 0.2, 0.4],
            [0.0, 0.0, 0.0],
            [0.7, 0.1, -0.6],
        ]
    )
    record = {}

    def guide(x, record):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Categorical(logits=logits))

    elbo = storch.StorchELBO()
    with handlers.estimator(config={"z": make_estimator()}):
        loss = elbo.differentiable_loss(mixture_model, guide, x, record)
    y = record["model_z"]
    assert y.shape == (6, 3) and y.requires_grad
    index = y.detach().argmax(-1)  # H(y), as an index
    log_q = dist.Categorical(logits=logits).log_prob(index)
    log_p = dist.Categorical(logits=torch.zeros(3, dtype=F64)).log_prob(index)
    log_lik = dist.Normal(y @ TABLE.to(F64), 1.0).log_prob(x)
    by_hand = (log_q - log_p - log_lik).sum()
    torch.testing.assert_close(loss.detach(), by_hand.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        flat_grad(loss, [logits], retain_graph=True),
        flat_grad(by_hand, [logits]),
        rtol=1e-10,
        atol=1e-10,
    )


# ==== 5. numerical robustness at extreme logits ==============================================

ROBUST_ESTIMATORS = [
    pytest.param(lambda: estimators.GumbelSoftmax(1.0), id="gumbel-soft-1"),
    pytest.param(lambda: estimators.GumbelSoftmax(0.1), id="gumbel-soft-0.1"),
    pytest.param(lambda: estimators.GumbelSoftmax(0.1, hard=True), id="gumbel-hard-0.1"),
    pytest.param(lambda: estimators.StraightThrough(), id="straight-through"),
]


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("make_estimator", ROBUST_ESTIMATORS)
def test_finite_at_extreme_logits(make_estimator, kind, dtype):
    """Logits +-30 (probabilities 1e-13 / 1e-26 apart): values, loss and gradients stay
    finite, pure SCG and ELBO mode (log q, log p at the discrete value)."""
    if kind == "bernoulli":
        init = [30.0, -30.0, 30.0, -30.0]
        prior = torch.tensor([-30.0, 30.0, 0.0, 0.0], dtype=dtype)
    else:
        init = [[30.0, -30.0, 0.0], [-30.0, -30.0, 30.0], [-30.0, 30.0, -30.0], [0.0, 0.0, -30.0]]
        prior = torch.tensor([[-30.0, 30.0, 0.0]] * 4, dtype=dtype)
    logits = _leaf(init, dtype)
    estimator = make_estimator()
    record = {}

    def use(z):
        if kind == "bernoulli":
            return z
        return (z * (torch.arange(3, dtype=dtype) - 1.0)).sum(-1)

    def scg():
        with pyro.plate("p", 4):
            z = storch.sample("z", discrete_fn(kind, logits), estimator=estimator)
            record["z"] = z
            storch.add_cost(
                "c", (use(z) - 0.4) ** 2 + torch.log1p(z.sum(-1) if kind != "bernoulli" else z)
            )

    def model():
        with pyro.plate("p", 4):
            z = pyro.sample("z", discrete_fn(kind, prior))
            pyro.sample("x", dist.Normal(use(z), 0.5), obs=torch.zeros(4, dtype=dtype))

    def guide():
        with pyro.plate("p", 4):
            record["z"] = pyro.sample("z", discrete_fn(kind, logits))

    for _ in range(10):
        for loss_fn in (
            lambda: storch.StorchELBO().differentiable_loss(scg, None),
            lambda: storch.StorchELBO().differentiable_loss(model, guide),
        ):
            with handlers.estimator(config={"z": estimator}):
                loss = loss_fn()
            (grad,) = torch.autograd.grad(loss, [logits])
            assert loss.dtype == dtype and grad.dtype == dtype
            assert torch.isfinite(record["z"]).all(), record["z"]
            assert torch.isfinite(loss), loss
            assert torch.isfinite(grad).all(), grad


# ==== 6. errors ==============================================================================


@pytest.mark.parametrize(
    "make_estimator",
    [
        pytest.param(lambda: estimators.GumbelSoftmax(0.5), id="gumbel-soft"),
        pytest.param(lambda: estimators.GumbelSoftmax(0.5, hard=True), id="gumbel-hard"),
        pytest.param(lambda: estimators.StraightThrough(), id="straight-through"),
    ],
)
@pytest.mark.parametrize("via", ["sample", "handler"])
def test_relaxation_on_normal_raises(make_estimator, via):
    estimator = make_estimator()

    def model():
        if via == "sample":
            e = storch.sample("gauss_site", dist.Normal(0.0, 1.0), estimator=estimator)
        else:
            e = pyro.sample("gauss_site", dist.Normal(0.0, 1.0))
        storch.add_cost("c", e**2)

    with handlers.estimator(config={"gauss_site": estimator} if via == "handler" else {}):
        with pytest.raises(UnsupportedDistributionError) as info:
            storch.StorchELBO().differentiable_loss(model, None)
    message = str(info.value)
    assert "gauss_site" in message
    assert "Normal" in message
    assert type(estimator).__name__ in message
    assert "Pathwise" in message  # an estimator that would work there


# ==== 7. guessed max_plate_nesting with one-hot-valued Categorical sites =====================


@pytest.mark.parametrize(
    "elbo_kwargs",
    [
        pytest.param({"num_particles": 3, "vectorize_particles": True}, id="guessed"),
        pytest.param(
            {"num_particles": 3, "vectorize_particles": True, "max_plate_nesting": 1},
            id="given",
        ),
    ],
)
@pytest.mark.parametrize(
    "make_estimator",
    [
        pytest.param(lambda: estimators.GumbelSoftmax(0.5), id="gumbel-soft"),
        pytest.param(lambda: estimators.StraightThrough(), id="straight-through"),
    ],
)
def test_vectorized_particles_with_relaxed_categorical(make_estimator, elbo_kwargs):
    """Vectorized particles need max_plate_nesting; when it is not given StorchELBO guesses
    it by running guide and model once. A model written for one-hot Categorical values
    (``z @ TABLE``, as the GumbelSoftmax docstring asks) must survive that (an earlier probe
    ran with plain Pyro semantics and handed it integer indices)."""
    elbo = storch.StorchELBO(**elbo_kwargs)
    with handlers.estimator(config={"z": make_estimator()}):
        loss = elbo.differentiable_loss(mixture_model, mixture_guide, X)
    (grad,) = torch.autograd.grad(loss, [pyro.param("q_logits").unconstrained()])
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_multi_sample_relaxed_categorical_with_guessed_plate_nesting():
    """The same probe, reached through a site with n_samples=2 (a sample dim is needed)."""
    logits = _leaf(CAT_LOGITS)

    def model():
        with pyro.plate("p", 4):
            z = storch.sample(
                "z",
                dist.Categorical(logits=logits),
                estimator=estimators.GumbelSoftmax(0.5, n_samples=2),
            )
            storch.add_cost("c", (z @ torch.arange(3, dtype=F64)) ** 2)

    loss = storch.StorchELBO().differentiable_loss(model, None)
    assert torch.isfinite(loss)


def test_plate_nesting_probe_leaves_the_temperature_schedule_alone():
    """The probe draws example values, not estimator samples: one loss evaluation with
    guessed nesting advances a temperature schedule by exactly one step."""
    estimator = estimators.GumbelSoftmax(lambda step: 1.0 / (1 + step))
    elbo = storch.StorchELBO(num_particles=3, vectorize_particles=True)
    with handlers.estimator(config={"z": estimator}):
        elbo.differentiable_loss(mixture_model, mixture_guide, X)
    assert elbo.max_plate_nesting == 2 and estimator.step == 1
