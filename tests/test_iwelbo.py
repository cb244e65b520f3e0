"""IWELBO (Burda et al. 2016) with VIMCO's leave-one-out baseline (Mnih & Rezende 2016):
the value is RenyiELBO(alpha=0)'s, the gradient is unbiased for the gradient of the K-sample
bound (exact enumeration over K-tuples; Gauss-Hermite quadrature for a mixed guide), the
baseline is stable in float32, and discrete guides learn where RenyiELBO(alpha=0) gives them
no gradient.

Unbiasedness tests draw many independent IWELBO estimates in one pass: every site lies in an
outer ``draws`` plate (shared by all sites, so IWELBO takes one bound per element) and every
element has its own copy of the parameters, so the gradient of element ``n``'s copy is the
``n``-th independent estimate.
"""

import itertools
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, RenyiELBO

import storch_pyro as storch
from storch_pyro import baselines, estimators
from storch_pyro.iwelbo import vimco_log_baselines, vimco_signals

X = 0.5  # the observation of the Bernoulli toy
PRIOR = 0.3  # p(z = 1)


def _toy(n, phi, theta):
    """Model p(z) = Bernoulli(0.3), p(x | z) = Normal(theta * z, 1), x = 0.5; guide
    q(z) = Bernoulli(sigmoid(phi)); ``n`` independent copies (one per draw)."""

    def model():
        with pyro.plate("draws", n):
            z = pyro.sample("z", dist.Bernoulli(torch.full((n,), PRIOR, dtype=phi.dtype)))
            pyro.sample("x", dist.Normal(theta * z, 1.0), obs=torch.full((n,), X, dtype=phi.dtype))

    def guide():
        with pyro.plate("draws", n):
            pyro.sample("z", dist.Bernoulli(logits=phi))

    return model, guide


def _exact_toy_bound(k, phi, theta):
    """The K-sample bound by enumeration over all K-tuples:
    sum_{z_1..z_K} prod_k q(z_k) log mean_k w(z_k)."""
    total = 0.0
    q = dist.Bernoulli(logits=phi)
    for zs in itertools.product([0.0, 1.0], repeat=k):
        z = torch.tensor(zs, dtype=phi.dtype)
        log_w = (
            dist.Bernoulli(torch.tensor(PRIOR, dtype=phi.dtype)).log_prob(z)
            + dist.Normal(theta * z, 1.0).log_prob(torch.tensor(X, dtype=phi.dtype))
            - q.log_prob(z)
        )
        total = total + q.log_prob(z).sum().exp() * (log_w.logsumexp(0) - math.log(k))
    return total


def _draw_gradients(loss, n, phi0, theta0):
    phi = torch.full((n,), phi0, dtype=torch.float64, requires_grad=True)
    theta = torch.full((n,), theta0, dtype=torch.float64, requires_grad=True)
    model, guide = _toy(n, phi, theta)
    surrogate = loss.differentiable_loss(model, guide)
    return torch.autograd.grad(surrogate, [phi, theta])


def _assert_unbiased(draws, exact, name):
    mean = draws.mean(0)
    se = draws.std(0) / math.sqrt(draws.size(0))
    assert torch.all((mean - exact).abs() < 4.5 * se), (name, mean, exact, se)


@pytest.mark.parametrize("k", [2, 5])
def test_value_equals_exact_expectation_and_renyi(k):
    phi, theta = torch.tensor(0.2, dtype=torch.float64), torch.tensor(1.5, dtype=torch.float64)
    model, guide = _toy(1, phi.expand(1), theta)
    pyro.set_rng_seed(3)
    ours = storch.IWELBO(num_particles=k, max_plate_nesting=1).loss(model, guide)
    pyro.set_rng_seed(3)
    renyi = RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
    assert ours == pytest.approx(renyi.loss(model, guide), rel=1e-12)
    # the mean of many draws is the exact bound
    n = 20000
    model, guide = _toy(n, phi.expand(n), theta)
    values = -storch.IWELBO(num_particles=k, max_plate_nesting=1).differentiable_loss(
        model, guide) / n
    exact = _exact_toy_bound(k, phi, theta)
    assert values.item() == pytest.approx(exact.item(), abs=0.02)


