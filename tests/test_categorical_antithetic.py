"""ARM and DisARM for Categorical sites through the stick-breaking binary representation
(Dong, Mnih & Tucker 2021): the representation itself, unbiasedness against exact
enumeration (pure SCG and ELBO with plates and subsampling), values, the measured variance
ordering, extreme logits, and errors for what stays unsupported.

The SCG statistics draw their ``n`` estimates in one call, as ``n`` copies of the program
in a plate (:func:`copies_stats`), with the same ``n`` and powers as ``n`` calls had."""

import pyro
import pyro.distributions as dist
import pytest
import torch

import storch_pyro as storch
from storch_pyro import baselines, estimators, handlers
from storch_pyro.diagnostics import GradientStats, flat_grad, gradient_stats
from storch_pyro.errors import UnsupportedDistributionError
from storch_pyro.estimators.antithetic import _first_one, stick_breaking_logits
from tests.test_enumeration import (
    F64,
    _leaf,
    assert_unbiased,
    elbo_copies_stats,
    elbo_params,
    exact_elbo,
    make_model_guide,
)

LOGITS = [[0.3, -1.0, 2.0, 0.1], [1.0, 0.0, -1.0, 0.5]]
W = torch.tensor([0.5, -1.0, 2.0, 0.3], dtype=F64)


def cost(z):
    """A nonlinear cost of the category index."""
    return (W[z] - 0.2) ** 2 + torch.sin(3 * W[z])


def test_stick_breaking_representation_has_the_categorical_distribution():
    # 200k draws per plate index: s.e. of each frequency <= 0.0011, so a probability off by
    # 0.005 would fail.
    torch.manual_seed(0)
    logits = torch.tensor(LOGITS, dtype=F64)
    bits = torch.bernoulli(torch.sigmoid(stick_breaking_logits(logits)).expand(200_000, 2, 3))
    z = _first_one(bits)
    frequency = torch.stack([(z == k).to(F64).mean(0) for k in range(4)], -1)
    probs = logits.softmax(-1)
    standard_error = (probs * (1 - probs) / 200_000).sqrt()
    assert ((frequency - probs).abs() / standard_error).max() < 4.5


def test_stick_breaking_logits_at_extremes_are_finite():
    inf = float("inf")
    logits = torch.tensor([[30.0, -30.0, 0.0], [0.0, -inf, -inf], [0.0, -inf, 0.0]], dtype=F64,
                          requires_grad=True)
    stick = stick_breaking_logits(logits)
    (grad,) = torch.autograd.grad(stick.sum(), [logits])
    assert torch.isfinite(stick).all() and torch.isfinite(grad).all()
    assert stick[1, 0] > 50  # nothing left after category 0: stop there
    assert stick[2, 1] < -50  # category 1 is impossible: never stop there


def scg_model(logits, estimator, onehot):
    with pyro.plate("p", 2):
        if onehot:
            y = storch.sample("z", dist.OneHotCategorical(logits=logits), estimator=estimator)
            z = y.argmax(-1)
        else:
            z = storch.sample("z", dist.Categorical(logits=logits), estimator=estimator)
        storch.add_cost("c", cost(z))


def copies_stats(model, values, n, exact, *args, elbo=None) -> GradientStats:
    """The statistics of ``n`` independent gradient estimates of ``model(logits, *args)`` at
    ``logits = values`` (a plate of 2 at dim -1 inside ``model``), drawn at once: the model
    runs in ``plate("copies", n, dim=-2)`` with its own copy of the logits per index, and
    the gradient w.r.t. copy ``i`` is one estimate (a site's terms only multiply the costs
    at its own plate index). The same estimates as ``n`` calls, in one vectorized call."""
    logits = torch.tensor(values, dtype=F64).expand(n, *torch.tensor(values).shape)
    logits = logits.clone().requires_grad_()

    def copies(logits, *args):
        with pyro.plate("copies", n, dim=-2):
            model(logits, *args)

    elbo = elbo or storch.StorchELBO(max_plate_nesting=2)
    (grads,) = torch.autograd.grad(elbo.differentiable_loss(copies, None, logits, *args),
                                   [logits])
    samples = grads.reshape(n, -1)
    variance = samples.var(0)
    return GradientStats(samples.mean(0), variance, (variance / n).sqrt(), n, exact)


