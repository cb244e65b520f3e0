"""Training script for the checkpoint/resume test (``tests/test_checkpoint.py``).

``python -m tests.checkpoint_run full STEPS SAVE_AT DIR`` trains ``STEPS`` SVI steps from a
fixed seed, writes a checkpoint after ``SAVE_AT`` of them (param store, optimizer state, RNG
state) and the final param store at the end; ``python -m tests.checkpoint_run resume STEPS
SAVE_AT DIR`` starts a fresh process from that checkpoint and trains the remaining steps.
The guide uses every kind of estimator state: a moving-average baseline, a learned
baseline network, Pyro's decaying-average annotation, a GumbelSoftmax temperature
schedule, and RELAX's control-variate network with its REBAR term's eta and temperature.
"""

import math
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI
from pyro.util import get_rng_state, set_rng_state

import storch_pyro as storch
from storch_pyro import baselines, estimators

DATA = torch.tensor([0.4, -1.1, 2.3, 0.7])
LOCS = torch.tensor([-1.0, 0.5, 2.0])


class Pointwise(torch.nn.Module):
    """A control variate for a Bernoulli in a plate: one value per element."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(1, 1)

    def forward(self, z):
        return self.linear(z.unsqueeze(-1)).squeeze(-1)


def build():
    """The model, guide and optimizer; built after seeding, identically in every process."""
    net = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Flatten(0))
    learned = baselines.Learned(net, input_fn=lambda x: x.unsqueeze(-1))
    gumbel = estimators.GumbelSoftmax(lambda step: max(0.3, 2.0 * math.exp(-0.2 * step)))
    moving = estimators.ScoreFunction(baseline=baselines.MovingAverage(0.8))
    relax = estimators.RELAX(Pointwise(), rebar_term=True)

    def model(x):
        with pyro.plate("data", len(x)):
            b = pyro.sample("b", dist.Bernoulli(0.3))
            k = pyro.sample("k", dist.OneHotCategorical(torch.ones(3) / 3))
            c = pyro.sample("c", dist.Bernoulli(0.6))
            d = pyro.sample("d", dist.Bernoulli(0.5))
            e = pyro.sample("e", dist.Bernoulli(0.4))
            pyro.sample("x", dist.Normal(b + k @ LOCS + c - d + e, 1.0), obs=x)

    def guide(x):
        b_logits = pyro.param("b_logits", torch.zeros(len(x)))
        k_logits = pyro.param("k_logits", torch.zeros(len(x), 3))
        c_logits = pyro.param("c_logits", torch.zeros(len(x)))
        d_logits = pyro.param("d_logits", torch.zeros(len(x)))
        e_logits = pyro.param("e_logits", torch.zeros(len(x)))
        with pyro.plate("data", len(x)):
            storch.sample("b", dist.Bernoulli(logits=b_logits), estimator=moving)
            storch.sample("k", dist.OneHotCategorical(logits=k_logits), estimator=gumbel)
            pyro.sample(
                "c",
                dist.Bernoulli(logits=c_logits),
                infer={"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": 0.7}},
            )
            storch.sample(
                "d",
                dist.Bernoulli(logits=d_logits),
                estimator=estimators.ScoreFunction(),
                baseline=learned,
            )
            storch.sample("e", dist.Bernoulli(logits=e_logits), estimator=relax)

    optimizer = pyro.optim.Adam({"lr": 0.05})
    return model, guide, optimizer


def main(mode: str, steps: int, save_at: int, directory: Path) -> None:
    torch.set_num_threads(1)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, guide, optimizer = build()
    # max_plate_nesting given: a guess would run the model once more in the resumed process
    svi = SVI(model, guide, optimizer, storch.StorchELBO(max_plate_nesting=1))
    start = 0
    if mode == "resume":
        pyro.get_param_store().load(directory / "params.pt")
        optimizer.load(str(directory / "optim.pt"))
        set_rng_state(torch.load(directory / "rng.pt", weights_only=False))
        start = save_at
    for step in range(start, steps):
        if mode == "full" and step == save_at:
            pyro.get_param_store().save(directory / "params.pt")
            optimizer.save(str(directory / "optim.pt"))
            torch.save(get_rng_state(), directory / "rng.pt")
        svi.step(DATA)
    pyro.get_param_store().save(directory / f"final_{mode}.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