def test_value_equals_renyi_on_a_continuous_model():
    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(0.3)), 0.8))

    x = torch.tensor([0.1, -0.4, 1.2, 0.7])
    for k in (2, 5):
        pyro.set_rng_seed(0)
        ours = storch.IWELBO(num_particles=k).loss(model, guide, x)
        pyro.set_rng_seed(0)
        theirs = RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True).loss(
            model, guide, x)
        assert ours == pytest.approx(theirs, rel=1e-6)


@pytest.mark.parametrize("k", [2, 5])
def test_vimco_gradient_unbiased_against_enumeration(k):
    """Power (measured, seed 1): with n = 20000 draws the standard errors are 2.7e-3 (phi)
    and 2.9e-3 (theta) at K = 2, 1.5e-3 and 1.6e-3 at K = 5, against exact gradients of
    0.21 / 0.40 (K = 2) and 0.081 / 0.285 (K = 5): a bias above 1.3e-2 (K = 2) or 7e-3
    (K = 5) fails. Dropping the score term fails at 128 / 222 s.e.; a baseline that sees the
    particle's own weight (signal - 0.2 (log w_k - mean log w)) at 28 / 165 s.e."""
    pyro.set_rng_seed(1)
    n, phi0, theta0 = 20000, 0.2, 1.5
    grad_phi, grad_theta = _draw_gradients(storch.IWELBO(num_particles=k), n, phi0, theta0)
    phi = torch.tensor(phi0, dtype=torch.float64, requires_grad=True)
    theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    exact = torch.autograd.grad(-_exact_toy_bound(k, phi, theta), [phi, theta])
    draws = torch.stack([grad_phi, grad_theta], -1)
    _assert_unbiased(draws, torch.stack(exact), "toy")
    assert exact[0].abs() > 0.05  # the discrete site's gradient is not trivially zero


def test_vimco_baseline_matches_definition_and_float32():
    """Against the definition (float64, K = 5), and float32 against float64 on log weights
    spanning 1000 nats, where exponentiating would overflow/underflow."""
    log_w = torch.randn(7, 5, dtype=torch.float64) * 3
    expected = torch.empty_like(log_w)
    for k in range(5):
        others = torch.cat([log_w[:, :k], log_w[:, k + 1:]], 1)
        column = torch.cat([others, others.mean(1, keepdim=True)], 1)
        expected[:, k] = column.logsumexp(1) - math.log(5)
    assert torch.allclose(vimco_log_baselines(log_w, 1), expected, rtol=0, atol=1e-12)

    generator = torch.Generator().manual_seed(0)
    spans = torch.rand(200, 50, generator=generator) * 1000.0
    log_w32 = -200.0 - spans  # log weights in [-1200, -200]
    log_w32[:, 0] = -200.0 - 1000.0 * torch.rand(200, generator=generator)

    def assert_close(lw32):
        # signals reach ~1000, where float32's spacing is 6e-5: 1e-4 relative above 1
        s32, s64 = vimco_signals(lw32, 1), vimco_signals(lw32.double(), 1)
        assert torch.isfinite(s32).all()
        assert ((s32.double() - s64).abs() / s64.abs().clamp(min=1.0)).max() < 1e-4
        reference = lw32.double().logsumexp(1, keepdim=True) - math.log(lw32.size(1))
        assert torch.allclose(s64, reference - vimco_log_baselines(lw32.double(), 1))

    assert_close(log_w32)
    for k in (2, 3):
        assert_close(log_w32[:, :k].contiguous())
    naive = log_w32.exp()  # what a linear-space computation would see: all zero
    assert (naive == 0).all()


