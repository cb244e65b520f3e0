"""Unbiasedness of StorchELBO's gradient estimators against EXACT gradients.

Project standard: the mean of ``n`` independent gradient estimates is compared with the exact
gradient (closed form, or enumeration of the whole discrete support), coordinate by
coordinate, and must lie within 4.5 standard errors of it (a false alarm rate of about 7e-6
per coordinate), under a fixed seed. Each test states its power: the standard error relative
to the gradient, i.e. the smallest bias it would reliably detect. Bounds are never loosened
to make a test pass.
"""

import itertools
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, TraceGraph_ELBO, config_enumerate

import storch_pyro as storch
from storch_pyro import baselines, estimators
from storch_pyro.diagnostics import GradientStats, flat_grad, gradient_stats
from tests.toys import TARGET, bernoulli_event_model, bernoulli_plate_model

Z_BOUND = 4.5




def assert_unbiased(stats: GradientStats, bound: float = Z_BOUND) -> None:
    """|mean - exact| < bound * s.e. per coordinate; where an estimate has zero variance
    (s.e. == 0) it must equal the exact value exactly."""
    exact_coords = stats.std_error == 0
    if exact_coords.any():
        assert torch.equal(stats.mean[exact_coords], stats.exact[exact_coords]), (
            f"zero-variance coordinates differ: mean {stats.mean[exact_coords].tolist()} "
            f"vs exact {stats.exact[exact_coords].tolist()}"
        )
    z = stats.z_scores[~exact_coords]
    assert z.abs().max() < bound, (
        f"biased: z-scores {stats.z_scores.tolist()}\nmean  {stats.mean.tolist()}\n"
        f"exact {stats.exact.tolist()}\ns.e.  {stats.std_error.tolist()}"
    )


def _leaf(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.get_default_dtype(), requires_grad=True)


def copies_stats(program, values, n, exact, *args, dim=-1) -> GradientStats:
    """:func:`gradient_stats` of ``n`` independent estimates of the gradient of
    ``program(*params, *args)`` at ``params = values``, drawn in one call: the program runs
    in ``plate("copies", n, dim=dim)`` (left of its own plates) with its own copy of each
    parameter per index, and the gradient w.r.t. copy ``i`` is one estimate (a site's terms
    only multiply the costs at its own plate index). The same estimates as ``n`` calls, for
    estimators without state carried from call to call."""
    params = [torch.tensor(v).expand((n,) + torch.tensor(v).shape).clone().requires_grad_()
              for v in values]

    def copies(*params_and_args):
        with pyro.plate("copies", n, dim=dim):
            program(*params_and_args)

    loss = storch.StorchELBO(max_plate_nesting=-dim).differentiable_loss(
        copies, None, *params, *args)
    grads = torch.autograd.grad(loss, params)
    samples = torch.cat([g.reshape(n, -1) for g in grads], 1)
    variance = samples.var(0)
    return GradientStats(samples.mean(0), variance, (variance / n).sqrt(), n, exact)


def stateful(estimator) -> bool:
    """Whether the estimator's baseline carries state from call to call (a moving
    average): its ``n`` estimates must come from ``n`` calls."""
    return isinstance(estimator.baseline, baselines.MovingAverage)


# ==== 1. the seed story: a pure stochastic computation graph ================================
#
#   d = a + b,  e ~ N(c + b, 1),  f = d e^2,   J(a, b, c) = E[f] = (a + b)((c + b)^2 + 1).
#
# With s = a + b, u = c + b:  dJ/da = u^2 + 1,  dJ/db = u^2 + 1 + 2 s u,  dJ/dc = 2 s u, and
#   H = [[0, 2u, 2u], [2u, 4u + 2s, 2u + 2s], [2u, 2u + 2s, 2s]].

A, B, C = 1.0, 0.5, 0.5  # s = 1.5, u = 1: gradient (2, 5, 3)


def story_gradient(a: float, b: float, c: float) -> torch.Tensor:
    s, u = a + b, c + b
    return torch.tensor([u * u + 1, u * u + 1 + 2 * s * u, 2 * s * u])


def story_hessian(a: float, b: float, c: float) -> torch.Tensor:
    s, u = a + b, c + b
    return torch.tensor(
        [[0.0, 2 * u, 2 * u], [2 * u, 4 * u + 2 * s, 2 * u + 2 * s], [2 * u, 2 * u + 2 * s, 2 * s]]
    )


def make_story(estimator):
    def story(a, b, c):
        d = a + b
        e = storch.sample("e", dist.Normal(c + b, 1.0), estimator=estimator)
        storch.add_cost("f", d * e**2)

    return story


