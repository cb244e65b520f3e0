"""A validated step is never drawn twice (issue: validation redraws biased the estimate).

StorchELBO validates the first step of each model structure. It used to discard an
unvalidated draw whose structure was new and draw the step again with validation, which
conditions the returned estimate on the structure: biased wherever the structure is random.
Now the returned draw itself is validated (after the fact), so the estimate has the same
distribution with validation on (the default), off, or on every step.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch

import storch_pyro as storch
from storch_pyro import baselines, estimators

MODES = ["default", "every_step", "off"]


def _rare_branch(t):
    z = storch.sample("z", dist.Bernoulli(logits=t))  # P(z = 1) = sigmoid(-2) = 0.119
    if z.item() == 1:
        storch.add_cost("rare", torch.tensor(10.0))
    storch.add_cost("c", t ** 2)


def _second_steps(mode: str, n: int):
    """The second ``differentiable_loss`` of a fresh StorchELBO, ``n`` times: in the default
    mode its structure is new whenever it differs from the first step's."""
    values, grads = [], []
    with pyro.validation_enabled(mode != "off"):
        for _ in range(n):
            t = torch.tensor(-2.0, requires_grad=True)
            elbo = storch.StorchELBO(validate_every_step=mode == "every_step")
            elbo.differentiable_loss(_rare_branch, None, t)
            loss = elbo.differentiable_loss(_rare_branch, None, t)
            (grad,) = torch.autograd.grad(loss, t)
            values.append(loss.detach())
            grads.append(grad)
    return torch.stack(values), torch.stack(grads)


def test_validation_modes_draw_the_same_steps():
    """Validation draws no random numbers and discards nothing: under one seed, the three
    modes return the very same estimates."""
    results = []
    for mode in MODES:
        pyro.set_rng_seed(1)
        results.append(_second_steps(mode, 300))
    for values, grads in results[1:]:
        assert torch.equal(values, results[0][0]) and torch.equal(grads, results[0][1])
    assert 0 < int((results[0][0] > 5).sum()) < 300  # both structures occurred


@pytest.mark.parametrize("mode", MODES)
def test_random_structure_is_unbiased_in_every_validation_mode(mode):
    """The issue's repro: E[loss] = 10 p + 4 and d/dt = 10 p (1 - p) - 4 with
    p = sigmoid(-2). Power: 4000 draws give standard errors of 0.051 on the value (10 z + 4)
    and 0.066 on the gradient ((z - p)(10 z + 4) - 4), so a bias of 0.23 / 0.30 fails, i.e.
    P(rare) off by 0.023 (a fifth of 0.119); the old redraw gave 0.041 (bias -0.78, z = -25).
    """
    n = 4000
    pyro.set_rng_seed(0)
    values, grads = _second_steps(mode, n)
    p = torch.sigmoid(torch.tensor(-2.0))
    for samples, exact in ((values, 10 * p + 4), (grads, 10 * p * (1 - p) - 4)):
        se = samples.std() / n ** 0.5
        assert se < 0.07
        assert abs(samples.mean() - exact) < 4.5 * se


N_ENVS, MAX_LEN = 5, 10


def _episodes(theta):
    """Five environments, each stepped until its Bernoulli 'done' fires (or MAX_LEN
    steps), one cost per step: the structure (the three episode lengths) is new on most
    steps of a training run."""
    for env in range(N_ENVS):
        for step in range(MAX_LEN):
            storch.add_cost(f"step_{env}_{step}", torch.tensor(1.0) + 0.0 * theta[env])
            done = storch.sample(f"done_{env}_{step}", dist.Bernoulli(logits=theta[env]))
            if done.item():
                break


def _expected_length(theta):
    """E[length] = sum_{t < MAX_LEN} (1 - p)^t per environment."""
    survive = 1 - torch.sigmoid(theta)
    steps = torch.arange(MAX_LEN, dtype=theta.dtype)
    return (survive.unsqueeze(-1) ** steps).sum()


def test_episodes_of_random_length_are_unbiased_with_default_settings():
    """One StorchELBO over many steps with default settings, as an RL loop runs it, where
    most steps (95 %) show a structure not seen before, each validated after the fact.
    Power: 800 draws give a standard error of 0.23 on the value (exact 20.3) and 0.05-0.19
    on the gradient coordinates (exact -2.2 to -2.5; the first environment's sites are
    credited with the later environments' costs), so a bias of 5 % of the value or 10-35 %
    of a gradient coordinate fails. (The old redraw is too weak a bias here to fail this
    test; the rare-branch test above is the one that catches it, at z = -25.)"""
    theta = torch.tensor([-1.5, -1.2, -1.0, -1.3, -1.1], requires_grad=True)
    baseline = estimators.ScoreFunction(baseline=baselines.MovingAverage())
    elbo = storch.StorchELBO(default_estimator=baseline)
    n, new = 800, 0
    values, grads = [], []
    for _ in range(n):
        before = len(elbo._validated_structures)
        loss = elbo.differentiable_loss(_episodes, None, theta)
        new += len(elbo._validated_structures) > before
        values.append(loss.detach())
        grads.append(torch.autograd.grad(loss, theta)[0])
    assert new > n / 2  # the structure was new on most steps
    exact_value = _expected_length(theta)
    (exact_grad,) = torch.autograd.grad(exact_value, theta)
    values, grads = torch.stack(values), torch.stack(grads)
    for samples, exact in ((values, exact_value.detach()), (grads, exact_grad)):
        se = samples.std(0) / n ** 0.5
        assert (abs(samples.mean(0) - exact) < 4.5 * se).all(), (samples.mean(0), exact, se)


