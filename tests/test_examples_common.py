"""``examples/_common.py`` says which estimators take a baseline as the loss decides it."""

import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

import storch_pyro as storch
from storch_pyro import baselines, estimators, handlers
from storch_pyro.errors import StorchError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import _common  # noqa: E402


class _Identity(torch.nn.Module):
    """A control variate for RELAX and LAX: the value itself, one number per sample."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z


def _estimators():
    """Every registered estimator the examples can build, and RELAX/LAX with a network."""
    made = []
    for name in sorted(_common.registered_estimators()):
        try:
            made.append(_common.make_estimator(name, 2))
        except TypeError:  # a required argument (the control-variate network)
            pass
    return made + [estimators.RELAX(_Identity()), estimators.LAX(_Identity())]


def _loss_accepts_a_named_baseline(estimator: estimators.Estimator) -> bool:
    """Whether the loss applies a baseline named for the site (else it raises)."""
    bernoulli = estimator.supports(dist.Bernoulli(logits=torch.zeros(2)))

    def story(theta):
        with pyro.plate("p", 2):
            fn = dist.Bernoulli(logits=theta) if bernoulli else dist.Normal(theta, 1.0)
            z = storch.sample("z", fn, estimator=estimator)
            storch.add_cost("c", (z - 0.3) ** 2)

    try:
        with handlers.baseline(config={"z": baselines.MovingAverage()}):
            storch.StorchELBO(max_plate_nesting=1).differentiable_loss(
                story, None, torch.zeros(2, requires_grad=True))
    except StorchError as error:
        assert "a baseline was given" in str(error), error
        return False
    return True


@pytest.mark.parametrize("estimator", _estimators(), ids=repr)
def test_takes_baseline_agrees_with_the_loss(estimator):
    if not _common._accepts(estimator, dist.Bernoulli(logits=torch.zeros(2))) and not \
            _common._accepts(estimator, dist.Normal(torch.zeros(2), 1.0)):
        assert not _common.takes_baseline(estimator)  # a sequence estimator
        return
    assert _common.takes_baseline(estimator) == _loss_accepts_a_named_baseline(estimator)


def test_takes_baseline_has_no_side_effects():
    """The probe draw leaves RNGs, the param store and the estimator as they were (REBAR
    registers parameters when it draws; GumbelSoftmax names its schedule after a site)."""
    estimator = estimators.GumbelSoftmax(temperature=lambda step: 1.0)
    pyro.set_rng_seed(0)
    expected = torch.rand(3)
    pyro.set_rng_seed(0)
    assert _common.takes_baseline(estimators.REBAR())
    assert not _common.takes_baseline(estimator)
    assert torch.equal(torch.rand(3), expected)
    assert list(pyro.get_param_store().keys()) == []
    assert estimator.name is None