class AffineOfArgs(torch.nn.Module):
    """A tiny learned baseline b(a, b, c) = w0 + w1 (a + b): a scalar, the site's batch
    shape (the story has no plates)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([2.0, 0.5]))

    def forward(self, a, b, c):
        return self.w[0] + self.w[1] * (a + b)


def _story_estimators():
    return [
        # exact gradient (2, 5, 3). Measured s.e. (a bias of 4.5 s.e. would fail):
        # Pathwise, n=5000: (0.035, 0.074, 0.043), i.e. 1.5% of dJ/db.
        pytest.param(lambda: estimators.Pathwise(), 5000, id="pathwise"),
        # ScoreFunction, no baseline, n=10000: (0.025, 0.11, 0.084): 2% of dJ/db, 3% of dJ/dc.
        pytest.param(lambda: estimators.ScoreFunction(), 10000, id="score"),
        # MovingAverage(0.9), n=10000: (0.025, 0.086, 0.065). Its first call (state unset)
        # uses b = 0, later calls the average of past costs.
        pytest.param(
            lambda: estimators.ScoreFunction(baseline=baselines.MovingAverage(0.9)),
            10000,
            id="score-moving-average",
        ),
        # RLOO with k=8, n=3000: (0.016, 0.055, 0.043).
        pytest.param(
            lambda: estimators.ScoreFunction(n_samples=8, baseline=baselines.LeaveOneOut()),
            3000,
            id="score-k8-leave-one-out",
        ),
        # NVIL-style learned baseline of the story's arguments (value 2.75, untrained),
        # n=10000: (0.025, 0.087, 0.066).
        pytest.param(
            lambda: estimators.ScoreFunction(baseline=baselines.Learned(AffineOfArgs())),
            10000,
            id="score-learned",
        ),
    ]


@pytest.mark.parametrize("make_estimator, n", _story_estimators())
def test_seed_story_unbiased(make_estimator, n):
    a, b, c = _leaf(A), _leaf(B), _leaf(C)
    estimator = make_estimator()
    story = make_story(estimator)
    if stateful(estimator):
        elbo = storch.StorchELBO()
        stats = gradient_stats(
            lambda: elbo.differentiable_loss(story, None, a, b, c),
            [a, b, c],
            n,
            exact=story_gradient(A, B, C),
        )
    else:  # n copies of the story in a plate, in one call
        stats = copies_stats(story, [A, B, C], n, story_gradient(A, B, C))
    assert_unbiased(stats)
    # the power claimed above: s.e. at most 2.5% of |dJ/db| = 5 for every case
    assert stats.std_error[1] < 0.125


def test_learned_baseline_output_is_used_and_trained():
    """The learned baseline's scalar output broadcasts to the (scalar) site and its params
    get the squared-error gradient 2 (b - D) * d b / d w, through a zero-valued term."""
    net = AffineOfArgs()
    a, b, c = _leaf(A), _leaf(B), _leaf(C)
    estimator = estimators.ScoreFunction(baseline=baselines.Learned(net))
    record = {}

    def story(a, b, c):
        e = storch.sample("e", dist.Normal(c + b, 1.0), estimator=estimator)
        record["cost"] = ((a + b) * e**2).detach()
        storch.add_cost("f", (a + b) * e**2)

    loss = storch.StorchELBO().differentiable_loss(story, None, a, b, c)
    # the value is the cost: the baseline terms have value zero
    assert loss.item() == pytest.approx(record["cost"].item(), rel=1e-6)
    (grad_w,) = torch.autograd.grad(loss, [net.w])
    baseline_value = net.w[0].detach() + net.w[1].detach() * (A + B)
    residual = 2 * (baseline_value - record["cost"])
    assert torch.allclose(grad_w, torch.stack([residual, residual * (A + B)]), rtol=1e-5)


# ==== 2. a Bernoulli toy: exact gradient by summing over all 8 outcomes ======================

PHI = [-0.5, 0.3, 1.0]


def bernoulli_exact(phi_values, target) -> torch.Tensor:
    """d/dphi sum_b q_phi(b) sum_i (b_i - t_i)^2 over the 8 outcomes of b in {0,1}^3."""
    phi = _leaf(phi_values)
    objective = 0.0
    for bits in itertools.product([0.0, 1.0], repeat=3):
        value = torch.tensor(bits)
        prob = dist.Bernoulli(logits=phi).log_prob(value).sum().exp()
        objective = objective + prob * ((value - target) ** 2).sum()
    (grad,) = torch.autograd.grad(objective, [phi])
    # the closed form: p (1 - p) ((1 - t)^2 - t^2) = p (1 - p) (1 - 2 t)
    p = torch.sigmoid(torch.tensor(phi_values))
    assert torch.allclose(grad, p * (1 - p) * (1 - 2 * target), atol=1e-6)
    return grad


@pytest.mark.parametrize(
    "model", [bernoulli_event_model, bernoulli_plate_model], ids=["to_event", "plate"]
)
@pytest.mark.parametrize(
    "make_estimator, n",
    [
        # exact gradient (0.235, -0.244, 0.079). Measured s.e. at n=10000: score <= 0.0074
        # (to_event) / 0.0030 (plate: per-element credit), moving average <= 0.0037; k=4
        # RLOO at n=3000 <= 0.0035. So a bias of 0.033 (14% of the largest coordinates)
        # would fail everywhere, and of 0.014 (6%) in the plate variants.
        pytest.param(lambda: estimators.ScoreFunction(), 10000, id="score"),
        pytest.param(
            lambda: estimators.ScoreFunction(baseline=baselines.MovingAverage(0.9)),
            10000,
            id="score-moving-average",
        ),
        pytest.param(
            lambda: estimators.ScoreFunction(n_samples=4, baseline=baselines.LeaveOneOut()),
            3000,
            id="score-k4-leave-one-out",
        ),
    ],
)
def test_bernoulli_toy_unbiased(model, make_estimator, n):
    phi = _leaf(PHI)
    estimator = make_estimator()
    exact = bernoulli_exact(PHI, TARGET)
    if stateful(estimator):
        elbo = storch.StorchELBO()
        stats = gradient_stats(
            lambda: elbo.differentiable_loss(model, None, phi, estimator), [phi], n, exact
        )
    else:  # n copies in a plate, in one call (left of the model's own plate, if any)
        dim = -2 if model is bernoulli_plate_model else -1
        stats = copies_stats(model, [PHI], n, exact, estimator, dim=dim)
    assert_unbiased(stats)
    assert stats.std_error.max() < 0.008  # the power claimed above


# ==== 3. ELBO mode: global + local discrete latents, plates, subsampling, scale, mask ========
#
# Exact gradient of the full-data -ELBO from TraceEnum_ELBO with every guide site enumerated
# (no subsampling), cross-checked against a hand-written enumeration. A subsampled plate
# scales its costs by N/B, which makes StorchELBO's estimate unbiased for that same full-data
# gradient (the expectation is also over the random subsample).

N_DATA = 4
X_DATA = torch.tensor([0.3, 2.4, -0.6, 1.9])
OBS_MASK = torch.tensor([True, False, True, True])
LIK_SCALE = 0.5


def elbo_params():
    return {
        # model
        "g_logit": _leaf(0.2),
        "z_prior": _leaf([-0.3, 1.0]),  # logits of z_i = z_prior[0] + z_prior[1] g
        "loc": _leaf([0.1, 1.5, -0.8]),  # x_i ~ N(loc[0] + loc[1] z_i + loc[2] g, 1)
        # guide
        "pg": _leaf(0.4),
        "lz": _leaf([0.5, -0.7, 0.2, 1.1]),
        "w": _leaf(-0.6),
    }


def make_model_guide(p, subsample_size=None, scale_mask=False):
    def model():
        g = pyro.sample("g", dist.Bernoulli(logits=p["g_logit"]))
        with pyro.plate("data", N_DATA, subsample_size=subsample_size, dim=-1) as idx:
            with poutine.scale(scale=LIK_SCALE if scale_mask else 1.0):
                z = pyro.sample("z", dist.Bernoulli(logits=p["z_prior"][0] + p["z_prior"][1] * g))
            loc = p["loc"][0] + p["loc"][1] * z + p["loc"][2] * g
            with poutine.mask(mask=OBS_MASK[idx] if scale_mask else True):
                pyro.sample("x", dist.Normal(loc, 1.0), obs=X_DATA[idx])

    def guide():
        g = pyro.sample("g", dist.Bernoulli(logits=p["pg"]))
        with pyro.plate("data", N_DATA, subsample_size=subsample_size, dim=-1) as idx:
            pyro.sample("z", dist.Bernoulli(logits=p["lz"][idx] + p["w"] * g))

    return model, guide


def manual_neg_elbo(p, scale_mask=False):
    """-ELBO by explicit enumeration: sum over g, and over each z_i given g."""
    total = 0.0
    lik_scale = LIK_SCALE if scale_mask else 1.0
    mask = OBS_MASK.to(X_DATA.dtype) if scale_mask else torch.ones(N_DATA)
    for g in (0.0, 1.0):
        g_t = torch.tensor(g)
        log_qg = dist.Bernoulli(logits=p["pg"]).log_prob(g_t)
        log_pg = dist.Bernoulli(logits=p["g_logit"]).log_prob(g_t)
        inner = log_pg - log_qg
        for z in (0.0, 1.0):
            z_t = torch.full((N_DATA,), z)
            log_qz = dist.Bernoulli(logits=p["lz"] + p["w"] * g).log_prob(z_t)
            log_pz = dist.Bernoulli(logits=p["z_prior"][0] + p["z_prior"][1] * g).log_prob(z_t)
            loc = p["loc"][0] + p["loc"][1] * z + p["loc"][2] * g
            log_px = dist.Normal(loc, 1.0).log_prob(X_DATA) * mask
            inner = inner + (log_qz.exp() * (lik_scale * log_pz + log_px - log_qz)).sum()
        total = total + log_qg.exp() * inner
    return -total


def exact_elbo_gradient(scale_mask):
    p = elbo_params()
    params = list(p.values())
    model, guide = make_model_guide(p, None, scale_mask)
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model, config_enumerate(guide))
    exact = flat_grad(loss, params)
    manual = flat_grad(manual_neg_elbo(p, scale_mask), params)
    assert torch.allclose(exact, manual, atol=1e-5), (exact, manual)
    return exact


@pytest.mark.parametrize(
    "elbo_kwargs, subsample_size, scale_mask, n",
    [
        # The exact gradient has norm 4.2 (scale_mask=False) / 1.5 (True), the largest
        # coordinates 2.6 / 0.87. Measured s.e. per coordinate: <= 0.087 everywhere; the
        # noisiest is always the guide's global logit pg (its score multiplies every cost),
        # then the model's z_prior. Elsewhere s.e. <= 0.065: a bias of 0.3 (about 10% of the
        # largest coordinate) would fail.
        pytest.param({}, None, False, 4000, id="full"),
        pytest.param({}, 2, False, 4000, id="subsample"),
        pytest.param({}, 2, True, 4000, id="subsample-scale-mask"),
        pytest.param(
            {"num_particles": 4, "vectorize_particles": True, "max_plate_nesting": 1},
            2,
            True,
            1500,
            id="subsample-4-vectorized-particles",
        ),
        pytest.param(
            {"num_particles": 4, "vectorize_particles": True},
            2,
            False,
            1500,
            id="subsample-4-vectorized-particles-guessed-nesting",
        ),
        pytest.param({"num_particles": 2}, 2, True, 2000, id="subsample-2-sequential-particles"),
        # a sample dim for g (k=3) and one for z nested inside it, with RLOO at both
        pytest.param(
            {
                "default_estimator": estimators.ScoreFunction(
                    n_samples=3, baseline=baselines.LeaveOneOut()
                ),
                "max_plate_nesting": 1,
            },
            2,
            True,
            1500,
            id="subsample-k3-leave-one-out",
        ),
        pytest.param(
            {"default_estimator": estimators.ScoreFunction(baseline=baselines.MovingAverage())},
            2,
            True,
            3000,
            id="subsample-moving-average",
        ),
    ],
)
def test_elbo_plates_subsampling_unbiased(elbo_kwargs, subsample_size, scale_mask, n):
    exact = exact_elbo_gradient(scale_mask)
    p = elbo_params()
    params = list(p.values())
    model, guide = make_model_guide(p, subsample_size, scale_mask)
    elbo = storch.StorchELBO(**elbo_kwargs)
    stats = gradient_stats(lambda: elbo.differentiable_loss(model, guide), params, n, exact)
    assert_unbiased(stats)
    # power: every coordinate's s.e. below 0.1 (the gradient's norm is 4.2)
    assert stats.std_error.max() < 0.1


# ==== 4. data-dependent control flow =========================================================
#
# Guide: z ~ Bernoulli(sigmoid(phi)); only if z == 1: y ~ N(mu, 1).
# Model: z ~ Bernoulli(0.4); if z == 1: y ~ N(0, 1), x ~ N(y, 1); else x ~ N(theta, 2).
# -ELBO in closed form (the y-expectation of Gaussians):
#   R1 = E_q[log N(y; 0, 1) + log N(x; y, 1) - log N(y; mu, 1)]
#      = -log(2 pi)/2 - (mu^2 + 1)/2 - ((x - mu)^2 + 1)/2 + 1/2
#   R0 = log N(x; theta, 2)
#   ELBO = q (log 0.4 - log q + R1) + (1 - q)(log 0.6 - log(1 - q) + R0),  q = sigmoid(phi).

X_CF = torch.tensor(2.0)
P_Z = 0.4
CF_PARAMS = {"phi": 0.3, "mu": 0.5, "theta": 1.0}


def cf_model(params):
    z = pyro.sample("z", dist.Bernoulli(torch.tensor(P_Z)))
    if z.item() == 1:
        y = pyro.sample("y", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(y, 1.0), obs=X_CF)
    else:
        pyro.sample("x", dist.Normal(params["theta"], 2.0), obs=X_CF)


def cf_guide(params):
    z = pyro.sample("z", dist.Bernoulli(logits=params["phi"]))
    if z.item() == 1:
        pyro.sample("y", dist.Normal(params["mu"], 1.0))


def cf_exact_gradient() -> torch.Tensor:
    p = {k: _leaf(v) for k, v in CF_PARAMS.items()}
    q = torch.sigmoid(p["phi"])
    mu = p["mu"]
    r1 = -0.5 * math.log(2 * math.pi) - 0.5 * (mu**2 + 1) - 0.5 * ((X_CF - mu) ** 2 + 1) + 0.5
    r0 = dist.Normal(p["theta"], 2.0).log_prob(X_CF)
    elbo = q * (math.log(P_Z) - torch.log(q) + r1) + (1 - q) * (
        math.log(1 - P_Z) - torch.log(1 - q) + r0
    )
    return flat_grad(-elbo, list(p.values()))


def test_control_flow_unbiased():
    # exact gradient (0.40, -0.57, -0.11); measured s.e. at n=8000 (0.018, 0.018, 0.0014):
    # a bias of 0.08 on dphi (20%) would fail (TraceGraph_ELBO's, below, is -0.23: its mean
    # dphi is 0.17, z = -339 at n=1000).
    # (The y-gradient uses Pathwise, by default.)
    exact = cf_exact_gradient()
    p = {k: _leaf(v) for k, v in CF_PARAMS.items()}
    elbo = storch.StorchELBO()
    stats = gradient_stats(
        lambda: elbo.differentiable_loss(cf_model, cf_guide, p), list(p.values()), 8000, exact
    )
    assert_unbiased(stats)
    assert stats.std_error[0] < 0.025


def test_control_flow_tracegraph_is_biased():
    """Informative: Pyro's TraceGraph_ELBO assigns credit by provenance tracking, and
    ``z.item()`` carries no provenance, so the costs of the branch z chose (x, y) are left out
    of z's score term: its dphi is biased. (Asserts the bias our test above would catch.)"""
    exact = cf_exact_gradient()
    p = {k: _leaf(v) for k, v in CF_PARAMS.items()}
    params = list(p.values())
    tracegraph = TraceGraph_ELBO()

    def tracegraph_grad():
        for param in params:
            param.grad = None
        tracegraph.loss_and_grads(cf_model, cf_guide, p)
        return torch.cat(
            [(torch.zeros_like(q) if q.grad is None else q.grad).reshape(-1) for q in params]
        )

    samples = torch.stack([tracegraph_grad() for _ in range(1000)])
    mean = samples.mean(0)
    std_error = (samples.var(0) / len(samples)).sqrt()
    stats = GradientStats(mean, samples.var(0), std_error, len(samples), exact)
    # the phi coordinate is off by many standard errors ...
    assert stats.z_scores[0].abs() > 10, stats.z_scores
    # ... while the pathwise mu gradient and the theta gradient, which need no credit
    # assignment, are right
    assert stats.z_scores[1:].abs().max() < Z_BOUND, stats.z_scores