@pytest.mark.parametrize("method", ["loss_and_grads", "loss"])
def test_data_outside_the_support_on_a_new_structure_is_still_caught(method):
    """A new structure's step is validated after the fact on its recorded values, also when
    an earlier call validated another structure: observed data outside the support raises,
    naming the site."""
    def model(flag):
        if flag:
            pyro.sample("x", dist.Bernoulli(0.3), obs=torch.tensor(2.0))
        else:
            pyro.sample("y", dist.Bernoulli(0.3), obs=torch.tensor(1.0))

    step = getattr(storch.StorchELBO(), method)
    step(model, None, False)
    step(model, None, False)
    with pytest.raises(ValueError, match="site 'x'.*support"):
        step(model, None, True)


def test_invalid_parameters_on_a_new_structure_are_still_caught():
    def model(flag):
        scale = torch.tensor(-1.0 if flag else 1.0)
        name = "bad" if flag else "good"
        pyro.sample(name, dist.Normal(0.0, scale), obs=torch.tensor(0.5))

    elbo = storch.StorchELBO()
    elbo.loss_and_grads(model, None, False)
    with pytest.raises(ValueError, match="site 'bad'.*scale.*GreaterThan"):
        elbo.loss_and_grads(model, None, True)


def test_duplicate_sites_on_a_new_structure_are_still_caught():
    def model(flag):
        pyro.sample("a", dist.Normal(0.0, 1.0), obs=torch.tensor(0.5))
        if flag:
            pyro.sample("a", dist.Normal(0.0, 1.0), obs=torch.tensor(0.5))

    elbo = storch.StorchELBO()
    elbo.loss_and_grads(model, None, False)
    with pytest.raises(RuntimeError, match="Multiple sample sites named 'a'"):
        elbo.loss_and_grads(model, None, True)


def _late_sample_dim(t):
    z = storch.sample("z", dist.Bernoulli(logits=t))  # P(z = 1) = sigmoid(0.5) = 0.62
    storch.add_cost("c", 4.0 * z)
    if z.item():
        w = storch.sample(
            "w", dist.Bernoulli(logits=t), estimator=estimators.ScoreFunction(n_samples=2)
        )
        storch.add_cost("w", 3.0 * w)


def test_first_draw_needing_a_sample_dim_is_not_discarded():
    """A fresh loss does not know where sample dims go until it has guessed
    max_plate_nesting; it used to abort a draw at its first multi-sample site and draw again,
    which made the first step of a loss see z = 1 with probability p^2 instead of p. The
    guess now comes first. E[loss] = 4 p + 3 p^2 and d/dt = (4 + 6 p) p (1 - p). Power: 2000
    fresh losses give standard errors of 0.066 (value) and 0.035 (gradient), so a bias of
    0.30 / 0.16 fails (a twelfth of each); the old abort gave a value bias of -1.33 (z = -25).
    """
    n = 2000
    values, grads = [], []
    for _ in range(n):
        t = torch.tensor(0.5, requires_grad=True)
        loss = storch.StorchELBO().differentiable_loss(_late_sample_dim, None, t)
        values.append(loss.detach())
        grads.append(torch.autograd.grad(loss, t)[0])
    p = torch.sigmoid(torch.tensor(0.5))
    for samples, exact in (
        (torch.stack(values), 4 * p + 3 * p ** 2),
        (torch.stack(grads), (4 + 6 * p) * p * (1 - p)),
    ):
        se = samples.std() / n ** 0.5
        assert abs(samples.mean() - exact) < 4.5 * se


def test_loss_validation_modes_draw_the_same_values():
    """``loss()`` validates as ``differentiable_loss`` does (a validated structure is not
    validated again): its repeated calls return the very same values in the three modes,
    both structures occurring among them."""
    results = []
    for mode in MODES:
        pyro.set_rng_seed(1)
        with pyro.validation_enabled(mode != "off"):
            elbo = storch.StorchELBO(validate_every_step=mode == "every_step")
            t = torch.tensor(-2.0)
            results.append(torch.tensor([elbo.loss(_rare_branch, None, t) for _ in range(200)]))
    for values in results[1:]:
        assert torch.equal(values, results[0])
    assert 0 < int((results[0] > 5).sum()) < 200
