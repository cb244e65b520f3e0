"""Checkpoint and resume: every piece of estimator state lives in Pyro's param store, so
train N steps, save, load in a fresh process and continue gives exactly the parameters
(and estimator state) of an uninterrupted run with the same seed."""

import os
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

import storch_pyro as storch
from storch_pyro import baselines, estimators, handlers
from tests import checkpoint_run

ROOT = Path(__file__).resolve().parent.parent
STEPS, SAVE_AT = 12, 5


def _run(mode: str, directory: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(
        [sys.executable, "-m", "tests.checkpoint_run", mode, str(STEPS), str(SAVE_AT),
         str(directory)],
        cwd=ROOT, env=env, check=True, timeout=300, capture_output=True,
    )


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False)["params"]


def test_resume_in_fresh_process_gives_the_uninterrupted_run(tmp_path):
    checkpoint_run.main("full", STEPS, SAVE_AT, tmp_path)  # uninterrupted, in this process
    _run("resume", tmp_path)  # from the checkpoint, in a fresh one
    full, resumed = _load(tmp_path / "final_full.pt"), _load(tmp_path / "final_resume.pt")
    saved = _load(tmp_path / "params.pt")
    expected_state = {
        "storch_pyro.baseline.b.moving_average",
        "__baseline_avg_downstream_cost_c",
        "storch_pyro.baseline.d$$$0.weight",
        "storch_pyro.estimator.k.step",
        "storch_pyro.relax.e$$$linear.weight",
        "storch_pyro.relax.e.eta",
        "storch_pyro.relax.e.temperature",
    }
    assert expected_state <= set(full), sorted(full)
    assert set(resumed) == set(full)
    for name, value in full.items():
        assert torch.equal(resumed[name], value), name
        # and training changed it after the checkpoint (the test would be vacuous otherwise)
        assert not torch.equal(saved[name], value), name
    assert full["storch_pyro.estimator.k.step"].item() == STEPS


def test_schedule_step_saved_and_loaded_with_the_param_store(tmp_path):
    estimator = estimators.GumbelSoftmax(lambda step: 1.0 / (1.0 + step))

    def model():
        logits = pyro.param("logits", torch.zeros(3))
        z = storch.sample("z", dist.OneHotCategorical(logits=logits), estimator=estimator)
        storch.add_cost("c", z[..., 0])

    elbo = storch.StorchELBO()
    for _ in range(3):
        elbo.differentiable_loss(model, None)
    assert estimator.step == 3
    pyro.get_param_store().save(tmp_path / "store.pt")
    pyro.clear_param_store()
    assert estimator.step == 0  # a cleared store restarts the schedule
    pyro.get_param_store().load(tmp_path / "store.pt")
    assert estimator.step == 3
    fresh = estimators.GumbelSoftmax(estimator.temperature, name="storch_pyro.estimator.z")
    assert fresh.step == 3 and fresh.current_temperature() == 0.25


def test_learned_baseline_computes_with_loaded_parameters(tmp_path):
    """After ``param_store.load`` a fresh network must use (and train) the loaded values,
    not its own initial ones (``pyro.module`` without ``update_module_params`` would not)."""
    x = torch.tensor([0.5, -1.0])

    def model(x, baseline):
        with pyro.plate("data", 2):
            b = storch.sample(
                "b",
                dist.Bernoulli(logits=pyro.param("logits", torch.zeros(2))),
                estimator=estimators.ScoreFunction(),
                baseline=baseline,
            )
            storch.add_cost("c", (b - x) ** 2)

    def net():
        return torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Flatten(0))

    trained = net()
    with torch.no_grad():
        trained[0].weight.fill_(3.0)
    first = baselines.Learned(trained, input_fn=lambda x, _: x.unsqueeze(-1), name="nvil")
    storch.StorchELBO().differentiable_loss(model, None, x, first)
    pyro.get_param_store().save(tmp_path / "store.pt")
    pyro.clear_param_store()
    pyro.get_param_store().load(tmp_path / "store.pt")
    fresh = net()
    second = baselines.Learned(fresh, input_fn=lambda x, _: x.unsqueeze(-1), name="nvil")
    loss = storch.StorchELBO().differentiable_loss(model, None, x, second)
    assert float(fresh[0].weight.detach()) == 3.0
    loss.backward()
    assert pyro.param("nvil$$$0.weight").grad is not None


# ---- no estimator keeps training state outside the param store ---------------------------


def _bernoulli_site(estimator):
    def model(x):
        logits = pyro.param("logits", torch.zeros(2))
        with pyro.plate("data", 2):
            b = storch.sample("b", dist.Bernoulli(logits=logits), estimator=estimator)
            storch.add_cost("c", (b - x) ** 2)

    return model


def _onehot_site(estimator):
    def model(x):
        logits = pyro.param("logits", torch.zeros(2, 3))
        with pyro.plate("data", 2):
            z = storch.sample("z", dist.OneHotCategorical(logits=logits), estimator=estimator)
            storch.add_cost("c", (z[..., 0] - x) ** 2)

    return model


def _sequence(estimator):
    """Estimators that work over sequences only (:func:`storch_pyro.handlers.sequence`)."""

    def model(x):
        logits = pyro.param("logits", torch.zeros(2, 3))
        with pyro.plate("data", 2):
            with handlers.sequence("y", estimator=estimator) as seq:
                state = torch.zeros(2, 3)
                for t in pyro.markov(range(2)):
                    tok = storch.sample(f"tok_{t}", dist.Categorical(logits=state + logits))
                    state = seq.reorder(state) + torch.nn.functional.one_hot(tok, 3)
            storch.add_cost("c", (seq.values()[..., 0] - x) ** 2)

    return model