# Discrete latent inside the branch: the guide's y (score function) exists only when z == 1.
# Guide: z ~ Bern(sigmoid(phi)); if z: y ~ Bern(sigmoid(psi)).
# Model: z ~ Bern(0.4); if z: y ~ Bern(0.7), x ~ N(2 y, 1); else x ~ N(theta, 2).

CF2_PARAMS = {"phi": -0.2, "psi": 0.4, "theta": -2.0}


def cf2_model(params):
    z = pyro.sample("z", dist.Bernoulli(torch.tensor(P_Z)))
    if z.item() == 1:
        y = pyro.sample("y", dist.Bernoulli(torch.tensor(0.7)))
        pyro.sample("x", dist.Normal(2.0 * y, 1.0), obs=X_CF)
    else:
        pyro.sample("x", dist.Normal(params["theta"], 2.0), obs=X_CF)


def cf2_guide(params):
    z = pyro.sample("z", dist.Bernoulli(logits=params["phi"]))
    if z.item() == 1:
        pyro.sample("y", dist.Bernoulli(logits=params["psi"]))


def cf2_exact_gradient() -> torch.Tensor:
    p = {k: _leaf(v) for k, v in CF2_PARAMS.items()}
    one, zero = torch.tensor(1.0), torch.tensor(0.0)
    qz = dist.Bernoulli(logits=p["phi"])
    qy = dist.Bernoulli(logits=p["psi"])
    branch1 = 0.0
    for y in (zero, one):
        log_term = (
            dist.Bernoulli(torch.tensor(0.7)).log_prob(y)
            + dist.Normal(2.0 * y, 1.0).log_prob(X_CF)
            - qy.log_prob(y)
        )
        branch1 = branch1 + qy.log_prob(y).exp() * log_term
    branch0 = dist.Normal(p["theta"], 2.0).log_prob(X_CF)
    elbo = qz.log_prob(one).exp() * (math.log(P_Z) - qz.log_prob(one) + branch1) + qz.log_prob(
        zero
    ).exp() * (math.log(1 - P_Z) - qz.log_prob(zero) + branch0)
    return flat_grad(-elbo, list(p.values()))