def _mixed(n, phi, mu, a, x):
    """Guide: z ~ Bernoulli(sigmoid(phi)) (score function), y ~ Normal(mu + a z, 0.7)
    (pathwise). Model: z ~ Bernoulli(0.4), y ~ Normal(z, 1), x ~ Normal(y, 1)."""

    def model():
        with pyro.plate("draws", n):
            z = pyro.sample("z", dist.Bernoulli(torch.full((n,), 0.4, dtype=phi.dtype)))
            y = pyro.sample("y", dist.Normal(z, 1.0))
            pyro.sample("x", dist.Normal(y, 1.0), obs=torch.full((n,), x, dtype=phi.dtype))

    def guide():
        with pyro.plate("draws", n):
            z = pyro.sample("z", dist.Bernoulli(logits=phi))
            pyro.sample("y", dist.Normal(mu + a * z, 0.7))

    return model, guide


def _mixed_bound_quadrature(phi, mu, a, x, nodes=48):
    """The K = 2 bound by enumeration over (z_1, z_2) and 2-D Gauss-Hermite quadrature over
    the guide's Normal noise (y_k = mu + a z_k + 0.7 eps_k), differentiable in the
    parameters."""
    points, weights = np.polynomial.hermite_e.hermegauss(nodes)
    eps = torch.tensor(points)
    weights = torch.tensor(weights) / math.sqrt(2 * math.pi)
    e1, e2 = torch.meshgrid(eps, eps, indexing="ij")
    w12 = weights[:, None] * weights[None, :]
    q = dist.Bernoulli(logits=phi)
    total = 0.0
    for z1, z2 in itertools.product([0.0, 1.0], repeat=2):
        log_ws = []
        for z, e in ((z1, e1), (z2, e2)):
            z = torch.tensor(z, dtype=torch.float64)
            y = mu + a * z + 0.7 * e
            log_ws.append(
                dist.Bernoulli(torch.tensor(0.4, dtype=torch.float64)).log_prob(z)
                + dist.Normal(z, 1.0).log_prob(y) + dist.Normal(y, 1.0).log_prob(
                    torch.tensor(x, dtype=torch.float64))
                - q.log_prob(z) - dist.Normal(mu + a * z, 0.7).log_prob(y)
            )
        bound = torch.stack(log_ws).logsumexp(0) - math.log(2)
        prob = (q.log_prob(torch.tensor(z1, dtype=torch.float64))
                + q.log_prob(torch.tensor(z2, dtype=torch.float64))).exp()
        total = total + prob * (w12 * bound).sum()
    return total


def test_mixed_discrete_continuous_guide_unbiased():
    """Score-function z with VIMCO, pathwise y (its parameters mu and a get IWAE's
    reparameterized gradient), K = 2, against enumeration + 48x48-point Gauss-Hermite
    quadrature (smooth integrand: 40 and 48 nodes agree to 1e-9). Power (measured, seed 2):
    n = 20000 draws give standard errors 2.4e-3 (phi), 7.3e-3 (mu), 5.0e-3 (a) on
    gradients -0.028, -0.223, -0.026: a bias above 1.1e-2 / 3.3e-2 / 2.2e-2 fails."""
    pyro.set_rng_seed(2)
    n, x = 20000, 1.1
    values = dict(phi=-0.3, mu=0.2, a=0.8)
    params = {k: torch.full((n,), v, dtype=torch.float64, requires_grad=True)
              for k, v in values.items()}
    model, guide = _mixed(n, params["phi"], params["mu"], params["a"], x)
    surrogate = storch.IWELBO(num_particles=2).differentiable_loss(model, guide)
    draws = torch.stack(torch.autograd.grad(surrogate, list(params.values())), -1)
    scalars = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
               for k, v in values.items()}
    bound = _mixed_bound_quadrature(scalars["phi"], scalars["mu"], scalars["a"], x)
    exact = torch.stack(torch.autograd.grad(-bound, list(scalars.values())))
    coarse = _mixed_bound_quadrature(scalars["phi"], scalars["mu"], scalars["a"], x, 40)
    assert abs(float((coarse - bound).detach())) < 1e-9
    _assert_unbiased(draws, exact, "mixed")