def scg_stats(estimator, onehot, n):
    logits = _leaf(LOGITS)
    exact = flat_grad((logits.softmax(-1) * cost(torch.arange(4))).sum(), [logits])
    return copies_stats(scg_model, LOGITS, n, exact, estimator, onehot)


@pytest.mark.parametrize("onehot", [False, True], ids=["categorical", "onehot"])
@pytest.mark.parametrize(
    "make_estimator, max_se",
    [
        # exact gradient: 8 coordinates, largest |.| 0.67. Measured s.e. at n=3000 (seeds
        # 1-2): <= 0.0085 (DisARM), 0.011 (ARM), 0.0060 (DisARM, 2 pairs): a bias of 0.04 /
        # 0.05 / 0.03 (6% / 7% / 4% of the largest coordinate) would fail.
        pytest.param(lambda: estimators.DisARM(), 0.011, id="disarm"),
        pytest.param(lambda: estimators.ARM(), 0.013, id="arm"),
        pytest.param(lambda: estimators.DisARM(n_samples=2), 0.0075, id="disarm-2-pairs"),
        # categories reordered by their logits before stick-breaking: s.e. <= 0.0086
        # (DisARM, ascending), 0.0103 (ARM, descending), the same power.
        pytest.param(lambda: estimators.DisARM(order="ascending"), 0.011, id="disarm-ascending"),
        pytest.param(lambda: estimators.ARM(order="descending"), 0.013, id="arm-descending"),
    ],
)
def test_scg_unbiased(make_estimator, max_se, onehot):
    stats = scg_stats(make_estimator(), onehot, 3000)
    assert_unbiased(stats)
    assert stats.std_error.max() < max_se  # the power claimed above


def test_values_are_pairs_of_categories_on_a_sample_dim():
    seen = {}

    def model():
        with pyro.plate("p", 5):
            z = storch.sample("z", dist.Categorical(logits=torch.zeros(5, 4)),
                              estimator=estimators.DisARM(n_samples=3))
            y = storch.sample("y", dist.OneHotCategorical(logits=torch.zeros(5, 4)),
                              estimator=estimators.ARM())
            seen["z"], seen["y"] = z, y
            storch.add_cost("c", z.float() + y[..., 0])

    storch.StorchELBO(max_plate_nesting=1).differentiable_loss(model, None)
    z, y = seen["z"], seen["y"]
    assert z.shape == (6, 5) and z.dtype == torch.long and ((z >= 0) & (z < 4)).all()
    assert y.shape == (2, 1, 5, 4) and (y.sum(-1) == 1).all()


@pytest.mark.parametrize(
    "subsample_size, max_se",
    [
        # ELBO of test_enumeration (global Categorical g, local Categoricals z_i | g in a
        # plate of 4), DisARM at both: 45 coordinates, norm 3.8, largest 2.5. Measured s.e.
        # at n=2000 (seeds 1-2) <= 0.034 (full), 0.053 (subsampled 2 of 4): a bias of 0.15
        # / 0.24 (6% / 10% of the largest coordinate) would fail.
        pytest.param(None, 0.038, id="full"),
        pytest.param(2, 0.058, id="subsampled"),
    ],
)
def test_elbo_unbiased(subsample_size, max_se):
    config = {"g": estimators.DisARM(), "z": estimators.DisARM()}
    if subsample_size is None:  # n copies in a plate, one call
        stats = elbo_copies_stats(config, 2000)
    else:
        _, exact_grad = exact_elbo()
        p = elbo_params()
        model, guide = make_model_guide(p, subsample_size)
        elbo = storch.StorchELBO()
        with handlers.estimator(config=config):
            stats = gradient_stats(lambda: elbo.differentiable_loss(model, guide),
                                   list(p.values()), 2000, exact_grad)
    assert_unbiased(stats)
    assert stats.std_error.max() < max_se