@pytest.mark.parametrize(
    "make_estimator",
    [
        pytest.param(lambda: None, id="default"),
        pytest.param(
            lambda: estimators.ScoreFunction(baseline=baselines.MovingAverage(0.8)),
            id="moving-average",
        ),
    ],
)
def test_control_flow_discrete_branch_unbiased(make_estimator):
    # exact gradient (-0.41, -0.26, -0.55); measured s.e. at n=8000 <= (0.021, 0.016, 0.006):
    # a bias of 0.095 on dphi (23%) or 0.07 on dpsi (27%) would fail.
    exact = cf2_exact_gradient()
    p = {k: _leaf(v) for k, v in CF2_PARAMS.items()}
    elbo = storch.StorchELBO(default_estimator=make_estimator())
    stats = gradient_stats(
        lambda: elbo.differentiable_loss(cf2_model, cf2_guide, p), list(p.values()), 8000, exact
    )
    assert_unbiased(stats)
    assert stats.std_error.max() < 0.025


# ==== 5. second order: the Hessian of the seed story ========================================


def hessian_stats(loss_fn, x: torch.Tensor, n: int, exact: torch.Tensor) -> GradientStats:
    """Statistics of n Hessian estimates: d/dx of (d loss / dx, with create_graph=True)."""
    samples = []
    for _ in range(n):
        loss = loss_fn()
        (grad,) = torch.autograd.grad(loss, [x], create_graph=True)
        rows = [
            flat_grad(grad[i], [x], retain_graph=True)
            if grad[i].requires_grad
            else torch.zeros(x.numel())
            for i in range(x.numel())
        ]
        samples.append(torch.cat(rows))
    samples = torch.stack(samples)
    variance = samples.var(0)
    return GradientStats(samples.mean(0), variance, (variance / n).sqrt(), n, exact.reshape(-1))