def _coin(n_obs=4):
    data = torch.full((n_obs,), 3.0)

    def model():
        z = pyro.sample("z", dist.Bernoulli(0.5))
        with pyro.plate("data", n_obs):
            pyro.sample("x", dist.Normal(3.0 * z, 1.0), obs=data)

    def guide():
        pyro.sample("z", dist.Bernoulli(logits=pyro.param("phi", torch.tensor(-3.0))))

    return model, guide


def test_svi_learns_a_discrete_guide_where_renyi_does_not():
    model, guide = _coin()
    # RenyiELBO(alpha=0): the discrete guide parameter gets no gradient
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    RenyiELBO(alpha=0, num_particles=5, vectorize_particles=True).loss_and_grads(model, guide)
    phi = pyro.param("phi").unconstrained()
    assert phi.grad is None or float(phi.grad.abs()) == 0.0
    # IWELBO: SVI moves phi from -3 towards the posterior (z = 1) and the loss falls
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), loss=storch.IWELBO(num_particles=5))
    losses = [svi.step() for _ in range(150)]
    assert pyro.param("phi").item() > 0.0
    assert np.mean(losses[-30:]) < np.mean(losses[:30]) - 1.0
    # under RenyiELBO(alpha=0) it never moves
    pyro.clear_param_store()
    renyi = SVI(model, guide, pyro.optim.Adam({"lr": 0.1}),
                loss=RenyiELBO(alpha=0, num_particles=5, vectorize_particles=True))
    for _ in range(20):
        renyi.step()
    assert pyro.param("phi").item() == -3.0


def test_estimator_choice_and_explicit_vimco():
    """A reparameterizable site given ScoreFunction is drawn without a gradient path and gets
    the VIMCO score term; an explicit VIMCO() is accepted; the default estimator applies."""

    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(0.0, 1.0), obs=torch.tensor(0.3))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.5))
        storch.sample("z", dist.Normal(loc, 1.0), estimator=estimators.ScoreFunction(),
                      baseline=baselines.VIMCO())

    pyro.clear_param_store()
    loss = storch.IWELBO(num_particles=4).differentiable_loss(model, guide)
    (grad,) = torch.autograd.grad(loss, [pyro.param("loc").unconstrained()])
    assert torch.isfinite(grad)
    loss = storch.IWELBO(num_particles=4, default_estimator=estimators.ScoreFunction())
    assert math.isfinite(loss.loss_and_grads(model, guide))


@pytest.mark.parametrize("k", [2, 5])
def test_second_derivative_unbiased_against_enumeration(k):
    """The Loaded-DiCE surrogate's second derivatives (d2/dphi2 and d2/dphi dtheta, per
    draw) against the exact bound's Hessian. Power (measured, seed 4): n = 20000 draws give
    standard errors 8.1e-3 / 3.4e-3 (K = 2) and 2.0e-2 / 4.0e-3 (K = 5) on second
    derivatives 0.22 / 0.19 and 0.10 / 0.066: a bias above 3.6e-2 / 1.5e-2 (K = 2) or
    9e-2 / 1.8e-2 (K = 5) fails. A first-order-only surrogate (signal x score term alone)
    fails at K = 2 by 0.58 (over 70 s.e.)."""
    pyro.set_rng_seed(4)
    n, phi0, theta0 = 20000, 0.2, 1.5
    phi = torch.full((n,), phi0, dtype=torch.float64, requires_grad=True)
    theta = torch.full((n,), theta0, dtype=torch.float64, requires_grad=True)
    model, guide = _toy(n, phi, theta)
    surrogate = storch.IWELBO(num_particles=k).differentiable_loss(model, guide)
    (grad_phi,) = torch.autograd.grad(surrogate, [phi], create_graph=True)
    draws = torch.stack(torch.autograd.grad(grad_phi.sum(), [phi, theta]), -1)
    scalar_phi = torch.tensor(phi0, dtype=torch.float64, requires_grad=True)
    scalar_theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    (exact_phi,) = torch.autograd.grad(
        -_exact_toy_bound(k, scalar_phi, scalar_theta), [scalar_phi], create_graph=True)
    exact = torch.stack(torch.autograd.grad(exact_phi, [scalar_phi, scalar_theta]))
    _assert_unbiased(draws, exact, "hessian")