def _normal_site(estimator):
    def model(x):
        loc = pyro.param("loc", torch.zeros(2))
        with pyro.plate("data", 2):
            z = storch.sample("z", dist.Normal(loc, 1.0), estimator=estimator)
            storch.add_cost("c", (z - x) ** 2)

    return model


def _learned_score_function():
    net = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Flatten(0))
    return estimators.ScoreFunction(
        baseline=baselines.Learned(net, input_fn=lambda x: x.unsqueeze(-1))
    )


#: class name -> [(estimator factory, model factory)]: every registered estimator, with each
#: kind of state it can carry. A new estimator must be added here (the test says so).
TRAINED_ESTIMATORS = {
    "Pathwise": [(estimators.Pathwise, _normal_site)],
    "ScoreFunction": [
        (lambda: estimators.ScoreFunction(baseline=baselines.MovingAverage(0.5)), _bernoulli_site),
        (_learned_score_function, _bernoulli_site),
        (lambda: estimators.ScoreFunction(3, baseline=baselines.LeaveOneOut()), _onehot_site),
    ],
    "ARM": [(estimators.ARM, _bernoulli_site)],
    "DisARM": [(estimators.DisARM, _bernoulli_site)],
    "Enumerate": [(estimators.Enumerate, _onehot_site)],
    "SumAndSample": [(lambda: estimators.SumAndSample(2), _onehot_site)],
    "GumbelSoftmax": [
        (lambda: estimators.GumbelSoftmax(lambda step: 1.0 / (1.0 + step)), _onehot_site)
    ],
    "StraightThrough": [(estimators.StraightThrough, _bernoulli_site)],
    "GumbelRao": [(lambda: estimators.GumbelRao(0.5, 3), _onehot_site)],
    "MeasureValued": [(estimators.MeasureValued, _normal_site),
                      (estimators.MeasureValued, _onehot_site)],
    "UnorderedSet": [(lambda: estimators.UnorderedSet(2), _onehot_site),
                     (lambda: estimators.UnorderedSet(2), _sequence)],
    "ImportanceWeightedSet": [(lambda: estimators.ImportanceWeightedSet(2), _sequence)],
    "REBAR": [(estimators.REBAR, _bernoulli_site)],
    "RELAX": [(lambda: estimators.RELAX(checkpoint_run.Pointwise(), rebar_term=True),
               _bernoulli_site)],
    "LAX": [(lambda: estimators.LAX(checkpoint_run.Pointwise()), _normal_site)],
}


def _reachable(obj, path="", seen=None):
    """(path, value) of every tensor, and every plain attribute, reachable from ``obj``."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, torch.nn.Module):
        for name, tensor in list(obj.named_parameters()) + list(obj.named_buffers()):
            yield f"{path}.{name}", tensor
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from _reachable(item, f"{path}[{i}]", seen)
    elif isinstance(obj, dict):
        for key, item in obj.items():
            yield from _reachable(item, f"{path}[{key!r}]", seen)
    elif type(obj).__module__.startswith("storch_pyro") and hasattr(obj, "__dict__"):
        # estimators, baselines and their helpers (e.g. a control-variate network holder)
        for name, item in vars(obj).items():
            if isinstance(item, (int, float, str, bool, type(None))):
                yield f"{path}.{name}", item
            else:
                yield from _reachable(item, f"{path}.{name}", seen)


def _snapshot(estimator):
    return {
        path: (value, value.detach().clone()) if isinstance(value, torch.Tensor) else value
        for path, value in _reachable(estimator, type(estimator).__name__)
    }


@pytest.mark.parametrize("name", sorted(c.__name__ for c in estimators.Estimator.registry))
def test_estimator_training_state_lives_in_the_param_store(name):
    """After the first step (which names and registers state), a training step changes no
    attribute of the estimator (or its baseline) and no tensor it holds, except tensors that
    are param-store entries: so ``param_store.save/load`` checkpoints all of its state."""
    if name not in TRAINED_ESTIMATORS:
        pytest.fail(
            f"{name} is a registered estimator without an entry in TRAINED_ESTIMATORS: add "
            f"one, and keep its training state in the param store (see "
            f"storch_pyro.param_state) so that checkpoints restore it"
        )
    x = torch.tensor([0.0, 1.0])
    for make_estimator, make_model in TRAINED_ESTIMATORS[name]:
        pyro.clear_param_store()
        estimator = make_estimator()
        model = make_model(estimator)
        svi = pyro.infer.SVI(model, None, pyro.optim.Adam({"lr": 0.1}), storch.StorchELBO())
        svi.step(x)
        before = _snapshot(estimator)
        svi.step(x)
        after = _snapshot(estimator)
        stored = [id(t) for t in pyro.get_param_store()._params.values()]
        assert set(after) == set(before), (name, set(after) ^ set(before))
        for path, old in before.items():
            new = after[path]
            if isinstance(old, tuple):
                tensor, value = old
                changed = not torch.equal(new[1], value) or new[0] is not tensor
                assert not changed or id(new[0]) in stored, f"{path} changed outside the store"
            else:
                assert new == old, f"{path} changed from {old!r} to {new!r}"