@pytest.mark.parametrize(
    "make_estimator, n",
    [
        # exact Hessian [[0, 2, 2], [2, 7, 5], [2, 5, 3]]. Measured per-entry s.e.: pathwise
        # (n=1000) <= 0.063 (H_cc = 2s exactly, zero variance); score (n=6000) <= 0.36 on
        # H_bb = 7 and <= 0.23 on H_cc = 3: a bias of 1.6 / 1.0 (23% / 35%) would fail,
        # while dropping DiCE's second-order score term E[(e - u)^2 s e^2] = s (u^2 + 3) = 6
        # (the Trace_ELBO mistake) would be off by 26 s.e.; k=4 RLOO (n=3000) <= 0.23;
        # moving average (n=6000) <= 0.32. H_aa is exactly 0 with zero variance for all of
        # them and is checked for equality.
        pytest.param(lambda: estimators.Pathwise(), 1000, id="pathwise"),
        pytest.param(lambda: estimators.ScoreFunction(), 6000, id="score"),
        pytest.param(
            lambda: estimators.ScoreFunction(n_samples=4, baseline=baselines.LeaveOneOut()),
            3000,
            id="score-k4-leave-one-out",
        ),
        pytest.param(
            lambda: estimators.ScoreFunction(baseline=baselines.MovingAverage()),
            6000,
            id="score-moving-average",
        ),
    ],
)
def test_seed_story_hessian_unbiased(make_estimator, n):
    x = _leaf([A, B, C])
    story = make_story(make_estimator())
    elbo = storch.StorchELBO()
    stats = hessian_stats(
        lambda: elbo.differentiable_loss(story, None, x[0], x[1], x[2]),
        x,
        n,
        story_hessian(A, B, C),
    )
    assert_unbiased(stats)
    assert stats.std_error[0] == 0  # H_aa: exactly zero in every estimate
    # symmetric estimates
    h = stats.mean.reshape(3, 3)
    assert torch.allclose(h, h.T, atol=1e-4)