def _normal_bound_quadrature(loc, nodes):
    """The K = 3 bound of the Normal toy below by 3-D Gauss-Hermite quadrature over the
    guide's noise (z_k = loc + 0.9 eps_k), differentiable in ``loc``."""
    points, weights = np.polynomial.hermite_e.hermegauss(nodes)
    eps = torch.tensor(points)
    weights = torch.tensor(weights) / math.sqrt(2 * math.pi)
    grids = torch.meshgrid(eps, eps, eps, indexing="ij")
    weight = weights[:, None, None] * weights[None, :, None] * weights[None, None, :]
    log_ws = []
    for e in grids:
        z = loc + 0.9 * e
        log_ws.append(dist.Normal(0.0, 1.0).log_prob(z)
                      + dist.Normal(z, 1.0).log_prob(torch.tensor(0.3, dtype=torch.float64))
                      - dist.Normal(loc, 0.9).log_prob(z))
    return (weight * (torch.stack(log_ws).logsumexp(0) - math.log(3))).sum()


def test_score_function_on_a_reparameterizable_site_unbiased():
    """A Normal guide site given ScoreFunction (drawn without a gradient path, VIMCO) and the
    same site pathwise (IWAE), K = 3, against 3-D Gauss-Hermite quadrature (30 and 36 nodes
    agree to 1e-10). Power (measured, seed 5): n = 50000 draws give standard errors of
    3.0e-3 (score function) and 4.1e-3 (pathwise) on a gradient of 0.158: a bias above
    1.4e-2 / 1.8e-2 fails."""
    pyro.set_rng_seed(5)
    n = 50000

    def gradients(estimator):
        loc = torch.full((n,), 0.5, dtype=torch.float64, requires_grad=True)

        def model():
            with pyro.plate("draws", n):
                z = pyro.sample("z", dist.Normal(torch.zeros(n, dtype=torch.float64), 1.0))
                pyro.sample("x", dist.Normal(z, 1.0), obs=torch.full((n,), 0.3,
                                                                     dtype=torch.float64))

        def guide():
            with pyro.plate("draws", n):
                storch.sample("z", dist.Normal(loc, 0.9), estimator=estimator)

        (grad,) = torch.autograd.grad(
            storch.IWELBO(num_particles=3).differentiable_loss(model, guide), [loc])
        return grad

    loc = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    (exact,) = torch.autograd.grad(-_normal_bound_quadrature(loc, 36), [loc])
    coarse = _normal_bound_quadrature(loc, 30) - _normal_bound_quadrature(loc, 36)
    assert abs(float(coarse.detach())) < 1e-10
    for estimator in (estimators.ScoreFunction(), estimators.Pathwise()):
        draws = gradients(estimator)[:, None]
        _assert_unbiased(draws, exact[None], repr(estimator))


def test_value_equals_renyi_with_scale_mask_and_subsampling():
    data = torch.tensor([0.3, -1.0, 2.0, 0.5, 1.5, -0.2])

    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 6, subsample_size=3) as index, pyro.poutine.scale(scale=0.5):
            with pyro.poutine.mask(mask=index % 2 == 0):
                pyro.sample("x", dist.Normal(z, 1.0), obs=data[index])

    def guide():
        pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(0.2)), 0.7))

    pyro.set_rng_seed(6)
    ours = storch.IWELBO(num_particles=4).loss(model, guide)
    pyro.set_rng_seed(6)
    theirs = RenyiELBO(alpha=0, num_particles=4, vectorize_particles=True).loss(model, guide)
    assert ours == pytest.approx(theirs, rel=1e-6)