def test_variance_ordering_on_the_toy():
    # Total variance of one estimate (2 evaluations each), n=3000 copies in a plate, seed 0:
    # DisARM 0.70, ARM 1.10, ScoreFunction(2, LeaveOneOut) 0.80 (one call per estimate, as
    # before: 0.66-0.68, 1.02-1.04, 0.79 over seeds 0-2). Asserted: DisARM
    # below ARM and below RLOO with a margin for the ~4% noise of each estimate.
    variance = {}
    for name, estimator in [
        ("disarm", estimators.DisARM()),
        ("arm", estimators.ARM()),
        ("rloo", estimators.ScoreFunction(2, baseline=baselines.LeaveOneOut())),
    ]:
        pyro.set_rng_seed(0)
        variance[name] = scg_stats(estimator, False, 3000).total_variance
    assert variance["disarm"] < 0.8 * variance["arm"], variance
    assert variance["disarm"] < 0.95 * variance["rloo"], variance


def test_ascending_order_lowers_the_variance_on_a_peaked_categorical():
    # Two Categorical(10) with spread logits (probabilities 0.0005-0.41), n=3000: total
    # variance DisARM given order 1.07-1.08, ascending 0.61-0.64 (0.57-0.59 x), descending
    # 1.96-2.02 (seeds 0-2). Asserted: ascending below 0.75 x given, descending above it.
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 10, dtype=F64, generator=generator) * 2).tolist()
    w = torch.randn(10, dtype=F64, generator=generator)

    def model(logits, estimator):
        with pyro.plate("p", 2):
            z = storch.sample("z", dist.Categorical(logits=logits), estimator=estimator)
            storch.add_cost("c", (w[z] - 0.2) ** 2 + torch.sin(3 * w[z]))

    variance = {}
    for order in ("given", "ascending", "descending"):
        pyro.set_rng_seed(0)
        estimator = estimators.DisARM(order=order)
        variance[order] = copies_stats(model, logits, 3000, None, estimator).total_variance
    assert variance["ascending"] < 0.75 * variance["given"] < variance["descending"], variance


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_extreme_logits_give_finite_gradients(dtype):
    logits = torch.tensor([[30.0, -30.0, 0.0], [-30.0, -30.0, 30.0]], dtype=dtype,
                          requires_grad=True)

    def model():
        with pyro.plate("p", 2):
            z = storch.sample("z", dist.Categorical(logits=logits),
                              estimator=estimators.DisARM())
            storch.add_cost("c", z.to(dtype) ** 2)

    for _ in range(20):
        loss = storch.StorchELBO().differentiable_loss(model, None)
        (grad,) = torch.autograd.grad(loss, [logits])
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


#: Three latents of 4 categories under .to_event(1), coupled by a nonlinear joint cost.
EVENT_LOGITS = [[0.3, -1.0, 2.0, 0.1], [1.0, 0.0, -1.0, 0.5], [-0.5, 0.4, 0.0, 1.2]]


def joint_cost(z):
    """A nonlinear cost of the vector of 3 category indices (last dim)."""
    w = W[z]
    return (w.sum(-1) - 0.5) ** 2 + torch.sin(w[..., 0] * w[..., 2])


def event_exact_gradient(logits):
    """d E[joint_cost] / d logits by enumerating the 4^3 configurations."""
    grid = torch.cartesian_prod(*[torch.arange(4)] * 3)  # [64, 3]
    log_pi = logits.log_softmax(-1)  # [..., 3, 4]
    log_p = log_pi[..., torch.arange(3), grid].sum(-1)  # [..., 64]
    return flat_grad((log_p.exp() * joint_cost(grid)).sum(), [logits])


def event_model(logits, estimator, onehot):
    """A plate of 2 around a .to_event(1) site of 3 latents (logits [2, 3, 4])."""
    with pyro.plate("p", 2):
        if onehot:
            y = storch.sample("z", dist.OneHotCategorical(logits=logits).to_event(1),
                              estimator=estimator)
            z = y.argmax(-1)
        else:
            z = storch.sample("z", dist.Categorical(logits=logits).to_event(1),
                              estimator=estimator)
        storch.add_cost("c", joint_cost(z))