# Second order on the Bernoulli toy: the exact Hessian of sum_i E[(b_i - t_i)^2] is diagonal,
# d^2/dphi_i^2 = p (1 - p) (1 - 2 p) (1 - 2 t_i). In the plate variant each element's score
# multiplies only its own cost, so the off-diagonal estimates are exactly zero, every draw.


def bernoulli_exact_hessian(phi_values, target) -> torch.Tensor:
    def objective(phi):
        total = 0.0
        for bits in itertools.product([0.0, 1.0], repeat=3):
            value = torch.tensor(bits)
            prob = dist.Bernoulli(logits=phi).log_prob(value).sum().exp()
            total = total + prob * ((value - target) ** 2).sum()
        return total

    enumerated = torch.autograd.functional.hessian(objective, torch.tensor(phi_values))
    p = torch.sigmoid(torch.tensor(phi_values))
    closed_form = torch.diag(p * (1 - p) * (1 - 2 * p) * (1 - 2 * target))
    assert torch.allclose(enumerated, closed_form, atol=1e-6)
    return closed_form


@pytest.mark.parametrize(
    "model", [bernoulli_event_model, bernoulli_plate_model], ids=["to_event", "plate"]
)
@pytest.mark.parametrize(
    "make_estimator, n",
    [
        # exact diagonal (0.058, 0.036, -0.036). Measured s.e.: score (n=4000) <= 0.0065
        # (to_event) / 0.0028 (plate); k=4 RLOO (n=2000) <= 0.0025 / 0.0012. So a bias of
        # 0.03 (50% of the largest entry) fails everywhere, of 0.013 (22%) in the plate
        # variant, whose off-diagonal estimates are exactly 0 (checked).
        pytest.param(lambda: estimators.ScoreFunction(), 4000, id="score"),
        pytest.param(
            lambda: estimators.ScoreFunction(n_samples=4, baseline=baselines.LeaveOneOut()),
            2000,
            id="score-k4-leave-one-out",
        ),
    ],
)
def test_bernoulli_toy_hessian_unbiased(model, make_estimator, n):
    phi = _leaf(PHI)
    estimator = make_estimator()
    elbo = storch.StorchELBO()
    stats = hessian_stats(
        lambda: elbo.differentiable_loss(model, None, phi, estimator),
        phi,
        n,
        bernoulli_exact_hessian(PHI, TARGET),
    )
    assert_unbiased(stats)
    if model is bernoulli_plate_model:
        off_diagonal = ~torch.eye(3, dtype=torch.bool).reshape(-1)
        assert (stats.std_error[off_diagonal] == 0).all()


