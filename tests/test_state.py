"""Estimator and baseline state is explicit: read while the surrogate is built, committed
once per step after it (storch_pyro.state), so a step's statistics can be synchronized in
one place and a shared schedule counts training steps."""

import pyro
import pyro.distributions as dist
import torch

import storch_pyro as storch
from storch_pyro import baselines, estimators, state
from storch_pyro.param_state import param_store_state


def _three_relaxed_sites(logits, estimator):
    for name in ("a", "b", "c"):
        z = storch.sample(name, dist.Bernoulli(logits=logits), estimator=estimator)
        storch.add_cost(f"cost_{name}", (z - 0.3) ** 2)


def test_a_schedule_shared_by_sites_counts_training_steps():
    seen = []

    def schedule(step):
        seen.append(step)
        return 1.0

    shared = estimators.GumbelSoftmax(schedule, name="shared")
    logits = torch.tensor(0.2, requires_grad=True)
    elbo = storch.StorchELBO(max_plate_nesting=0)
    for _ in range(5):
        elbo.differentiable_loss(_three_relaxed_sites, None, logits, shared).backward()
    assert shared.step == 5  # not 15: one per step, not per site
    assert sorted(set(seen)) == [0, 1, 2, 3, 4]
    elbo.loss(_three_relaxed_sites, None, logits, shared)  # evaluating is not training
    assert shared.step == 5


def _two_sites_one_average(logits):
    for name in ("x", "y"):
        z = storch.sample(name, dist.Bernoulli(logits=logits))
        storch.add_cost(f"c_{name}", 2.0 * z)


def test_moving_average_reads_the_state_and_commits_once_per_step(monkeypatch):
    """Both particles of a step see the average of the steps before; the step's statistics
    (averaged over particles) update it once, through one commit per step."""
    commits = []
    real_commit = state.commit

    def counting_commit(updates, all_reduce=None):
        commits.append(updates.statistics())
        real_commit(updates, all_reduce)

    monkeypatch.setattr(state, "commit", counting_commit)
    baseline = baselines.MovingAverage(0.5)
    estimator = estimators.ScoreFunction(baseline=baseline)
    logits = torch.tensor(0.0, requires_grad=True)
    elbo = storch.StorchELBO(num_particles=2, default_estimator=estimator, max_plate_nesting=0)
    name = baselines.MovingAverage.param_name("x")
    expected = None
    for step in range(4):
        before = param_store_state(name)
        before = None if before is None else before.clone()
        elbo.differentiable_loss(_two_sites_one_average, None, logits)
        assert len(commits) == step + 1
        stats = commits[-1][name]
        expected = stats if expected is None else 0.5 * expected + 0.5 * stats
        torch.testing.assert_close(param_store_state(name), expected)
        if before is not None:
            assert not torch.equal(before, param_store_state(name)) or stats == before


def test_commit_passes_statistics_through_all_reduce():
    updates = state.StepUpdates()
    updates.record("s", torch.tensor(1.0), lambda old, stats: stats)
    updates.record("s", torch.tensor(3.0), lambda old, stats: stats)
    seen = {}

    def all_reduce(stats):
        seen.update(stats)
        return {name: value * 10 for name, value in stats.items()}

    state.commit(updates, all_reduce)
    assert seen == {"s": torch.tensor(2.0)}  # averaged over the step's records
    assert param_store_state("s") == 20.0
    pyro.clear_param_store()