@pytest.mark.parametrize("onehot", [False, True], ids=["categorical", "onehot"])
@pytest.mark.parametrize("make_estimator, max_se", [
    pytest.param(lambda: estimators.DisARM(n_samples=4), 0.019, id="disarm"),
    pytest.param(lambda: estimators.ARM(n_samples=4), 0.024, id="arm"),
    pytest.param(lambda: estimators.DisARM(n_samples=4, order="ascending"), 0.019,
                 id="disarm-ascending"),
])
def test_unbiased_with_to_event(make_estimator, max_se, onehot):
    """Each latent's K - 1 stick-breaking coordinates estimated jointly with the other
    latents' (f sees the whole vector). Exact gradient: 24 coordinates, largest |.| 1.10.
    Measured s.e. at n=6000 with 4 pairs per draw (seeds 1-2): <= 0.017 (DisARM), 0.022
    (ARM), so a bias of 0.08 / 0.10 (7% / 9% of the largest coordinate) would fail."""
    values = [EVENT_LOGITS, EVENT_LOGITS[::-1]]
    stats = copies_stats(event_model, values, 6000, event_exact_gradient(_leaf(values)),
                         make_estimator(), onehot)
    assert_unbiased(stats)
    assert stats.std_error.max() < max_se  # the power claimed above


@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_reordered_draws_have_the_categorical_distribution(order):
    # 100k pairs, both members counted (each is marginally pi): s.e. of each frequency
    # <= 0.0011, so a probability off by 0.005 would fail.
    torch.manual_seed(0)
    logits = torch.tensor(LOGITS, dtype=F64)
    fn = dist.Categorical(logits=logits)
    site = estimators.Site("z", fn, sample_dim=-2)  # the pairs' dim left of the batch dim
    z = estimators.DisARM(n_samples=100_000, order=order).draw(site).value
    assert z.shape == (200_000, 2)
    frequency = torch.stack([(z == k).to(F64).mean(0) for k in range(4)], -1)
    probs = logits.softmax(-1)
    standard_error = (probs * (1 - probs) / 100_000).sqrt()  # members of a pair correlate
    assert ((frequency - probs).abs() / standard_error).max() < 4.5


def test_order_is_checked():
    with pytest.raises(ValueError, match="order must be one of"):
        estimators.DisARM(order="random")
    assert repr(estimators.ARM(order="descending")) == "ARM(n_samples=1, order='descending')"


def test_to_event_values_have_the_site_shape():
    seen = {}

    def model():
        with pyro.plate("p", 5):
            z = storch.sample("z", dist.Categorical(logits=torch.zeros(5, 3, 4)).to_event(1),
                              estimator=estimators.DisARM(n_samples=2))
            y = storch.sample("y", dist.OneHotCategorical(logits=torch.zeros(3, 4))
                              .expand([5, 3]).to_event(1), estimator=estimators.ARM())
            seen["z"], seen["y"] = z, y
            storch.add_cost("c", z.float().sum(-1) + y[..., 0].sum(-1))

    storch.StorchELBO(max_plate_nesting=1).differentiable_loss(model, None)
    z, y = seen["z"], seen["y"]
    assert z.shape == (4, 5, 3) and ((z >= 0) & (z < 4)).all()
    assert y.shape == (2, 1, 5, 3, 4) and (y.sum(-1) == 1).all()


@pytest.mark.parametrize(
    "fn, name",
    [
        pytest.param(dist.Poisson(3.0), "Poisson", id="poisson"),
        pytest.param(dist.Normal(0.0, 1.0).expand([2]).to_event(1), "Normal", id="normal"),
    ],
)
def test_still_unsupported(fn, name):
    def model():
        z = storch.sample("site_q", fn, estimator=estimators.DisARM())
        storch.add_cost("c", z.float().sum())

    with pytest.raises(UnsupportedDistributionError) as info:
        storch.StorchELBO().differentiable_loss(model, None)
    message = str(info.value)
    assert "'site_q'" in message and name in message and "ScoreFunction" in message