# Second order in ELBO mode, with plates and subsampling: the Hessian of the full-data -ELBO
# w.r.t. x = (pg, w, lz[0]) (guide params: every entry needs score-function terms of
# second order: the global g's score squared, g's and z_0's scores crossed, ...), exact by
# differentiating the enumerated -ELBO twice.


def _elbo_params_of(x):
    p = elbo_params()
    p["pg"] = x[0]
    p["w"] = x[1]
    p["lz"] = torch.cat([x[2:3], p["lz"][1:].detach()])
    return p


X_ELBO = [0.4, -0.6, 0.5]


def exact_elbo_hessian(scale_mask):
    return torch.autograd.functional.hessian(
        lambda x: manual_neg_elbo(_elbo_params_of(x), scale_mask), torch.tensor(X_ELBO)
    )


@pytest.mark.parametrize(
    "elbo_kwargs, n",
    [
        # exact [[0.23, -0.25, -0.13], [-0.25, 0.53, 0.14], [-0.13, 0.14, 0.20]]; measured
        # s.e. <= 0.021 (score, n=3000) / 0.016 (k=3 RLOO, n=1500): a bias of 0.09 (17% of
        # the largest entry) would fail.
        pytest.param({}, 3000, id="score"),
        pytest.param(
            {
                "default_estimator": estimators.ScoreFunction(
                    n_samples=3, baseline=baselines.LeaveOneOut()
                ),
                "max_plate_nesting": 1,
            },
            1500,
            id="k3-leave-one-out",
        ),
    ],
)
def test_elbo_hessian_plates_subsampling_unbiased(elbo_kwargs, n):
    x = _leaf(X_ELBO)
    model, guide = make_model_guide(_elbo_params_of(x), 2, True)
    elbo = storch.StorchELBO(**elbo_kwargs)
    stats = hessian_stats(
        lambda: elbo.differentiable_loss(model, guide), x, n, exact_elbo_hessian(True)
    )
    assert_unbiased(stats)


# Second order with data-dependent control flow (the model of test_control_flow_unbiased):
# the Hessian of the closed-form -ELBO in (phi, mu, theta). The (mu, theta) entries are
# exactly zero, every draw (mu and theta live in different branches).


def cf_neg_elbo(x):
    q, mu = torch.sigmoid(x[0]), x[1]
    r1 = -0.5 * math.log(2 * math.pi) - 0.5 * (mu**2 + 1) - 0.5 * ((X_CF - mu) ** 2 + 1) + 0.5
    r0 = dist.Normal(x[2], 2.0).log_prob(X_CF)
    elbo = q * (math.log(P_Z) - torch.log(q) + r1) + (1 - q) * (
        math.log(1 - P_Z) - torch.log(1 - q) + r0
    )
    return -elbo


def test_control_flow_hessian_unbiased():
    x0 = [CF_PARAMS["phi"], CF_PARAMS["mu"], CF_PARAMS["theta"]]
    exact = torch.autograd.functional.hessian(cf_neg_elbo, torch.tensor(x0))
    # the first-order oracle agrees with the closed form used above
    grad = torch.autograd.functional.jacobian(cf_neg_elbo, torch.tensor(x0))
    assert torch.allclose(grad, cf_exact_gradient(), atol=1e-6)
    x = _leaf(x0)
    params = {"phi": x[0], "mu": x[1], "theta": x[2]}
    elbo = storch.StorchELBO()
    # exact [[0.18, -0.24, 0.06], [-0.24, 1.15, 0], [0.06, 0, 0.11]]; measured s.e. at
    # n=3000 <= 0.018 (a bias of 0.08 on H_mu,mu = 1.15, or of 0.025 on H_phi,phi, fails)
    stats = hessian_stats(
        lambda: elbo.differentiable_loss(cf_model, cf_guide, params), x, 3000, exact
    )
    assert_unbiased(stats)
    assert stats.std_error[5] == 0 and stats.std_error[7] == 0


# ==== 6. a pathwise site upstream of a score-function site ===================================
#
#   e ~ N(c, 1) (pathwise), z ~ Bernoulli(sigmoid(e + d)) (score function),
#   cost z e d + 0.3 e^2.
# z's score depends on c through e's reparameterized value, so the gradient needs both paths.
# Exact objective E_e[sigmoid(e + d) e d + 0.3 e^2] by 80-point Gauss-Hermite quadrature
# (float64; exact to far below the standard errors), differentiated with autograd.

V0 = [0.3, 1.2]


def _quadrature_objective(v):
    nodes, weights = np.polynomial.hermite.hermgauss(80)
    e = v[0] + math.sqrt(2.0) * torch.tensor(nodes, dtype=torch.float64)
    g = torch.sigmoid(e + v[1]) * e * v[1] + 0.3 * e**2
    return (torch.tensor(weights, dtype=torch.float64) * g).sum() / math.sqrt(math.pi)


def pathwise_then_score(v, estimator):
    e = storch.sample("e", dist.Normal(v[0], 1.0))
    z = storch.sample("z", dist.Bernoulli(logits=e + v[1]), estimator=estimator)
    storch.add_cost("c", z * e * v[1] + 0.3 * e**2)


@pytest.mark.parametrize(
    "make_estimator",
    [
        pytest.param(lambda: estimators.ScoreFunction(), id="score"),
        pytest.param(
            lambda: estimators.ScoreFunction(n_samples=4, baseline=baselines.LeaveOneOut()),
            id="score-k4-leave-one-out",
        ),
    ],
)
def test_pathwise_upstream_of_score_function_unbiased(make_estimator):
    v64 = torch.tensor(V0, dtype=torch.float64)
    exact_grad = torch.autograd.functional.jacobian(_quadrature_objective, v64).float()
    exact_hessian = torch.autograd.functional.hessian(_quadrature_objective, v64).float()
    v = _leaf(V0)
    estimator = make_estimator()
    elbo = storch.StorchELBO()

    def loss():
        return elbo.differentiable_loss(pathwise_then_score, None, v, estimator)

    # exact gradient (1.09, 0.36), Hessian [[0.92, 0.90], [0.90, -0.08]]. Measured s.e.:
    # gradient (n=3000) <= 0.02, Hessian (n=2000) <= 0.012: a bias of 0.09 (8% of dJ/dc) in
    # the gradient, of 0.055 in the Hessian, would fail.
    assert_unbiased(gradient_stats(loss, [v], 3000, exact_grad))
    assert_unbiased(hessian_stats(loss, v, 2000, exact_hessian))
